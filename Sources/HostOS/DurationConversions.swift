extension Duration {
    /// Attoseconds in one millisecond.
    static let attosecondsPerMillisecond: Int64 = 1_000_000_000_000_000

    /// Whole milliseconds, rounded down: how events and progress reports carry durations.
    public var wholeMilliseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds &* 1000 &+ attoseconds / Self.attosecondsPerMillisecond
    }

    /// Milliseconds rounded up, at least 0: a wait of this many milliseconds never ends before the
    /// duration has passed, so a loop waiting for a deadline never spins just short of it.
    public var roundedUpMilliseconds: Int64 {
        guard self > .zero else { return 0 }
        let (seconds, attoseconds) = components
        return seconds &* 1000 &+ (attoseconds + Self.attosecondsPerMillisecond - 1) / Self.attosecondsPerMillisecond
    }

    /// Seconds as a floating-point number, for rates.
    public var inSeconds: Double {
        Double(components.seconds) + Double(components.attoseconds) / 1e18
    }
}
