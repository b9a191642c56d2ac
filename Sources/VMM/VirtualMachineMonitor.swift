import Dispatch
import Events
import Foundation
import Logging
import Machine
import Synchronization

/// The VMM core: owns the one VM, serialises every operation on it, and reports every lifecycle
/// edge as an event (events.md section 3).
///
/// VM states follow Cloud Hypervisor: no VM → `Created` (vm.create) → `Running` (vm.boot) ⇄
/// `Paused` → `Shutdown` (vm.shutdown, or the guest powers off) → `Running` again (vm.boot), and
/// vm.delete from any state back to no VM. An operation in the wrong state changes nothing and
/// emits nothing.
public actor VirtualMachineMonitor {
    /// Ferry's version, as `vmm.starting` and `vmm.ping` report it.
    public static let version = "0.1.0"

    /// The VM's lifecycle state, spelled as Cloud Hypervisor's `vm.info` spells it.
    public enum VMState: String, Sendable, Codable {
        case created = "Created"
        case running = "Running"
        case paused = "Paused"
        case shutdown = "Shutdown"
    }

    /// How the VMM process ends, and the exit status that goes with it.
    public enum Outcome: Equatable, Sendable {
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

    public nonisolated let events: EventMonitor
    let logger: Logger
    /// Without an API, the process ends with its VM; with one, the VMM outlives the guest.
    private let exitsWithVM: Bool

    var configuration: VMConfiguration? { didSet { publishInfo() } }
    var machine: Machine?
    var console: HostConsole?
    var state: VMState? { didSet { publishInfo() } }
    /// The migration under way, if any: while there is one, only queries are answered.
    var migration: MigrationActivity?
    /// `vm.cancel-migration` came while `vm.send-migration` was connecting.
    var cancelWhileConnecting = false
    /// The current or last migration's progress, readable without waiting for the actor.
    nonisolated let publishedProgress = Mutex<MigrationProgressTracker?>(nil)
    /// Waiting for the migration under way to end (`finish()`).
    var migrationWaiters: [CheckedContinuation<Void, Never>] = []
    /// What `info()` answers, readable without waiting for the actor, so that `vm.info` stays
    /// responsive while a long operation (a snapshot of a large guest) runs.
    private nonisolated let publishedInfo = Mutex<Info?>(nil)
    var outcome: Outcome?
    private var exitWaiters: [CheckedContinuation<Outcome, Never>] = []

    public init(events: EventMonitor, logger: Logger, exitsWithVM: Bool) {
        self.events = events
        self.logger = logger
        self.exitsWithVM = exitsWithVM
        events.emitStarting(version: Self.version)
    }

    // MARK: Queries

    public struct Info: Sendable, Equatable {
        public var configuration: VMConfiguration
        public var state: VMState
        public var memoryActualSize: UInt64
    }

    public nonisolated func info() throws(VMMError) -> Info {
        guard let info = publishedInfo.withLock({ $0 }) else { throw VMMError(.noVM, "no VM has been created") }
        return info
    }

    private func publishInfo() {
        let info = configuration.flatMap { configuration in
            state.map { Info(configuration: configuration, state: $0, memoryActualSize: configuration.machine.memorySize) }
        }
        publishedInfo.withLock { $0 = info }
    }

    // MARK: Operations

    public func create(_ configuration: VMConfiguration) throws(VMMError) {
        try refuseDuringMigration()
        guard state == nil else { throw VMMError(.wrongState, "a VM already exists; delete it first") }
        do {
            try configuration.machine.validate()
        } catch {
            throw VMMError(.invalidRequest, "\(error)")
        }
        for (field, path) in [("payload.kernel", configuration.machine.kernel), ("payload.initramfs", configuration.machine.initramfs)] {
            if let path, !FileManager.default.isReadableFile(atPath: path) {
                throw VMMError(.invalidRequest, "\(field): \(path) does not exist or is not readable")
            }
        }
        self.configuration = configuration
        state = .created
    }

    public func boot() throws(VMMError) {
        try refuseDuringMigration()
        guard let configuration, let state else { throw VMMError(.noVM, "no VM has been created") }
        guard state == .created || state == .shutdown else {
            throw VMMError(.wrongState, "the VM is \(state.rawValue); only a Created or Shutdown VM can boot")
        }
        events.emit(.vm, "booting")
        do {
            try startMachine(configuration)
        } catch {
            events.emit(.vm, "shutdown", ["reason": "guest", "error": "\(error)"])
            self.state = .shutdown
            throw VMMError(.internalFailure, "booting failed: \(error)")
        }
        self.state = .running
        events.emit(.vm, "booted")
    }

    public func pause() throws(VMMError) {
        try refuseDuringMigration()
        try pauseMachine()
    }

    func pauseMachine() throws(VMMError) {
        let machine = try requireMachine(in: .running, for: "pause")
        events.emit(.vm, "pausing")
        do {
            try machine.pause()
        } catch {
            throw VMMError(.internalFailure, "pausing failed: \(error)")
        }
        state = .paused
        events.emit(.vm, "paused")
    }

    public func resume() throws(VMMError) {
        try refuseDuringMigration()
        try resumeMachine()
    }

    func resumeMachine() throws(VMMError) {
        let machine = try requireMachine(in: .paused, for: "resume")
        events.emit(.vm, "resuming")
        do {
            // A VM restored without `resume` has never run on this host: it starts rather than resumes.
            if machine.state == .created { try machine.start() } else { try machine.resume() }
        } catch {
            throw VMMError(.internalFailure, "resuming failed: \(error)")
        }
        state = .running
        events.emit(.vm, "resumed")
    }

    /// Stops the guest (API `vm.shutdown`); the VM's configuration stays, and it can boot again.
    public func shutdown() throws(VMMError) {
        try refuseDuringMigration()
        guard let state else { throw VMMError(.noVM, "no VM has been created") }
        guard state == .running || state == .paused else {
            throw VMMError(.wrongState, "the VM is \(state.rawValue); only a Running or Paused VM can shut down")
        }
        stopMachine()
        self.state = .shutdown
        events.emit(.vm, "shutdown", ["reason": "api"])
    }

    /// Restarts the guest from its kernel with the same configuration.
    public func reboot() throws(VMMError) {
        try refuseDuringMigration()
        guard let configuration, let state else { throw VMMError(.noVM, "no VM has been created") }
        guard state == .running || state == .paused else {
            throw VMMError(.wrongState, "the VM is \(state.rawValue); only a Running or Paused VM can reboot")
        }
        events.emit(.vm, "rebooting")
        stopMachine()
        do {
            try startMachine(configuration)
        } catch {
            self.state = .shutdown
            events.emit(.vm, "shutdown", ["reason": "guest", "error": "\(error)"])
            throw VMMError(.internalFailure, "rebooting failed: \(error)")
        }
        self.state = .running
        events.emit(.vm, "rebooted")
    }

    /// Removes the VM, stopping it first if it runs.
    public func delete() throws(VMMError) {
        try refuseDuringMigration()
        guard let state else { throw VMMError(.noVM, "no VM has been created") }
        if state == .running || state == .paused {
            stopMachine()
            events.emit(.vm, "shutdown", ["reason": "api"])
        }
        self.state = nil
        configuration = nil
        events.emit(.vm, "deleted")
    }

    // MARK: Snapshot and restore

    /// Writes the paused VM's complete state and memory into `directory` (created if needed).
    public func snapshot(to directory: String) throws(VMMError) {
        try refuseDuringMigration()
        let machine = try requireMachine(in: .paused, for: "snapshot")
        guard let configuration else { throw VMMError(.noVM, "no VM has been created") }
        events.emit(.vm, "snapshotting")
        do {
            let state = try machine.saveState()
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            try machine.saveMemory(toFile: (directory as NSString).appendingPathComponent(Snapshot.memoryFile))
            try Snapshot(formatVersion: Snapshot.currentFormatVersion, configuration: configuration, machine: state)
                .write(to: directory)
        } catch {
            events.emit(.vm, "snapshot-failed", ["error": "\(error)"])
            throw VMMError(.internalFailure, "snapshot failed: \(error)")
        }
        events.emit(.vm, "snapshotted", ["destination": directory])
    }

    /// Creates the VM from a snapshot directory; it runs if `resume`, and is Paused otherwise.
    public func restore(from directory: String, resume: Bool) throws(VMMError) {
        try refuseDuringMigration()
        guard state == nil else { throw VMMError(.wrongState, "a VM already exists; restore needs a VMM without one") }
        let snapshot = try Snapshot.read(from: directory)
        do {
            try snapshot.configuration.machine.validate()
        } catch {
            throw VMMError(.invalidRequest, "the snapshot's VM does not fit this host: \(error)")
        }
        events.emit(.vm, "restoring", ["source": directory])
        do {
            let console = try HostConsole(mode: snapshot.configuration.serial)
            let generation = UUID()
            let machine = try Machine.forRestore(configuration: snapshot.configuration.machine,
                                                 serialOutput: console.output,
                                                 onStop: { [weak self] stop in
                                                     Task { await self?.machineStopped(stop, generation: generation) }
                                                 })
            try machine.loadMemory(fromFile: (directory as NSString).appendingPathComponent(Snapshot.memoryFile))
            try machine.restore(snapshot.machine)
            self.machine = machine
            self.console = console
            machineGeneration = generation
            configuration = snapshot.configuration
            state = .paused
        } catch {
            stopMachine()
            events.emit(.vm, "restore-failed", ["error": "\(error)"])
            throw VMMError(.invalidRequest, "restore from \(directory) failed: \(error)")
        }
        events.emit(.vm, "restored")
        if resume {
            try self.resume()
        }
    }

    // MARK: Process lifetime

    /// Ends the VMM: `waitForExit` returns `outcome` (the first one asked for wins).
    public func requestExit(_ outcome: Outcome) {
        guard self.outcome == nil else { return }
        self.outcome = outcome
        for waiter in exitWaiters { waiter.resume(returning: outcome) }
        exitWaiters.removeAll()
    }

    public func waitForExit() async -> Outcome {
        if let outcome { return outcome }
        return await withCheckedContinuation { exitWaiters.append($0) }
    }

    /// The last act before the process exits: ends a migration under way (its terminal event says
    /// the VMM is shutting down), stops a running VM (`vm.shutdown reason=api`), emits
    /// `vmm.shutdown` and closes the event monitor.
    public func finish() async {
        await endMigration()
        if state == .running || state == .paused {
            stopMachine()
            state = .shutdown
            events.emit(.vm, "shutdown", ["reason": "api"])
        }
        events.emit(.vmm, "shutdown")
        events.close()
    }

    // MARK: The machine

    func requireMachine(in required: VMState, for operation: String) throws(VMMError) -> Machine {
        guard let state else { throw VMMError(.noVM, "no VM has been created") }
        guard state == required, let machine else {
            throw VMMError(.wrongState, "the VM is \(state.rawValue); it must be \(required.rawValue) to \(operation)")
        }
        return machine
    }

    private func startMachine(_ configuration: VMConfiguration) throws {
        let console = try HostConsole(mode: configuration.serial)
        let generation = UUID()
        let machine = try Machine(configuration: configuration.machine, serialOutput: console.output,
                                  onStop: { [weak self] stop in
                                      Task { await self?.machineStopped(stop, generation: generation) }
                                  })
        try machine.start()
        console.forwardInput(to: machine)
        self.machine = machine
        self.console = console
        machineGeneration = generation
        logger.info("VM booted", metadata: ["cpus": "\(configuration.machine.cpus)",
                                            "memory": "\(configuration.machine.memorySize >> 20) MiB"])
    }

    /// Identifies the machine a stop report belongs to, so that a late report from a machine that
    /// was already replaced (reboot) or stopped changes nothing.
    var machineGeneration: UUID?

    func stopMachine() {
        if let machine, !machine.stop() {
            logger.warning("a vCPU did not stop within the grace period; continuing without it")
        }
        console?.restore()
        machine = nil
        console = nil
        machineGeneration = nil
    }

    /// The guest powered off, or the VM failed.
    func machineStopped(_ stop: MachineStop, generation: UUID) {
        guard generation == machineGeneration else { return }
        if case .sending(let sender) = migration { sender.requestStop(.guestStopped) }
        stopMachine()
        state = .shutdown
        switch stop {
        case .guest, .requested:
            events.emit(.vm, "shutdown", ["reason": "guest"])
            if exitsWithVM { requestExit(.guestShutdown) }
        case let .failed(message):
            if !exitsWithVM { logger.error("the VM stopped: \(message)") }
            events.emit(.vm, "shutdown", ["reason": "guest", "error": message])
            if exitsWithVM { requestExit(.failed(message)) }
        }
    }
}
