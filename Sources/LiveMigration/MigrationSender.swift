import Events
import Foundation
import HostOS
import Machine
import MigrationWire
import Synchronization

/// One outgoing live migration, run on its own thread: pre-copy passes over guest memory while the
/// guest runs, then the switch-over (pause, last dirty pages, state, the destination resumes).
///
/// It emits every source-side migration event of docs/events.md §4 itself and ends with exactly
/// one terminal event. What changes the VM's lifecycle (pausing and resuming the guest, with their
/// events) it asks of the VMM through `SourceVM`.
public final class MigrationSender: Sendable {
    /// What the sender asks of the VMM that owns the guest; called from the sender's thread and
    /// waited for.
    public struct SourceVM: Sendable {
        /// Pauses the running guest, emitting `vm.pausing`/`vm.paused`.
        public var pause: @Sendable () throws -> Void
        /// Resumes the guest the migration paused, emitting `vm.resuming`/`vm.resumed`.
        public var resume: @Sendable () -> Void

        public init(pause: @escaping @Sendable () throws -> Void, resume: @escaping @Sendable () -> Void) {
            self.pause = pause
            self.resume = resume
        }
    }

    /// Why the migration was stopped from outside its thread.
    public enum StopReason: Equatable, Sendable {
        /// `vm.cancel-migration`.
        case cancelled
        /// The VMM is exiting (vmm.shutdown, a signal).
        case vmmExiting
        /// The guest powered off or failed on the source.
        case guestStopped
    }

    /// How the migration ended, as its terminal event says.
    public enum Ending: Equatable, Sendable {
        case finished
        case failed
        case cancelled
    }

    public let id: UUID
    let options: SendMigrationOptions
    let machine: Machine
    /// The main connection, connected to `options.destination`; the sender joins
    /// `options.connections - 1` more after the config.
    let connection: MigrationConnection
    /// The sender's credentials, for the extra connections too.
    let tls: MigrationTLS?
    let events: EventMonitor
    let guestWasRunning: Bool
    let sourceVM: SourceVM
    public let progress: MigrationProgressTracker
    let started: ContinuousClock.Instant

    private struct Control {
        var stopReason: StopReason?
        /// Set once `complete` went out: the destination may be running the guest, so the
        /// migration can no longer be stopped from here.
        var committed = false
    }

    private let control = Mutex(Control())
    /// The extra connections joined so far, for `requestStop` to interrupt.
    private let extraConnections = Mutex<[MigrationConnection]>([])
    /// What the memory connections moved, counted as each request is written.
    private let link = Mutex(LinkStatistics())

    /// A migration of `machine` over `connection` (connected to `options.destination`, with
    /// `tls` if it is TLS).
    public init(id: UUID = UUID(), options: SendMigrationOptions, machine: Machine, connection: MigrationConnection,
                tls: MigrationTLS? = nil, events: EventMonitor, guestWasRunning: Bool, sourceVM: SourceVM) {
        self.id = id
        self.options = options
        self.machine = machine
        self.connection = connection
        self.tls = tls
        self.events = events
        self.guestWasRunning = guestWasRunning
        self.sourceVM = sourceVM
        started = .now
        progress = MigrationProgressTracker(MigrationProgress(
            direction: .outgoing, transport: options.local ? "Local" : options.destination.transport, connections: options.connections,
            tls: connection.isEncrypted, downtimeLimit: options.policy.downtimeLimit))
        progress.update {
            $0.migrationID = id.lowercasedString
            $0.memory.totalBytes = machine.memory.size
        }
    }

    /// Emits `vm.migration-started`, then runs the migration on a thread of its own and hands its
    /// ending to `ended` from that thread.
    public func start(_ ended: @escaping @Sendable (Ending) -> Void) {
        events.emit(VMEvent.MigrationStarted(
            migrationID: id.lowercasedString, destinationURL: options.destination.description,
            downtimeMs: options.policy.downtimeLimit.wholeMilliseconds, timeoutS: options.policy.timeout.components.seconds,
            connections: options.connections, local: options.local, tls: connection.isEncrypted))
        startThread(named: "migration-send") { [self] in ended(run()) }
    }

    /// The destination accepted the start request. One that closes the connection instead, with a
    /// plaintext sender, may be expecting TLS: the error says so.
    private func expectStartAnswered() throws(MigrationError) {
        do {
            try connection.expectOK(after: .start)
        } catch {
            guard error.kind == .peerWentAway, !connection.isEncrypted else { throw error }
            throw MigrationError(error.kind, "\(error.message) (before it answered the start request; "
                                 + "a destination that expects TLS, with tls_dir, closes a plaintext connection so)", cause: error.cause)
        }
    }

