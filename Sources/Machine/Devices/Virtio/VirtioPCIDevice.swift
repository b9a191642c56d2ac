import CKVM
import Foundation
import HostOS
import KVM
import Synchronization

/// Constants of the virtio 1.x PCI transport (virtio 1.2 §4.1) and of Ferry's BAR layout.
public enum VirtioPCI {
    public static let vendor: UInt16 = 0x1AF4
    /// "No interrupt" in every MSI-X vector field.
    public static let noVector: UInt16 = 0xFFFF

    // device_status bits (§2.1)
    static let acknowledge: UInt8 = 1, driver: UInt8 = 2, driverOK: UInt8 = 4, featuresOK: UInt8 = 8
    static let needsReset: UInt8 = 0x40, failed: UInt8 = 0x80

    // Transport feature bits (§6)
    static let indirectDescriptors: UInt64 = 1 << 28
    static let eventIndex: UInt64 = 1 << 29
    static let version1: UInt64 = 1 << 32
    static let transportFeatures = indirectDescriptors | eventIndex | version1

    // BAR 0: every structure the capabilities point to, each in its own page.
    static let bar = 0
    static let barSize: UInt64 = 0x8000
    static let commonOffset: UInt64 = 0x0000, commonSize: UInt64 = 0x38
    static let isrOffset: UInt64 = 0x1000
    static let deviceOffset: UInt64 = 0x2000, deviceSize: UInt64 = 0x1000
    static let notifyOffset: UInt64 = 0x3000, notifyMultiplier: UInt64 = 4
    static let msixTableOffset: UInt64 = 0x4000, msixPBAOffset: UInt64 = 0x5000

    // ISR bits (§4.1.4.5)
    static let isrQueue: UInt8 = 1, isrConfiguration: UInt8 = 2
}

/// A virtio device on PCI, modern interface only: the PCI function (configuration space with the
/// virtio and MSI-X capabilities, BAR 0 with the common, notify, ISR and device structures and
/// the MSI-X table), its virtqueues, and an I/O thread that serves them. Queue notifications
/// arrive by ioeventfd and interrupts leave by irqfd, so neither stops a vCPU; accesses to the
/// structures in BAR 0 come from vCPU threads and take the device's lock briefly, never across
/// a request's I/O.
///
/// The I/O thread runs only while the machine runs: `pauseIO()` returns once the request in
/// hand has completed, so a saved state never has a request half done.
public final class VirtioPCIDevice: PCIDevice, StatefulDevice, @unchecked Sendable {
    /// Everything the guest could observe: configuration space, negotiation, queues, MSI-X.
    public struct SavedState: Codable, Equatable, Sendable {
        public var header: PCIConfigurationHeader
        public var deviceFeatureSelect: UInt32 = 0
        public var driverFeatureSelect: UInt32 = 0
        public var driverFeatures: UInt64 = 0
        public var status: UInt8 = 0
        public var configurationGeneration: UInt8 = 0
        public var queueSelect: UInt16 = 0
        public var configurationVector: UInt16 = VirtioPCI.noVector
        public var isr: UInt8 = 0
        public var queues: [Virtqueue]
        public var msix: MSIX

        public struct MSIX: Codable, Equatable, Sendable {
            public var enabled = false
            public var functionMask = false
            public var entries: [Entry]
            public var pending: [Bool]

            public struct Entry: Codable, Equatable, Sendable {
                public var address: UInt64 = 0
                public var data: UInt32 = 0
                public var masked = true

                /// The entry as the table holds it (PCI 3.0 §6.8.2.6): address, data, vector control.
                var bytes: [UInt8] {
                    var image = LittleEndianBytes()
                    image.append(address)
                    image.append(data)
                    image.append(UInt32(masked ? 1 : 0))
                    return image.bytes
                }

                init() {}

                init(bytes: [UInt8]) {
                    address = bytes.littleEndian(UInt64.self, at: 0) ?? 0
                    data = bytes.littleEndian(UInt32.self, at: 8) ?? 0
                    masked = (bytes.littleEndian(UInt32.self, at: 12) ?? 1) & 1 != 0
                }
            }
        }
    }

    public let backend: any VirtioBackend
    let memory: GuestMemory
    private let router: InterruptRouter
    private let log: @Sendable (String) -> Void
    private let state: Mutex<SavedState>
    private let offeredFeatures: UInt64
    /// Capability offsets in configuration space.
    private let msixCapability: Int, pciConfigurationCapability: Int

