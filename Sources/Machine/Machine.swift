import CKVM
import Foundation
import HostOS
import KVM
import Synchronization

/// Why a machine stopped running.
public enum MachineStop: Equatable, Sendable {
    /// The guest asked to power off or reset (i8042 reset, or a KVM system event).
    case guest
    /// The VMM asked (API, signal).
    case requested
    /// Something the VMM cannot recover from: the message names the exit reason, vCPU and RIP.
    case failed(String)
}

/// One x86-64 VM on KVM: guest memory, vCPUs on dedicated threads, devices.
///
/// Two builders: `forBoot` loads a kernel and sets up every vCPU to boot it; `forRestore` leaves
/// RAM zero and the vCPUs blank, waiting for a saved state. Phases:
///
///     forRestore: awaitingState ─restore─▶ ready
///     forBoot:                             ready ─start─▶ running ─pause─▶ pausing ─▶ paused
///                                                          ▲                           │
///                                                          └──────────resume───────────┘
///     any phase ─stop (or the guest powers off or fails)─▶ stopped
///
/// Each transition refuses to run from a phase it does not start from.
public final class Machine: Sendable {
    public enum Phase: String, Sendable {
        /// Built by `forRestore`: the vCPUs hold no state yet and cannot run.
        case awaitingState = "awaiting a saved state"
        /// Can start: booted vCPUs at their entry point, or restored ones where they were saved.
        case ready
        case running
        /// The vCPUs are being taken out of the guest; `pause()` has not returned yet.
        case pausing
        /// Every vCPU is parked with its last exit finished: its state is complete.
        case paused
        case stopped
    }

    /// Tells machines apart in stop reports (a VMM may be handed a report from a machine it has
    /// already replaced).
    public typealias ID = UUID

    public let id: ID
    public let configuration: MachineConfiguration
    public let memory: GuestMemory
    let kvm: KVMSystem
    let vm: KVMVirtualMachine
    let vcpus: [KVMVCPU]
    let serial: Serial8250
    let i8042: I8042
    let bus: PortIOBus
    let pciBus: PCIBus
    /// The virtio devices on the PCI bus, in slot order from slot 1.
    let virtioDevices: [VirtioPCIDevice]
    let interruptRouter: InterruptRouter
    /// Every device with saved state, under the id its state carries in a `MachineState`.
    let statefulDevices: [(id: String, device: any StatefulDevice)]
    /// What KVM on this host saves of a vCPU.
    let vcpuStateSupport: VCPUStateSupport
    let control: VCPUControl
    private let stopLatch: StopLatch

    /// Device ids in a `MachineState`.
    enum DeviceID {
        static let serial = "serial0"
        static let i8042 = "i8042"
    }

    /// Builds the VM, loads the kernel and prepares every vCPU to boot; the machine is `ready`.
    /// - Parameters:
    ///   - serialOutput: receives the bytes the guest writes to its UART (if it has one).
    ///   - onStop: called once, from a vCPU thread, with this machine's `id`, when the guest stops
    ///     by itself or fails (not when `stop()` stops it).
    ///   - consoleOutput: receives the bytes the guest writes to its virtio console (if it has one).
    public static func forBoot(configuration: MachineConfiguration, serialOutput: @escaping @Sendable ([UInt8]) -> Void,
                               consoleOutput: @escaping @Sendable ([UInt8]) -> Void = { _ in },
                               onStop: @escaping @Sendable (ID, MachineStop) -> Void) throws(MachineError) -> Machine {
        let machine = try Machine(configuration: configuration, serialOutput: serialOutput, consoleOutput: consoleOutput,
                                  onStop: onStop, phase: .ready)
        try machine.prepareToBoot()
        return machine
    }

