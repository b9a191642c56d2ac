import Events
import Foundation
import HostOS
import LiveMigration
import Logging
import Machine
import Synchronization

/// The VMM core: owns the one VM, serialises every operation on it, and reports every lifecycle
/// edge as an event (docs/events.md §4).
///
/// The VM's lifecycle is one value, `Lifecycle` (docs/architecture.md draws it): an operation
/// checks the case it may start from, refuses any other without changing anything or emitting
/// anything, and moves to the next case.
public actor VirtualMachineMonitor {
    /// Ferry's version, as `vmm.starting` and `vmm.ping` report it.
    public static let version = "0.1.0"
    /// The Cloud Hypervisor release whose API, flags and events Ferry serves: what `--version`
    /// and `vmm.ping` report to clients that switch features on by it (libvirt's ch driver).
    public static let cloudHypervisorVersion = "48.0.0"
    /// Both, in Cloud Hypervisor's build-version form: `v48.0.0-ferry-0.1.0` (`vmm.ping`'s
    /// `build_version`, and `--version` after `cloud-hypervisor `).
    public static let buildVersion = "v\(cloudHypervisorVersion)-ferry-\(version)"
    /// What `vmm.ping` lists in `features`, for clients to switch on: Cloud Hypervisor's `kvm`
    /// (the hypervisor), then Ferry's capabilities beyond that release, each named after what it
    /// adds.
    public static let features = ["kvm", "ferry", "vmm.events", "vm.migration-progress", "migration_events"]

    /// The VM's state, spelled as Cloud Hypervisor's `vm.info` spells it.
    public enum VMState: String, Sendable, Codable {
        case created = "Created"
        case running = "Running"
        case paused = "Paused"
        case shutdown = "Shutdown"
    }

    /// Why the VMM process ends, and the exit status that goes with it.
    public enum ExitReason: Equatable, Sendable {
        /// The guest stopped and the VMM runs without an API (boot-at-once mode).
        case guestShutdown
        case signalled(Int32)
        /// The VM migrated away and the VMM was not asked to stay up (`keep_alive`).
        case migrated
        /// `vmm.shutdown` over the API.
        case requested
        case failed(String)

        public var exitStatus: Int32 {
            switch self {
            case .guestShutdown, .signalled, .requested, .migrated: 0
            case .failed: 1
            }
        }
    }

    /// A VM whose machine exists: booted, restored or received.
    struct LiveVM: Sendable {
        var configuration: VMConfiguration
        var machine: Machine
        /// Where its serial console output goes; closed when the VM is gone.
        var console: ConsoleOutput
        /// Where its virtio console output goes.
        var virtioConsole: ConsoleOutput
    }

    /// What the guest of a VM that is migrating does meanwhile.
    enum GuestActivity: Sendable {
        case running
        case paused
        /// It powered off or failed; the migration is ending.
        case stopped

        var vmState: VMState {
            switch self {
            case .running: .running
            case .paused: .paused
            case .stopped: .shutdown
            }
        }
    }

    /// An incoming migration, and the VM it brought once the guest is here (until the receive has
    /// emitted its last event, the lifecycle stays here, so that no other operation's events come
    /// between the guest's arrival and `vm.migration-receive-finished`).
    struct IncomingMigration: Sendable {
        var receiver: MigrationReceiver
        var arrived: (vm: LiveVM, guest: GuestActivity)?
    }

    /// An outgoing migration.
    enum OutgoingMigration: Sendable {
        /// `vm.send-migration` is connecting to the destination; `cancelRequested` once
        /// `vm.cancel-migration` came meanwhile.
        case connecting(cancelRequested: Bool)
        case sending(MigrationSender)
    }

    /// One VMM's VM, from no VM to deleted. While a migration runs in either direction, only
    /// queries are answered.
    enum Lifecycle: Sendable {
        case noVM
        case created(VMConfiguration)
        case running(LiveVM)
        case paused(LiveVM)
        /// Stopped (guest power-off, `vm.shutdown`, a failure); it can boot again.
        case shutDown(VMConfiguration)
        case migratingOut(LiveVM, GuestActivity, OutgoingMigration)
        /// `vm.receive-migration` waits for a sender or receives.
        case migratingIn(IncomingMigration)

        /// The state `vm.info` reports; nil without a VM.
        var vmState: VMState? {
            switch self {
            case .noVM: nil
            case .created: .created
            case .running: .running
            case .paused: .paused
            case .shutDown: .shutdown
            case .migratingOut(_, let guest, _): guest.vmState
            case .migratingIn(let incoming): incoming.arrived?.guest.vmState
            }
        }

        var configuration: VMConfiguration? {
            switch self {
            case .noVM: nil
            case let .created(configuration), let .shutDown(configuration): configuration
            case let .running(vm), let .paused(vm), let .migratingOut(vm, _, _): vm.configuration
            case .migratingIn(let incoming): incoming.arrived?.vm.configuration
            }
        }

        /// Where a VM lands once no migration holds it: running or paused as its guest is, or
        /// shut down if the guest stopped meanwhile.
        static func settled(_ vm: LiveVM, _ guest: GuestActivity) -> Lifecycle {
            switch guest {
            case .running: .running(vm)
            case .paused: .paused(vm)
            case .stopped: .shutDown(vm.configuration)
            }
        }

        var liveVM: LiveVM? {
            switch self {
            case let .running(vm), let .paused(vm), let .migratingOut(vm, _, _): vm
            case .migratingIn(let incoming): incoming.arrived?.vm
            default: nil
            }
        }
    }

    public nonisolated let events: EventMonitor
    let logger: Logger
    /// Without an API, the process ends with its VM; with one, the VMM outlives the guest.
    private let exitsWithVM: Bool
    /// The process's terminal, for the VM whose console is `tty`.
    let terminal = TerminalInput()

    var lifecycle = Lifecycle.noVM { didSet { publishInfo() } }
    /// The current or last migration's progress, readable without waiting for the actor.
    nonisolated let publishedProgress = Mutex<MigrationProgressTracker?>(nil)
    /// Waiting for the migration under way to end (`finish()`).
    var migrationWaiters: [CheckedContinuation<Void, Never>] = []
    /// What `info()` answers, readable without waiting for the actor, so that `vm.info` stays
    /// responsive while a long operation (a snapshot of a large guest) runs.
    private nonisolated let publishedInfo = Mutex<Info?>(nil)
    var exitReason: ExitReason?
    private var exitWaiters: [CheckedContinuation<ExitReason, Never>] = []

    public init(events: EventMonitor, logger: Logger, exitsWithVM: Bool) {
        self.events = events
        self.logger = logger
        self.exitsWithVM = exitsWithVM
        _ = Courier.shared  // its thread starts here, with the process's filters only
        events.emitStarting(version: Self.version)
    }

    // MARK: Queries

    public struct Info: Sendable, Equatable {
        public var configuration: VMConfiguration
        public var state: VMState
        public var memoryActualSize: UInt64
        /// The pseudo-terminals of `pty` consoles, while the VM has them.
        public var serialTerminal: String?
        public var consoleTerminal: String?
    }

    public nonisolated func info() throws(VMMError) -> Info {
        guard let info = publishedInfo.withLock({ $0 }) else { throw VMMError(.noVM, "no VM has been created") }
        return info
    }

    /// `vm.counters`, as Cloud Hypervisor reports them: per device id, each counter by name.
    /// Network cards count frames and bytes each way and the frames they dropped.
    public func counters() throws(VMMError) -> [String: [String: UInt64]] {
        let machine: Machine? = switch lifecycle {
        case let .running(vm), let .paused(vm), let .migratingOut(vm, _, _): vm.machine
        case .migratingIn(let incoming): incoming.arrived?.vm.machine
        case .created, .shutDown: nil
        case .noVM: throw VMMError(.noVM, "no VM has been created")
        }
        return (machine?.networkCounters ?? [:]).mapValues { counters in
            ["rx_frames": counters.rxFrames, "rx_bytes": counters.rxBytes, "rx_dropped": counters.rxDropped,
             "tx_frames": counters.txFrames, "tx_bytes": counters.txBytes, "tx_dropped": counters.txDropped]
        }
    }

    private func publishInfo() {
        let info = lifecycle.configuration.flatMap { configuration in
            lifecycle.vmState.map {
                Info(configuration: configuration, state: $0, memoryActualSize: configuration.machine.memorySize,
                     serialTerminal: lifecycle.liveVM?.console.terminalPath,
                     consoleTerminal: lifecycle.liveVM?.virtioConsole.terminalPath)
            }
        }
        publishedInfo.withLock { $0 = info }
    }

    /// The error for an operation the lifecycle's current case does not allow: no VM, a
    /// migration under way, or `requirement` (e.g. "only a Running VM can pause").
    func refusal(_ requirement: String = "it cannot do that") -> VMMError {
        switch lifecycle {
        case .noVM:
            VMMError(.noVM, "no VM has been created")
        case .migratingOut:
            VMMError(.wrongState, "the VM is being migrated; only vm.info is answered until the migration ends")
        case .migratingIn:
            VMMError(.wrongState, "this VMM is receiving a migration; only vm.info is answered until it ends")
        default:
            VMMError(.wrongState, "the VM is \(lifecycle.vmState?.rawValue ?? "gone"); \(requirement)")
        }
    }

    // MARK: Operations

    public func create(_ configuration: VMConfiguration) throws(VMMError) {
        switch lifecycle {
        case .noVM: break
        case .migratingOut, .migratingIn: throw refusal()
        default: throw VMMError(.wrongState, "a VM already exists; delete it first")
        }
        let machine = configuration.machine
        do {
            try machine.validate()
        } catch {
            throw VMMError(.invalidRequest, error.message, cause: error)
        }
        for (field, path) in [("payload.kernel", machine.kernel), ("payload.initramfs", machine.initramfs)] {
            if let path, !FileManager.default.isReadableFile(atPath: path) {
                throw VMMError(.invalidRequest, "\(field): \(path) does not exist or is not readable")
            }
        }
        do {
            try BootLoader.check(kernelPath: machine.kernel, initramfsPath: machine.initramfs,
                                 commandLine: machine.commandLine, memorySize: machine.memorySize)
        } catch {
            throw VMMError(.invalidRequest, "payload: \(error.message)", cause: error)
        }
        lifecycle = .created(configuration)
    }

    public func boot() throws(VMMError) {
        let configuration: VMConfiguration
        switch lifecycle {
        case let .created(created), let .shutDown(created): configuration = created
        default: throw refusal("only a Created or Shutdown VM can boot")
        }
        events.emit(VMEvent.Booting())
        do {
            lifecycle = .running(try startMachine(configuration))
        } catch {
            events.emit(VMEvent.Shutdown(reason: .guest, error: "\(error)"))
            lifecycle = .shutDown(configuration)
            throw VMMError("booting failed", error)
        }
        events.emit(VMEvent.Booted())
    }

    public func pause() throws(VMMError) {
        guard case .running(let vm) = lifecycle else { throw refusal("it must be Running to pause") }
        try pause(vm)
        lifecycle = .paused(vm)
    }

    /// Pauses the guest of `vm` with its events; the caller moves the lifecycle on.
    func pause(_ vm: LiveVM) throws(VMMError) {
        events.emit(VMEvent.Pausing())
        do {
            try vm.machine.pause()
        } catch {
            throw VMMError("pausing failed", error)
        }
        events.emit(VMEvent.Paused())
    }

    /// `vm.add-net` before boot: the card joins the Created (or Shutdown) VM's configuration. A
    /// running guest cannot take one: Ferry has no PCI hotplug.
    public func addNetwork(_ network: NetworkConfiguration) throws(VMMError) {
        switch lifecycle {
        case let .created(configuration):
            lifecycle = .created(try configuration.adding(network))
        case let .shutDown(configuration):
            lifecycle = .shutDown(try configuration.adding(network))
        case .running, .paused:
            throw refusal("Ferry has no hotplug: add network cards between vm.create and vm.boot")
        default:
            throw refusal()
        }
    }

    /// `vm.nmi`: a non-maskable interrupt to every vCPU of the Running or Paused guest.
    public func nmi() throws(VMMError) {
        let vm: LiveVM
        switch lifecycle {
        case let .running(running), let .paused(running): vm = running
        default: throw refusal("it must be Running or Paused to take an NMI")
        }
        do {
            try vm.machine.injectNMI()
        } catch {
            throw VMMError("the NMI failed", error)
        }
    }

    /// `vm.power-button`: Ferry's machine has no ACPI, hence no power button to press.
    public func pressPowerButton() throws(VMMError) {
        guard lifecycle.vmState != nil else { throw refusal() }
        throw VMMError(.invalidRequest, "Ferry's machine has no ACPI power button; stop the guest with vm.shutdown, or from inside it")
    }

    public func resume() throws(VMMError) {
        guard case .paused(let vm) = lifecycle else { throw refusal("it must be Paused to resume") }
        try resume(vm)
        lifecycle = .running(vm)
    }

    /// Runs the paused guest of `vm` with its events; the caller moves the lifecycle on.
    func resume(_ vm: LiveVM) throws(VMMError) {
        events.emit(VMEvent.Resuming())
        do {
            // A VM restored or received paused has never run on this host: it starts rather than resumes.
            if vm.machine.phase == .ready { try vm.machine.start() } else { try vm.machine.resume() }
        } catch {
            throw VMMError("resuming failed", error)
        }
        events.emit(VMEvent.Resumed())
    }

    /// Stops the guest (API `vm.shutdown`); the VM's configuration stays, and it can boot again.
    public func shutdown() throws(VMMError) {
        guard let vm = stoppableVM() else { throw refusal("only a Running or Paused VM can shut down") }
        stop(vm)
        lifecycle = .shutDown(vm.configuration)
        events.emit(VMEvent.Shutdown(reason: .api))
    }

    /// Restarts the guest from its kernel with the same configuration.
    public func reboot() throws(VMMError) {
        guard let vm = stoppableVM() else { throw refusal("only a Running or Paused VM can reboot") }
        events.emit(VMEvent.Rebooting())
        stop(vm)
        do {
            lifecycle = .running(try startMachine(vm.configuration))
        } catch {
            lifecycle = .shutDown(vm.configuration)
            events.emit(VMEvent.Shutdown(reason: .guest, error: "\(error)"))
            throw VMMError("rebooting failed", error)
        }
        events.emit(VMEvent.Rebooted())
    }

    /// Removes the VM, stopping it first if it runs; without a VM there is nothing to do.
    public func delete() throws(VMMError) {
        switch lifecycle {
        case .created, .shutDown:
            break
        case .running, .paused:
            try shutdown()
        case .noVM:
            return  // nothing to delete: done, as Cloud Hypervisor answers
        case .migratingOut, .migratingIn:
            throw refusal()
        }
        forgetVM()
        events.emit(VMEvent.Deleted())
    }

    /// The VM is gone from this VMM: the tap descriptors it held are closed.
    func forgetVM() {
        for descriptor in lifecycle.configuration?.tapDescriptors ?? [] { close(descriptor) }
        lifecycle = .noVM
    }

    /// The VM of a Running or Paused lifecycle.
    private func stoppableVM() -> LiveVM? {
        switch lifecycle {
        case .running(let vm), .paused(let vm): vm
        default: nil
        }
    }

    // MARK: Snapshot and restore

    /// Writes the paused VM's complete state and memory into `directory` (created if needed).
    public func snapshot(to directory: String) throws(VMMError) {
        guard case .paused(let vm) = lifecycle else { throw refusal("it must be Paused to snapshot") }
        events.emit(VMEvent.Snapshotting())
        do {
            let state = try vm.machine.saveState()
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            try vm.machine.saveMemory(toFile: (directory as NSString).appendingPathComponent(Snapshot.memoryFile))
            try Snapshot(formatVersion: Snapshot.currentFormatVersion, configuration: vm.configuration, machine: state)
                .write(to: directory)
        } catch {
            events.emit(VMEvent.SnapshotFailed(error: "\(error)"))
            throw VMMError(.internalFailure, "snapshot failed: \(error)", cause: error)
        }
        events.emit(VMEvent.Snapshotted(destination: directory))
    }

    /// Creates the VM from a snapshot directory; it runs if `resume`, and is Paused otherwise.
    /// Restores the snapshot in `directory`; the cards named in `tapDescriptors` use those taps.
    public func restore(from directory: String, resume: Bool, tapDescriptors: [String: Int32] = [:]) throws(VMMError) {
        switch lifecycle {
        case .noVM: break
        case .migratingOut, .migratingIn: throw refusal()
        default: throw VMMError(.wrongState, "a VM already exists; restore needs a VMM without one")
        }
        let snapshot = try Snapshot.read(from: directory)
        let configuration = try snapshot.configuration.withTapDescriptors(tapDescriptors)
        do {
            try configuration.machine.validate()
        } catch {
            throw VMMError(.invalidRequest, "the snapshot's VM does not fit this host: \(error)", cause: error)
        }
        events.emit(VMEvent.Restoring(source: directory))
        let vm: LiveVM
        do {
            vm = try prepareMachine(configuration, appendingToConsole: true)
            try vm.machine.loadMemory(fromFile: (directory as NSString).appendingPathComponent(Snapshot.memoryFile))
            try vm.machine.restore(snapshot.machine)
        } catch {
            events.emit(VMEvent.RestoreFailed(error: "\(error)"))
            throw VMMError("restore from \(directory) failed", error)
        }
        install(vm)
        lifecycle = .paused(vm)
        events.emit(VMEvent.Restored())
        if resume {
            try self.resume()
        }
    }

    // MARK: Process lifetime

    /// Ends the VMM: `waitForExit` returns `reason` (the first one asked for wins).
    public func requestExit(_ reason: ExitReason) {
        guard exitReason == nil else { return }
        exitReason = reason
        for waiter in exitWaiters { waiter.resume(returning: reason) }
        exitWaiters.removeAll()
    }

    public func waitForExit() async -> ExitReason {
        if let exitReason { return exitReason }
        return await withCheckedContinuation { exitWaiters.append($0) }
    }

    /// The last act before the process exits: ends a migration under way (its terminal event says
    /// the VMM is shutting down), stops a running VM (`vm.shutdown reason=api`), emits
    /// `vmm.shutdown` and closes the event monitor.
    public func finish() async {
        await endMigration()
        if stoppableVM() != nil { try? shutdown() }
        events.emit(VMMEvent.Shutdown())
        events.close()
    }

    // MARK: The machine

    /// Builds and starts a machine that boots `configuration`'s kernel.
    private func startMachine(_ configuration: VMConfiguration) throws -> LiveVM {
        let console = try ConsoleOutput(mode: configuration.serial)
        let virtioConsole = try ConsoleOutput(mode: configuration.console, field: "console")
        let machine = try Machine.forBoot(configuration: configuration.machine, serialOutput: console.write,
                                          consoleOutput: virtioConsole.write, onStop: stopHandler())
        let vm = LiveVM(configuration: configuration, machine: machine, console: console, virtioConsole: virtioConsole)
        try machine.start()
        install(vm)
        logger.info("VM booted", metadata: ["cpus": "\(configuration.machine.cpus)",
                                            "memory": "\(configuration.machine.memorySize >> 20) MiB"])
        return vm
    }

    /// A machine that waits for a saved state (restore, or an incoming migration), with its console;
    /// its RAM is `memoryFile` if given (a local migration's).
    nonisolated func prepareMachine(_ configuration: VMConfiguration, memoryFile: FileDescriptor? = nil,
                                    appendingToConsole: Bool) throws -> LiveVM {
        let console = try ConsoleOutput(mode: configuration.serial, appending: appendingToConsole)
        let virtioConsole = try ConsoleOutput(mode: configuration.console, field: "console", appending: appendingToConsole)
        let machine = try Machine.forRestore(configuration: configuration.machine, memoryFile: memoryFile, serialOutput: console.write,
                                             consoleOutput: virtioConsole.write, onStop: stopHandler())
        return LiveVM(configuration: configuration, machine: machine, console: console, virtioConsole: virtioConsole)
    }

    /// What a machine calls when its guest stops by itself: a report to this VMM, naming the machine.
    /// It comes from a vCPU thread, under the vCPU's seccomp list: the courier starts the task.
    private nonisolated func stopHandler() -> @Sendable (Machine.ID, MachineStop) -> Void {
        { [weak self] machine, stop in
            Courier.shared.post { [weak self] in Task { await self?.machineStopped(stop, machine: machine) } }
        }
    }

    /// `vm` has become this VMM's VM: its console takes the terminal's keystrokes if it is `tty`,
    /// and what a `pty` or `socket` console's client types.
    func install(_ vm: LiveVM) {
        vm.console.deliverInput { [weak machine = vm.machine] in machine?.sendConsoleInput($0) }
        vm.virtioConsole.deliverInput { [weak machine = vm.machine] in machine?.sendVirtioConsoleInput($0) }
        if vm.configuration.serial == .tty {
            terminal.attach(vm.machine)
        } else if vm.configuration.console == .tty {
            terminal.attach(vm.machine, virtioConsole: true)
        }
    }

    /// Stops `vm`'s machine and lets go of its console and the terminal.
    func stop(_ vm: LiveVM) {
        vm.console.deliverInput(to: nil)
        vm.virtioConsole.deliverInput(to: nil)
        if vm.configuration.serial == .tty || vm.configuration.console == .tty { terminal.detach() }
        if !vm.machine.stop() {
            logger.warning("a vCPU did not stop within the grace period; continuing without it")
        }
    }

    /// The guest powered off, or the VM failed. A report from a machine that is no longer this
    /// VMM's (already stopped, or replaced by a reboot) changes nothing.
    func machineStopped(_ stop: MachineStop, machine: Machine.ID) {
        guard let vm = lifecycle.liveVM, vm.machine.id == machine else { return }
        self.stop(vm)
        switch lifecycle {
        case let .migratingOut(_, _, outgoing):
            if case .sending(let sender) = outgoing { sender.requestStop(.guestStopped) }
            lifecycle = .migratingOut(vm, .stopped, outgoing)
        case var .migratingIn(incoming):
            incoming.arrived?.guest = .stopped
            lifecycle = .migratingIn(incoming)
        default:
            lifecycle = .shutDown(vm.configuration)
        }
        switch stop {
        case .guest, .requested:
            events.emit(VMEvent.Shutdown(reason: .guest))
            if exitsWithVM { requestExit(.guestShutdown) }
        case let .failed(message):
            if !exitsWithVM { logger.error("the VM stopped: \(message)") }
            events.emit(VMEvent.Shutdown(reason: .guest, error: message))
            if exitsWithVM { requestExit(.failed(message)) }
        }
    }
}
