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

extension Poll {
    /// Waits until one of `descriptors` is readable (or `timeout` passes, nil: forever) and returns
    /// the indices of the readable ones; empty after a timeout. Interrupted waits go on.
    public static func readable(_ descriptors: [Int32], timeout: Duration?) throws(SystemError) -> [Int] {
        var fds = descriptors.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
        let milliseconds = timeout.map { Int32(clamping: $0.roundedUpMilliseconds) } ?? -1
        while true {
            let ready = Glibc.poll(&fds, nfds_t(fds.count), milliseconds)
            if ready >= 0 { break }
            let code = errno
            if code != EINTR { throw SystemError("poll", errno: code) }
        }
        return fds.indices.filter { fds[$0].revents != 0 }
    }
}

/// A descriptor that one thread polls and another makes readable, once, to wake it: the read end
/// of a pipe whose write end gets one byte.
public final class Wakeup: Sendable {
    public let readEnd: FileDescriptor
    private let writeEnd: FileDescriptor

    public init() throws(SystemError) {
        var ends: [Int32] = [-1, -1]
        try systemCall("pipe") { pipe(&ends) }
        readEnd = FileDescriptor(ends[0])
        writeEnd = FileDescriptor(ends[1])
        for end in ends {
            _ = fcntl(end, F_SETFD, FD_CLOEXEC)
            _ = fcntl(end, F_SETFL, O_NONBLOCK)
        }
    }

    /// Makes `readEnd` readable for good. Safe from any thread.
    public func signal() {
        var byte: UInt8 = 1
        _ = Glibc.write(writeEnd.rawValue, &byte, 1)
    }
}
