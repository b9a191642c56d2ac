#if canImport(Glibc)
import Glibc
#endif
import CKVM
import HostOS
import KVM
import Synchronization

/// An Ethernet address, written `52:54:00:12:34:56`.
public struct MACAddress: Codable, Hashable, Sendable, CustomStringConvertible {
    public let bytes: [UInt8]

    public init?(_ text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6 else { return nil }
        var bytes: [UInt8] = []
        for part in parts {
            guard part.count == 2, let byte = UInt8(part, radix: 16) else { return nil }
            bytes.append(byte)
        }
        self.bytes = bytes
    }

    /// A random locally administered unicast address (as Cloud Hypervisor gives a card without one).
    public static func random() -> MACAddress {
        var generator = SystemRandomNumberGenerator()
        var bytes = (0..<6).map { _ in UInt8.random(in: 0...255, using: &generator) }
        bytes[0] = (bytes[0] & 0xFE) | 0x02
        return MACAddress(bytes: bytes)
    }

    init(bytes: [UInt8]) { self.bytes = bytes }

    public var isMulticast: Bool { bytes[0] & 1 != 0 }
    public var description: String { bytes.map { String($0, radix: 16).leftPadded(to: 2) }.joined(separator: ":") }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let address = MACAddress(text) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "'\(text)' is not a MAC address"))
        }
        self = address
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

private extension String {
    func leftPadded(to width: Int) -> String { String(repeating: "0", count: max(0, width - count)) + self }
}

/// A network card as the guest sees it, and the tap that is its host end here.
public struct NetworkConfiguration: Codable, Equatable, Sendable {
    /// Names the card in the API and across a migration.
    public var id: String
    public var mac: MACAddress
    /// The tap to open or create (`tap=`). A migration does not carry it: the destination names its own.
    public var tap: String?
    /// A tap descriptor this process inherited (`fd=`, libvirt's way); used instead of `tap`.
    public var fd: Int32?
    /// The address and netmask to give the host end of a tap Ferry opens.
    public var hostAddress: String?
    public var hostNetmask: String?
    /// Entries of each of the two queues (receive, transmit).
    public var queueSize: UInt16
    /// Which offloads the card may offer (Cloud Hypervisor's `offload_tso`, `offload_ufo`,
    /// `offload_csum`; all on by default). Segmentation needs checksum offload.
    public var offloadTSO = true, offloadUFO = true, offloadChecksum = true

    public static let defaultQueueSize: UInt16 = 256
    public static let maximumQueueSize: UInt16 = 1024

    /// The id of the `index`th card that names none.
    public static func defaultID(index: Int) -> String { "net\(index)" }

    public init(id: String, mac: MACAddress, tap: String? = nil, fd: Int32? = nil, hostAddress: String? = nil,
                hostNetmask: String? = nil, queueSize: UInt16 = defaultQueueSize) {
        self.id = id
        self.mac = mac
        self.tap = tap
        self.fd = fd
        self.hostAddress = hostAddress
        self.hostNetmask = hostNetmask
        self.queueSize = queueSize
    }

    /// Checks what can be checked without opening anything; the message names the field.
    public func validate() throws(MachineError) {
        func invalid(_ message: String) -> MachineError { MachineError(.invalidConfiguration, "net \(id): \(message)") }
        guard !id.isEmpty else { throw MachineError(.invalidConfiguration, "net: an id must not be empty") }
        guard !mac.isMulticast else { throw invalid("mac \(mac) is a multicast address") }
        guard queueSize >= 2, queueSize <= Self.maximumQueueSize, queueSize & (queueSize - 1) == 0 else {
            throw invalid("queue_size \(queueSize) is not a power of two from 2 to \(Self.maximumQueueSize)")
        }
        guard tap != nil || fd != nil else { throw invalid("needs tap=NAME or fd=N") }
        for (field, value) in [("ip", hostAddress), ("mask", hostNetmask)] {
            guard let value else { continue }
            var parsed = in_addr()
            guard inet_pton(AF_INET, value, &parsed) == 1 else { throw invalid("\(field) '\(value)' is not an IPv4 address") }
        }
    }
}

