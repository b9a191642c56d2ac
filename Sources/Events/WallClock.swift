#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A `CLOCK_REALTIME` reading, kept to state when an event monitor's timestamp 0 was.
struct WallClockTime: Sendable {
    var secondsSinceEpoch: Int
    var nanoseconds: Int

    static func now() -> WallClockTime {
        var time = timespec()
        clock_gettime(CLOCK_REALTIME, &time)
        return WallClockTime(secondsSinceEpoch: Int(time.tv_sec), nanoseconds: Int(time.tv_nsec))
    }

    /// RFC 3339 in UTC with microseconds, e.g. `2025-11-27T15:41:07.250113Z`.
    var rfc3339: String {
        var seconds = time_t(secondsSinceEpoch)
        var calendar = tm()
        gmtime_r(&seconds, &calendar)
        let date = "\(padded(Int(calendar.tm_year) + 1900, 4))-\(padded(Int(calendar.tm_mon) + 1, 2))-\(padded(Int(calendar.tm_mday), 2))"
        let time = "\(padded(Int(calendar.tm_hour), 2)):\(padded(Int(calendar.tm_min), 2)):\(padded(Int(calendar.tm_sec), 2))"
        return "\(date)T\(time).\(padded(nanoseconds / 1_000, 6))Z"
    }
}

/// `value` in decimal with leading zeros up to `width` digits.
private func padded(_ value: Int, _ width: Int) -> String {
    let digits = String(value)
    return String(repeating: "0", count: max(0, width - digits.count)) + digits
}
