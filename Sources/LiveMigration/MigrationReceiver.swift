import Events
import Foundation
import HostOS
import Machine
import MigrationWire
import Synchronization

/// One incoming live migration, run on its own thread: accepts one sender, enforces the request
/// sequence (start, config, memory…, state, complete — or abandon), builds the VM from what it
/// receives and hands it to the VMM, which runs it. After the config, the sender's extra
/// connections may join and carry memory requests too (`ReceiveLanes`).
///
/// It emits `vm.migration-receive-started` once a sender's first request is a well-formed start,
/// and after that exactly one of `vm.migration-receive-finished` and `vm.migration-receive-failed`.
public final class MigrationReceiver: Sendable {
    /// What the receiver asks of the VMM for the VM it builds; called from the receiver's thread
    /// and waited for.
    public struct DestinationVM: Sendable {
        /// Builds a machine for `configuration`, awaiting its state, wired to the VMM's console and
        /// stop handling, which are the destination's own choice. Its RAM is zero, or the memory
        /// file a local migration passed.
        public var prepare: @Sendable (MachineConfiguration, _ memoryFile: FileDescriptor?) throws -> Machine
        /// Makes the restored machine the VMM's VM and, if the guest ran on the source, starts it
        /// with `vm.resuming`/`vm.resumed`. On error the VMM has no VM.
        public var adopt: @Sendable (Machine, _ guestRunning: Bool) throws -> Void

        public init(prepare: @escaping @Sendable (MachineConfiguration, _ memoryFile: FileDescriptor?) throws -> Machine,
                    adopt: @escaping @Sendable (Machine, _ guestRunning: Bool) throws -> Void) {
            self.prepare = prepare
            self.adopt = adopt
        }
    }

    /// How the receive ended.
    public enum Ending: Equatable, Sendable {
        case received
        /// The receive failed; the message says why (and is `receive-failed`'s `error` if the
        /// receive had started).
        case failed(String)
    }

    let listener: MigrationListener
    /// The receiver's TLS credentials: the sender must connect over TLS with a certificate the CA signed.
    let tls: MigrationTLS?
    let events: EventMonitor
    let destinationVM: DestinationVM
    let ioTimeout: Duration
    public let progress: MigrationProgressTracker
    /// Why the receive was stopped from outside, once it was.
    private let stopReason = Mutex<String?>(nil)
    private let connection = Mutex<MigrationConnection?>(nil)

    public init(listener: MigrationListener, tls: MigrationTLS? = nil, events: EventMonitor, destinationVM: DestinationVM,
                ioTimeout: Duration = MigrationConnection.defaultIOTimeout) {
        self.listener = listener
        self.tls = tls
        self.events = events
        self.destinationVM = destinationVM
        self.ioTimeout = ioTimeout
        progress = MigrationProgressTracker(MigrationProgress(
            direction: .incoming, transport: listener.url.transport, connections: 1, tls: tls != nil))
    }

    /// Emits `vm.migration-receive-ready`: a sender may connect now.
    public func announce() {
        events.emit(VMEvent.MigrationReceiveReady(receiverURL: listener.url.description))
    }

    /// Stops the receive as soon as possible, whether it waits for a sender or receives;
    /// `reason` becomes its error. Safe from any thread.
    public func requestStop(reason: String) {
        requestStop(reason: reason, closingListener: true)
    }

    private func requestStop(reason: String, closingListener: Bool) {
        stopReason.withLock { $0 = $0 ?? reason }
        if closingListener { listener.shutdown() }
        connection.withLock { $0?.shutdown() }
    }

    private struct Refusal: Error, CustomStringConvertible {
        var description: String
    }

    /// The sender sent `abandon`: answered with ok, as the protocol says.
    private struct Abandoned: Error, CustomStringConvertible {
        var description: String { "the sender abandoned the migration" }
    }

    /// Runs the whole receive on the calling thread and emits its events.
    public func run() -> Ending {
        let began = ContinuousClock.now
        let ending = receive()
        if case .failed(let message) = ending { progress.end(.failed(message), total: .now - began) }
        return ending
    }

