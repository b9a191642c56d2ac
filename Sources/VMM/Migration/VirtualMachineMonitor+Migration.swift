import Events
import Foundation
import Synchronization
import HostOS
import LiveMigration
import Machine
import MigrationWire

/// A checked `vm.receive-migration` request: where to listen, and where this host puts the
/// arriving guest's console — the destination's own choice, never the sender's.
public struct ReceiveMigrationOptions: Equatable, Sendable {
    public var url: MigrationURL
    /// `null` (the default), `tty` or `file`; not `off`, which would take a device from the guest.
    public var serial: SerialMode
    /// Where the arriving guest's virtio console goes, if it has one: as `serial`.
    public var console: SerialMode
    /// The file of each arriving disk on this host, by disk id.
    public var diskPaths: [String: String]
    /// The tap of each arriving network card on this host, by card id.
    public var netTaps: [String: String]
    /// The tap descriptor of each arriving card placed on one (sent with the request), by card
    /// id. The VMM owns them: they become the arrived guest's, or are closed if none arrives.
    public var netDescriptors: [String: Int32]
    /// Mutual TLS with the receiver's credentials from this directory (`tls_dir`); `tcp:` only.
    public var tlsDirectory: String?

    public init(url: MigrationURL, serial: SerialMode = .null, console: SerialMode = .null, diskPaths: [String: String] = [:],
                netTaps: [String: String] = [:], netDescriptors: [String: Int32] = [:], tlsDirectory: String? = nil) {
        self.tlsDirectory = tlsDirectory
        self.url = url
        self.serial = serial
        self.console = console
        self.diskPaths = diskPaths
        self.netTaps = netTaps
        self.netDescriptors = netDescriptors
    }
}

extension VirtualMachineMonitor {
    /// Connecting to a destination gives up after this long.
    static let migrationConnectTimeout: Duration = .seconds(10)

    // MARK: Source

    /// Starts a live migration of the VM to `options.destination` and returns once it is under way:
    /// connected, `vm.migration-started` emitted. It then runs on its own thread and reports itself
    /// through events. A destination that cannot be reached fails this call, and the guest never
    /// stops.
    public func sendMigration(_ options: SendMigrationOptions) async throws(VMMError) {
        let guest: GuestActivity
        let vm: LiveVM
        switch lifecycle {
        case .running(let live): (vm, guest) = (live, .running)
        case .paused(let live): (vm, guest) = (live, .paused)
        case .migratingOut, .migratingIn: throw VMMError(.wrongState, "a migration is already in progress; wait for it to end")
        default: throw refusal("only a Running or Paused VM can migrate")
        }
        if options.local, vm.machine.memory.backingFile == nil {
            throw VMMError(.invalidRequest, "local: this VM's memory is not shared; a local migration needs a VM created with memory.shared (--memory shared=on)")
        }
        let tls = try Self.credentials(options.tlsDirectory, role: .sender)
        lifecycle = .migratingOut(vm, guest, .connecting(cancelRequested: false))
        let destination = options.destination
        let connected = await onOwnThread(named: "migration-connect") { () -> Result<MigrationConnection, MigrationError> in
            Result { () throws(MigrationError) in
                try MigrationConnection.connect(to: destination, timeout: Self.migrationConnectTimeout, tls: tls)
            }
        }
        // Every other operation is refused while connecting; only the guest stopping
        // (`machineStopped`) and `vm.cancel-migration` change the case meanwhile.
        guard case let .migratingOut(vm, guest, .connecting(cancelRequested)) = lifecycle else {
            try? connected.get().close()
            migrationEnded()
            throw VMMError(.internalFailure, "the VM changed while connecting to the destination")
        }
        let connection: MigrationConnection
        do {
            connection = try connected.get()
        } catch {
            lifecycle = .settled(vm, guest)
            migrationEnded()
            throw VMMError("cannot reach the destination", error)
        }
        let abandoned: String? = if exitReason != nil {
            "the VMM is shutting down"
        } else if guest == .stopped {
            "the VM stopped while connecting to the destination"
        } else if cancelRequested {
            "cancelled (vm.cancel-migration) while connecting"
        } else {
            nil
        }
        if let abandoned {
            connection.close()
            lifecycle = .settled(vm, guest)
            migrationEnded()
            throw VMMError(.wrongState, abandoned)
        }
        let sender = MigrationSender(
            options: options, machine: vm.machine, connection: connection, tls: tls, events: events, guestWasRunning: guest == .running,
            sourceVM: MigrationSender.SourceVM(
                pause: { [weak self] in
                    guard let self else { throw VMMError(.internalFailure, "the VMM is gone") }
                    try waitFor { await self.pauseForMigration() }.get()
                },
                resume: { [weak self] in
                    guard let self else { return }
                    waitFor { await self.resumeAfterMigration() }
                }))
        publishedProgress.withLock { $0 = sender.progress }
        lifecycle = .migratingOut(vm, guest, .sending(sender))
        let keepAlive = options.keepAlive
        sender.start { [weak self] ending in
            guard let self else { return }
            waitFor { await self.sendEnded(ending, keepAlive: keepAlive) }
        }
    }