    /// Builds the VM, guest memory (zero), vCPUs and devices of `configuration` without loading a
    /// kernel or setting up any vCPU: the machine is `awaitingState`. Fill its RAM with
    /// `loadMemory(fromFile:)` (or by writing `memory` directly), apply a state with `restore(_:)`,
    /// then `start()` it. With `memoryFile` (a local migration's, for a configuration with shared
    /// memory), guest RAM is that file's pages as they are, not zero.
    public static func forRestore(configuration: MachineConfiguration, memoryFile: FileDescriptor? = nil,
                                  serialOutput: @escaping @Sendable ([UInt8]) -> Void,
                                  consoleOutput: @escaping @Sendable ([UInt8]) -> Void = { _ in },
                                  onStop: @escaping @Sendable (ID, MachineStop) -> Void) throws(MachineError) -> Machine {
        try Machine(configuration: configuration, memoryFile: memoryFile, serialOutput: serialOutput, consoleOutput: consoleOutput,
                    onStop: onStop, phase: .awaitingState)
    }

    /// What both builders share: KVM, RAM, interrupt controllers, vCPUs and devices.
    private init(configuration: MachineConfiguration, memoryFile: FileDescriptor? = nil, serialOutput: @escaping @Sendable ([UInt8]) -> Void,
                 consoleOutput: @escaping @Sendable ([UInt8]) -> Void,
                 onStop: @escaping @Sendable (ID, MachineStop) -> Void, phase: Phase) throws(MachineError) {
        try configuration.validate()
        self.configuration = configuration
        do {
            kvm = try KVMSystem()
            try kvm.require(KVMCapability.irqchip, named: "an in-kernel interrupt controller (KVM_CAP_IRQCHIP)")
            try kvm.require(KVMCapability.immediateExit, named: "KVM_CAP_IMMEDIATE_EXIT")
            try kvm.require(KVMCapability.ioeventfd, named: "doorbells by eventfd (KVM_CAP_IOEVENTFD)")
            try kvm.require(KVMCapability.irqfd, named: "interrupts by eventfd (KVM_CAP_IRQFD)")
            try kvm.require(KVMCapability.irqRouting, named: "interrupt routing (KVM_CAP_IRQ_ROUTING)")
        } catch {
            throw MachineError.host("opening KVM", error)
        }
        let maxVCPUs = Int(kvm.checkExtension(KVMCapability.maxVCPUs))
        if maxVCPUs > 0, configuration.cpus > maxVCPUs {
            throw MachineError(.invalidConfiguration, "cpus: this host's KVM runs at most \(maxVCPUs) vCPUs per VM")
        }
        let ranges = GuestRAMLayout.ranges(size: configuration.memorySize)
        if let memoryFile {
            guard configuration.sharedMemory else {
                throw MachineError(.invalidConfiguration, "a memory file is only for a machine with shared memory")
            }
            memory = try GuestMemory(ranges: ranges, sharedFile: memoryFile)
        } else {
            memory = try GuestMemory(ranges: ranges, shared: configuration.sharedMemory)
        }
        do {
            vcpuStateSupport = try kvm.vcpuStateSupport()
            vm = try kvm.createVM()
            for (slot, region) in memory.regions.enumerated() {
                try vm.setMemoryRegion(slot: UInt32(slot), guestAddress: region.range.start, size: region.range.size,
                                       hostAddress: region.host)
            }
            try vm.setIdentityMapAddress(BootLayout.kvmIdentityMapAddress)
            try vm.setTSSAddress(BootLayout.kvmTSSAddress)
            try vm.createInterruptController()
            try vm.createPIT()
            var vcpus: [KVMVCPU] = []
            for id in 0..<configuration.cpus { vcpus.append(try vm.createVCPU(id: UInt32(id))) }
            self.vcpus = vcpus
        } catch {
            throw MachineError.host("creating the VM", error)
        }
        let control = VCPUControl(vcpus: vcpus, phase: phase)
        self.control = control
        let vmForIRQ = vm
        serial = Serial8250(output: serialOutput, setInterrupt: { high in
            try? vmForIRQ.setInterruptLine(Serial8250.interruptLine, high: high)
        })
        let id = ID()
        self.id = id
        let stopOnce = StopLatch { onStop(id, $0) }
        stopLatch = stopOnce
        i8042 = I8042(onReset: { [control] in
            if stopOnce.fire(.guest) { control.requestExit() }
        })
        interruptRouter = InterruptRouter(vm: vm)
        let (virtioDevices, virtioIDs) = try Self.makeVirtioDevices(configuration, memory: memory, router: interruptRouter,
                                                                    consoleOutput: consoleOutput)
        self.virtioDevices = virtioDevices
        pciBus = PCIBus(devices: virtioDevices)
        var devices: [(ports: ClosedRange<UInt16>, device: any PortIODevice)] = [(I8042.ports, i8042), (PCIBus.ports, pciBus)]
        if configuration.serialPort { devices.append((Serial8250.ports, serial)) }
        bus = PortIOBus(devices)
        statefulDevices = [(DeviceID.serial, serial), (DeviceID.i8042, i8042)] + zip(virtioIDs, virtioDevices).map { ($0, $1) }
    }

