import Foundation
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

/// One running x86-64 VM on KVM: guest memory, vCPUs on dedicated threads, devices.
///
/// States: created → running ⇄ paused → stopped. `start`, `pause`, `resume` and `stop` are
/// transitions; each refuses to run from a state it does not start from.
public final class Machine: Sendable {
    public enum State: String, Sendable { case created, running, paused, stopped }

    public let configuration: MachineConfiguration
    public let memory: GuestMemory
    let vm: KVMVirtualMachine
    let vcpus: [KVMVCPU]
    let serial: Serial8250
    let i8042: I8042
    let bus: PortIOBus
    /// Every device with saved state, under the id its state carries in a `MachineState`.
    let statefulDevices: [(id: String, device: any StatefulDevice)]
    /// What KVM on this host saves of a vCPU.
    let vcpuStateSupport: VCPUStateSupport
    let control: VCPUControl
    private let onStop: @Sendable (MachineStop) -> Void
    /// True from `forRestore` until `restore(_:)` has succeeded: the vCPUs hold no state yet.
    let awaitingState: Mutex<Bool>

    /// Device ids in a `MachineState`.
    enum DeviceID {
        static let serial = "serial0"
        static let i8042 = "i8042"
    }

    /// Creates the VM, loads the kernel and prepares every vCPU to boot.
    /// - Parameters:
    ///   - serialOutput: receives the bytes the guest writes to its console UART; nil leaves the UART out.
    ///   - onStop: called once, from a vCPU thread, when the guest stops by itself or fails.
    public convenience init(configuration: MachineConfiguration, serialOutput: (@Sendable ([UInt8]) -> Void)?,
                            onStop: @escaping @Sendable (MachineStop) -> Void) throws {
        try self.init(configuration: configuration, serialOutput: serialOutput, onStop: onStop, bootsKernel: true)
    }

    /// Creates the VM, guest memory, vCPUs and devices of `configuration` without loading a kernel
    /// or setting any vCPU up: the machine is `created` and waits for a saved state. Fill its RAM
    /// with `loadMemory(fromFile:)` (or by writing `memory` directly), apply the state with
    /// `restore(_:)`, then `start()` it; it refuses to start before `restore(_:)` succeeded.
    public static func forRestore(configuration: MachineConfiguration, serialOutput: (@Sendable ([UInt8]) -> Void)?,
                                  onStop: @escaping @Sendable (MachineStop) -> Void) throws -> Machine {
        try Machine(configuration: configuration, serialOutput: serialOutput, onStop: onStop, bootsKernel: false)
    }