    /// The TLS credentials in `directory`, checked before anything connects or listens; a file
    /// that cannot be used is the request's fault.
    private static func credentials(_ directory: String?, role: MigrationTLS.Role) throws(VMMError) -> MigrationTLS? {
        guard let directory else { return nil }
        do {
            return try MigrationTLS(directory: directory, role: role)
        } catch {
            throw VMMError(.invalidRequest, error.message, cause: error)
        }
    }

    /// The switch-over pauses the running guest.
    private func pauseForMigration() -> Result<Void, VMMError> {
        guard case let .migratingOut(vm, .running, outgoing) = lifecycle else {
            return .failure(VMMError(.wrongState, "the guest is not running"))
        }
        do {
            try pause(vm)
        } catch {
            return .failure(error)
        }
        lifecycle = .migratingOut(vm, .paused, outgoing)
        return .success(())
    }

    /// Resumes the guest a failed or cancelled migration paused, if it is still there.
    private func resumeAfterMigration() {
        guard case let .migratingOut(vm, .paused, outgoing) = lifecycle else { return }
        do {
            try resume(vm)
            lifecycle = .migratingOut(vm, .running, outgoing)
        } catch {
            logger.error("resuming the guest after the migration failed: \(error)")
        }
    }

    /// The sender's thread ended: after a finished migration the VM is gone from here; otherwise
    /// it is as the migration left it.
    private func sendEnded(_ ending: MigrationSender.Ending, keepAlive: Bool) {
        guard case let .migratingOut(vm, guest, _) = lifecycle else { return }
        if ending == .finished {
            stop(vm)
            forgetVM()
            events.emit(VMEvent.Deleted())
            if !keepAlive { requestExit(.migrated) }
        } else {
            lifecycle = .settled(vm, guest)
        }
        migrationEnded()
    }

    // MARK: Destination

    /// Listens where `options` say, receives one migration and runs the guest here (paused if it
    /// was paused on the source). Returns when the guest runs here; throws when the receive failed,
    /// after which this VMM can receive again.
    public func receiveMigration(_ options: ReceiveMigrationOptions) async throws(VMMError) {
        var guestArrived = false
        defer {
            if !guestArrived { for descriptor in options.netDescriptors.values { close(descriptor) } }
        }
        switch lifecycle {
        case .noVM: break
        case .migratingOut, .migratingIn: throw VMMError(.wrongState, "a migration is already in progress; wait for it to end")
        default:
            throw VMMError(.wrongState, "a VM already exists here (\(lifecycle.vmState?.rawValue ?? "")); only a VMM without one can receive a migration")
        }
        let tls = try Self.credentials(options.tlsDirectory, role: .receiver)
        let listener: MigrationListener
        do {
            listener = try MigrationListener(listeningOn: options.url)
        } catch {
            throw VMMError(error.kind == .invalidURL ? .invalidRequest : .internalFailure, error.message, cause: error)
        }
        let prepared = PreparedVM()
        let receiver = MigrationReceiver(
            listener: listener, tls: tls, events: events,
            destinationVM: MigrationReceiver.DestinationVM(
                prepare: { [weak self] machine, memoryFile in
                    guard let self else { throw VMMError(.internalFailure, "the VMM is gone") }
                    let configuration = try VMConfiguration(arriving: machine, serial: options.serial, console: options.console,
                                                            diskPaths: options.diskPaths, netTaps: options.netTaps,
                                                            netDescriptors: options.netDescriptors)
                    let vm = try prepareMachine(configuration, memoryFile: memoryFile, appendingToConsole: true)
                    prepared.vm.withLock { $0 = vm }
                    return vm.machine
                },
                adopt: { [weak self] machine, guestRunning in
                    guard let self, let vm = prepared.vm.withLock({ $0 }), vm.machine === machine else {
                        throw VMMError(.internalFailure, "the VMM is gone")
                    }
                    try waitFor { await self.adopt(vm, guestRunning: guestRunning) }.get()
                }))
        publishedProgress.withLock { $0 = receiver.progress }
        lifecycle = .migratingIn(IncomingMigration(receiver: receiver))
        receiver.announce()
        let ending = await onOwnThread(named: "migration-receive") { receiver.run() }
        if case .migratingIn(let incoming) = lifecycle {
            guestArrived = incoming.arrived != nil
            lifecycle = incoming.arrived.map { .settled($0.vm, $0.guest) } ?? .noVM
        }
        migrationEnded()
        if case .failed(let message) = ending {
            throw VMMError(.internalFailure, "receiving the migration failed: \(message)")
        }
    }

