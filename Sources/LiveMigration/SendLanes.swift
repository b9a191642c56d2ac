import Foundation
import HostOS
import Machine
import MigrationWire

/// The connections an outgoing migration sends guest memory over, each driven by a thread of its
/// own. Memory requests wait in one queue; each connection takes the next one as soon as it has
/// room, keeping up to `window` requests unanswered, so that the link never waits for an answer
/// and a fast connection takes more of the work than a slow one.
///
/// The main connection (index 0) is one of them. Between `drain()` and the next `enqueue` the
/// connections are idle, and the sender's own thread may use the main one for other requests.
final class SendLanes: @unchecked Sendable {
    /// Memory requests a connection keeps unanswered. Two already keep a link busy (a request is
    /// written while the one before it is still being read); more cover a slow receiver's
    /// stalls.
    static let window = 4

    let connections: [MigrationConnection]
    private let memory: GuestMemory
    /// Called on a lane's thread once a request is written to its connection: its data bytes, and
    /// the time the link spent on them (since the last request written on any connection, or
    /// since work began). Counted when written, not when answered, as QEMU counts: a connection
    /// reads its answers only when its window is full, so they lag.
    private let sent: @Sendable (_ bytes: UInt64, _ busy: Duration) -> Void

    private let lock = ConditionLock()
    private let changed: ConditionLock.Condition
    // Guarded by `lock`:
    private var queue: [MemoryRangeTable] = []
    private var next = 0
    /// Requests taken by a lane and not answered yet.
    private var unanswered = 0
    private var failure: MigrationError?
    private var closing = false
    private var running = 0
    /// Since when the link has been busy, measured up to the next request written.
    private var busySince: ContinuousClock.Instant = .now

    init(connections: [MigrationConnection], memory: GuestMemory,
         sent: @escaping @Sendable (_ bytes: UInt64, _ busy: Duration) -> Void) {
        precondition(!connections.isEmpty)
        self.connections = connections
        self.memory = memory
        self.sent = sent
        changed = ConditionLock.Condition(lock)
        running = connections.count
        for (index, connection) in connections.enumerated() {
            startThread(named: "mig-send-\(index)") { [self] in run(connection) }
        }
    }

    /// How large each memory request of a set of `bytes` is: small enough that every connection
    /// gets a share, at most `MemoryRangeTable.defaultBatchBytes`.
    func batchBytes(for bytes: UInt64) -> UInt64 {
        let share = bytes / UInt64(connections.count)
        let pages = (share + MigrationProtocol.pageSize - 1) / MigrationProtocol.pageSize
        return min(max(pages, 1) * MigrationProtocol.pageSize, MemoryRangeTable.defaultBatchBytes)
    }

    /// Queues memory requests for `pages`; they go out at once, in parallel. Throws the first
    /// failure of any connection.
    func enqueue(_ pages: PageRuns) throws(MigrationError) {
        let tables = MemoryRangeTable.batches(of: pages.runs, maximumBytes: batchBytes(for: pages.byteCount))
        try lock.withLock { () throws(MigrationError) in
            if let failure { throw failure }
            if next == queue.count && unanswered == 0 {
                queue.removeAll(keepingCapacity: true)
                next = 0
                busySince = .now
            }
            queue += tables
            changed.broadcast()
        }
    }

    /// Waits until every queued request has been answered; throws the first failure of any connection.
    func drain() throws(MigrationError) {
        try lock.withLock { () throws(MigrationError) in
            while failure == nil && (next < queue.count || unanswered > 0) {
                changed.wait()
            }
            if let failure { throw failure }
        }
    }

    /// Interrupts every connection's I/O: the lanes fail at once. Safe from any thread.
    func shutdown() {
        for connection in connections { connection.shutdown() }
    }

    /// Ends the lanes' threads and waits for them; requests still queued are dropped. The
    /// connections stay open.
    func stop() {
        lock.withLock {
            closing = true
            changed.broadcast()
            while running > 0 { changed.wait() }
        }
    }

    /// One connection's loop: send while there is work and room in the window, otherwise read
    /// an answer, otherwise wait.
    private func run(_ connection: MigrationConnection) {
        var waiting = 0  // this lane's unanswered requests
        lock.withLock {
            defer {
                running -= 1
                changed.broadcast()
            }
            while failure == nil && !closing {
                if waiting < Self.window, next < queue.count {
                    let table = queue[next]
                    next += 1
                    unanswered += 1
                    waiting += 1
                    if let failed = unlocked({ () throws(MigrationError) in try connection.sendMemory(table, from: memory) }) {
                        fail(failed)
                        break
                    }
                    report(table.dataBytes)
                } else if waiting > 0 {
                    if let failed = unlocked({ () throws(MigrationError) in try connection.expectOK(after: .memory) }) {
                        fail(failed)
                        break
                    }
                    waiting -= 1
                    unanswered -= 1
                    // The time from the last write to its answer is the link's too: without it, a
                    // pass that fits the socket buffers would look instantaneous.
                    if unanswered == 0, next == queue.count { report(0) }
                    changed.broadcast()
                } else {
                    changed.wait()
                }
            }
        }
    }

    /// Runs one connection's I/O with the lock released; returns its failure, if any.
    private func unlocked(_ io: () throws(MigrationError) -> Void) -> MigrationError? {
        lock.withoutLock { () -> MigrationError? in
            do throws(MigrationError) {
                try io()
                return nil
            } catch {
                return error
            }
        }
    }

    /// Hands `sent` the link time since the last report, with `bytes`; called with the lock held.
    private func report(_ bytes: UInt64) {
        let now = ContinuousClock.now
        let busy = now - busySince
        busySince = now
        lock.withoutLock { sent(bytes, busy) }
    }

    /// Records the first failure and interrupts the other connections, whose lanes then fail too.
    private func fail(_ error: MigrationError) {
        if failure == nil {
            failure = error
            lock.withoutLock { shutdown() }
        }
        changed.broadcast()
    }
}