    /// The configuration's virtio devices — disks, network cards, then the entropy device, then the console —
    /// with their BARs placed, and the ids their states carry.
    private static func makeVirtioDevices(_ configuration: MachineConfiguration, memory: GuestMemory, router: InterruptRouter,
                                          consoleOutput: @escaping @Sendable ([UInt8]) -> Void) throws(MachineError)
        -> ([VirtioPCIDevice], [String]) {
        var backends: [(String, any VirtioBackend)] = []
        for disk in configuration.disks { backends.append(("virtio-blk:\(disk.id)", try VirtioBlock(disk))) }
        for network in configuration.networks { backends.append(("virtio-net:\(network.id)", try VirtioNet(network))) }
        if let source = configuration.entropySource { backends.append(("virtio-rng", try VirtioEntropy(source: source))) }
        if configuration.virtioConsole { backends.append(("virtio-console", try VirtioConsole(output: consoleOutput))) }
        var allocator = BARAllocator(endOfRAM: memory.ranges.map(\.end).max() ?? 0)
        var devices: [VirtioPCIDevice] = []
        let lines = INTxLines(router: router)
        for (index, (_, backend)) in backends.enumerated() {
            let slot = PCIBus.slot(ofDevice: index)
            do {
                devices.append(try VirtioPCIDevice(backend: backend, memory: memory, router: router,
                                                   barAddress: try allocator.allocate(size: VirtioPCI.barSize),
                                                   interruptPin: PCIBus.interruptPin(slot: slot),
                                                   setINTx: { lines.set(PCIBus.interruptPin(slot: slot), source: slot, high: $0) },
                                                   log: Self.logDeviceError))
            } catch {
                throw MachineError.host("creating \(backend.name)", error)
            }
        }
        return (devices, backends.map(\.0))
    }

    /// Where devices report what a guest did wrong: the VMM's standard error.
    private static let logDeviceError: @Sendable (String) -> Void = { message in
        FileHandle.standardError.write(Data("ferry: \(message)\n".utf8))
    }

    /// Loads the kernel and boot tables and sets every vCPU to its power-on state, the first one
    /// at the kernel's entry point.
    private func prepareToBoot() throws(MachineError) {
        let entry = try BootLoader.load(kernelPath: configuration.kernel, initramfsPath: configuration.initramfs,
                                        commandLine: configuration.commandLine, cpuCount: configuration.cpus,
                                        pciSlots: virtioDevices.indices.map(PCIBus.slot(ofDevice:)), memory: memory)
        do {
            let supportedCPUID = try kvm.supportedCPUID()
            for vcpu in vcpus {
                let index = Int(vcpu.id)
                try vcpu.setCPUID(CPUIDTemplate.entries(supported: supportedCPUID, vcpu: index, count: configuration.cpus,
                                                        hostEmulatesGuestKernel: CPUIDTemplate.hostEmulatesGuestKernel))
                try vcpu.setMSRs(BootMSRs.entries)
                try vcpu.resetFPU()
                try vcpu.setLocalAPIC(LocalAPICSetup.configure(try vcpu.localAPIC()))
                guard index == 0 else { continue }
                let base = try vcpu.specialRegisters()
                let (regs, sregs) = switch entry {
                case let .pvh(entry, startInfo): BootCPUState.pvh(entry: entry, startInfo: startInfo, base: base)
                case let .linux64(entry, zeroPage): BootCPUState.linux64(entry: entry, zeroPage: zeroPage, base: base)
                }
                try vcpu.setSpecialRegisters(sregs)
                try vcpu.setRegisters(regs)
            }
        } catch {
            throw MachineError.host("setting up the vCPUs to boot", error)
        }
    }