    /// Stops the migration as soon as possible: a blocked send or receive returns at once.
    /// Returns false, changing nothing, once the destination has been told to run the guest.
    @discardableResult
    public func requestStop(_ reason: StopReason) -> Bool {
        let accepted = control.withLock { control in
            guard !control.committed else { return false }
            control.stopReason = control.stopReason ?? reason
            return true
        }
        if accepted {
            connection.shutdown()
            for extra in extraConnections.withLock({ $0 }) { extra.shutdown() }
        }
        return accepted
    }

    /// What the memory connections moved.
    private struct LinkStatistics {
        var bandwidth = BandwidthMeter()
        var bytesTotal: UInt64 = 0
    }

    /// The timeout passed with the `Cancel` strategy.
    private struct TimedOut: Error {}

    private struct Stopped: Error {
        var reason: StopReason
    }

    /// Pass 0 scans guest RAM in slices of this size and queues each slice's pages before it
    /// scans the next, so that the link is busy from the start.
    static let scanSliceBytes: UInt64 = 256 << 20

    /// Runs the whole migration on the calling thread and emits its events.
    func run() -> Ending {
        var phase = MigrationPhase.starting
        var passes = 0
        var pausedByMigration = false
        var lanes: SendLanes?
        func enter(_ next: MigrationPhase) {
            phase = next
            progress.update { $0.state = .ongoing(next) }
        }
        /// Ends the lanes' threads and closes the extra connections (not the main one).
        func closeLanes(interrupting: Bool) {
            if interrupting { lanes?.shutdown() }
            lanes?.stop()
            lanes = nil
            for extra in extraConnections.withLock({ $0 }) { extra.close() }
        }
        do {
            try connection.handshake()
            try connection.sendStart(MigrationStart(migrationID: id))
            try expectStartAnswered()
            if options.local {
                guard let file = machine.memory.backingFile else {
                    throw MigrationError(.protocolViolation, "a local migration needs the guest's memory to be shared")
                }
                try connection.sendMemoryFile(file)
                try connection.expectOK(after: .memoryFile)
            }
            try connection.sendConfig(MigrationConfig(machine: machine.configuration))
            // While the destination builds the VM: the state coded in the pause is not this process's first.
            MigrationState.rehearseCoding(of: machine.configuration)
            try connection.expectOK(after: .config)
            let remaining: PageRuns
            let reason: PrecopyPolicy.SwitchOverReason
            if options.local {
                (remaining, reason) = (PageRuns(runs: []), .local)
            } else {
                lanes = SendLanes(connections: [connection] + (try joinExtraConnections()), memory: machine.memory) { [self] bytes, busy in
                    let bandwidth = link.withLock { link in
                        link.bandwidth.record(bytes: bytes, in: busy)
                        link.bytesTotal += bytes
                        return UInt64(link.bandwidth.bytesPerSecond)
                    }
                    progress.update {
                        $0.memory.transmittedBytes += bytes
                        $0.memory.remainingInPassBytes -= min(bytes, $0.memory.remainingInPassBytes)
                        $0.memory.bytesPerSecond = bandwidth
                    }
                }

                enter(.memoryPrecopy)
                try machine.setDirtyLogging(true)
                (remaining, reason) = try precopy(lanes!, passes: &passes)
                throttle(0)  // the guest is paused next, and runs freely wherever it runs after
            }

            enter(.completing)
            let estimate = PrecopyPolicy.estimatedDowntime(remainingBytes: remaining.byteCount,
                                                           bandwidthBytesPerSecond: link.withLock { $0.bandwidth.bytesPerSecond })
            events.emit(VMEvent.MigrationDowntime(migrationID: id.lowercasedString, remainingBytes: remaining.byteCount,
                                                  estimatedDowntimeMs: estimate?.wholeMilliseconds ?? 0, iterations: passes,
                                                  reason: reason.rawValue))
            let downtimeStart = ContinuousClock.now
            if guestWasRunning {
                try sourceVM.pause()
                pausedByMigration = true
            }
            try checkStop()
            if !options.local {
                let last = remaining.union(try machine.collectDirtyPages())
                try send(last, over: lanes!)
                closeLanes(interrupting: false)
            }
            try connection.sendState(MigrationState(machine: try machine.saveState(), guestRunning: guestWasRunning))
            try connection.expectOK(after: .state)
            try commit()
            try connection.sendRequest(.complete)
            try connection.expectOK(after: .complete)
            let downtime = ContinuousClock.now - downtimeStart
            let total = ContinuousClock.now - started
            progress.update { $0.downtime = downtime }
            progress.end(.finished, total: total)
            events.emit(VMEvent.MigrationFinished(migrationID: id.lowercasedString, totalMs: total.wholeMilliseconds,
                                                  downtimeMs: downtime.wholeMilliseconds, bytesTotal: link.withLock { $0.bytesTotal },
                                                  iterations: passes))
            connection.close()
            return .finished
        } catch {
            // After the connection itself failed, an abandon could only wait out another I/O
            // timeout behind a full send buffer.
            let connectionFailed = (error as? MigrationError).map { $0.kind == .timedOut || $0.kind == .peerWentAway } ?? false
            // The lanes are idle here unless a connection failed or a stop interrupted them; idle
            // ones end without touching the main connection, which then still carries the abandon.
            closeLanes(interrupting: connectionFailed || control.withLock { $0.stopReason != nil })
            if !connectionFailed { try? connection.sendRequest(.abandon) }
            connection.close()
            try? machine.setDirtyLogging(false)
            throttle(0)
            // Once complete went out the destination may run the guest. A copying migration resumes
            // it here too, preferring a guest twice to none; a local one must not, since both
            // would run on the same memory: the source keeps its guest paused.
            let sharesRunningMemory = options.local && control.withLock { $0.committed }
            if pausedByMigration, !sharesRunningMemory { sourceVM.resume() }
            let cancelReason: MigrationCancelReason? = if error is TimedOut {
                .timeout
            } else if control.withLock({ $0.stopReason }) == .cancelled {
                .requested
            } else {
                nil
            }
            if let cancelReason {
                progress.end(.cancelled, total: ContinuousClock.now - started)
                events.emit(VMEvent.MigrationCancelled(migrationID: id.lowercasedString, reason: cancelReason))
                return .cancelled
            }
            var message = describe(error)
            if sharesRunningMemory {
                message += "; the destination may be running the guest on the same memory, so it stays paused here"
            }
            progress.end(.failed(message), total: ContinuousClock.now - started)
            events.emit(VMEvent.MigrationFailed(migrationID: id.lowercasedString, error: message, phase: phase))
            return .failed
        }
    }