/// What a network card counted: frames and bytes each way, and what it dropped.
public struct NetworkCounters: Codable, Equatable, Sendable {
    public var rxFrames: UInt64 = 0, rxBytes: UInt64 = 0
    public var txFrames: UInt64 = 0, txBytes: UInt64 = 0
    /// Frames from the network that did not fit the buffers the guest posted.
    public var rxDropped: UInt64 = 0
    /// Frames from the guest the tap refused (a malformed header, too large).
    public var txDropped: UInt64 = 0
    public init() {}
}

/// virtio-net (virtio 1.2 §5.1) on a tap: queue 0 receives, queue 1 transmits, one queue pair.
///
/// Transmit: each chain (virtio-net header, then the frame) goes to the tap with one writev
/// straight from guest memory. Receive: a frame is read from the tap into a staging buffer and
/// copied into the buffers the guest posted; with `VIRTIO_NET_F_MRG_RXBUF` it may fill several
/// chains (the header says how many). While the guest has posted nothing the tap is not polled,
/// so frames queue in the host (and the host drops beyond its queue), never in Ferry.
public final class VirtioNet: VirtioBackend, @unchecked Sendable {
    // Feature bits (§5.1.3).
    static let featureCsum: UInt64 = 1 << 0, featureGuestCsum: UInt64 = 1 << 1, featureMAC: UInt64 = 1 << 5
    static let featureGuestTSO4: UInt64 = 1 << 7, featureGuestTSO6: UInt64 = 1 << 8, featureGuestECN: UInt64 = 1 << 9
    static let featureGuestUFO: UInt64 = 1 << 10, featureHostTSO4: UInt64 = 1 << 11, featureHostTSO6: UInt64 = 1 << 12
    static let featureHostECN: UInt64 = 1 << 13, featureHostUFO: UInt64 = 1 << 14, featureMergeable: UInt64 = 1 << 15
    static let featureStatus: UInt64 = 1 << 16
    static let linkUp: UInt16 = 1
    static let receiveQueue = 0, transmitQueue = 1
    /// The largest frame the tap hands over: a 64 KiB GSO frame and its Ethernet header, plus the virtio-net header.
    static let stagingSize = 65_550 + Tap.virtioHeaderSize

    public let network: NetworkConfiguration
    public let name: String
    public let tap: Tap
    public let features: UInt64
    /// The features the driver accepted (set from a vCPU thread, read by the I/O thread).
    private let negotiated = Atomic<UInt64>(0)
    private let countersLock = Mutex(NetworkCounters())
    // The receive side's state. Only the I/O thread touches it, and reset() while that thread
    // is parked (the device's worker pause orders the two).
    /// The frame read from the tap and not yet delivered.
    private let staging: UnsafeMutableRawBufferPointer
    /// Bytes of the staged frame, header included; 0: none.
    private var staged = 0
    /// The guest had no room for the staged frame: wait for its doorbell, not for the tap.
    private var waitingForBuffers = false

    public init(_ network: NetworkConfiguration) throws(MachineError) {
        self.network = network
        name = "virtio-net \(network.id)"
        if let fd = network.fd {
            tap = try Tap.adopt(descriptor: fd, for: "net \(network.id)")
        } else {
            tap = try Tap.open(name: network.tap ?? "", address: network.hostAddress, netmask: network.hostNetmask,
                               for: "net \(network.id)")
        }
        var features = Self.featureMAC | Self.featureStatus | Self.featureMergeable
        if tap.hasVirtioHeader, network.offloadChecksum {
            // The tap checksums and segments what the guest hands over with a header, and hands
            // the guest what its driver accepts (TUNSETOFFLOAD, once the driver is ready).
            let offloads = tap.supportedOffloads
            features |= Self.featureCsum
            if offloads & CKVM_TUN_F_CSUM != 0 { features |= Self.featureGuestCsum }
            if network.offloadTSO {
                features |= Self.featureHostTSO4 | Self.featureHostTSO6 | Self.featureHostECN
                if offloads & CKVM_TUN_F_TSO4 != 0 { features |= Self.featureGuestTSO4 }
                if offloads & CKVM_TUN_F_TSO6 != 0 { features |= Self.featureGuestTSO6 }
                if offloads & CKVM_TUN_F_TSO_ECN != 0 { features |= Self.featureGuestECN }
            }
            if network.offloadUFO {
                features |= Self.featureHostUFO
                if offloads & CKVM_TUN_F_UFO != 0 { features |= Self.featureGuestUFO }
            }
        }
        self.features = features
        staging = .allocate(byteCount: Self.stagingSize, alignment: 64)
    }

