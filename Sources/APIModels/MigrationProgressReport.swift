/// What `vm.migration-progress` answers: the current or last migration of this VMM, in the shape
/// of Cloud Hypervisor's migration progress (the object libvirt's Cloud Hypervisor driver reads),
/// plus Ferry's `migration_id`, `direction` and, once finished, the measured `downtime_ms` and
/// `total_ms`.
///
/// Sizes are bytes, rates per second, times milliseconds; timestamps are milliseconds since the
/// Unix epoch.
public struct MigrationProgressReport: Codable, Equatable, Sendable {
    public enum Direction: String, Codable, Sendable {
        case outgoing = "Outgoing"
        case incoming = "Incoming"
    }

    public enum Phase: String, Codable, Sendable {
        case starting = "Starting"
        case memoryPrecopy = "MemoryPrecopy"
        case completing = "Completing"
    }

    /// Encoded as Cloud Hypervisor encodes its Rust enum of struct variants: `{"Ongoing": {...}}`,
    /// `{"Finished": {}}`, `{"Failed": {"error_msg": ..., "error_msg_debug": ...}}`,
    /// `{"Cancelled": {}}`.
    public enum State: Equatable, Sendable, Codable {
        case ongoing(phase: Phase, vcpuThrottlePercent: Int)
        case finished
        case failed(errorMessage: String)
        case cancelled

        private struct Ongoing: Codable {
            var phase: Phase
            var vcpu_throttle_percent: Int
        }

        /// Ferry's failures are one message; `error_msg_debug` repeats it.
        private struct Failed: Codable {
            var error_msg: String
            var error_msg_debug: String?
        }

        private struct Empty: Codable {}

        private enum Key: String, CodingKey {
            case Ongoing, Finished, Failed, Cancelled
        }

