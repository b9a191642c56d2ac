import Testing
@testable import LiveMigration

@Suite struct PrecopyPolicyTests {
    static let megabyte: UInt64 = 1_000_000

    @Test(arguments: [
        // remaining bytes, bandwidth B/s, elapsed s, expected
        (UInt64(0), 0.0, 0, PrecopyPolicy.Decision.switchOver(.nothingDirty)),
        (UInt64(0), 1e9, 5000, .switchOver(.nothingDirty)),
        (30 * megabyte, 100e6, 1, .switchOver(.converged)),     // 300 ms: exactly the limit
        (31 * megabyte, 100e6, 1, .anotherPass),                 // 310 ms
        (1 * megabyte, 0.0, 1, .anotherPass),                    // no bandwidth measured yet
        (500 * megabyte, 100e6, 3600, .cancel),                  // timeout, strategy cancel
        (500 * megabyte, 100e6, 3599, .anotherPass),
    ])
    func decisionFollowsEstimatedDowntimeAndTimeout(remaining: UInt64, bandwidth: Double, elapsed: Int,
                                                    expected: PrecopyPolicy.Decision) {
        let policy = PrecopyPolicy()
        #expect(policy.decide(remainingBytes: remaining, bandwidthBytesPerSecond: bandwidth,
                              elapsed: .seconds(elapsed)) == expected)
    }

    @Test func ignoreStrategySwitchesOverAtTheTimeout() {
        let policy = PrecopyPolicy(downtimeLimit: .milliseconds(100), timeout: .seconds(2), timeoutStrategy: .ignore)
        #expect(policy.decide(remainingBytes: 1 << 30, bandwidthBytesPerSecond: 1e6, elapsed: .seconds(2))
            == .switchOver(.timeoutIgnored))
        #expect(policy.decide(remainingBytes: 1 << 30, bandwidthBytesPerSecond: 1e6, elapsed: .milliseconds(1999))
            == .anotherPass)
    }

    @Test func estimatedDowntimeIsRemainingOverBandwidth() {
        #expect(PrecopyPolicy.estimatedDowntime(remainingBytes: 250_000_000, bandwidthBytesPerSecond: 1e9) == .milliseconds(250))
        #expect(PrecopyPolicy.estimatedDowntime(remainingBytes: 0, bandwidthBytesPerSecond: 0) == .zero)
        #expect(PrecopyPolicy.estimatedDowntime(remainingBytes: 1, bandwidthBytesPerSecond: 0) == nil)
    }

    @Test func bandwidthIsAllBytesOverAllSendingTime() {
        var meter = BandwidthMeter()
        #expect(meter.bytesPerSecond == 0)
        meter.record(bytes: 100_000_000, in: .milliseconds(500))
        meter.record(bytes: 50_000_000, in: .milliseconds(1000))
        #expect(meter.bytesPerSecond == 100_000_000)
    }

    @Test func timeoutStrategyUsesCloudHypervisorsSpelling() {
        #expect(TimeoutStrategy(rawValue: "Cancel") == .cancel)
        #expect(TimeoutStrategy(rawValue: "Ignore") == .ignore)
    }
}