    public var phase: Phase { control.currentPhase }

    /// The share of time every vCPU is kept out of the guest, 0–99 (auto-converge slows a guest
    /// that dirties memory faster than a migration carries it, as QEMU's CPU throttle). 0 lets
    /// the vCPUs run freely again; stopping the machine ends it too.
    public var vcpuThrottlePercent: Int {
        get { control.throttle }
        set { control.setThrottle(newValue) }
    }

    /// `ready` → `running`: starts every vCPU on its own thread, and returns once each thread
    /// runs under its name (`vcpuN`, which management software such as libvirt looks for in
    /// `/proc/PID/task/*/comm` as soon as the VM has booted).
    public func start() throws(MachineError) {
        try control.start(startDevices: { for device in virtioDevices { device.startIO() } }, launch: launchVCPUThreads)
    }

    /// Starts the vCPU threads of a machine that waits for its state (an incoming migration's)
    /// ahead of `start()`: they park until it. Starting a thread, and compiling and loading its
    /// seccomp list, then happen while the guest still runs on the source, not in its pause.
    /// Nothing if the threads run already; `stop()` ends them as it ends running ones.
    public func launchVCPUThreadsEarly() {
        control.launchParked(launchVCPUThreads)
    }

    /// Starts one thread per vCPU and returns once each is named and confined.
    private func launchVCPUThreads() {
        let named = DispatchSemaphore(value: 0)
        VCPUControl.installKickSignalHandler()
        for vcpu in vcpus {
            let name = "vcpu\(vcpu.id)"
            startThread(named: name, stackSize: 1 << 20) { [self] in
                Self.confine(.vcpu, name: name)
                named.signal()
                runLoop(vcpu)
            }
        }
        for _ in vcpus { named.wait() }
    }

    /// `running` → `paused`: stops every vCPU at its next exit and returns once all are parked.
    /// Device I/O stops too, after the requests in hand complete, so that what a saved state or
    /// a final memory copy sees is final.
    public func pause() throws(MachineError) {
        try control.pause()
        for device in virtioDevices { device.pauseIO() }
    }

    /// `paused` → `running`.
    public func resume() throws(MachineError) {
        try control.resume()
        for device in virtioDevices { device.startIO() }
    }

    /// The network cards' counters, by card id.
    public var networkCounters: [String: NetworkCounters] {
        Dictionary(uniqueKeysWithValues: virtioDevices.compactMap { device in
            (device.backend as? VirtioNet).map { ($0.network.id, $0.counters) }
        })
    }

    /// Announces every network card once on its tap's network (a RARP frame from its address),
    /// so that bridges learn where the guest is now; see `VirtioNet.announce`.
    public func announceNetworks() {
        for case let network as VirtioNet in virtioDevices.map(\.backend) { network.announce() }
    }

    /// Ends every vCPU thread and waits for them, at most `timeout`; returns whether all ended.
    /// Idempotent.
    @discardableResult
    public func stop(timeout: Duration = .seconds(5)) -> Bool {
        stopLatch.fire(.requested)
        let ended = control.exitAll(timeout: timeout)
        for device in virtioDevices { device.stopIO() }
        return ended
    }

