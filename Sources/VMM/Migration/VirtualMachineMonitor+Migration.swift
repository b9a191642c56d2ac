import Foundation
import Machine
import Migration

/// The migration under way in a VMM.
enum MigrationActivity: Sendable {
    /// `vm.send-migration` is connecting to the destination.
    case connecting
    case sending(MigrationSender)
    case receiving(MigrationReceiver)
}

extension VirtualMachineMonitor {
    /// Connecting to a destination gives up after this long.
    static let migrationConnectTimeout: Duration = .seconds(10)

    func refuseDuringMigration() throws(VMMError) {
        switch migration {
        case nil: return
        case .connecting, .sending:
            throw VMMError(.wrongState, "the VM is being migrated; only vm.info is answered until the migration ends")
        case .receiving:
            throw VMMError(.wrongState, "this VMM is receiving a migration; only vm.info is answered until it ends")
        }
    }

    // MARK: Source

    /// Starts a live migration of the VM to `options.destination` and returns once it is under way:
    /// connected, `vm.migration-started` emitted. It then runs on its own thread and reports itself
    /// through events. A destination that cannot be reached fails this call, and the guest never
    /// stops.
    public func sendMigration(_ options: SendMigrationOptions) async throws(VMMError) {
        guard migration == nil else {
            throw VMMError(.wrongState, "a migration is already in progress; wait for it to end")
        }
        guard let state else { throw VMMError(.noVM, "no VM has been created") }
        guard state == .running || state == .paused else {
            throw VMMError(.wrongState, "the VM is \(state.rawValue); only a Running or Paused VM can migrate")
        }
        migration = .connecting
        let destination = options.destination
        let connected = await onOwnThread { () -> Result<MigrationConnection, MigrationError> in
            do throws(MigrationError) {
                return .success(try MigrationConnection.connect(to: destination, timeout: Self.migrationConnectTimeout))
            } catch {
                return .failure(error)
            }
        }
        let connection: MigrationConnection
        switch connected {
        case .success(let value): connection = value
        case .failure(let error):
            migrationEnded()
            throw VMMError(error.kind == .invalidURL ? .invalidRequest : .internalFailure,
                           "cannot reach the destination: \(error.message)")
        }
        if outcome != nil || cancelWhileConnecting {
            connection.close()
            migrationEnded()
            throw VMMError(.wrongState, outcome != nil ? "the VMM is shutting down" : "cancelled (vm.cancel-migration) while connecting")
        }
        // Nothing else can have changed the VM while connecting: every operation is refused.
        guard let machine, let configuration, let current = self.state else {
            connection.close()
            migrationEnded()
            throw VMMError(.wrongState, "the VM stopped while connecting to the destination")
        }
        let id = UUID()
        let started = ContinuousClock.now
        let progress = MigrationProgressTracker(MigrationProgress(
            migration_id: id.uuidString.lowercased(), direction: .outgoing,
            timestamp_begin_ms: MigrationProgress.nowMilliseconds(), timestamp_snapshot_ms: 0,
            downtime_configured_ms: UInt64(options.policy.downtimeLimit.wholeMilliseconds),
            transportation_mode: destination.transportationMode, connections: SendMigrationOptions.connections,
            state: .ongoing(phase: .starting, vcpuThrottlePercent: 0),
            memory_transmission_info: .init(memory_bytes_total: machine.memory.size)))
        publishedProgress.withLock { $0 = progress }
        events.emit(.vm, "migration-started", [
            "migration_id": id.uuidString.lowercased(),
            "destination_url": destination.description,
            "downtime_ms": "\(options.policy.downtimeLimit.wholeMilliseconds)",
            "timeout_s": "\(options.policy.timeout.components.seconds)",
            "connections": "\(SendMigrationOptions.connections)",
            "local": "false",
        ])
        let sender = MigrationSender(
            id: id, options: options, machine: machine, configuration: configuration, connection: connection,
            events: events, guestWasRunning: current == .running,
            host: MigrationSender.Host(
                pause: { [weak self] in
                    guard let self else { throw VMMError(.internalFailure, "the VMM is gone") }
                    try waitFor { await self.pauseForMigration() }.get()
                },
                resume: { [weak self] in
                    guard let self else { return }
                    waitFor { await self.resumeAfterMigration() }
                }),
            started: started, progress: progress)
        migration = .sending(sender)
        let thread = Thread { [weak self] in
            let outcome = sender.run()
            guard let self else { return }
            waitFor { await self.sendEnded(outcome, keepAlive: options.keepAlive) }
        }
        thread.name = "migration-send"
        thread.start()
    }

    private func pauseForMigration() -> Result<Void, VMMError> {
        do {
            try pauseMachine()
            return .success(())
        } catch {
            return .failure(error)
        }
    }

    /// Resumes the guest a failed or cancelled migration paused, if it is still there.
    private func resumeAfterMigration() {
        guard state == .paused, machine != nil else { return }
        do {
            try resumeMachine()
        } catch {
            logger.error("resuming the guest after the migration failed: \(error)")
        }
    }

    /// The sender's thread ended: after a finished migration the VM is gone from here.
    private func sendEnded(_ outcome: MigrationSender.Outcome, keepAlive: Bool) {
        migrationEnded()
        guard outcome == .finished else { return }
        stopMachine()
        state = nil
        configuration = nil
        events.emit(.vm, "deleted")
        if !keepAlive { requestExit(.migrated) }
    }

    // MARK: Destination