    private func receive() -> Ending {
        let connection: MigrationConnection
        do {
            connection = try listener.accept(ioTimeout: ioTimeout, tls: tls)
        } catch {
            listener.close()
            return .failed(stopReason.withLock { $0 } ?? "accepting a sender failed: \(error)")
        }
        self.connection.withLock { $0 = connection }
        defer {
            self.connection.withLock { $0 = nil }
            connection.close()
            listener.close()
        }
        if let reason = stopReason.withLock({ $0 }) { return .failed(reason) }
        let peer = connection.peer
        do {
            try connection.handshake()
        } catch {
            // Nothing identifies a migration yet: the receive fails with no receive-started event.
            return .failed(stopReason.withLock { $0 } ?? "the sender at \(peer) did not open a migration: \(error)")
        }

        let start: MigrationStart
        do {
            guard case .start(let first) = try connection.receiveRequest(limits: MigrationLimits(guestRAM: [])) else {
                throw Refusal(description: "the first request was not start")
            }
            start = first
        } catch {
            let message = stopReason.withLock({ $0 }) ?? "the sender at \(connection.peer) did not open a migration: \(error)"
            try? connection.sendResponse(.error(message))
            return .failed(message)
        }
        let id = start.migrationID.uuidString.lowercased()
        progress.update {
            $0.migrationID = id
            $0.beganAtMilliseconds = MigrationProgress.wallClockMilliseconds()
        }
        events.emit(VMEvent.MigrationReceiveStarted(migrationID: id, peer: connection.peer, tls: connection.isEncrypted))
        let began = ContinuousClock.now
        var phase = MigrationPhase.starting
        func enter(_ next: MigrationPhase) {
            phase = next
            progress.update { $0.state = .ongoing(next) }
        }
        var incoming: Machine?
        var lanes: ReceiveLanes?
        /// Ends the extra connections; what they leave incomplete, if anything.
        func finishLanes() -> String? {
            defer { lanes = nil }
            return lanes?.finish()
        }
        let received = Mutex((bytes: UInt64(0), bandwidth: BandwidthMeter(), lastEnd: ContinuousClock.Instant.now))
        /// Counts a memory request that began to arrive at `start`, on any connection; time that
        /// several connections spent at once counts once.
        let record: @Sendable (UInt64, ContinuousClock.Instant) -> Void = { [progress] bytes, start in
            let bytesPerSecond = received.withLock { received in
                let now = ContinuousClock.now
                received.bytes += bytes
                received.bandwidth.record(bytes: bytes, in: now - max(start, received.lastEnd))
                received.lastEnd = now
                return UInt64(received.bandwidth.bytesPerSecond)
            }
            progress.update {
                $0.memory.transmittedBytes += bytes
                $0.memory.bytesPerSecond = bytesPerSecond
            }
        }
        do {
            try start.checkVersion()
            try connection.sendResponse(.ok)

            var second = try connection.receiveRequest(limits: MigrationLimits(guestRAM: []))
            // A local migration passes the guest's memory file first; only a Unix socket can.
            var memoryFile: FileDescriptor?
            if case .memoryFile(let file) = second {
                memoryFile = file.descriptor
                progress.update { $0.transport = "Local" }
                try connection.sendResponse(.ok)
                second = try connection.receiveRequest(limits: MigrationLimits(guestRAM: []))
            }
            guard case .config(let config) = second else { throw unexpected(second, expected: "config") }
            if memoryFile != nil, !config.machine.sharedMemory {
                throw Refusal(description: "protocol violation: a local migration's VM must have shared memory")
            }
            let machine: Machine
            do {
                machine = try destinationVM.prepare(config.machine, memoryFile)
            } catch {
                throw Refusal(description: "this host cannot run the VM: \(error)")
            }
            incoming = machine
            progress.update { $0.memory.totalBytes = machine.memory.size }
            // So that the state decoded and applied in the pause is not this process's first.
            MigrationState.rehearseCoding(of: config.machine)
            machine.rehearseDeviceStateCoding()
            machine.launchVCPUThreadsEarly()
            if memoryFile == nil {
                lanes = ReceiveLanes(
                    listener: listener, tls: tls, ioTimeout: ioTimeout, migrationID: start.migrationID, memory: machine.memory,
                    progress: progress, received: record,
                    failed: { [weak self] reason in self?.requestStop(reason: reason, closingListener: false) })
            }
            try connection.sendResponse(.ok)

            // A local migration has no pre-copy: the guest's memory is already here.
            if memoryFile == nil { enter(.memoryPrecopy) }
            let limits = MigrationLimits(guestRAM: machine.memory.ranges)
            /// The request after the config or a memory batch. Of these only the state carries a
            /// document: one that does not decode is a state this machine cannot restore, and the
            /// switch-over the sender began with it has failed.
            func nextRequest() throws -> MigrationRequest {
                do {
                    return try connection.receiveRequest(limits: limits)
                } catch {
                    guard error.kind == .malformedPayload else { throw error }
                    enter(.completing)
                    throw Refusal(description: "the machine state cannot be restored: \(error.message)")
                }
            }
            var request = try nextRequest()
            while case .memory(let table) = request {
                if memoryFile != nil {
                    throw Refusal(description: "protocol violation: a local migration carries no memory requests")
                }
                let batchStart = ContinuousClock.now
                try connection.receiveMemory(table, into: machine.memory)
                record(table.dataBytes, batchStart)
                try connection.sendResponse(.ok)
                request = try nextRequest()
            }

            guard case .state(let state) = request else { throw unexpected(request, expected: "memory or state") }
            enter(.completing)
            if let incomplete = finishLanes() { throw Refusal(description: incomplete) }
            do {
                try machine.restore(state.machine)
            } catch {
                throw Refusal(description: "the machine state cannot be restored: \(error)")
            }
            try connection.sendResponse(.ok)

            let last = try connection.receiveRequest(limits: limits)
            guard case .complete = last else { throw unexpected(last, expected: "complete") }
            try destinationVM.adopt(machine, state.guestRunning)
            incoming = nil  // the VMM's now; until then a failure stops it below
            // The guest runs here now. If the sender misses this answer it cannot tell, and the
            // guest keeps running here rather than nowhere.
            try? connection.sendResponse(.ok)
            let total = ContinuousClock.now - began
            progress.end(.finished, total: total)
            events.emit(VMEvent.MigrationReceiveFinished(migrationID: id, totalMs: total.wholeMilliseconds,
                                                         bytesTotal: received.withLock { $0.bytes }))
            return .received
        } catch {
            // The extra connections' threads write into the machine's memory: end them first.
            let laneFailure = finishLanes()
            incoming?.stop()
            let message = describe(error, laneFailure: laneFailure)
            if error is Abandoned {
                try? connection.sendResponse(.ok)
            } else if (error as? MigrationError)?.kind != .peerWentAway {
                try? connection.sendResponse(.error(message))
            }
            progress.end(.failed(message), total: ContinuousClock.now - began)
            events.emit(VMEvent.MigrationReceiveFailed(migrationID: id, error: message, phase: phase))
            return .failed(message)
        }
    }

    /// A request that is valid on its own but not at this point of the sequence; `abandon` is the
    /// sender giving up.
    private func unexpected(_ request: MigrationRequest, expected: String) -> any Error {
        if case .abandon = request { return Abandoned() }
        return Refusal(description: "protocol violation: expected \(expected), got \(request.command)")
    }

    private func describe(_ error: any Error, laneFailure: String? = nil) -> String {
        if let reason = stopReason.withLock({ $0 }) { return reason }
        // A sender whose extra connection failed abandons, or loses its main connection too.
        if let laneFailure, error is Abandoned || (error as? MigrationError)?.kind == .peerWentAway { return laneFailure }
        if let error = error as? MigrationError {
            switch error.kind {
            case .peerWentAway: return "the sender went away: \(error.message)"
            case .timedOut: return "the sender stopped sending: \(error.message)"
            default: return error.message
            }
        }
        return "\(error)"
    }
}
