import Foundation
import HostOS
import Machine
import MigrationWire

/// The extra connections of an incoming migration: after the config, the receiver keeps
/// accepting on its listener, and each connection that joins this migration (`join`) gets a
/// thread of its own that reads memory requests into guest memory beside the main connection.
///
/// A connection that does not join properly (no `join` first, another migration's id, an index
/// taken or out of range) is refused and closed; the migration goes on without it. Once one has
/// joined, its failure fails the migration (`failed`). `finish()` ends them all before the state
/// is restored or the receive ends.
final class ReceiveLanes: @unchecked Sendable {
    private let listener: MigrationListener
    private let tls: MigrationTLS?
    private let ioTimeout: Duration
    private let migrationID: UUID
    private let memory: GuestMemory
    /// Shows how many connections the migration uses as they join.
    private let progress: MigrationProgressTracker
    /// Called on a lane's thread for each memory request received: its data bytes and when they
    /// began to arrive.
    private let received: @Sendable (_ bytes: UInt64, _ start: ContinuousClock.Instant) -> Void
    /// Called once, on a lane's thread, when a joined connection fails: the receive fails with this.
    private let failed: @Sendable (String) -> Void

    private let lock = ConditionLock()
    private let changed: ConditionLock.Condition
    // Guarded by `lock`:
    private var connections: [MigrationConnection] = []
    /// The count the joined connections announced, and the indexes joined.
    private var count: UInt32?
    private var joined: Set<UInt32> = []
    /// Indexes whose lane is inside a memory request.
    private var busy: Set<UInt32> = []
    private var failure: String?
    private var closing = false
    private var running = 0

    init(listener: MigrationListener, tls: MigrationTLS?, ioTimeout: Duration, migrationID: UUID, memory: GuestMemory,
         progress: MigrationProgressTracker, received: @escaping @Sendable (_ bytes: UInt64, _ start: ContinuousClock.Instant) -> Void,
         failed: @escaping @Sendable (String) -> Void) {
        self.listener = listener
        self.tls = tls
        self.ioTimeout = ioTimeout
        self.migrationID = migrationID
        self.memory = memory
        self.progress = progress
        self.received = received
        self.failed = failed
        changed = ConditionLock.Condition(lock)
        running = 1
        startThread(named: "mig-join") { [self] in acceptJoins() }
    }

    /// Stops accepting, interrupts every extra connection and waits for their threads. Returns
    /// why the memory they carried is incomplete, if it is: a joined connection failed, one was
    /// inside a memory request, or fewer joined than the migration announced.
    func finish() -> String? {
        lock.withLock {
            closing = true
            lock.withoutLock { listener.shutdown() }
            let inside = busy
            for connection in connections { connection.shutdown() }
            while running > 0 { changed.wait() }
            for connection in connections { connection.close() }
            connections.removeAll()
            if let failure { return failure }
            if let index = inside.min() {
                return "extra connection \(index) was still receiving memory when the state arrived"
            }
            if let count, joined.count != Int(count) - 1 {
                return "only \(joined.count) of the migration's \(count - 1) extra connections joined"
            }
            return nil
        }
    }

    private func acceptJoins() {
        defer { exited() }
        while true {
            let connection: MigrationConnection
            do {
                connection = try listener.accept(ioTimeout: ioTimeout, tls: tls)
            } catch {
                return  // shut down at the end, or the listener failed: no more joins
            }
            let admitted = lock.withLock { () -> Bool in
                // Joined ones plus ones still joining: more than a migration can use are strays.
                guard !closing, connections.count < MigrationProtocol.maximumConnections - 1 else { return false }
                connections.append(connection)
                running += 1
                return true
            }
            guard admitted else {
                connection.close()
                continue
            }
            startThread(named: "mig-recv") { [self] in lane(connection) }
        }
    }

    private func exited() {
        lock.withLock {
            running -= 1
            changed.broadcast()
        }
    }

    /// One extra connection: its handshake and join, then memory requests until the sender closes
    /// it or `finish()` interrupts it.
    private func lane(_ connection: MigrationConnection) {
        defer { exited() }
        guard let index = join(connection) else {
            // Refused: closed now, and its place taken by no one.
            lock.withLock { connections.removeAll { $0 === connection } }
            connection.close()
            return
        }
        let limits = MigrationLimits(guestRAM: memory.ranges)
        while true {
            do throws(MigrationError) {
                let request = try connection.receiveRequest(limits: limits)
                guard case .memory(let table) = request else {
                    throw MigrationError(.protocolViolation, "protocol violation: an extra connection carries only memory requests, not \(request.command)")
                }
                lock.withLock { _ = busy.insert(index) }
                let began = ContinuousClock.now
                try connection.receiveMemory(table, into: memory)
                // Out of the request before it is answered: the answer can let the sender send the
                // state, and `finish()` must then find this lane between requests.
                lock.withLock { _ = busy.remove(index) }
                received(table.dataBytes, began)
                try connection.sendResponse(.ok)
            } catch {
                // The sender closing between requests, or `finish()`, ends a lane; anything else
                // fails the migration.
                let quiet = lock.withLock { closing || (!busy.contains(index) && error.kind == .peerWentAway) }
                if quiet { return }
                let message = "extra connection \(index) failed: \(error.message)"
                if error.kind != .peerWentAway && error.kind != .timedOut { try? connection.sendResponse(.error(message)) }
                let first = lock.withLock { () -> Bool in
                    guard failure == nil else { return false }
                    failure = message
                    return true
                }
                if first { failed(message) }
                return
            }
        }
    }

    /// The connection's handshake and `join`; answers it and returns its index, or refuses it
    /// and returns nil.
    private func join(_ connection: MigrationConnection) -> UInt32? {
        do throws(MigrationError) {
            try connection.handshake()
            let request = try connection.receiveRequest(limits: MigrationLimits(guestRAM: []))
            guard case .join(let join) = request else {
                throw MigrationError(.protocolViolation, "the first request on an extra connection must be join, not \(request.command)")
            }
            try join.check(joining: migrationID)
            try lock.withLock { () throws(MigrationError) in
                if let count, count != join.count {
                    throw MigrationError(.protocolViolation, "extra connection \(join.index) announces \(join.count) connections; an earlier one announced \(count)")
                }
                guard !joined.contains(join.index) else {
                    throw MigrationError(.protocolViolation, "extra connection \(join.index) has already joined")
                }
                guard !closing else { throw MigrationError(.protocolViolation, "the migration no longer takes connections") }
                count = join.count
                joined.insert(join.index)
                let connections = 1 + joined.count
                progress.update { $0.connections = connections }
            }
            try connection.sendResponse(.ok)
            return join.index
        } catch {
            try? connection.sendResponse(.error(error.message))
            return nil
        }
    }
}
