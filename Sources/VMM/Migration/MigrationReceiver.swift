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
    let progress: MigrationProgressTracker
    /// Why the receive was stopped from outside, once it was.
    private let stopReason = Mutex<String?>(nil)
    private let connection = Mutex<MigrationConnection?>(nil)

    init(listener: MigrationListener, events: EventMonitor, progress: MigrationProgressTracker, host: Host,
         ioTimeout: Duration = MigrationConnection.defaultIOTimeout) {
        self.progress = progress
        self.listener = listener
        self.events = events
        self.host = host
        self.ioTimeout = ioTimeout
    }

    /// Stops the receive as soon as possible, whether it waits for a sender or receives;
    /// `reason` becomes its error.
    func requestStop(reason: String) {
        stopReason.withLock { $0 = $0 ?? reason }
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
            return .failed(stopReason.withLock { $0 } ?? "accepting a sender failed: \(error)")
        }
        listener.close()  // one sender per receive
        self.connection.withLock { $0 = connection }
        defer { connection.close() }
        if let reason = stopReason.withLock({ $0 }) { return .failed(reason) }

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
            $0.migration_id = id
            $0.timestamp_begin_ms = MigrationProgress.nowMilliseconds()
        }
        events.emit(.vm, "migration-receive-started", ["migration_id": id, "peer": connection.peer])
        let began = ContinuousClock.now
        var phase = MigrationPhase.starting
        func enter(_ next: MigrationPhase) {
            phase = next
            progress.update { $0.state = .ongoing(phase: next.progressPhase, vcpuThrottlePercent: 0) }
        }
        var incoming: IncomingVM?
        var bytes: UInt64 = 0
        var bandwidth = BandwidthMeter()
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
            progress.update { $0.memory_transmission_info.memory_bytes_total = vm.machine.memory.size }
            try connection.sendResponse(.ok)

            enter(.memoryPrecopy)
            let limits = MigrationLimits(guestRAM: vm.machine.memory.ranges)
            var request = try connection.receiveRequest(limits: limits)
            while case .memory(let table) = request {
                let batchStart = ContinuousClock.now
                try connection.receiveMemory(table, into: vm.machine.memory)
                bandwidth.record(bytes: table.dataBytes, in: ContinuousClock.now - batchStart)
                bytes += table.dataBytes
                let bps = UInt64(bandwidth.bytesPerSecond)
                progress.update {
                    $0.memory_transmission_info.memory_bytes_transmitted += table.dataBytes
                    $0.memory_transmission_info.memory_pages_4k_transmitted += table.dataBytes / DirtyPages.pageSize
                    $0.memory_transmission_info.memory_transmission_bps = bps
                }
                try connection.sendResponse(.ok)
                request = try connection.receiveRequest(limits: limits)
            }

            guard case .state(let stateDocument) = request else { throw unexpected(request, expected: "memory or state") }
            enter(.completing)
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
            let total = ContinuousClock.now - began
            progress.end(.finished, total: total)
            events.emit(.vm, "migration-receive-finished", [
                "migration_id": id,
                "total_ms": "\(total.wholeMilliseconds)",
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
            progress.end(.failed(errorMessage: message), total: ContinuousClock.now - began)
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
        if let reason = stopReason.withLock({ $0 }) { return reason }
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