        public func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: Key.self)
            switch self {
            case .finished: try container.encode(Empty(), forKey: .Finished)
            case .cancelled: try container.encode(Empty(), forKey: .Cancelled)
            case let .ongoing(phase, throttle):
                try container.encode(Ongoing(phase: phase, vcpu_throttle_percent: throttle), forKey: .Ongoing)
            case let .failed(message):
                try container.encode(Failed(error_msg: message, error_msg_debug: message), forKey: .Failed)
            }
        }

        public init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: Key.self)
            if let ongoing = try container.decodeIfPresent(Ongoing.self, forKey: .Ongoing) {
                self = .ongoing(phase: ongoing.phase, vcpuThrottlePercent: ongoing.vcpu_throttle_percent)
            } else if let failed = try container.decodeIfPresent(Failed.self, forKey: .Failed) {
                self = .failed(errorMessage: failed.error_msg)
            } else if container.contains(.Finished) {
                self = .finished
            } else if container.contains(.Cancelled) {
                self = .cancelled
            } else {
                throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath,
                                                        debugDescription: "state is none of Ongoing, Finished, Failed, Cancelled"))
            }
        }

        public var isOngoing: Bool {
            if case .ongoing = self { true } else { false }
        }
    }

    /// How the migration travels: Cloud Hypervisor's `"Local"` or `{"Tcp": {"connections": N,
    /// "tls": false}}`, and Ferry's `{"Unix": {"connections": N}}` for a `unix:` URL.
    public enum TransportationMode: Equatable, Sendable, Codable, CustomStringConvertible {
        case local
        case tcp(connections: Int, tls: Bool)
        case unix(connections: Int)

        private struct Tcp: Codable {
            var connections: Int
            var tls: Bool
        }

        private struct Unix: Codable {
            var connections: Int
        }

        private enum Key: String, CodingKey {
            case Tcp, Unix
        }

        public func encode(to encoder: any Encoder) throws {
            switch self {
            case .local:
                var container = encoder.singleValueContainer()
                try container.encode("Local")
            case let .tcp(connections, tls):
                var container = encoder.container(keyedBy: Key.self)
                try container.encode(Tcp(connections: connections, tls: tls), forKey: .Tcp)
            case let .unix(connections):
                var container = encoder.container(keyedBy: Key.self)
                try container.encode(Unix(connections: connections), forKey: .Unix)
            }
        }

        public init(from decoder: any Decoder) throws {
            if let text = try? decoder.singleValueContainer().decode(String.self) {
                guard text == "Local" else {
                    throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "unknown mode \(text)"))
                }
                self = .local
                return
            }
            let container = try decoder.container(keyedBy: Key.self)
            if let tcp = try container.decodeIfPresent(Tcp.self, forKey: .Tcp) {
                self = .tcp(connections: tcp.connections, tls: tcp.tls)
            } else {
                self = .unix(connections: try container.decode(Unix.self, forKey: .Unix).connections)
            }
        }

        public var connections: Int {
            switch self {
            case .local: 1
            case let .tcp(connections, _), let .unix(connections): connections
            }
        }

        public var description: String {
            switch self {
            case .local: "Local"
            case let .tcp(_, tls): tls ? "Tcp with TLS" : "Tcp"
            case .unix: "Unix"
            }
        }
    }

    public struct MemoryTransmissionInfo: Codable, Equatable, Sendable {
        /// The pre-copy pass under way (or the last one), from 0.
        public var memory_iteration: Int
        /// Bandwidth measured on this migration so far, bytes per second.
        public var memory_transmission_bps: UInt64
        /// Guest RAM.
        public var memory_bytes_total: UInt64
        /// Page data sent (received, on the destination) so far, over all passes.
        public var memory_bytes_transmitted: UInt64
        /// Bytes of the current pass not yet sent.
        public var memory_bytes_remaining_iteration: UInt64
        public var memory_pages_4k_transmitted: UInt64
        public var memory_pages_4k_remaining_iteration: UInt64
        /// Pages skipped because they hold only zeros (pass 0).
        public var memory_pages_constant_count: UInt64
        /// Pages the guest dirtied per second during the last completed pass.
        public var memory_dirty_rate_pps: UInt64

        public init(memory_iteration: Int = 0, memory_transmission_bps: UInt64 = 0, memory_bytes_total: UInt64 = 0,
                    memory_bytes_transmitted: UInt64 = 0, memory_bytes_remaining_iteration: UInt64 = 0,
                    memory_pages_4k_transmitted: UInt64 = 0, memory_pages_4k_remaining_iteration: UInt64 = 0,
                    memory_pages_constant_count: UInt64 = 0, memory_dirty_rate_pps: UInt64 = 0) {
            self.memory_iteration = memory_iteration
            self.memory_transmission_bps = memory_transmission_bps
            self.memory_bytes_total = memory_bytes_total
            self.memory_bytes_transmitted = memory_bytes_transmitted
            self.memory_bytes_remaining_iteration = memory_bytes_remaining_iteration
            self.memory_pages_4k_transmitted = memory_pages_4k_transmitted
            self.memory_pages_4k_remaining_iteration = memory_pages_4k_remaining_iteration
            self.memory_pages_constant_count = memory_pages_constant_count
            self.memory_dirty_rate_pps = memory_dirty_rate_pps
        }
    }

    public var migration_id: String?
    public var direction: Direction
    public var timestamp_begin_ms: UInt64
    public var timestamp_snapshot_ms: UInt64
    /// `timestamp_snapshot_ms - timestamp_begin_ms`.
    public var timestamp_snapshot_relative_ms: UInt64
    /// The downtime limit; 0 where it is not known (on the destination).
    public var downtime_configured_ms: UInt64
    /// The pause the source expects if it switched over now; 0 until it can tell.
    public var downtime_estimated_ms: UInt64
    public var transportation_mode: TransportationMode
    public var state: State
    public var memory_transmission_info: MemoryTransmissionInfo
    /// Measured by the source once the migration finished: pause on the source to resume on the
    /// destination (absent on the destination, which cannot see when the source paused).
    public var downtime_ms: UInt64?
    /// Set once the migration has ended.
    public var total_ms: UInt64?

    public init(migration_id: String?, direction: Direction, timestamp_begin_ms: UInt64, timestamp_snapshot_ms: UInt64,
                downtime_configured_ms: UInt64, downtime_estimated_ms: UInt64, transportation_mode: TransportationMode,
                state: State, memory_transmission_info: MemoryTransmissionInfo, downtime_ms: UInt64?, total_ms: UInt64?) {
        self.migration_id = migration_id
        self.direction = direction
        self.timestamp_begin_ms = timestamp_begin_ms
        self.timestamp_snapshot_ms = timestamp_snapshot_ms
        let elapsed = timestamp_snapshot_ms.subtractingReportingOverflow(timestamp_begin_ms)
        timestamp_snapshot_relative_ms = elapsed.overflow ? 0 : elapsed.partialValue
        self.downtime_configured_ms = downtime_configured_ms
        self.downtime_estimated_ms = downtime_estimated_ms
        self.transportation_mode = transportation_mode
        self.state = state
        self.memory_transmission_info = memory_transmission_info
        self.downtime_ms = downtime_ms
        self.total_ms = total_ms
    }
}