    private let queueEvents: [EventFD]
    private let vectorEvents: [EventFD]
    private let vectorGSIs: [UInt32]
    /// Where the queue doorbells are bound with ioeventfd now (nil: not bound).
    private let doorbells = Mutex<UInt64?>(nil)
    /// Raises or lowers the device's INTx line, and whether it is raised now.
    private let setINTx: @Sendable (Bool) -> Void
    private let intxAsserted = Mutex(false)
    private let worker: DeviceWorker

    /// - Parameters:
    ///   - interruptPin: the IOAPIC pin of the device's INTA#, for the interrupt line register.
    ///   - setINTx: raises or lowers that line (used while MSI-X is off).
    init(backend: any VirtioBackend, memory: GuestMemory, router: InterruptRouter, barAddress: UInt64,
         interruptPin: UInt32, setINTx: @escaping @Sendable (Bool) -> Void,
         log: @escaping @Sendable (String) -> Void) throws {
        self.backend = backend
        self.memory = memory
        self.router = router
        self.setINTx = setINTx
        self.log = log
        offeredFeatures = backend.features | VirtioPCI.transportFeatures
        let queueCount = backend.queueSizes.count
        let vectorCount = queueCount + 1
        var header = PCIConfigurationHeader(
            vendor: VirtioPCI.vendor, device: 0x1040 + backend.deviceType, classCode: backend.pciClass, revision: 1,
            subsystemVendor: VirtioPCI.vendor, subsystem: 0x40, interruptPin: 1,
            bars: [.init(index: VirtioPCI.bar, size: VirtioPCI.barSize, is64Bit: true)])
        header.write(offset: 0x3C, size: 1, value: interruptPin)    // as firmware would
        func virtioCapability(_ type: UInt8, offset: UInt64, length: UInt64, extra: [UInt8] = []) -> (id: UInt8, body: [UInt8]) {
            var body = LittleEndianBytes()
            body.append(UInt8(16 + extra.count))     // cap_len, from the capability id on
            body.append(type)
            body.append(UInt8(VirtioPCI.bar))
            body.append(UInt8(0))                    // id
            body.appendZeros(2)
            body.append(UInt32(offset))
            body.append(UInt32(length))
            return (0x09, body.bytes + extra)
        }
        var msix = LittleEndianBytes()
        msix.append(UInt16(vectorCount - 1))
        msix.append(UInt32(VirtioPCI.msixTableOffset) | UInt32(VirtioPCI.bar))
        msix.append(UInt32(VirtioPCI.msixPBAOffset) | UInt32(VirtioPCI.bar))
        var multiplier = LittleEndianBytes()
        multiplier.append(UInt32(VirtioPCI.notifyMultiplier))
        let offsets = header.setCapabilities([
            (0x11, msix.bytes),
            virtioCapability(1, offset: VirtioPCI.commonOffset, length: VirtioPCI.commonSize),
            virtioCapability(3, offset: VirtioPCI.isrOffset, length: 1),
            virtioCapability(4, offset: VirtioPCI.deviceOffset, length: VirtioPCI.deviceSize),
            virtioCapability(2, offset: VirtioPCI.notifyOffset, length: VirtioPCI.notifyMultiplier * UInt64(queueCount),
                             extra: multiplier.bytes),
            virtioCapability(5, offset: 0, length: 0, extra: [0, 0, 0, 0]),
        ])
        msixCapability = offsets[0]
        pciConfigurationCapability = offsets[5]
        header.place(bar: VirtioPCI.bar, at: barAddress)
        state = Mutex(SavedState(
            header: header, queues: backend.queueSizes.map { Virtqueue(maximumSize: $0) },
            msix: .init(entries: Array(repeating: .init(), count: vectorCount), pending: Array(repeating: false, count: vectorCount))))
        queueEvents = try (0..<queueCount).map { _ in try EventFD() }
        vectorEvents = try (0..<vectorCount).map { _ in try EventFD() }
        vectorGSIs = router.allocate(vectorCount)
        for (event, gsi) in zip(vectorEvents, vectorGSIs) { try router.bind(event, gsi: gsi) }
        worker = try DeviceWorker(name: backend.name, events: queueEvents + (backend.wakeup.map { [$0] } ?? []),
                                  queueCount: queueCount, descriptors: { [backend] in backend.pollDescriptors })
    }

