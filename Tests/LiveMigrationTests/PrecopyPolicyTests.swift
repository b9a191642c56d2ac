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
        // The guest dirties as fast as the link carries: another pass would not shorten the pause.
        let policy = PrecopyPolicy()
        #expect(policy.decide(remainingBytes: remaining, bandwidthBytesPerSecond: bandwidth,
                              elapsed: .seconds(elapsed), dirtyBytesPerSecond: bandwidth, refiningPasses: 0) == expected)
    }

    @Test func ignoreStrategySwitchesOverAtTheTimeout() {
        let policy = PrecopyPolicy(downtimeLimit: .milliseconds(100), timeout: .seconds(2), timeoutStrategy: .ignore)
        #expect(policy.decide(remainingBytes: 1 << 30, bandwidthBytesPerSecond: 1e6, elapsed: .seconds(2),
                              dirtyBytesPerSecond: 1e6, refiningPasses: 0) == .switchOver(.timeoutIgnored))
        #expect(policy.decide(remainingBytes: 1 << 30, bandwidthBytesPerSecond: 1e6, elapsed: .milliseconds(1999),
                              dirtyBytesPerSecond: 1e6, refiningPasses: 0) == .anotherPass)
    }

    /// 20 MB left on a 100 MB/s link is a 200 ms pause, inside the 300 ms limit. Another pass takes
    /// about 200 ms; at 40 MB/s the guest dirties 8 MB meanwhile, so it is worth making (a 80 ms
    /// pause), at 60 MB/s it would leave 12 MB and is not. Refining stops after its budget, below
    /// the floor, and at the timeout.
    @Test(arguments: [
        // dirty B/s, remaining bytes, refining passes so far, elapsed s, expected
        (40e6, 20 * megabyte, 0, 1, PrecopyPolicy.Decision.refine),
        (50e6, 20 * megabyte, 0, 1, .refine),                                   // exactly half
        (60e6, 20 * megabyte, 0, 1, .switchOver(.converged)),
        (40e6, 20 * megabyte, PrecopyPolicy.maximumRefiningPasses - 1, 1, .refine),
        (40e6, 20 * megabyte, PrecopyPolicy.maximumRefiningPasses, 1, .switchOver(.converged)),
        (0.0, 100_000, 0, 1, .switchOver(.converged)),                          // a 1 ms pause: below the floor
        (40e6, 20 * megabyte, 0, 3600, .switchOver(.converged)),                // the timeout has passed
        (40e6, 40 * megabyte, 0, 1, .anotherPass),                              // 400 ms: does not fit yet
    ])
    func onceItFitsAnotherPassIsMadeOnlyIfItAtLeastHalvesThePause(dirtyRate: Double, remaining: UInt64, refining: Int, elapsed: Int,
                                                                  expected: PrecopyPolicy.Decision) {
        #expect(PrecopyPolicy().decide(remainingBytes: remaining, bandwidthBytesPerSecond: 100e6, elapsed: .seconds(elapsed),
                                       dirtyBytesPerSecond: dirtyRate, refiningPasses: refining) == expected)
    }

    /// QEMU's auto-converge steps: 20 % once the guest dirties more than half of what a pass sent,
    /// then 10 more per such pass, at most 99 %; unchanged when it dirties less; never without it.
    @Test func throttleStepsAsQEMUs() {
        let policy = PrecopyPolicy()
        #expect(policy.throttle(after: 0, sentBytes: 100, dirtyBytes: 51) == 20)
        #expect(policy.throttle(after: 0, sentBytes: 100, dirtyBytes: 50) == 0)
        #expect(policy.throttle(after: 20, sentBytes: 100, dirtyBytes: 90) == 30)
        #expect(policy.throttle(after: 30, sentBytes: 100, dirtyBytes: 10) == 30)
        #expect(policy.throttle(after: 90, sentBytes: 100, dirtyBytes: 100) == 99)
        #expect(policy.throttle(after: 99, sentBytes: 100, dirtyBytes: 100) == 99)
        #expect(PrecopyPolicy(autoConverge: false).throttle(after: 0, sentBytes: 100, dirtyBytes: 100) == 0)
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
