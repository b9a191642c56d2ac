import Events
import Foundation
import Machine
import Migration
import Synchronization

/// One outgoing live migration, run on its own thread: pre-copy passes over guest memory while the
/// guest runs, then the switch-over (pause, last dirty pages, state, the destination resumes).
///
/// It emits every source-side migration event of events.md section 4 itself and ends with exactly
/// one terminal event. The VMM actor does what changes the VM's state, through `Host`.
final class MigrationSender: Sendable {
    /// What the sender asks of the VMM, called from the sender's thread and waited for.
    struct Host: Sendable {
        /// Pauses the running guest, emitting `vm.pausing`/`vm.paused`.
        var pause: @Sendable () throws -> Void
        /// Resumes the guest the migration paused, emitting `vm.resuming`/`vm.resumed`.
        var resume: @Sendable () -> Void
    }

    /// Why the migration was stopped from outside its thread.
    enum StopReason: Equatable, Sendable {
        /// The VMM is exiting (vmm.shutdown, a signal).
        case vmmExiting
        /// The guest powered off or failed on the source.
        case guestStopped
    }

    enum Outcome: Equatable, Sendable {
        case finished
        case failed
        case cancelled
    }

    let id: UUID
    let options: SendMigrationOptions
    let machine: Machine
    let configuration: VMConfiguration
    let connection: MigrationConnection
    let events: EventMonitor
    let guestWasRunning: Bool
    let host: Host
    let started: ContinuousClock.Instant
    private let stopReason = Mutex<StopReason?>(nil)

    init(id: UUID, options: SendMigrationOptions, machine: Machine, configuration: VMConfiguration,
         connection: MigrationConnection, events: EventMonitor, guestWasRunning: Bool, host: Host,
         started: ContinuousClock.Instant) {
        self.id = id
        self.options = options
        self.machine = machine
        self.configuration = configuration
        self.connection = connection
        self.events = events
        self.guestWasRunning = guestWasRunning
        self.host = host
        self.started = started
    }

    /// Stops the migration as soon as possible: a blocked send or receive returns at once.
    func requestStop(_ reason: StopReason) {
        stopReason.withLock { $0 = $0 ?? reason }
        connection.shutdown()
    }

    /// Everything measured while the migration runs.
    private struct Statistics {
        var bandwidth = BandwidthMeter()
        var passes = 0
        var bytesTotal: UInt64 = 0
    }

    private struct Cancelled: Error {
        var reason: String
    }

    private struct Stopped: Error {
        var reason: StopReason
    }

    /// Runs the whole migration on the calling thread and emits its events.
    func run() -> Outcome {
        var phase = MigrationPhase.starting
        var statistics = Statistics()
        var pausedByMigration = false
        do {
            try connection.sendStart(MigrationStart(migrationID: id))
            try connection.expectOK(after: .start)
            try connection.sendRequest(.config, payload: Array(try JSONEncoder().encode(configuration)))
            try connection.expectOK(after: .config)

            phase = .memoryPrecopy
            try machine.setDirtyLogging(true)
            let remaining = try precopy(&statistics)

            phase = .completing
            let estimate = PrecopyPolicy.estimatedDowntime(remainingBytes: remaining.byteCount,
                                                           bandwidthBytesPerSecond: statistics.bandwidth.bytesPerSecond)
            events.emit(.vm, "migration-downtime", [
                "migration_id": id.uuidString.lowercased(),
                "remaining_bytes": "\(remaining.byteCount)",
                "estimated_downtime_ms": "\(estimate?.wholeMilliseconds ?? 0)",
                "iterations": "\(statistics.passes)",
            ])
            let downtimeStart = ContinuousClock.now
            if guestWasRunning {
                try host.pause()
                pausedByMigration = true
            }
            try checkStop()
            let last = remaining.union(try machine.collectDirtyPages())
            statistics.bytesTotal += try send(last)
            let state = MigrationStateDocument(machine: try machine.saveState(), guestRunning: guestWasRunning)
            try connection.sendRequest(.state, payload: Array(try JSONEncoder().encode(state)))
            try connection.expectOK(after: .state)
            try connection.sendRequest(.complete)
            try connection.expectOK(after: .complete)
            let downtime = ContinuousClock.now - downtimeStart
            events.emit(.vm, "migration-finished", [
                "migration_id": id.uuidString.lowercased(),
                "total_ms": "\((ContinuousClock.now - started).wholeMilliseconds)",
                "downtime_ms": "\(downtime.wholeMilliseconds)",
                "bytes_total": "\(statistics.bytesTotal)",
                "iterations": "\(statistics.passes)",
            ])
            connection.close()
            return .finished
        } catch {
            try? connection.sendRequest(.abandon)
            connection.close()
            try? machine.setDirtyLogging(false)
            if pausedByMigration { host.resume() }
            let id = id.uuidString.lowercased()
            if let cancelled = error as? Cancelled {
                events.emit(.vm, "migration-cancelled", ["migration_id": id, "reason": cancelled.reason])
                return .cancelled
            }
            events.emit(.vm, "migration-failed", ["migration_id": id, "error": describe(error), "phase": phase.rawValue])
            return .failed
        }
    }