    deinit {
        worker.stop()
        if let base = doorbells.withLock({ $0 }) { unbindDoorbells(base) }
        for (event, gsi) in zip(vectorEvents, vectorGSIs) { router.unbind(event, gsi: gsi) }
    }

    // MARK: The I/O thread

    /// Starts serving the queues (the machine starts or resumes).
    func startIO() {
        worker.start { [weak self] queues in self?.serve(queues: queues) }
    }

    /// Stops serving once the request in hand is complete; returns when it is.
    func pauseIO() { worker.pause() }

    func stopIO() { worker.stop() }

    /// Serves the queues whose doorbell rang or whose descriptor became ready (nil: every queue).
    private func serve(queues: Set<Int>?) {
        for queue in backend.queueSizes.indices where queues?.contains(queue) ?? true { serve(queue: queue) }
    }

    private var eventIndex: Bool { state.withLock { $0.driverFeatures & VirtioPCI.eventIndex != 0 } }

    /// Serves every request the driver made available on `queue`, then interrupts it if it asked.
    private func serve(queue index: Int) {
        let eventIndex = self.eventIndex
        let served = Mutex(false)
        let access = QueueAccess(
            index: index, memory: memory,
            take: { () throws(VirtioError) -> DescriptorChain? in
                try self.state.withLock { (state) throws(VirtioError) -> DescriptorChain? in
                    guard state.status & (VirtioPCI.driverOK | VirtioPCI.needsReset) == VirtioPCI.driverOK,
                          state.queues[index].enabled else { return nil }
                    if let chain = try state.queues[index].pop(self.memory) { return chain }
                    guard eventIndex else { return nil }
                    // Ask for a doorbell for the next request, then look once more: the driver
                    // may have added one before it could see the request.
                    try state.queues[index].requestNotification(self.memory)
                    return try state.queues[index].pop(self.memory)
                }
            },
            give: { (chain, written) throws(VirtioError) in
                try self.state.withLock { (state) throws(VirtioError) in
                    // A reset while the request ran leaves nothing to complete.
                    guard state.queues[index].enabled else { return }
                    try state.queues[index].push(head: chain.head, written: written, self.memory)
                }
                served.withLock { $0 = true }
            },
            untake: { (count) throws(VirtioError) -> Bool in
                try self.state.withLock { (state) throws(VirtioError) -> Bool in
                    guard state.queues[index].enabled else { return false }
                    return try state.queues[index].unpop(count, eventIndex: eventIndex, self.memory)
                }
            },
            stop: { self.worker.pauseRequested })
        var failure: VirtioError?
        do { try backend.serve(access) } catch { failure = error }
        if served.withLock({ $0 }) {
            let vector = try? state.withLock { (state) throws(VirtioError) -> UInt16? in
                try state.queues[index].shouldInterrupt(eventIndex: eventIndex, memory) ? state.queues[index].msixVector : nil
            }
            if let vector = vector ?? nil { interrupt(vector: vector, cause: VirtioPCI.isrQueue) }
        }
        if let failure { needsReset(failure) }
    }

    /// The driver broke a rule: the device stops until the driver resets it (§2.1.2).
    private func needsReset(_ error: VirtioError) {
        log("\(backend.name): \(error.message); the device needs a reset")
        let vector = state.withLock { state -> UInt16? in
            guard state.status & VirtioPCI.needsReset == 0 else { return nil }
            state.status |= VirtioPCI.needsReset
            return state.configurationVector
        }
        if let vector { interrupt(vector: vector, cause: VirtioPCI.isrConfiguration) }
    }

    // MARK: Interrupts

    private func interrupt(vector: UInt16, cause: UInt8) {
        let deliver = state.withLock { state -> Bool in
            state.isr |= cause
            let index = Int(vector)
            guard state.msix.enabled else {
                updateINTx(state)
                return false
            }
            guard index < state.msix.entries.count else { return false }
            if state.msix.functionMask || state.msix.entries[index].masked {
                state.msix.pending[index] = true
                return false
            }
            return true
        }
        if deliver { vectorEvents[Int(vector)].signal() }
    }

    /// INTx (PCI 3.0 §2.2.6), when MSI-X is off: the line is high while the ISR has a bit set and
    /// the command register allows it; reading the ISR lowers it. Call with the state locked.
    private func updateINTx(_ state: SavedState) {
        let high = !state.msix.enabled && state.isr != 0
            && state.header.command & PCIConfigurationHeader.commandINTxDisable == 0
        intxAsserted.withLock { asserted in
            guard asserted != high else { return }
            asserted = high
            setINTx(high)
        }
    }

