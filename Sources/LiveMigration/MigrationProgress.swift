import Events
import Foundation
import HostOS
import Synchronization

/// Where one migration of this VMM stands, in either direction: what `vm.migration-progress`
/// reports (the API shapes it as Cloud Hypervisor's progress object).
public struct MigrationProgress: Equatable, Sendable {
    public enum Direction: Sendable {
        case outgoing
        case incoming
    }

    public enum State: Equatable, Sendable {
        case ongoing(MigrationPhase)
        case finished
        case failed(String)
        case cancelled

        public var isOngoing: Bool {
            if case .ongoing = self { true } else { false }
        }
    }

    /// Memory moved so far; sizes in bytes, rates per second.
    public struct Memory: Equatable, Sendable {
        /// The pre-copy pass under way (or the last one), from 0.
        public var pass = 0
        /// Bandwidth measured on this migration so far.
        public var bytesPerSecond: UInt64 = 0
        /// Guest RAM.
        public var totalBytes: UInt64 = 0
        /// Page data sent (received, on the destination) so far, over all passes.
        public var transmittedBytes: UInt64 = 0
        /// Bytes of the current pass not yet sent.
        public var remainingInPassBytes: UInt64 = 0
        /// Pages that hold only zeros and were not sent (pass 0).
        public var zeroPages: UInt64 = 0
        /// Pages the guest dirtied per second during the last completed pass.
        public var dirtyPagesPerSecond: UInt64 = 0

        public var transmittedPages: UInt64 { transmittedBytes / PageSize.bytes }
        public var remainingInPassPages: UInt64 { remainingInPassBytes / PageSize.bytes }

        public init() {}
    }

    /// Joins this progress with the migration's events; nil on the destination until a sender
    /// has started.
    public var migrationID: String?
    public var direction: Direction
    /// When the migration began, in milliseconds since the Unix epoch.
    public var beganAtMilliseconds: UInt64
    /// The limit asked for (source only).
    public var downtimeLimit: Duration?
    /// The remaining bytes at the measured bandwidth, after the last pass.
    public var estimatedDowntime: Duration?
    /// `Tcp`, `Unix`, or `Local` (a local migration, over a Unix socket).
    public var transport: String
    public var connections: Int
    /// The connections are TLS (`tls_dir`).
    public var tls: Bool
    /// The share of time the source's vCPUs are kept out of the guest (auto-converge), 0–99.
    public var vcpuThrottlePercent = 0
    public var state: State
    public var memory: Memory
    /// Measured by the source once the migration finished: pause on the source to resume on the
    /// destination (the destination cannot see when the source paused).
    public var downtime: Duration?
    /// How long the migration took; nil while it runs.
    public var total: Duration?

    public init(direction: Direction, transport: String, connections: Int, tls: Bool = false, downtimeLimit: Duration? = nil) {
        self.direction = direction
        self.transport = transport
        self.connections = connections
        self.tls = tls
        self.downtimeLimit = downtimeLimit
        beganAtMilliseconds = Self.wallClockMilliseconds()
        state = .ongoing(.starting)
        memory = Memory()
    }

    /// Milliseconds since the Unix epoch: progress reports carry wall-clock timestamps.
    public static func wallClockMilliseconds() -> UInt64 {
        UInt64(Date().timeIntervalSince1970 * 1000)
    }
}

/// The page size migration counts in.
enum PageSize {
    static let bytes: UInt64 = 4096
}

/// One migration's progress, written by its thread and read by anyone without waiting for it.
public final class MigrationProgressTracker: Sendable {
    private let progress: Mutex<MigrationProgress>

    public init(_ initial: MigrationProgress) {
        progress = Mutex(initial)
    }

    func update(_ change: (inout MigrationProgress) -> Void) {
        progress.withLock { change(&$0) }
    }

    /// The progress now.
    public func snapshot() -> MigrationProgress {
        progress.withLock { $0 }
    }

    /// Marks the end: the final state and the total time.
    public func end(_ state: MigrationProgress.State, total: Duration) {
        progress.withLock { progress in
            guard progress.state.isOngoing else { return }
            progress.state = state
            progress.total = total
            progress.memory.remainingInPassBytes = 0
        }
    }
}
