#if canImport(Glibc)
import Glibc
#endif

/// Waiting for a descriptor with poll(2), against a monotonic deadline.
public enum Poll {
    /// Waits until `fd` is ready for `events` — or reports an error or hang-up, which the next call
    /// on it surfaces — and returns true; returns false once `deadline` has passed (nil: no
    /// deadline). Interrupted waits go on.
    public static func wait(_ fd: Int32, for events: Int16, until deadline: ContinuousClock.Instant?) throws(SystemError) -> Bool {
        while true {
            var timeout: Int32 = -1
            if let deadline {
                let remaining = deadline - .now
                guard remaining > .zero else { return false }
                timeout = Int32(clamping: remaining.roundedUpMilliseconds)
            }
            var descriptor = pollfd(fd: fd, events: events, revents: 0)
            let ready = Glibc.poll(&descriptor, 1, timeout)
            if ready > 0 { return true }
            if ready < 0 {
                let code = errno
                if code == EINTR { continue }
                throw SystemError("poll", errno: code)
            }
        }
    }

    /// Sleeps for `duration` on the calling thread.
    public static func sleep(for duration: Duration) {
        let deadline = ContinuousClock.now + duration
        while true {
            let remaining = deadline - .now
            guard remaining > .zero else { return }
            _ = Glibc.poll(nil, 0, Int32(clamping: remaining.roundedUpMilliseconds))
        }
    }
}