    /// Re-routes every vector after a change to the MSI-X table or control, and delivers what
    /// became unmasked while pending.
    private func updateVectors() {
        let (routes, deliver) = state.withLock { state -> ([(address: UInt64, data: UInt32)?], [Int]) in
            let msix = state.msix
            let routes = msix.entries.map { entry -> (address: UInt64, data: UInt32)? in
                msix.enabled && !entry.masked ? (entry.address, entry.data) : nil
            }
            var deliver: [Int] = []
            if msix.enabled, !msix.functionMask {
                for index in msix.entries.indices where msix.pending[index] && !msix.entries[index].masked {
                    state.msix.pending[index] = false
                    deliver.append(index)
                }
            }
            return (routes, deliver)
        }
        for (gsi, route) in zip(vectorGSIs, routes) {
            do { try router.route(gsi, to: route) } catch { log("\(backend.name): cannot route an MSI-X vector: \(error)") }
        }
        for index in deliver { vectorEvents[index].signal() }
    }

    // MARK: PCI configuration space

    public func configurationRead(offset: Int, size: Int) -> UInt32 {
        guard offset < PCIConfigurationHeader.size else { return 0 }
        let data = pciConfigurationCapability + 16
        if offset >= data, offset < data + 4 {
            return windowAccess(write: nil, size: size)
        }
        return state.withLock { state in
            var header = state.header
            if offset <= msixCapability + 3, offset + size > msixCapability + 2 {
                var control = UInt16(state.msix.entries.count - 1)
                if state.msix.functionMask { control |= 1 << 14 }
                if state.msix.enabled { control |= 1 << 15 }
                header.put(control, at: msixCapability + 2)
            }
            return header.read(offset: offset, size: size)
        }
    }

    public func configurationWrite(offset: Int, size: Int, value: UInt32) {
        guard offset < PCIConfigurationHeader.size else { return }
        let window = pciConfigurationCapability
        if offset >= window + 16, offset < window + 20 {
            _ = windowAccess(write: value, size: size)
            return
        }
        var vectorsChanged = false
        state.withLock { state in
            if offset >= window + 4, offset + size <= window + 16, !(offset >= window + 5 && offset < window + 8) {
                // The VIRTIO_PCI_CAP_PCI_CFG window's bar, offset and length fields.
                for byte in 0..<size { state.header.put(UInt8(truncatingIfNeeded: value >> (8 * byte)), at: offset + byte) }
                return
            }
            if offset <= msixCapability + 3, offset + size > msixCapability + 3 {
                let high = UInt8(truncatingIfNeeded: value >> (8 * (msixCapability + 3 - offset)))
                state.msix.functionMask = high & 0x40 != 0
                state.msix.enabled = high & 0x80 != 0
                vectorsChanged = true
                return
            }
            state.header.write(offset: offset, size: size, value: value)
        }
        state.withLock { updateINTx($0) }
        if vectorsChanged { updateVectors() }
        updateDoorbells()
    }