    deinit { staging.deallocate() }

    public var deviceType: UInt16 { 1 }
    public var pciClass: UInt32 { 0x02_00_00 }   // network controller, Ethernet
    public var queueSizes: [UInt16] { [network.queueSize, network.queueSize] }

    /// `struct virtio_net_config` up to `max_virtqueue_pairs` (§5.1.4).
    public func configuration() -> [UInt8] {
        var bytes = LittleEndianBytes()
        for byte in network.mac.bytes { bytes.append(byte) }
        bytes.append(Self.linkUp)
        bytes.append(UInt16(1))
        return bytes.bytes
    }

    public var counters: NetworkCounters { countersLock.withLock { $0 } }

    public var pollDescriptors: [(descriptor: Int32, queue: Int)] {
        waitingForBuffers ? [] : [(tap.descriptor.rawValue, Self.receiveQueue)]
    }

    public func driverReady(features: UInt64) {
        negotiated.store(features, ordering: .releasing)
        var offloads: UInt32 = 0
        if features & Self.featureGuestCsum != 0 {
            offloads |= CKVM_TUN_F_CSUM
            if features & Self.featureGuestTSO4 != 0 { offloads |= CKVM_TUN_F_TSO4 }
            if features & Self.featureGuestTSO6 != 0 { offloads |= CKVM_TUN_F_TSO6 }
            if features & Self.featureGuestECN != 0 { offloads |= CKVM_TUN_F_TSO_ECN }
            if features & Self.featureGuestUFO != 0 { offloads |= CKVM_TUN_F_UFO }
        }
        tap.setOffloads(offloads)
    }

    public func reset() {
        negotiated.store(0, ordering: .releasing)
        staged = 0
        waitingForBuffers = false
        tap.setOffloads(0)
    }

    public func serve(_ queue: QueueAccess) throws(VirtioError) {
        if queue.index == Self.transmitQueue {
            try transmit(queue)
        } else {
            try receive(queue)
        }
    }

    public func handle(_ chain: DescriptorChain, queue: Int, memory: GuestMemory) throws(VirtioError) -> UInt32 { 0 }

    // MARK: Transmit

    private func transmit(_ queue: QueueAccess) throws(VirtioError) {
        let skip = tap.hasVirtioHeader ? 0 : Tap.virtioHeaderSize
        while !queue.stopRequested, let chain = try queue.next() {
            var vectors: [iovec] = []
            var skipping = skip, length = 0
            for buffer in chain.buffers where !buffer.deviceWritable {
                let take = min(skipping, Int(buffer.length))
                skipping -= take
                guard Int(buffer.length) > take else { continue }
                let host: UnsafeMutableRawBufferPointer
                do { host = try queue.memory.buffer(at: buffer.address + UInt64(take), count: Int(buffer.length) - take) } catch {
                    throw VirtioError(error.message)
                }
                vectors.append(iovec(iov_base: host.baseAddress, iov_len: host.count))
                length += host.count
            }
            let frame = length - (Tap.virtioHeaderSize - skip)
            var sent = -1
            if frame >= 14 {   // at least an Ethernet header after the virtio-net header
                repeat {
                    sent = vectors.withUnsafeBufferPointer { writev(tap.descriptor.rawValue, $0.baseAddress, Int32($0.count)) }
                } while sent < 0 && errno == EINTR
            }
            countersLock.withLock { counters in
                if sent >= 0 {
                    counters.txFrames += 1
                    counters.txBytes += UInt64(frame)
                } else {
                    counters.txDropped += 1
                }
            }
            try queue.complete(chain, written: 0)
        }
    }

    // MARK: Receive