    /// Listens on `url`, receives one migration and runs the guest here (paused if it was paused
    /// on the source). Returns when the guest runs here; throws when the receive failed, after
    /// which this VMM can receive again.
    public func receiveMigration(at url: MigrationURL) async throws(VMMError) {
        guard migration == nil else {
            throw VMMError(.wrongState, "a migration is already in progress; wait for it to end")
        }
        if let state {
            throw VMMError(.wrongState, "a VM already exists here (\(state.rawValue)); only a VMM without one can receive a migration")
        }
        let listener: MigrationListener
        do {
            listener = try MigrationListener(listeningOn: url)
        } catch {
            throw VMMError(error.kind == .invalidURL ? .invalidRequest : .internalFailure, error.message)
        }
        let progress = MigrationProgressTracker(MigrationProgress(
            direction: .incoming, timestamp_begin_ms: MigrationProgress.nowMilliseconds(), timestamp_snapshot_ms: 0,
            transportation_mode: url.transportationMode, connections: SendMigrationOptions.connections,
            state: .ongoing(phase: .starting, vcpuThrottlePercent: 0), memory_transmission_info: .init()))
        publishedProgress.withLock { $0 = progress }
        let receiver = MigrationReceiver(
            listener: listener, events: events, progress: progress,
            host: MigrationReceiver.Host(
                makeVM: { [weak self] configuration in
                    guard let self else { throw VMMError(.internalFailure, "the VMM is gone") }
                    return try self.makeIncomingVM(configuration)
                },
                adopt: { [weak self] vm in
                    guard let self else { throw VMMError(.internalFailure, "the VMM is gone") }
                    try waitFor { await self.adopt(vm) }.get()
                }))
        migration = .receiving(receiver)
        events.emit(.vm, "migration-receive-ready", ["receiver_url": listener.url.description])
        let began = ContinuousClock.now
        let outcome = await onOwnThread { receiver.run() }
        migrationEnded()
        if case .failed(let message) = outcome {
            if progress.snapshot().state.isOngoing {
                progress.end(.failed(errorMessage: message), total: ContinuousClock.now - began)
            }
            throw VMMError(.internalFailure, "receiving the migration failed: \(message)")
        }
    }

    /// A paused VM with zeroed RAM for `configuration`, wired to this VMM's stop handling.
    private nonisolated func makeIncomingVM(_ configuration: VMConfiguration) throws -> MigrationReceiver.IncomingVM {
        try configuration.machine.validate()
        let console = try HostConsole(mode: configuration.serial, truncating: false)
        let generation = UUID()
        let machine = try Machine.forRestore(configuration: configuration.machine, serialOutput: console.output,
                                             onStop: { [weak self] stop in
                                                 Task { await self?.machineStopped(stop, generation: generation) }
                                             })
        return MigrationReceiver.IncomingVM(configuration: configuration, machine: machine, console: console,
                                            generation: generation, guestRunning: false)
    }

    private func adopt(_ vm: MigrationReceiver.IncomingVM) -> Result<Void, VMMError> {
        machine = vm.machine
        console = vm.console
        machineGeneration = vm.generation
        configuration = vm.configuration
        state = .paused
        guard vm.guestRunning else { return .success(()) }
        do {
            try resumeMachine()
            vm.console.forwardInput(to: vm.machine)
            return .success(())
        } catch {
            stopMachine()
            state = nil
            configuration = nil
            return .failure(error)
        }
    }

    // MARK: Both sides

    /// The current or last migration of this VMM, either direction; answered without waiting for
    /// the VMM or the migration.
    public nonisolated func migrationProgress() throws(VMMError) -> MigrationProgress {
        guard let progress = publishedProgress.withLock({ $0 }) else {
            throw VMMError(.noVM, "no migration has run in this VMM")
        }
        return progress.snapshot()
    }

    /// Stops the migration under way (`vm.cancel-migration`): an outgoing one ends with
    /// `vm.migration-cancelled reason=requested` and the guest running here; an incoming one is
    /// discarded. Returns at once; the migration's thread emits its terminal event.
    public func cancelMigration() throws(VMMError) {
        switch migration {
        case nil:
            throw VMMError(.wrongState, "no migration is in progress")
        case .connecting:
            cancelWhileConnecting = true
        case .sending(let sender):
            guard sender.requestStop(.cancelled) else {
                throw VMMError(.wrongState, "too late to cancel: the destination has been told to run the guest")
            }
        case .receiving(let receiver):
            receiver.requestStop(reason: "cancelled on the destination (vm.cancel-migration)")
        }
    }

    private func migrationEnded() {
        migration = nil
        cancelWhileConnecting = false
        for waiter in migrationWaiters { waiter.resume() }
        migrationWaiters.removeAll()
    }

    /// Stops the migration under way, if any, and waits until it has ended with its terminal event.
    func endMigration() async {
        switch migration {
        case nil: return
        case .connecting: break
        case .sending(let sender): sender.requestStop(.vmmExiting)
        case .receiving(let receiver): receiver.requestStop(reason: "the VMM is shutting down")
        }
        await withCheckedContinuation { migrationWaiters.append($0) }
    }
}

extension MigrationURL {
    /// `transportation_mode` in `vm.migration-progress`.
    var transportationMode: String {
        switch self {
        case .tcp: "Tcp"
        case .unix: "Unix"
        }
    }
}

/// Runs blocking work (socket I/O) on a thread of its own rather than on Swift's cooperative pool,
/// and waits for its result without blocking the caller's thread.
func onOwnThread<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        let thread = Thread { continuation.resume(returning: body()) }
        thread.name = "migration"
        thread.start()
    }
}
