import HostOS

/// The state an `EventMonitor` shares with its writer thread, all of it guarded by `lock`.
final class MonitorCore: @unchecked Sendable {
    let lock = ConditionLock()
    /// Signalled when the queue gains an event or the monitor starts closing.
    let workAvailable: ConditionLock.Condition
    /// Broadcast when the writer thread has stopped.
    let writerStopped: ConditionLock.Condition
    /// Timestamp 0.
    let start: ContinuousClock.Instant
    /// The wall-clock time at timestamp 0, for `vmm.starting`.
    let wallClockAtStart: WallClockTime
    /// Guarded by `lock`.
    var state: MonitorState

    init(hasSink: Bool, queueCapacity: Int, historyCapacity: Int) {
        workAvailable = ConditionLock.Condition(lock)
        writerStopped = ConditionLock.Condition(lock)
        start = .now
        wallClockAtStart = .now()
        state = MonitorState(
            writerRunning: hasSink,
            queue: RingBuffer(capacity: hasSink ? queueCapacity : 0),
            history: RingBuffer(capacity: historyCapacity)
        )
    }

    /// Stops accepting events and sets the writer's deadline; returns the subscribers to finish
    /// (outside the lock). Call inside `lock`. Does nothing the second time.
    func beginClosing(timeout: Duration) -> [AsyncStream<Event>.Continuation] {
        guard state.accepting else { return [] }
        state.accepting = false
        state.closeDeadline = .now + max(timeout, .zero)
        workAvailable.signal()
        let subscribers = Array(state.subscribers.values)
        state.subscribers = [:]
        return subscribers
    }

    // MARK: Used by the writer thread

    /// The writer's `EventSink.PatienceCheck`.
    func timeLeftBeforeGivingUp() -> Duration? {
        lock.withLock {
            state.closeDeadline.map { ContinuousClock.now.duration(to: $0) }
        }
    }

    /// Adds what the writer did since it last reported to the statistics.
    func publish(_ report: inout WriterReport) {
        lock.withLock {
            state.statistics.add(report)
        }
        report = WriterReport()
    }

    /// Publishes what the writer did since the last call, then waits for events to write: returns
    /// them oldest first, preceded by a `vmm.events-dropped` event if the queue overflowed since the
    /// last batch; `nil` once the monitor is closing and the queue is empty.
    func nextBatch(after report: inout WriterReport) -> [Event]? {
        lock.withLock {
            state.statistics.add(report)
            report = WriterReport()
            while state.queue.isEmpty && state.accepting {
                workAvailable.wait()
            }
            guard !state.queue.isEmpty else { return nil }
            var batch: [Event] = []
            if state.droppedSinceLastBatch > 0 {
                // Dropped events were queued after the previous batch and before this one, so the
                // timestamp of the newest of them sits between the two: order stays intact.
                batch.append(Event(
                    timestamp: state.newestDroppedTimestamp,
                    source: .vmm,
                    name: VMMEvent.EventsDropped.name,
                    properties: VMMEvent.EventsDropped(count: state.droppedSinceLastBatch).properties
                ))
                state.droppedSinceLastBatch = 0
            }
            batch.append(contentsOf: state.queue.removeAll())
            return batch
        }
    }

    /// The writer has stopped: anything still queued is discarded and counted, and `close` waiters
    /// are released.
    func writerDidStop(after report: WriterReport) {
        lock.withLock {
            state.statistics.add(report)
            state.statistics.discarded += state.queue.removeAll().count
            state.droppedSinceLastBatch = 0
            state.writerRunning = false
            writerStopped.broadcast()
        }
    }
}

/// Everything `MonitorCore.lock` guards.
struct MonitorState {
    /// False once `close` was called: `emit` then does nothing.
    var accepting = true
    /// True from the start while a sink is configured, until its writer thread has stopped.
    var writerRunning: Bool
    /// Events waiting for the writer; when full, the oldest is dropped.
    var queue: RingBuffer<Event>
    /// Events dropped from `queue` since the writer last took a batch.
    var droppedSinceLastBatch = 0
    var newestDroppedTimestamp: Duration = .zero
    /// The most recent events, for subscribers that ask for them.
    var history: RingBuffer<Event>
    var subscribers: [Int: AsyncStream<Event>.Continuation] = [:]
    var nextSubscriberID = 0
    /// When the writer stops waiting for a stalled or absent reader; set by `close`.
    var closeDeadline: ContinuousClock.Instant?
    var statistics = EventMonitor.Statistics()

    /// Hands `event` to the writer's queue, dropping the oldest queued event if it is full.
    mutating func enqueue(_ event: Event) {
        guard writerRunning else { return }
        if let dropped = queue.append(event) {
            droppedSinceLastBatch += 1
            newestDroppedTimestamp = dropped.timestamp
            statistics.dropped += 1
        }
    }

    /// Yields `event` to every subscriber; returns those that overflowed or went away, already
    /// removed, to be finished outside the lock.
    mutating func deliverToSubscribers(_ event: Event) -> [AsyncStream<Event>.Continuation] {
        var removed: [AsyncStream<Event>.Continuation] = []
        for (id, subscriber) in subscribers {
            switch subscriber.yield(event) {
            case .enqueued:
                continue
            case .dropped, .terminated:
                removed.append(subscriber)
                subscribers[id] = nil
            @unknown default:
                continue
            }
        }
        return removed
    }
}

/// What the writer did since it last reported, added to `EventMonitor.Statistics` under the lock.
struct WriterReport {
    var written = 0
    var failedWrites = 0
    var discarded = 0
    var lastError: EventsError?
}

extension EventMonitor.Statistics {
    mutating func add(_ report: WriterReport) {
        written += report.written
        failedWrites += report.failedWrites
        discarded += report.discarded
        if let error = report.lastError { lastSinkError = error }
    }
}