    private func receive(_ queue: QueueAccess) throws(VirtioError) {
        let mergeable = negotiated.load(ordering: .acquiring) & Self.featureMergeable != 0
        let headerOffset = tap.hasVirtioHeader ? 0 : Tap.virtioHeaderSize
        while !queue.stopRequested {
            var length = staged
            if length == 0 {
                // Without a virtio-net header on the tap, leave room for one of zeros.
                if headerOffset > 0 { staging.prefix(headerOffset).initializeMemory(as: UInt8.self, repeating: 0) }
                let result = read(tap.descriptor.rawValue, staging.baseAddress! + headerOffset, staging.count - headerOffset)
                if result < 0 {
                    if errno == EINTR { continue }
                    return   // EAGAIN: nothing more now; the poll wakes the thread for the next frame
                }
                length = result + headerOffset
                guard length >= Tap.virtioHeaderSize + 14 else { continue }
                staged = length
            }
            guard try deliver(length: length, mergeable: mergeable, queue) else { return }
            staged = 0
            waitingForBuffers = false
        }
    }

    /// Copies the staged frame into the guest's receive buffers; false if the guest has not
    /// posted enough yet (the frame stays staged and the device waits for the driver's doorbell).
    private func deliver(length: Int, mergeable: Bool, _ queue: QueueAccess) throws(VirtioError) -> Bool {
        var chains: [(chain: DescriptorChain, written: Int)] = []
        var placed = 0
        while placed < length {
            guard let chain = try queue.next() else {
                if try queue.giveBack(UInt16(chains.count)) { return try deliver(length: length, mergeable: mergeable, queue) }
                waitingForBuffers = true
                return false
            }
            var room = 0
            for buffer in chain.buffers where buffer.deviceWritable { room += Int(buffer.length) }
            guard room >= (chains.isEmpty ? Tap.virtioHeaderSize : 1) else {
                throw VirtioError("receive buffer \(chain.head) has \(room) device-writable bytes, too few for a virtio-net header")
            }
            if !mergeable, room < length {
                // One chain per frame and this one is too small: drop the frame, keep the buffer.
                _ = try queue.giveBack(1)
                countersLock.withLock { $0.rxDropped += 1 }
                return true
            }
            let take = min(room, length - placed)
            chains.append((chain, take))
            placed += take
            if chains.count >= Int(network.queueSize), placed < length {
                _ = try queue.giveBack(UInt16(chains.count))
                countersLock.withLock { $0.rxDropped += 1 }
                return true
            }
        }
        // num_buffers (§5.1.6.4): how many chains the frame fills.
        staging.storeBytes(of: UInt16(chains.count).littleEndian, toByteOffset: 10, as: UInt16.self)
        var offset = 0
        for (chain, written) in chains {
            var left = written
            for buffer in chain.buffers where buffer.deviceWritable && left > 0 {
                let count = min(Int(buffer.length), left)
                do {
                    let host = try queue.memory.buffer(at: buffer.address, count: count)
                    host.copyMemory(from: UnsafeRawBufferPointer(rebasing: staging[offset..<(offset + count)]))
                } catch {
                    throw VirtioError(error.message)
                }
                queue.memory.recordDeviceWrite(at: buffer.address, count: count)
                offset += count
                left -= count
            }
            try queue.complete(chain, written: UInt32(written))
        }
        countersLock.withLock {
            $0.rxFrames += 1
            $0.rxBytes += UInt64(length - Tap.virtioHeaderSize)
        }
        return true
    }

    // MARK: Announcing

    /// Sends a RARP frame from the guest's address to everyone on the tap's network, so that
    /// bridges and switches learn where the guest is now (after a migration, as QEMU's
    /// self-announce does). The guest does not see it.
    public func announce() {
        var frame = [UInt8](repeating: 0, count: tap.hasVirtioHeader ? Tap.virtioHeaderSize : 0)
        let mac = network.mac.bytes
        frame += [UInt8](repeating: 0xFF, count: 6) + mac + [0x80, 0x35]       // broadcast, from the guest, RARP
        frame += [0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x03]                   // Ethernet, IPv4, reverse request
        frame += mac + [0, 0, 0, 0] + mac + [0, 0, 0, 0]                      // sender, target: the guest
        frame += [UInt8](repeating: 0, count: max(0, (tap.hasVirtioHeader ? Tap.virtioHeaderSize : 0) + 60 - frame.count))
        _ = frame.withUnsafeBytes { write(tap.descriptor.rawValue, $0.baseAddress, $0.count) }
    }
}