    private init(configuration: MachineConfiguration, serialOutput: (@Sendable ([UInt8]) -> Void)?,
                 onStop: @escaping @Sendable (MachineStop) -> Void, bootsKernel: Bool) throws {
        try configuration.validate()
        self.configuration = configuration
        self.onStop = onStop
        awaitingState = Mutex(!bootsKernel)
        let kvm = try KVMSystem()
        try kvm.require(KVMCapability.irqchip, named: "an in-kernel interrupt controller (KVM_CAP_IRQCHIP)")
        try kvm.require(KVMCapability.immediateExit, named: "KVM_CAP_IMMEDIATE_EXIT")
        let maxVCPUs = Int(kvm.checkExtension(KVMCapability.maxVCPUs))
        if maxVCPUs > 0, configuration.cpus > maxVCPUs {
            throw MachineError("cpus: this host's KVM runs at most \(maxVCPUs) vCPUs per VM")
        }
        vcpuStateSupport = try kvm.vcpuStateSupport()
        vm = try kvm.createVM()
        memory = try GuestMemory(ranges: GuestRAMLayout.ranges(size: configuration.memorySize))
        for (slot, region) in memory.regions.enumerated() {
            try vm.setMemoryRegion(slot: UInt32(slot), guestAddress: region.range.start, size: region.range.size,
                                   hostAddress: region.host)
        }
        try vm.setIdentityMapAddress(BootLayout.kvmIdentityMapAddress)
        try vm.setTSSAddress(BootLayout.kvmTSSAddress)
        try vm.createInterruptController()
        try vm.createPIT()

        let control = VCPUControl(count: configuration.cpus)
        self.control = control
        let vmForIRQ = vm
        serial = Serial8250(output: serialOutput ?? { _ in }, setInterrupt: { high in
            try? vmForIRQ.setInterruptLine(Serial8250.interruptLine, high: high)
        })
        let stopOnce = StopLatch(onStop)
        i8042 = I8042(onReset: { [control] in
            if stopOnce.fire(.guest) { control.requestExit() }
        })
        var devices: [(ports: ClosedRange<UInt16>, device: any PortIODevice)] = [(I8042.ports, i8042)]
        if serialOutput != nil { devices.append((Serial8250.ports, serial)) }
        bus = PortIOBus(devices)
        statefulDevices = [(DeviceID.serial, serial), (DeviceID.i8042, i8042)]
        stopLatch = stopOnce

        let entry = try bootsKernel ? BootLoader.load(kernelPath: configuration.kernel, initramfsPath: configuration.initramfs,
                                                     commandLine: configuration.commandLine, cpuCount: configuration.cpus,
                                                     memory: memory) : nil
        let supportedCPUID = bootsKernel ? try kvm.supportedCPUID() : []
        var vcpus: [KVMVCPU] = []
        for index in 0..<configuration.cpus {
            let vcpu = try vm.createVCPU(id: UInt32(index))
            if let entry {
                try vcpu.setCPUID(CPUIDTemplate.entries(supported: supportedCPUID, vcpu: index, count: configuration.cpus,
                                                        hostEmulatesGuestKernel: CPUIDTemplate.hostEmulatesGuestKernel))
                try vcpu.setMSRs(BootMSRs.entries)
                try vcpu.resetFPU()
                try vcpu.setLocalAPIC(LocalAPICSetup.configure(try vcpu.localAPIC()))
                if index == 0 {
                    let base = try vcpu.specialRegisters()
                    let (regs, sregs) = switch entry {
                    case let .pvh(entry, startInfo): BootCPUState.pvh(entry: entry, startInfo: startInfo, base: base)
                    case let .linux64(entry, zeroPage): BootCPUState.linux64(entry: entry, zeroPage: zeroPage, base: base)
                    }
                    try vcpu.setSpecialRegisters(sregs)
                    try vcpu.setRegisters(regs)
                }
            }
            vcpus.append(vcpu)
        }
        self.vcpus = vcpus
        control.attach(vcpus)
    }

    private let stopLatch: StopLatch

    public var state: State { control.machineState }

    /// Starts every vCPU on its own thread.
    public func start() throws {
        if awaitingState.withLock({ $0 }) {
            throw MachineError("the VM was created to receive a saved state; restore one before starting it")
        }
        try control.transition(from: [.created], to: .running)
        VCPUControl.installKickSignalHandler()
        for vcpu in vcpus {
            let thread = Thread { [self] in runLoop(vcpu) }
            thread.name = "vcpu\(vcpu.id)"
            thread.stackSize = 1 << 20
            thread.start()
        }
    }

    /// Stops all vCPUs at their next exit and waits until they are parked.
    public func pause() throws {
        try control.transition(from: [.running], to: .paused)
        control.pauseAll()
    }

    public func resume() throws {
        try control.transition(from: [.paused], to: .running)
        control.resumeAll()
    }

    /// Ends every vCPU thread and waits for them, at most `timeout`; returns whether all ended.
    /// Idempotent.
    @discardableResult
    public func stop(timeout: Duration = .seconds(5)) -> Bool {
        stopLatch.fire(.requested)
        let seconds = Double(timeout.components.seconds) + Double(timeout.components.attoseconds) / 1e18
        return control.exitAll(timeout: seconds)
    }

    /// Feeds host input to the guest's console.
    public func sendConsoleInput(_ bytes: [UInt8]) {
        serial.enqueueInput(bytes)
    }

    // MARK: vCPU threads

    private func runLoop(_ vcpu: KVMVCPU) {
        control.threadStarted(vcpu)
        while control.waitUntilRunnable(vcpu, beforeParking: { settle(vcpu) }) {
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
        case .mmio(_, _, let isWrite, _):
            // No MMIO devices besides the in-kernel APICs: reads see an absent device, writes vanish.
            if !isWrite { vcpu.completeRead([]) }
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