    /// Pass 0 sends every page that is not zero; each later pass sends what the guest dirtied
    /// during the one before. Returns the pages dirtied during the last pass, still to send, once
    /// the policy says to switch over.
    private func precopy(_ statistics: inout Statistics) throws -> DirtyPages {
        var pages = machine.memory.nonZeroPages()
        while true {
            let passStart = ContinuousClock.now
            let bytes = try send(pages)
            let duration = ContinuousClock.now - passStart
            statistics.bandwidth.record(bytes: bytes, in: duration)
            statistics.bytesTotal += bytes
            let dirty = try machine.collectDirtyPages()
            let bandwidth = statistics.bandwidth.bytesPerSecond
            let estimate = PrecopyPolicy.estimatedDowntime(remainingBytes: dirty.byteCount, bandwidthBytesPerSecond: bandwidth)
            events.emit(.vm, "migration-memory-iteration", [
                "migration_id": id.uuidString.lowercased(),
                "id": "\(statistics.passes)",
                "bytes": "\(bytes)",
                "pages": "\(pages.pageCount)",
                "duration_ms": "\(duration.wholeMilliseconds)",
                "bandwidth_bytes_per_s": "\(UInt64(bandwidth))",
                "dirty_pages": "\(dirty.pageCount)",
                "remaining_bytes": "\(dirty.byteCount)",
                "estimated_downtime_ms": "\(estimate?.wholeMilliseconds ?? 0)",
            ])
            statistics.passes += 1
            switch options.policy.decide(remainingBytes: dirty.byteCount, bandwidthBytesPerSecond: bandwidth,
                                         elapsed: ContinuousClock.now - started) {
            case .anotherPass:
                pages = dirty
            case .switchOver:
                return dirty
            case .cancel:
                throw Cancelled(reason: "timeout")
            }
        }
    }

    /// Sends `pages` as memory requests straight from guest memory; returns the bytes sent.
    private func send(_ pages: DirtyPages) throws -> UInt64 {
        var sent: UInt64 = 0
        for table in MemoryRangeTable.batches(of: pages.runs) {
            try checkStop()
            try connection.sendMemory(table, from: machine.memory)
            try connection.expectOK(after: .memory)
            sent += table.dataBytes
        }
        return sent
    }

    private func checkStop() throws {
        if let reason = stopReason.withLock({ $0 }) { throw Stopped(reason: reason) }
    }

    /// One line for `vm.migration-failed`'s `error`: what went wrong, and for a lost connection
    /// that the destination went away.
    private func describe(_ error: any Error) -> String {
        let stop = stopReason.withLock { $0 }
        switch (stop, error) {
        case (.vmmExiting?, _): return "the source VMM is shutting down"
        case (.guestStopped?, _): return "the guest stopped on the source during the migration"
        case (_, let error as MigrationError) where error.kind == .peerWentAway:
            return "the destination went away: \(error.message)"
        case (_, let error as MigrationError) where error.kind == .timedOut:
            return "the destination stopped responding: \(error.message)"
        default: return "\(error)"
        }
    }
}