    /// Raises a non-maskable interrupt on every vCPU, as a machine's NMI button does (`vm.nmi`):
    /// a message to each vCPU's local APIC (physical destination = the vCPU's APIC id) with
    /// delivery mode NMI. A paused vCPU takes it when it runs again.
    public func injectNMI() throws(MachineError) {
        let localAPICWindow: UInt64 = 0xFEE0_0000
        let deliveryModeNMI: UInt32 = 0b100 << 8
        for vcpu in vcpus {
            do {
                try vm.signalMessage(address: localAPICWindow | UInt64(vcpu.id) << 12, data: deliveryModeNMI)
            } catch {
                throw MachineError.host("NMI to vCPU \(vcpu.id)", error)
            }
        }
    }

    /// Feeds host input to the guest's serial console.
    public func sendConsoleInput(_ bytes: [UInt8]) {
        serial.enqueueInput(bytes)
    }

    /// Feeds host input to the guest's virtio console, if it has one.
    public func sendVirtioConsoleInput(_ bytes: [UInt8]) {
        for device in virtioDevices {
            (device.backend as? VirtioConsole)?.enqueueInput(bytes)
        }
    }

    // MARK: vCPU threads

    private func runLoop(_ vcpu: KVMVCPU) {
        control.threadStarted(vcpu)
        while control.waitUntilRunnable(vcpu, settle: { settle(vcpu) }) {
            let exit: VCPUExit
            do {
                exit = try vcpu.runOnce()
            } catch {
                fail("\(error)")
                break
            }
            if let failure = handle(exit, on: vcpu) {
                fail(failure)
                break
            }
        }
        control.threadExited(vcpu)
    }

    /// Lets KVM finish the vCPU's last exit before it parks, so that a paused vCPU's state is
    /// complete: no `in` whose value has not reached RAX, no `out` whose RIP has not moved on.
    private func settle(_ vcpu: KVMVCPU) {
        do {
            while let exit = try vcpu.completePendingExit() {
                if let failure = handle(exit, on: vcpu) {
                    fail(failure)
                    return
                }
            }
        } catch {
            fail("\(error)")
        }
    }

    private func fail(_ message: String) {
        if stopLatch.fire(.failed(message)) { control.requestExit() }
    }

    /// Handles one exit; returns a failure message for exits that end the VM.
    private func handle(_ exit: VCPUExit, on vcpu: KVMVCPU) -> String? {
        switch exit {
        case let .portIO(port, size, count, isWrite, data):
            if isWrite {
                for element in 0..<count {
                    bus.write(port: port, data: Array(data[element * size..<(element + 1) * size]))
                }
            } else {
                var bytes: [UInt8] = []
                for _ in 0..<count { bytes += bus.read(port: port, size: size) }
                vcpu.completeRead(bytes)
            }
            return nil
        case let .mmio(address, size, isWrite, data):
            // PCI: ECAM and device BARs. Elsewhere (besides the in-kernel APICs) nothing answers:
            // reads see an absent device, writes vanish.
            var bytes = isWrite ? data : [UInt8](repeating: 0xFF, count: size)
            let claimed = pciBus.handleMemory(address: address, isWrite: isWrite, data: &bytes)
            if !isWrite { vcpu.completeRead(claimed ? bytes : []) }
            return nil
        case .interrupted, .halt:
            return nil
        case let .systemEvent(type):
            if type == KVMSystemEvent.crash {
                return "the guest crashed (KVM system event \(type)) on vCPU \(vcpu.id)\(Self.ripText(vcpu))"
            }
            if stopLatch.fire(.guest) { control.requestExit() }
            return nil
        case .shutdown:
            return "triple fault (KVM_EXIT_SHUTDOWN) on vCPU \(vcpu.id)\(Self.ripText(vcpu))"
        case let .internalError(suberror):
            let kind = suberror == 1 ? " (instruction emulation failed)" : ""
            return "KVM internal error, suberror \(suberror)\(kind), on vCPU \(vcpu.id)\(Self.ripText(vcpu))"
        case let .failedEntry(reason):
            return "entering the guest failed (KVM_EXIT_FAIL_ENTRY, hardware reason 0x\(String(reason, radix: 16))) on vCPU \(vcpu.id)\(Self.ripText(vcpu))"
        case let .other(reason):
            return "unhandled KVM exit reason \(reason) on vCPU \(vcpu.id)\(Self.ripText(vcpu))"
        }
    }

