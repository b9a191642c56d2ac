/// Where a migration was when it failed, as the `phase` property names it (docs/events.md §4).
public enum MigrationPhase: String, Codable, Sendable, CaseIterable {
    /// Connecting, the start and config requests.
    case starting
    /// Pre-copy passes while the guest runs (source); memory requests (destination).
    case memoryPrecopy = "memory-precopy"
    /// From the switch-over on: the last memory, the state, the destination resuming.
    case completing
}

/// Why an outgoing migration was cancelled.
public enum MigrationCancelReason: String, Codable, Sendable {
    /// `vm.cancel-migration`.
    case requested
    /// `timeout_s` passed with `timeout_strategy` `Cancel`.
    case timeout
}

extension VMEvent {
    /// Source: `vm.send-migration` was accepted; emitted before the first byte goes out.
    public struct MigrationStarted: EventPayload {
        public static let source = EventSource.vm
        public static let name = "migration-started"
        public static let example = MigrationStarted(
            migrationID: "3f2c0b4e-5d55-4c1e-9d0e-5f7f5f6a0c11", destinationURL: "tcp:192.0.2.7:6000",
            downtimeMs: 300, timeoutS: 3600, connections: 1, local: false, tls: true)
        public var migrationID: String
        public var destinationURL: String
        /// The downtime limit asked for.
        public var downtimeMs: Int64
        public var timeoutS: Int64
        public var connections: Int
        public var local: Bool
        /// The migration runs over mutually authenticated TLS (`tls_dir`); it never falls back to
        /// plaintext.
        public var tls: Bool

        public init(migrationID: String, destinationURL: String, downtimeMs: Int64, timeoutS: Int64, connections: Int, local: Bool,
                    tls: Bool) {
            self.migrationID = migrationID
            self.destinationURL = destinationURL
            self.downtimeMs = downtimeMs
            self.timeoutS = timeoutS
            self.connections = connections
            self.local = local
            self.tls = tls
        }
    }

    /// Source: one pre-copy pass over memory was sent while the guest ran.
    public struct MigrationMemoryIteration: EventPayload {
        public static let source = EventSource.vm
        public static let name = "migration-memory-iteration"
        public static let example = MigrationMemoryIteration(
            migrationID: MigrationStarted.example.migrationID, id: 0, bytes: 67_108_864, pages: 16384, durationMs: 120,
            bandwidthBytesPerS: 559_240_533, dirtyPages: 2048, remainingBytes: 8_388_608, estimatedDowntimeMs: 15,
            vcpuThrottlePercent: 0)
        public var migrationID: String
        /// The pass, from 0 (the first full pass).
        public var id: Int
        /// Sent in this pass.
        public var bytes: UInt64
        public var pages: UInt64
        public var durationMs: Int64
        /// Measured on this migration so far.
        public var bandwidthBytesPerS: UInt64
        /// Dirtied during this pass: still to send.
        public var dirtyPages: UInt64
        public var remainingBytes: UInt64
        /// `remainingBytes` at the measured bandwidth.
        public var estimatedDowntimeMs: Int64
        /// The share of time the vCPUs were kept out of the guest during this pass (auto-converge).
        public var vcpuThrottlePercent: Int

        public init(migrationID: String, id: Int, bytes: UInt64, pages: UInt64, durationMs: Int64, bandwidthBytesPerS: UInt64,
                    dirtyPages: UInt64, remainingBytes: UInt64, estimatedDowntimeMs: Int64, vcpuThrottlePercent: Int) {
            self.migrationID = migrationID
            self.id = id
            self.bytes = bytes
            self.pages = pages
            self.durationMs = durationMs
            self.bandwidthBytesPerS = bandwidthBytesPerS
            self.dirtyPages = dirtyPages
            self.remainingBytes = remainingBytes
            self.estimatedDowntimeMs = estimatedDowntimeMs
            self.vcpuThrottlePercent = vcpuThrottlePercent
        }
    }

    /// Source: the guest is about to be paused for the switch-over; downtime begins.
    public struct MigrationDowntime: EventPayload {
        public static let source = EventSource.vm
        public static let name = "migration-downtime"
        public static let example = MigrationDowntime(migrationID: MigrationStarted.example.migrationID, remainingBytes: 8_388_608,
                                                      estimatedDowntimeMs: 15, iterations: 2, reason: "converged")
        public var migrationID: String
        public var remainingBytes: UInt64
        public var estimatedDowntimeMs: Int64
        /// Pre-copy passes sent.
        public var iterations: Int
        /// Why pre-copy ended: `converged` (the estimate fits the limit and another pass would
        /// not halve it), `nothing-dirty`, or `timeout-ignored`.
        public var reason: String