    /// An access through the VIRTIO_PCI_CAP_PCI_CFG window: to the BAR 0 bytes its fields select.
    private func windowAccess(write value: UInt32?, size: Int) -> UInt32 {
        let (bar, offset, length) = state.withLock { state in
            (state.header.bytes[pciConfigurationCapability + 4],
             UInt64(state.header.read(offset: pciConfigurationCapability + 8, size: 4)),
             Int(state.header.read(offset: pciConfigurationCapability + 12, size: 4)))
        }
        guard bar == VirtioPCI.bar, [1, 2, 4].contains(length), length <= size || value == nil else { return 0 }
        if let value {
            barWrite(index: 0, offset: offset, data: (0..<length).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) })
            return 0
        }
        return barRead(index: 0, offset: offset, size: length).reversed().reduce(0) { $0 << 8 | UInt32($1) }
    }

    public func decodedBARs() -> [(index: Int, start: UInt64, size: UInt64)] {
        state.withLock { state in
            let address = state.header.address(ofBAR: VirtioPCI.bar)
            return state.header.decodesMemory && address != 0 ? [(VirtioPCI.bar, address, VirtioPCI.barSize)] : []
        }
    }

    /// Binds each queue's doorbell where BAR 0 now decodes, and unbinds the old place.
    private func updateDoorbells() {
        let base = decodedBARs().first.map { $0.start + VirtioPCI.notifyOffset }
        doorbells.withLock { bound in
            guard bound != base else { return }
            if let old = bound { unbindDoorbells(old) }
            bound = nil
            guard let base else { return }
            do {
                for (queue, event) in queueEvents.enumerated() {
                    try router.bindDoorbell(event, address: base + VirtioPCI.notifyMultiplier * UInt64(queue))
                }
                bound = base
            } catch {
                // Doorbell writes then exit to the VMM, which rings the same eventfd: slower, correct.
                unbindDoorbells(base)
                log("\(backend.name): cannot bind the queue doorbells with ioeventfd: \(error)")
            }
        }
    }

    private func unbindDoorbells(_ base: UInt64) {
        for (queue, event) in queueEvents.enumerated() {
            router.unbindDoorbell(event, address: base + VirtioPCI.notifyMultiplier * UInt64(queue))
        }
    }

    // MARK: BAR 0

    public func barRead(index: Int, offset: UInt64, size: Int) -> [UInt8] {
        func bytes(_ value: UInt64, from start: UInt64) -> [UInt8] {
            (0..<size).map { UInt8(truncatingIfNeeded: value >> (8 * (offset - start + UInt64($0)))) }
        }
        switch offset {
        case VirtioPCI.commonOffset..<(VirtioPCI.commonOffset + VirtioPCI.commonSize):
            return Self.bytes(state.withLock { commonImage($0) }, at: Int(offset - VirtioPCI.commonOffset), size: size)
        case VirtioPCI.isrOffset:
            // Reading the ISR acknowledges it.
            return bytes(UInt64(state.withLock { state in
                defer { state.isr = 0; updateINTx(state) }
                return state.isr
            }), from: offset)
        case VirtioPCI.deviceOffset..<(VirtioPCI.deviceOffset + VirtioPCI.deviceSize):
            return Self.bytes(backend.configuration(), at: Int(offset - VirtioPCI.deviceOffset), size: size)
        case VirtioPCI.msixTableOffset..<VirtioPCI.msixPBAOffset:
            let entry = Int((offset - VirtioPCI.msixTableOffset) / 16)
            let image = state.withLock { state in entry < state.msix.entries.count ? state.msix.entries[entry].bytes : [] }
            return Self.bytes(image, at: Int((offset - VirtioPCI.msixTableOffset) % 16), size: size)
        case VirtioPCI.msixPBAOffset..<(VirtioPCI.msixPBAOffset + 8):
            let pending = state.withLock { state in
                state.msix.pending.enumerated().reduce(UInt64(0)) { $0 | ($1.element ? 1 << UInt64($1.offset) : 0) }
            }
            return bytes(pending, from: VirtioPCI.msixPBAOffset)
        default:
            return [UInt8](repeating: 0, count: size)
        }
    }

    /// `size` bytes of `image` from `start`; zeros past its end.
    private static func bytes(_ image: [UInt8], at start: Int, size: Int) -> [UInt8] {
        (0..<size).map { start + $0 < image.count ? image[start + $0] : 0 }
    }

    public func barWrite(index: Int, offset: UInt64, data: [UInt8]) {
        switch offset {
        case VirtioPCI.commonOffset..<(VirtioPCI.commonOffset + VirtioPCI.commonSize):
            writeCommon(at: Int(offset - VirtioPCI.commonOffset), data)
        case VirtioPCI.notifyOffset..<(VirtioPCI.notifyOffset + VirtioPCI.notifyMultiplier * UInt64(queueEvents.count)):
            // A doorbell that did not go through ioeventfd (another width, or binding failed).
            queueEvents[Int((offset - VirtioPCI.notifyOffset) / VirtioPCI.notifyMultiplier)].signal()
        case VirtioPCI.msixTableOffset..<VirtioPCI.msixPBAOffset:
            let entry = Int((offset - VirtioPCI.msixTableOffset) / 16)
            let field = Int((offset - VirtioPCI.msixTableOffset) % 16)
            state.withLock { state in
                guard entry < state.msix.entries.count else { return }
                var image = state.msix.entries[entry].bytes
                for (i, byte) in data.enumerated() where field + i < image.count { image[field + i] = byte }
                state.msix.entries[entry] = .init(bytes: image)
            }
            updateVectors()
        default:
            break
        }
    }

    // MARK: The common configuration structure (§4.1.4.3)

    private enum Field: Int, CaseIterable {
        case deviceFeatureSelect = 0x00, deviceFeature = 0x04, driverFeatureSelect = 0x08, driverFeature = 0x0C
        case configurationVector = 0x10, queueCount = 0x12, status = 0x14, generation = 0x15, queueSelect = 0x16
        case queueSize = 0x18, queueVector = 0x1A, queueEnable = 0x1C, queueNotifyOffset = 0x1E
        case queueDescriptorLow = 0x20, queueDescriptorHigh = 0x24, queueDriverLow = 0x28, queueDriverHigh = 0x2C
        case queueDeviceLow = 0x30, queueDeviceHigh = 0x34

        var width: Int {
            switch self {
            case .status, .generation: 1
            case .configurationVector, .queueCount, .queueSelect, .queueSize, .queueVector, .queueEnable, .queueNotifyOffset: 2
            default: 4
            }
        }
    }

    private func commonImage(_ state: SavedState) -> [UInt8] {
        var image = [UInt8](repeating: 0, count: Int(VirtioPCI.commonSize))
        let queue = Int(state.queueSelect) < state.queues.count ? state.queues[Int(state.queueSelect)] : nil
        for field in Field.allCases {
            let value: UInt64 = switch field {
            case .deviceFeatureSelect: UInt64(state.deviceFeatureSelect)
            case .deviceFeature: state.deviceFeatureSelect < 2 ? offeredFeatures >> (32 * UInt64(state.deviceFeatureSelect)) : 0
            case .driverFeatureSelect: UInt64(state.driverFeatureSelect)
            case .driverFeature: state.driverFeatureSelect < 2 ? state.driverFeatures >> (32 * UInt64(state.driverFeatureSelect)) : 0
            case .configurationVector: UInt64(state.configurationVector)
            case .queueCount: UInt64(state.queues.count)
            case .status: UInt64(state.status)
            case .generation: UInt64(state.configurationGeneration)
            case .queueSelect: UInt64(state.queueSelect)
            case .queueSize: UInt64(queue?.size ?? 0)
            case .queueVector: UInt64(queue?.msixVector ?? VirtioPCI.noVector)
            case .queueEnable: queue?.enabled == true ? 1 : 0
            case .queueNotifyOffset: UInt64(state.queueSelect)
            case .queueDescriptorLow: queue?.descriptorTable ?? 0
            case .queueDescriptorHigh: (queue?.descriptorTable ?? 0) >> 32
            case .queueDriverLow: queue?.driverArea ?? 0
            case .queueDriverHigh: (queue?.driverArea ?? 0) >> 32
            case .queueDeviceLow: queue?.deviceArea ?? 0
            case .queueDeviceHigh: (queue?.deviceArea ?? 0) >> 32
            }
            for byte in 0..<field.width { image[field.rawValue + byte] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(byte))) }
        }
        return image
    }

    private func writeCommon(at start: Int, _ data: [UInt8]) {
        var wake = false, reset = false
        var ready: UInt64?
        var failure: VirtioError?
        state.withLock { state in
            var image = commonImage(state)
            for (i, byte) in data.enumerated() where start + i < image.count { image[start + i] = byte }
            for field in Field.allCases where field.rawValue < start + data.count && start < field.rawValue + field.width {
                var value: UInt64 = 0
                for byte in 0..<field.width { value |= UInt64(image[field.rawValue + byte]) << (8 * UInt64(byte)) }
                let selected = Int(state.queueSelect) < state.queues.count ? Int(state.queueSelect) : nil
                let queueEditable = selected.map { !state.queues[$0].enabled } ?? false
                func setAddress(_ keyPath: WritableKeyPath<Virtqueue, UInt64>, high: Bool) {
                    guard let selected, queueEditable else { return }
                    let old = state.queues[selected][keyPath: keyPath]
                    state.queues[selected][keyPath: keyPath] = high ? (old & 0xFFFF_FFFF) | value << 32 : (old & ~0xFFFF_FFFF) | value
                }
                switch field {
                case .deviceFeatureSelect: state.deviceFeatureSelect = UInt32(value)
                case .driverFeatureSelect: state.driverFeatureSelect = UInt32(value)
                case .driverFeature:
                    guard state.status & VirtioPCI.featuresOK == 0, state.driverFeatureSelect < 2 else { break }
                    let shift = 32 * UInt64(state.driverFeatureSelect)
                    state.driverFeatures = (state.driverFeatures & ~(0xFFFF_FFFF << shift)) | (value << shift)
                case .configurationVector:
                    state.configurationVector = Int(value) < state.msix.entries.count ? UInt16(value) : VirtioPCI.noVector
                case .status:
                    let requested = UInt8(value)
                    if requested == 0 {
                        reset = true
                        break
                    }
                    var accepted = requested & ~VirtioPCI.needsReset
                    if accepted & VirtioPCI.featuresOK != 0, state.status & VirtioPCI.featuresOK == 0 {
                        let unsupported = state.driverFeatures & ~offeredFeatures
                        if unsupported != 0 || state.driverFeatures & VirtioPCI.version1 == 0 {
                            accepted &= ~VirtioPCI.featuresOK
                            log("\(backend.name): the driver's features 0x\(String(state.driverFeatures, radix: 16)) are refused (\(unsupported != 0 ? "bits 0x\(String(unsupported, radix: 16)) were not offered" : "VIRTIO_F_VERSION_1 is required"))")
                        }
                    }
                    if accepted & VirtioPCI.driverOK != 0, state.status & VirtioPCI.driverOK == 0 {
                        wake = true
                        ready = state.driverFeatures
                    }
                    state.status = accepted | (state.status & VirtioPCI.needsReset)
                case .queueSelect: state.queueSelect = UInt16(value)
                case .queueSize:
                    if let selected, queueEditable { state.queues[selected].size = UInt16(value) }
                case .queueVector:
                    if let selected {
                        state.queues[selected].msixVector = Int(value) < state.msix.entries.count ? UInt16(value) : VirtioPCI.noVector
                    }
                case .queueEnable:
                    guard let selected, value == 1, queueEditable else { break }
                    do throws(VirtioError) {
                        try state.queues[selected].validate(in: memory)
                        state.queues[selected].enabled = true
                        wake = true
                    } catch {
                        failure = VirtioError("queue \(selected): \(error.message)")
                    }
                case .queueDescriptorLow: setAddress(\.descriptorTable, high: false)
                case .queueDescriptorHigh: setAddress(\.descriptorTable, high: true)
                case .queueDriverLow: setAddress(\.driverArea, high: false)
                case .queueDriverHigh: setAddress(\.driverArea, high: true)
                case .queueDeviceLow: setAddress(\.deviceArea, high: false)
                case .queueDeviceHigh: setAddress(\.deviceArea, high: true)
                case .deviceFeature, .queueCount, .generation, .queueNotifyOffset:
                    break
                }
            }
        }
        if reset { resetDevice() }
        if let ready { backend.driverReady(features: ready) }
        if let failure { needsReset(failure) }
        if wake { worker.wake() }
    }

    /// A driver's reset (writing 0 to device_status): back to the state before the driver found the
    /// device, except where the PCI function is placed and its MSI-X table, which belong to PCI.
    private func resetDevice() {
        // Paused here only if it was running: a worker the machine paused stays paused.
        let pausedHere = worker.pause()
        state.withLock { state in
            state.deviceFeatureSelect = 0
            state.driverFeatureSelect = 0
            state.driverFeatures = 0
            state.status = 0
            state.queueSelect = 0
            state.configurationVector = VirtioPCI.noVector
            state.isr = 0
            for index in state.queues.indices { state.queues[index].reset() }
            updateINTx(state)
        }
        backend.reset()
        if pausedHere { worker.resumeAfterPause() }
    }

    // MARK: Saved state

    public func saveState() -> SavedState {
        state.withLock { $0 }
    }

    public func restoreState(_ saved: SavedState) throws(MachineError) {
        try state.withLock { (state) throws(MachineError) in
            guard saved.queues.map(\.maximumSize) == state.queues.map(\.maximumSize),
                  saved.msix.entries.count == state.msix.entries.count, saved.msix.pending.count == state.msix.entries.count
            else {
                throw MachineError(.invalidState, "the saved \(backend.name) has other queues or MSI-X vectors than this one")
            }
            for (index, queue) in saved.queues.enumerated() where queue.enabled {
                do throws(VirtioError) { try queue.validate(in: memory) } catch {
                    throw MachineError(.invalidState, "the saved \(backend.name) queue \(index) is invalid: \(error.message)")
                }
            }
            var header = state.header
            try header.restore(saved.header)
            state = saved
            state.header = header
            updateINTx(state)
        }
        if saved.status & VirtioPCI.driverOK != 0 { backend.driverReady(features: saved.driverFeatures) }
        updateVectors()
        updateDoorbells()
    }
}