    private static func ripText(_ vcpu: KVMVCPU) -> String {
        guard let regs = try? vcpu.registers() else { return "" }
        return " at RIP 0x\(String(regs.rip, radix: 16))"
    }
}

/// KVM_SYSTEM_EVENT types (include/uapi/linux/kvm.h).
enum KVMSystemEvent {
    static let crash: UInt32 = 3
}

/// Reports the first stop reason exactly once.
final class StopLatch: Sendable {
    private let fired = Mutex(false)
    private let handler: @Sendable (MachineStop) -> Void

    init(_ handler: @escaping @Sendable (MachineStop) -> Void) {
        self.handler = handler
    }

    /// Returns true if this call was the first; only the first reason reaches the handler.
    @discardableResult
    func fire(_ reason: MachineStop) -> Bool {
        let first = fired.withLock { fired in
            defer { fired = true }
            return !fired
        }
        if first, reason != .requested { handler(reason) }
        return first
    }
}

extension Machine {
    /// Adds `kind`'s seccomp list (`SeccompPolicy`) to the calling thread before it acts for the
    /// guest. A thread that cannot be confined ends the process rather than run the guest unconfined.
    static func confine(_ kind: SeccompPolicy.ThreadKind, name: String) {
        do {
            try Seccomp.confineCurrentThread(kind, name: name, ioctls: guestThreadIoctls)
        } catch {
            fatalError("\(name): \(error)")
        }
    }
}

extension Machine {
    /// The only `ioctl` requests a vCPU thread may make (`SeccompPolicy`): running the
    /// vCPU, its state and the VM's (saved and set around a pause), interrupts (lines, MSIs, MSI
    /// routes a guest programs, irqfds), doorbells (ioeventfds) and queries, and the tap settings a guest's driver
    /// negotiates. Not the calls that create or reshape a VM (`KVM_CREATE_*`, memory slots, the
    /// dirty log), nor any other device's or terminal's.
    static let guestThreadIoctls: [UInt] = [
        CKVM_RUN, CKVM_GET_REGS, CKVM_SET_REGS, CKVM_GET_SREGS, CKVM_SET_SREGS, CKVM_GET_FPU, CKVM_SET_FPU,
        CKVM_GET_CPUID2, CKVM_SET_CPUID2, CKVM_GET_MSRS, CKVM_SET_MSRS, CKVM_GET_LAPIC, CKVM_SET_LAPIC,
        CKVM_GET_MP_STATE, CKVM_SET_MP_STATE, CKVM_GET_VCPU_EVENTS, CKVM_SET_VCPU_EVENTS, CKVM_GET_XSAVE, CKVM_SET_XSAVE,
        CKVM_GET_XCRS, CKVM_SET_XCRS, CKVM_GET_DEBUGREGS, CKVM_SET_DEBUGREGS, CKVM_GET_TSC_KHZ, CKVM_SET_TSC_KHZ,
        CKVM_GET_IRQCHIP, CKVM_SET_IRQCHIP, CKVM_GET_PIT2, CKVM_SET_PIT2, CKVM_GET_CLOCK, CKVM_SET_CLOCK,
        CKVM_IRQ_LINE, CKVM_SIGNAL_MSI, CKVM_SET_GSI_ROUTING, CKVM_IRQFD, CKVM_IOEVENTFD, CKVM_CHECK_EXTENSION, CKVM_GET_API_VERSION,
        CKVM_GET_VCPU_MMAP_SIZE, CKVM_GET_SUPPORTED_CPUID, CKVM_GET_MSR_INDEX_LIST,
        CKVM_TUNSETOFFLOAD, CKVM_TUNSETVNETHDRSZ,
    ].map { UInt($0) }
}
