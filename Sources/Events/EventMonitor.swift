#if canImport(Glibc)
import Glibc
#endif
import HostOS

/// The event monitor (docs/events.md §2 and §7): timestamps events, queues them for the sink's
/// writer thread, keeps a bounded history and feeds any number of subscribers.
///
/// Thread-safe: every method may be called from any thread, vCPU threads included. `emit` never
/// waits for I/O; a sink that cannot keep up loses its oldest queued events, and a subscriber that
/// cannot keep up is finished, never the other way round.
public final class EventMonitor: Sendable {
    /// The smallest sink queue docs/events.md §2, guarantee 3 allows.
    public static let minimumQueueCapacity = 1024
    /// How long `close` waits beyond its timeout for the writer to notice it and close the sink.
    static let closeGracePeriod: Duration = .milliseconds(200)

    /// What happened to the events so far, for diagnostics and tests.
    public struct Statistics: Sendable, Equatable {
        /// Events accepted by `emit`.
        public var emitted = 0
        /// Events written whole to the sink, `vmm.events-dropped` events included.
        public var written = 0
        /// Events dropped from a full sink queue (each counted in a `vmm.events-dropped` event).
        public var dropped = 0
        /// Writes that failed, e.g. with EPIPE after a FIFO's reader went away; those events are lost.
        public var failedWrites = 0
        /// Events still queued when the sink could not be opened or `close` stopped waiting for a reader.
        public var discarded = 0
        /// The last error the sink reported, if any.
        public var lastSinkError: EventsError?

        public init() {}
    }

    private let core: MonitorCore

    /// Starts the monitor: the clock's zero is now. The sink is opened on the writer thread, so a
    /// FIFO with no reader yet never blocks the caller; a sink that cannot be opened is reported in
    /// `statistics.lastSinkError`. A monitor with no sink still keeps history and serves subscribers.
    /// `queueCapacity` is raised to `minimumQueueCapacity` if it is smaller.
    public init(sink: EventSinkTarget?, queueCapacity: Int = 1024, historyCapacity: Int = 4096) {
        core = MonitorCore(
            hasSink: sink != nil,
            queueCapacity: max(queueCapacity, Self.minimumQueueCapacity),
            historyCapacity: historyCapacity
        )
        guard let sink else { return }
        do {
            try EventWriter.start(core: core, target: sink)
        } catch {
            core.lock.withLock {
                core.state.writerRunning = false
                core.state.statistics.lastSinkError = error
            }
        }
    }

    deinit {
        // The writer thread keeps `core` alive and finishes on its own, writing what is queued.
        let subscribers = core.lock.withLock { core.beginClosing(timeout: .seconds(2)) }
        for subscriber in subscribers { subscriber.finish() }
    }

    /// Records an event now. Its timestamp is taken under the lock that orders the queue, so the
    /// order of events is the order of their timestamps. Does nothing after `close`.
    public func emit<Payload: EventPayload>(_ payload: Payload) {
        emit(Payload.source, Payload.name, payload.properties)
    }

    /// Records an event of any name: for the monitor's own tests. Everything Ferry emits goes
    /// through `emit(_:)` and the catalogue.
    func emit(_ source: EventSource, _ name: String, _ properties: [String: String]? = nil) {
        let finishedSubscribers = core.lock.withLock { () -> [AsyncStream<Event>.Continuation] in
            guard core.state.accepting else { return [] }
            let event = Event(
                timestamp: core.start.duration(to: .now),
                source: source,
                name: name,
                properties: properties
            )
            core.state.statistics.emitted += 1
            core.state.history.append(event)
            core.state.enqueue(event)
            core.workAvailable.signal()
            return core.state.deliverToSubscribers(event)
        }
        for subscriber in finishedSubscribers { subscriber.finish() }
    }

    /// Emits `vmm.starting` with `version`, `pid` and `wall_clock` (RFC 3339 UTC, with microseconds:
    /// the wall-clock time at timestamp 0). Call it first, so it is the first event of the stream.
    public func emitStarting(version: String) {
        emit(VMMEvent.Starting(version: version, pid: getpid(), wallClock: core.wallClockAtStart.rfc3339))
    }

    /// A subscriber (docs/events.md §7): the events from now on, or with `sinceStart`, every event
    /// still in the history first. A subscriber that falls more than `bufferLimit` events behind
    /// (not counting the replayed history) is finished: its stream ends rather than slowing the VMM.
    /// After `close`, the stream replays the history if asked and then ends.
    public func subscribe(sinceStart: Bool, bufferLimit: Int = 1024) -> AsyncStream<Event> {
        let (stream, continuation, isClosed) = core.lock.withLock {
            let replay = sinceStart ? core.state.history.elements : []
            let (stream, continuation) = AsyncStream.makeStream(
                of: Event.self,
                bufferingPolicy: .bufferingOldest(max(bufferLimit, 1) + replay.count)
            )
            for event in replay { continuation.yield(event) }
            if core.state.accepting {
                core.state.subscribers[core.state.nextSubscriberID] = continuation
                core.state.nextSubscriberID += 1
            }
            return (stream, continuation, !core.state.accepting)
        }
        if isClosed { continuation.finish() }
        return stream
    }

    /// Stops accepting events, lets the writer write what is queued (waiting at most `timeout` for a
    /// stalled or absent reader, then discarding the rest), closes the sink and finishes every
    /// subscriber. Idempotent: a second call waits for the first one's writer. Synchronous, so it
    /// may be called from a signal-handling path that is not async.
    public func close(timeout: Duration = .seconds(2)) {
        let subscribers = core.lock.withLock { core.beginClosing(timeout: timeout) }
        for subscriber in subscribers { subscriber.finish() }
        core.lock.withLock {
            guard let deadline = core.state.closeDeadline else { return }
            let giveUp = deadline + Self.closeGracePeriod
            while core.state.writerRunning {
                if !core.writerStopped.wait(until: giveUp) { return }
            }
        }
    }

    /// What happened to the events so far.
    public var statistics: Statistics {
        core.lock.withLock { core.state.statistics }
    }
}