/// A device's I/O thread: waits on the queue doorbells, runs the device's serve function, and
/// parks while the machine is paused.
final class DeviceWorker: @unchecked Sendable {
    private enum Mode { case idle, running, pausing, paused, stopping, stopped }
    private let lock = ConditionLock()
    private let changed: ConditionLock.Condition
    private var mode = Mode.idle
    private let pauseFlag = Mutex(false)
    private let control: EventFD
    private let events: [EventFD]
    /// More descriptors to wait on, asked before each wait, each with the queue to serve when it
    /// is readable; read by whoever serves them.
    private let descriptors: @Sendable () -> [(descriptor: Int32, queue: Int)]
    private let name: String
    /// Serves the given queues (nil: all of them).
    private var serve: (@Sendable (Set<Int>?) -> Void)?

    private let queueCount: Int

    /// `events`: the first `queueCount` are the queues' doorbells in queue order; any after them
    /// mean "look at every queue".
    init(name: String, events: [EventFD], queueCount: Int,
         descriptors: @escaping @Sendable () -> [(descriptor: Int32, queue: Int)] = { [] }) throws {
        self.name = name
        self.events = events
        self.queueCount = queueCount
        self.descriptors = descriptors
        changed = ConditionLock.Condition(lock)
        control = try EventFD()
    }

