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
/// migration. While it exceeds the downtime limit, another pass follows (until the timeout). Once
/// it fits, the rule aims for the shortest pause rather than just an allowed one: another pass of
/// what is left takes about the estimated downtime, during which the guest dirties about its
/// measured dirty rate times that; if that would at most halve what the pause carries, and the
/// pause is still above `refiningFloor`, one more pass is sent (a refining pass), up to
/// `maximumRefiningPasses` of them — so refining costs at most that many times the downtime limit
/// in extra pre-copy. Otherwise the migration switches over. It also switches over when nothing
/// is dirty, or when the timeout has passed with the `ignore` strategy.
public struct PrecopyPolicy: Equatable, Sendable {
    /// Cloud Hypervisor's defaults for `downtime_ms` and `timeout_s`.
    public static let defaultDowntimeLimit: Duration = .milliseconds(300)
    public static let defaultTimeout: Duration = .seconds(3600)

    public var downtimeLimit: Duration
    public var timeout: Duration
    public var timeoutStrategy: TimeoutStrategy
    /// Auto-converge: slow the guest's vCPUs step by step while it dirties memory faster than the
    /// link carries it (`throttle(after:)`).
    public var autoConverge: Bool

    public init(downtimeLimit: Duration = PrecopyPolicy.defaultDowntimeLimit,
                timeout: Duration = PrecopyPolicy.defaultTimeout, timeoutStrategy: TimeoutStrategy = .cancel,
                autoConverge: Bool = true) {
        self.downtimeLimit = downtimeLimit
        self.timeout = timeout
        self.timeoutStrategy = timeoutStrategy
        self.autoConverge = autoConverge
    }

    /// QEMU's auto-converge steps: the first throttle, the step after each further pass that
    /// still dirties too fast, and the most.
    public static let initialThrottlePercent = 20
    public static let throttleIncrementPercent = 10
    public static let maximumThrottlePercent = 99

    /// The vCPU throttle for the next pass, after a pass that sent `sentBytes` while the guest
    /// dirtied `dirtyBytes` and that is followed by another (the estimate does not fit yet):
    /// raised one step when the guest dirtied more than half of what the pass sent (QEMU's
    /// trigger), unchanged otherwise, and 0 without auto-converge.
    public func throttle(after current: Int, sentBytes: UInt64, dirtyBytes: UInt64) -> Int {
        guard autoConverge else { return 0 }
        guard dirtyBytes > sentBytes / 2 else { return current }
        return current == 0 ? Self.initialThrottlePercent : min(current + Self.throttleIncrementPercent, Self.maximumThrottlePercent)
    }

    /// Refining passes after the first pass whose estimate fit the limit, at most.
    public static let maximumRefiningPasses = 4
    /// A pause estimated below this is not worth another pass.
    public static let refiningFloor: Duration = .milliseconds(2)

    public enum Decision: Equatable, Sendable {
        case anotherPass
        /// The estimate fits the limit, but another pass should at least halve it.
        case refine
        case switchOver(SwitchOverReason)
        /// The timeout passed with the `cancel` strategy.
        case cancel
    }

    /// Why pre-copy ended; the raw value is `reason` of `vm.migration-downtime`.
    public enum SwitchOverReason: String, Equatable, Sendable {
        /// The estimated downtime fits in the limit, and another pass would not halve it (or it is
        /// below `refiningFloor`, or the refining passes are spent).
        case converged
        /// No page was written during the last pass.
        case nothingDirty = "nothing-dirty"
        /// The timeout passed and the strategy is `ignore`.
        case timeoutIgnored = "timeout-ignored"
        /// A local migration: the destination maps the guest's memory, so none is copied.
        case local
    }

    /// Remaining bytes ÷ bandwidth; nil while no bandwidth has been measured.
    public static func estimatedDowntime(remainingBytes: UInt64, bandwidthBytesPerSecond: Double) -> Duration? {
        if remainingBytes == 0 { return .zero }
        guard bandwidthBytesPerSecond > 0, bandwidthBytesPerSecond.isFinite else { return nil }
        return .nanoseconds(Int64(min(Double(remainingBytes) / bandwidthBytesPerSecond * 1e9, Double(Int64.max))))
    }

    /// The decision after a pass: `remainingBytes` were dirtied during it, at
    /// `dirtyBytesPerSecond`, and are still to send; `refiningPasses` refining passes came before.
    public func decide(remainingBytes: UInt64, bandwidthBytesPerSecond: Double, elapsed: Duration,
                       dirtyBytesPerSecond: Double, refiningPasses: Int) -> Decision {
        if remainingBytes == 0 { return .switchOver(.nothingDirty) }
        if let estimate = Self.estimatedDowntime(remainingBytes: remainingBytes, bandwidthBytesPerSecond: bandwidthBytesPerSecond),
           estimate <= downtimeLimit {
            let nextRemainder = dirtyBytesPerSecond * estimate.inSeconds
            let worthIt = estimate >= Self.refiningFloor && nextRemainder <= Double(remainingBytes) / 2
            return worthIt && refiningPasses < Self.maximumRefiningPasses && elapsed < timeout ? .refine : .switchOver(.converged)
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
