import HostOS

/// What to do when a migration reaches its `timeout_s` (Cloud Hypervisor's `timeout_strategy`).
public enum TimeoutStrategy: String, Codable, Equatable, Sendable {
    /// Stop the migration; the guest keeps running on the source.
    case cancel = "Cancel"
    /// Switch over anyway, accepting a longer downtime.
    case ignore = "Ignore"
}

/// The pre-copy convergence rule, in one place: after each pass over memory, either send another
/// pass, switch over (pause the guest and send what is left), or give up.
///
/// The estimated downtime is the bytes still to send divided by the bandwidth measured on this
/// migration; the migration switches over once that fits in the downtime limit, or nothing is
/// dirty, or its timeout has passed with the `ignore` strategy.
public struct PrecopyPolicy: Equatable, Sendable {
    /// Cloud Hypervisor's defaults for `downtime_ms` and `timeout_s`.
    public static let defaultDowntimeLimit: Duration = .milliseconds(300)
    public static let defaultTimeout: Duration = .seconds(3600)

    public var downtimeLimit: Duration
    public var timeout: Duration
    public var timeoutStrategy: TimeoutStrategy

    public init(downtimeLimit: Duration = PrecopyPolicy.defaultDowntimeLimit,
                timeout: Duration = PrecopyPolicy.defaultTimeout, timeoutStrategy: TimeoutStrategy = .cancel) {
        self.downtimeLimit = downtimeLimit
        self.timeout = timeout
        self.timeoutStrategy = timeoutStrategy
    }

    public enum Decision: Equatable, Sendable {
        case anotherPass
        case switchOver(SwitchOverReason)
        /// The timeout passed with the `cancel` strategy.
        case cancel
    }

    public enum SwitchOverReason: String, Equatable, Sendable {
        /// The estimated downtime fits in the limit.
        case converged
        /// No page was written during the last pass.
        case nothingDirty
        /// The timeout passed and the strategy is `ignore`.
        case timeoutIgnored
    }

    /// Remaining bytes ÷ bandwidth; nil while no bandwidth has been measured.
    public static func estimatedDowntime(remainingBytes: UInt64, bandwidthBytesPerSecond: Double) -> Duration? {
        if remainingBytes == 0 { return .zero }
        guard bandwidthBytesPerSecond > 0, bandwidthBytesPerSecond.isFinite else { return nil }
        return .nanoseconds(Int64(min(Double(remainingBytes) / bandwidthBytesPerSecond * 1e9, Double(Int64.max))))
    }

    /// The decision after a pass: `remainingBytes` were dirtied during it and are still to send.
    public func decide(remainingBytes: UInt64, bandwidthBytesPerSecond: Double, elapsed: Duration) -> Decision {
        if remainingBytes == 0 { return .switchOver(.nothingDirty) }
        if let estimate = Self.estimatedDowntime(remainingBytes: remainingBytes, bandwidthBytesPerSecond: bandwidthBytesPerSecond),
           estimate <= downtimeLimit {
            return .switchOver(.converged)
        }
        if elapsed >= timeout {
            return timeoutStrategy == .cancel ? .cancel : .switchOver(.timeoutIgnored)
        }
        return .anotherPass
    }
}

/// The bandwidth of one migration: all bytes sent over all time spent sending them.
public struct BandwidthMeter: Equatable, Sendable {
    public private(set) var bytes: UInt64 = 0
    public private(set) var time: Duration = .zero

    public init() {}

    public mutating func record(bytes sent: UInt64, in duration: Duration) {
        bytes += sent
        time += duration
    }

    /// Bytes per second, or 0 before anything was measured.
    public var bytesPerSecond: Double {
        time > .zero ? Double(bytes) / time.inSeconds : 0
    }
}