    var pauseRequested: Bool { pauseFlag.withLock { $0 } }

    /// Starts the thread, or resumes it if it is paused.
    func start(_ serve: @escaping @Sendable (Set<Int>?) -> Void) {
        lock.withLock {
            switch mode {
            case .idle:
                self.serve = serve
                mode = .running
                startThread(named: name) { [self] in
                    Machine.confine(.deviceIO, name: name)
                    run()
                }
            case .paused, .pausing:
                mode = .running
                pauseFlag.withLock { $0 = false }
                changed.broadcast()
            default:
                break
            }
        }
        control.signal()
    }

    /// Resumes a thread that `pause()` paused (after a device reset).
    func resumeAfterPause() {
        lock.withLock {
            guard mode == .paused || mode == .pausing else { return }
            mode = .running
            pauseFlag.withLock { $0 = false }
            changed.broadcast()
        }
        control.signal()
    }

    /// Returns once the thread has parked; true if it was running until now.
    @discardableResult
    func pause() -> Bool {
        lock.withLock {
            guard mode == .running else { return false }
            mode = .pausing
            pauseFlag.withLock { $0 = true }
            control.signal()
            while mode == .pausing { changed.wait() }
            return true
        }
    }

    func stop() {
        lock.withLock {
            guard mode != .idle else { mode = .stopped; return }
            guard mode != .stopped else { return }
            mode = .stopping
            pauseFlag.withLock { $0 = true }
            changed.broadcast()
            control.signal()
            while mode != .stopped { changed.wait() }
        }
    }