        public init(migrationID: String, remainingBytes: UInt64, estimatedDowntimeMs: Int64, iterations: Int, reason: String) {
            self.migrationID = migrationID
            self.remainingBytes = remainingBytes
            self.estimatedDowntimeMs = estimatedDowntimeMs
            self.iterations = iterations
            self.reason = reason
        }
    }

    /// Source: the destination confirmed that it runs the guest.
    public struct MigrationFinished: EventPayload {
        public static let source = EventSource.vm
        public static let name = "migration-finished"
        public static let example = MigrationFinished(migrationID: MigrationStarted.example.migrationID, totalMs: 412, downtimeMs: 19,
                                                      bytesTotal: 75_497_472, iterations: 2)
        public var migrationID: String
        public var totalMs: Int64
        /// Measured: the pause on the source until the destination confirmed it runs the guest.
        public var downtimeMs: Int64
        public var bytesTotal: UInt64
        public var iterations: Int

        public init(migrationID: String, totalMs: Int64, downtimeMs: Int64, bytesTotal: UInt64, iterations: Int) {
            self.migrationID = migrationID
            self.totalMs = totalMs
            self.downtimeMs = downtimeMs
            self.bytesTotal = bytesTotal
            self.iterations = iterations
        }
    }

    /// Source: the migration stopped on an error; the guest runs on the source again.
    public struct MigrationFailed: EventPayload {
        public static let source = EventSource.vm
        public static let name = "migration-failed"
        public static let example = MigrationFailed(migrationID: MigrationStarted.example.migrationID,
                                                    error: "the destination went away: the peer closed the connection", phase: .memoryPrecopy)
        public var migrationID: String
        public var error: String
        public var phase: MigrationPhase

        public init(migrationID: String, error: String, phase: MigrationPhase) {
            self.migrationID = migrationID
            self.error = error
            self.phase = phase
        }
    }

    /// Source: the migration was cancelled; the guest runs on the source again.
    public struct MigrationCancelled: EventPayload {
        public static let source = EventSource.vm
        public static let name = "migration-cancelled"
        public static let example = MigrationCancelled(migrationID: MigrationStarted.example.migrationID, reason: .requested)
        public var migrationID: String
        public var reason: MigrationCancelReason

        public init(migrationID: String, reason: MigrationCancelReason) {
            self.migrationID = migrationID
            self.reason = reason
        }
    }

    /// Destination: the receiver listens; a sender may connect now.
    public struct MigrationReceiveReady: EventPayload {
        public static let source = EventSource.vm
        public static let name = "migration-receive-ready"
        public static let example = MigrationReceiveReady(receiverURL: "tcp:0.0.0.0:6000")
        /// Where it listens, with the port the system chose if port 0 was asked for.
        public var receiverURL: String

        public init(receiverURL: String) {
            self.receiverURL = receiverURL
        }
    }

    /// Destination: a sender connected and its first message was valid.
    public struct MigrationReceiveStarted: EventPayload {
        public static let source = EventSource.vm
        public static let name = "migration-receive-started"
        public static let example = MigrationReceiveStarted(migrationID: MigrationStarted.example.migrationID, peer: "192.0.2.5:41234",
                                                            tls: true)
        public var migrationID: String
        public var peer: String
        /// The sender connected over mutually authenticated TLS, its certificate checked.
        public var tls: Bool

        public init(migrationID: String, peer: String, tls: Bool) {
            self.migrationID = migrationID
            self.peer = peer
            self.tls = tls
        }
    }

    /// Destination: the guest runs here (or stays paused, if it was paused on the source).
    public struct MigrationReceiveFinished: EventPayload {
        public static let source = EventSource.vm
        public static let name = "migration-receive-finished"
        public static let example = MigrationReceiveFinished(migrationID: MigrationStarted.example.migrationID, totalMs: 405,
                                                             bytesTotal: 75_497_472)
        public var migrationID: String
        public var totalMs: Int64
        public var bytesTotal: UInt64

        public init(migrationID: String, totalMs: Int64, bytesTotal: UInt64) {
            self.migrationID = migrationID
            self.totalMs = totalMs
            self.bytesTotal = bytesTotal
        }
    }

    /// Destination: the receive failed after it started; the half-received VM is discarded.
    public struct MigrationReceiveFailed: EventPayload {
        public static let source = EventSource.vm
        public static let name = "migration-receive-failed"
        public static let example = MigrationReceiveFailed(migrationID: MigrationStarted.example.migrationID,
                                                           error: "the sender went away: the peer closed the connection", phase: .memoryPrecopy)
        public var migrationID: String
        public var error: String
        public var phase: MigrationPhase

        public init(migrationID: String, error: String, phase: MigrationPhase) {
            self.migrationID = migrationID
            self.error = error
            self.phase = phase
        }
    }
}
