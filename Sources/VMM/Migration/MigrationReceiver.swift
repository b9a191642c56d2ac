import Events
import Foundation
import Machine
import Migration
import Synchronization

/// One incoming live migration, run on its own thread: accepts one sender, enforces the request
/// sequence (start, config, memory…, state, complete — or abandon), builds the VM from what it
/// receives and hands it to the VMM, which runs it.
///
/// It emits `vm.migration-receive-started` once a sender's first request is a well-formed start,
/// and after that exactly one of `vm.migration-receive-finished` and `vm.migration-receive-failed`.
final class MigrationReceiver: Sendable {
    /// A VM built from a migration, not yet running.
    struct IncomingVM: Sendable {
        var configuration: VMConfiguration
        var machine: Machine
        var console: HostConsole
        var generation: UUID
        /// Whether the guest ran on the source: if so, the VMM starts it.
        var guestRunning: Bool
    }

    /// What the receiver asks of the VMM, called from the receiver's thread and waited for.
    struct Host: Sendable {
        /// Builds a VM, paused, with zeroed RAM, wired to the VMM's stop handling.
        var makeVM: @Sendable (VMConfiguration) throws -> IncomingVM
        /// Makes `vm` the VMM's VM and, if it ran on the source, starts it with
        /// `vm.resuming`/`vm.resumed`. On error the VMM has no VM.
        var adopt: @Sendable (IncomingVM) throws -> Void
    }

    enum Outcome: Sendable {
        case received
        /// The receive failed; the message says why (and is `receive-failed`'s `error` if the
        /// receive had started).
        case failed(String)
    }

    let listener: MigrationListener
    let events: EventMonitor
    let host: Host
    let ioTimeout: Duration
    private let stopping = Mutex(false)
    private let connection = Mutex<MigrationConnection?>(nil)

    init(listener: MigrationListener, events: EventMonitor, host: Host,
         ioTimeout: Duration = MigrationConnection.defaultIOTimeout) {
        self.listener = listener
        self.events = events
        self.host = host
        self.ioTimeout = ioTimeout
    }

    /// Stops the receive as soon as possible, whether it waits for a sender or receives.
    func requestStop() {
        stopping.withLock { $0 = true }
        listener.shutdown()
        connection.withLock { $0 }?.shutdown()
    }

    private struct Refusal: Error, CustomStringConvertible {
        var description: String
    }

    /// The sender sent `abandon`: answered with ok, as the protocol says.
    private struct Abandoned: Error, CustomStringConvertible {
        var description: String { "the sender abandoned the migration" }
    }

    /// Runs the whole receive on the calling thread and emits its events.
    func run() -> Outcome {
        let connection: MigrationConnection
        do {
            connection = try listener.accept(ioTimeout: ioTimeout)
        } catch {
            listener.close()
            return .failed(stopping.withLock { $0 } ? "the VMM is shutting down" : "accepting a sender failed: \(error)")
        }
        listener.close()  // one sender per receive
        self.connection.withLock { $0 = connection }
        defer { connection.close() }
        if stopping.withLock({ $0 }) { return .failed("the VMM is shutting down") }

        let start: MigrationStart
        do {
            guard case .start(let first) = try connection.receiveRequest(limits: MigrationLimits(guestRAM: [])) else {
                throw Refusal(description: "the first request was not start")
            }
            start = first
        } catch {
            let message = "the sender at \(connection.peer) did not open a migration: \(error)"
            try? connection.sendResponse(.error(message))
            return .failed(message)
        }
        let id = start.migrationID.uuidString.lowercased()
        events.emit(.vm, "migration-receive-started", ["migration_id": id, "peer": connection.peer])
        let began = ContinuousClock.now
        var phase = MigrationPhase.starting
        var incoming: IncomingVM?
        var bytes: UInt64 = 0
        do {
            try start.checkVersion()
            try connection.sendResponse(.ok)

            let second = try connection.receiveRequest(limits: MigrationLimits(guestRAM: []))
            guard case .config(let document) = second else { throw unexpected(second, expected: "config") }
            let configuration: VMConfiguration
            do {
                configuration = try JSONDecoder().decode(VMConfiguration.self, from: Data(document))
            } catch {
                throw Refusal(description: "the VM configuration does not decode: \(error)")
            }
            do {
                incoming = try host.makeVM(configuration)
            } catch {
                throw Refusal(description: "this host cannot run the VM: \(error)")
            }
            let vm = incoming!
            try connection.sendResponse(.ok)

            phase = .memoryPrecopy
            let limits = MigrationLimits(guestRAM: vm.machine.memory.ranges)
            var request = try connection.receiveRequest(limits: limits)
            while case .memory(let table) = request {
                try connection.receiveMemory(table, into: vm.machine.memory)
                bytes += table.dataBytes
                try connection.sendResponse(.ok)
                request = try connection.receiveRequest(limits: limits)
            }

            phase = .completing
            guard case .state(let stateDocument) = request else { throw unexpected(request, expected: "memory or state") }
            do {
                let state = try JSONDecoder().decode(MigrationStateDocument.self, from: Data(stateDocument))
                try vm.machine.restore(state.machine)
                incoming?.guestRunning = state.guestRunning
            } catch {
                throw Refusal(description: "the machine state cannot be restored: \(error)")
            }
            try connection.sendResponse(.ok)

            let last = try connection.receiveRequest(limits: limits)
            guard case .complete = last else { throw unexpected(last, expected: "complete") }
            let adopted = incoming!
            incoming = nil
            try host.adopt(adopted)
            // The guest runs here now. If the sender misses this answer it cannot tell, and the
            // guest keeps running here rather than nowhere.
            try? connection.sendResponse(.ok)
            events.emit(.vm, "migration-receive-finished", [
                "migration_id": id,
                "total_ms": "\((ContinuousClock.now - began).wholeMilliseconds)",
                "bytes_total": "\(bytes)",
            ])
            return .received
        } catch {
            if let incoming {
                incoming.machine.stop()
                incoming.console.restore()
            }
            let message = describe(error)
            if error is Abandoned {
                try? connection.sendResponse(.ok)
            } else if (error as? MigrationError)?.kind != .peerWentAway {
                try? connection.sendResponse(.error(message))
            }
            events.emit(.vm, "migration-receive-failed", ["migration_id": id, "error": message, "phase": phase.rawValue])
            return .failed(message)
        }
    }

    /// A request that is valid on its own but not at this point of the sequence; `abandon` is the
    /// sender giving up.
    private func unexpected(_ request: MigrationRequest, expected: String) -> any Error {
        if case .abandon = request { return Abandoned() }
        return Refusal(description: "protocol violation: expected \(expected), got \(request.command)")
    }

    private func describe(_ error: any Error) -> String {
        if stopping.withLock({ $0 }) { return "the VMM is shutting down" }
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