    func wake() { control.signal() }

    private func run() {
        let eventDescriptors = [control.rawValue] + events.map(\.rawValue)
        // The first round after a start or resume looks at every queue.
        var queues: Set<Int>? = nil
        while true {
            // Park while paused; leave when stopping.
            let proceed = lock.withLock { () -> Bool in
                while true {
                    switch mode {
                    case .pausing:
                        mode = .paused
                        changed.broadcast()
                    case .paused:
                        changed.wait()
                    case .stopping, .stopped:
                        mode = .stopped
                        changed.broadcast()
                        return false
                    default:
                        return true
                    }
                }
            }
            guard proceed else { return }
            serve?(queues)
            let extra = descriptors()
            guard let ready = try? Poll.readable(eventDescriptors + extra.map(\.descriptor), timeout: nil) else {
                queues = nil
                continue
            }
            // A doorbell or a backend descriptor names its queue; the control event (start,
            // resume, driver ready) and the backend's wakeup (host input) mean every queue.
            var next = Set<Int>()
            var all = false
            for index in ready {
                if index == 0 {
                    control.consume()
                    all = true
                } else if index <= events.count {
                    events[index - 1].consume()
                    if index - 1 < queueCount { next.insert(index - 1) } else { all = true }
                } else {
                    next.insert(extra[index - 1 - events.count].queue)
                }
            }
            queues = all ? nil : next
        }
    }
}