    /// Connects the extra connections `options.connections` asks for, each with its own TLS
    /// handshake, and joins each to this migration.
    private func joinExtraConnections() throws -> [MigrationConnection] {
        let count = options.connections
        for index in 1..<max(count, 1) {
            try checkStop()
            let extra = try MigrationConnection.connect(to: options.destination, timeout: MigrationConnection.defaultConnectTimeout,
                                                        ioTimeout: connection.ioTimeout, tls: tls)
            extraConnections.withLock { $0.append(extra) }
            try checkStop()
            do {
                try extra.handshake()
                try extra.sendJoin(MigrationJoin(migrationID: id, index: UInt32(index), count: UInt32(count)))
                try extra.expectOK(after: .join)
            } catch {
                throw MigrationError(error.kind, "extra connection \(index) of \(count - 1): \(error.message)", cause: error.cause)
            }
        }
        return extraConnections.withLock { $0 }
    }

    /// Pass 0 sends every page that is not zero; each later pass sends what the guest dirtied
    /// during the one before. Returns the pages dirtied during the last pass, still to send, once
    /// the policy says to switch over.
    private func precopy(_ lanes: SendLanes, passes: inout Int) throws -> (PageRuns, PrecopyPolicy.SwitchOverReason) {
        var pages: PageRuns?  // nil: pass 0, every page that is not zero
        var refiningPasses = 0
        while true {
            let passStart = ContinuousClock.now
            progress.update { [passes] in $0.memory.pass = passes }
            let bytes: UInt64
            let pageCount: Int
            if let pages {
                (bytes, pageCount) = (try send(pages, over: lanes), pages.pageCount)
            } else {
                (bytes, pageCount) = try sendNonZeroPages(over: lanes)
            }
            let duration = ContinuousClock.now - passStart
            let dirty = try machine.collectDirtyPages()
            let bandwidth = link.withLock { $0.bandwidth.bytesPerSecond }
            let estimate = PrecopyPolicy.estimatedDowntime(remainingBytes: dirty.byteCount, bandwidthBytesPerSecond: bandwidth)
            progress.update {
                $0.estimatedDowntime = estimate
                $0.memory.dirtyPagesPerSecond = duration > .zero ? UInt64(Double(dirty.pageCount) / duration.inSeconds) : 0
            }
            events.emit(VMEvent.MigrationMemoryIteration(
                migrationID: id.lowercasedString, id: passes, bytes: bytes, pages: UInt64(pageCount),
                durationMs: duration.wholeMilliseconds, bandwidthBytesPerS: UInt64(bandwidth), dirtyPages: UInt64(dirty.pageCount),
                remainingBytes: dirty.byteCount, estimatedDowntimeMs: estimate?.wholeMilliseconds ?? 0,
                vcpuThrottlePercent: machine.vcpuThrottlePercent))
            passes += 1
            let dirtyRate = duration > .zero ? Double(dirty.byteCount) / duration.inSeconds : .infinity
            switch options.policy.decide(remainingBytes: dirty.byteCount, bandwidthBytesPerSecond: bandwidth,
                                         elapsed: ContinuousClock.now - started, dirtyBytesPerSecond: dirtyRate,
                                         refiningPasses: refiningPasses) {
            case .anotherPass:
                // Pass 0 sends every page once; from pass 1 on, a guest that dirties more than
                // half of what a pass sends is slowed down (auto-converge).
                if passes > 1 { throttle(options.policy.throttle(after: machine.vcpuThrottlePercent, sentBytes: bytes,
                                                                 dirtyBytes: dirty.byteCount)) }
                pages = dirty
            case .refine:
                refiningPasses += 1
                pages = dirty
            case .switchOver(let reason):
                return (dirty, reason)
            case .cancel:
                throw TimedOut()
            }
        }
    }