    /// The received VM becomes this VMM's; it runs if it ran on the source.
    private func adopt(_ vm: LiveVM, guestRunning: Bool) -> Result<Void, VMMError> {
        guard case var .migratingIn(incoming) = lifecycle else {
            return .failure(VMMError(.wrongState, "the receive has ended"))
        }
        if guestRunning {
            do {
                try resume(vm)
            } catch {
                stop(vm)
                return .failure(error)
            }
            Self.announce(vm.machine)
        }
        install(vm)
        incoming.arrived = (vm, guestRunning ? .running : .paused)
        lifecycle = .migratingIn(incoming)
        return .success(())
    }

    /// Announces the arrived guest's network cards on this host's networks, as QEMU's
    /// self-announce does: a RARP frame per card now and after 50, 150, 250 and 350 ms more, so
    /// that bridges and switches send the guest's traffic here even if the first frames are lost.
    private static func announce(_ machine: Machine) {
        guard !machine.configuration.networks.isEmpty else { return }
        startThread(named: "announce") { [weak machine] in
            for pause in [0, 50, 150, 250, 350] {
                if pause > 0 { Poll.sleep(for: .milliseconds(pause)) }
                guard let machine, machine.phase == .running else { return }
                machine.announceNetworks()
            }
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
        switch lifecycle {
        case let .migratingOut(vm, guest, .connecting):
            lifecycle = .migratingOut(vm, guest, .connecting(cancelRequested: true))
        case .migratingOut(_, _, .sending(let sender)):
            guard sender.requestStop(.cancelled) else {
                throw VMMError(.wrongState, "too late to cancel: the destination has been told to run the guest")
            }
        case .migratingIn(let incoming):
            incoming.receiver.requestStop(reason: "cancelled on the destination (vm.cancel-migration)")
        default:
            throw VMMError(.wrongState, "no migration is in progress")
        }
    }

    private func migrationEnded() {
        for waiter in migrationWaiters { waiter.resume() }
        migrationWaiters.removeAll()
    }

    /// Stops the migration under way, if any, and waits until it has ended with its terminal event.
    func endMigration() async {
        switch lifecycle {
        case .migratingOut(_, _, .connecting): break
        case .migratingOut(_, _, .sending(let sender)): sender.requestStop(.vmmExiting)
        case .migratingIn(let incoming): incoming.receiver.requestStop(reason: "the VMM is shutting down")
        default: return
        }
        await withCheckedContinuation { migrationWaiters.append($0) }
    }
}

/// The VM an incoming migration is building, from `prepare` (on the receiver's thread) to `adopt`.
private final class PreparedVM: Sendable {
    let vm = Mutex<VirtualMachineMonitor.LiveVM?>(nil)
}

/// Runs `body` (typically a call on the VMM actor) and waits for its result, blocking the calling
/// thread. Only for a migration's own thread, never for a thread of Swift's cooperative pool.
func waitFor<T: Sendable>(_ body: @escaping @Sendable () async -> T) -> T {
    let box = WaitBox<T>()
    Task {
        box.value = await body()
        box.done.signal()
    }
    box.done.wait()
    return box.value!
}

/// The result of `waitFor`'s task, handed over under the semaphore's ordering.
private final class WaitBox<T>: @unchecked Sendable {
    var value: T?
    let done = DispatchSemaphore(value: 0)
}