    /// Pass 0: scans guest RAM slice by slice and queues each slice's non-zero pages before
    /// scanning the next, then waits until all are answered. Returns the bytes and pages sent.
    private func sendNonZeroPages(over lanes: SendLanes) throws -> (UInt64, Int) {
        progress.update { $0.memory.remainingInPassBytes = machine.memory.size }
        var bytes: UInt64 = 0
        var pages = 0
        for range in machine.memory.ranges {
            var start = range.start
            while start < range.end {
                try checkStop()
                let slice = GuestRAMRange(start: start, size: min(Self.scanSliceBytes, range.end - start))
                let nonZero = machine.memory.nonZeroPages(in: slice)
                let skipped = slice.size - nonZero.byteCount
                progress.update {
                    $0.memory.zeroPages += skipped / PageRuns.pageSize
                    $0.memory.remainingInPassBytes -= min(skipped, $0.memory.remainingInPassBytes)
                }
                try lanes.enqueue(nonZero)
                bytes += nonZero.byteCount
                pages += nonZero.pageCount
                start = slice.end
            }
        }
        try lanes.drain()
        return (bytes, pages)
    }

    /// Sends `pages`, a whole pass, over every connection, and waits until all are answered;
    /// returns the bytes sent.
    @discardableResult
    private func send(_ pages: PageRuns, over lanes: SendLanes) throws -> UInt64 {
        try checkStop()
        progress.update { $0.memory.remainingInPassBytes = pages.byteCount }
        try lanes.enqueue(pages)
        try lanes.drain()
        return pages.byteCount
    }

    /// Sets the vCPU throttle for the passes to come, and shows it in the progress.
    private func throttle(_ percent: Int) {
        machine.vcpuThrottlePercent = percent
        progress.update { $0.vcpuThrottlePercent = percent }
    }

    private func checkStop() throws {
        if let reason = control.withLock({ $0.stopReason }) { throw Stopped(reason: reason) }
    }

    /// Passes the point of no return, unless a stop came first.
    private func commit() throws {
        let reason = control.withLock { control -> StopReason? in
            if control.stopReason == nil { control.committed = true }
            return control.stopReason
        }
        if let reason { throw Stopped(reason: reason) }
    }

    /// One line for `vm.migration-failed`'s `error`: what went wrong, and for a lost connection
    /// that the destination went away. (A cancel ends in `vm.migration-cancelled` instead.)
    private func describe(_ error: any Error) -> String {
        let stop = control.withLock { $0.stopReason }
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

extension UUID {
    /// The form migration ids take in events and progress reports.
    var lowercasedString: String { uuidString.lowercased() }
}

extension MigrationURL {
    /// `Tcp` or `Unix`, as progress reports name the transport.
    var transport: String {
        switch self {
        case .tcp: "Tcp"
        case .unix: "Unix"
        }
    }
}
