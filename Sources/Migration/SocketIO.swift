#if canImport(Glibc)
import Glibc
#endif

/// Whole reads and writes on a stream socket with one policy: short transfers are continued,
/// `EINTR` is retried, readiness is awaited with poll(2), and the wait gives up after `timeout`
/// without progress. End of stream, `EPIPE` and `ECONNRESET` are `peerWentAway`; `SIGPIPE` is
/// never raised.
enum SocketIO {
    /// Writes all of `bytes`; `what` names them in errors ("the state payload").
    static func write(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, timeout: Duration, what: String) throws(MigrationError) {
        guard let base = bytes.baseAddress else { return }
        var done = 0
        var deadline = ContinuousClock.now + timeout
        while done < bytes.count {
            let sent = Glibc.send(fd, base + done, bytes.count - done, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
            if sent > 0 {
                done += sent
                deadline = .now + timeout
                continue
            }
            let code = errno
            switch code {
            case EINTR: continue
            case EAGAIN, EWOULDBLOCK:
                try wait(fd, events: Int16(POLLOUT), until: deadline,
                         timedOut: "the peer accepted none of \(what) for \(timeout) (after \(done) of \(bytes.count) bytes)")
            case EPIPE, ECONNRESET:
                throw MigrationError(.peerWentAway, "the peer went away while \(what) was being sent (after \(done) of \(bytes.count) bytes)")
            default:
                throw .system("send (\(what))", errno: code)
            }
        }
    }

    static func write(_ fd: Int32, _ bytes: [UInt8], timeout: Duration, what: String) throws(MigrationError) {
        let result = bytes.withUnsafeBytes { buffer in
            Result { () throws(MigrationError) in try write(fd, buffer, timeout: timeout, what: what) }
        }
        try result.get()
    }

    /// Reads exactly `count` bytes. End of stream before them is `peerWentAway`, which says whether
    /// the peer left between messages (`atMessageStart` and nothing read) or inside `what`.
    static func read(_ fd: Int32, count: Int, timeout: Duration, what: String, atMessageStart: Bool = false) throws(MigrationError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        let result = bytes.withUnsafeMutableBytes { buffer in
            Result { () throws(MigrationError) in
                try read(fd, into: buffer, timeout: timeout, what: what, atMessageStart: atMessageStart)
            }
        }
        try result.get()
        return bytes
    }

    static func read(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, timeout: Duration, what: String,
                     atMessageStart: Bool) throws(MigrationError) {
        guard let base = buffer.baseAddress else { return }
        var done = 0
        var deadline = ContinuousClock.now + timeout
        while done < buffer.count {
            let got = Glibc.recv(fd, base + done, buffer.count - done, Int32(MSG_DONTWAIT))
            if got > 0 {
                done += got
                deadline = .now + timeout
                continue
            }
            let code = got == 0 ? 0 : errno
            switch code {
            case 0 where done == 0 && atMessageStart:
                throw MigrationError(.peerWentAway, "the peer went away: the connection closed before the next message")
            case 0, ECONNRESET:
                throw MigrationError(.peerWentAway, "the peer went away in the middle of \(what) (after \(done) of \(buffer.count) bytes)")
            case EINTR: continue
            case EAGAIN, EWOULDBLOCK:
                try wait(fd, events: Int16(POLLIN), until: deadline,
                         timedOut: "the peer sent nothing for \(timeout) while \(what) was expected (after \(done) of \(buffer.count) bytes)")
            default:
                throw .system("recv (\(what))", errno: code)
            }
        }
    }

    /// Waits until `fd` is ready for `events` or reports an error or hang-up (which the next call
    /// on it surfaces); throws `timedOut` with `timedOut` as its message once `deadline` passes.
    static func wait(_ fd: Int32, events: Int16, until deadline: ContinuousClock.Instant, timedOut: @autoclosure () -> String) throws(MigrationError) {
        while true {
            let remaining = deadline - .now
            guard remaining > .zero else { throw MigrationError(.timedOut, timedOut()) }
            var descriptor = pollfd(fd: fd, events: events, revents: 0)
            let ready = poll(&descriptor, 1, pollMilliseconds(remaining))
            if ready > 0 { return }
            if ready < 0 {
                let code = errno
                if code == EINTR { continue }
                throw .system("poll", errno: code)
            }
        }
    }

    /// A poll(2) timeout for `duration`, rounded up so that a wait never wakes just before its
    /// deadline and spins.
    static func pollMilliseconds(_ duration: Duration) -> Int32 {
        let (seconds, attoseconds) = duration.components
        let milliseconds = seconds * 1000 + (attoseconds + 999_999_999_999_999) / 1_000_000_000_000_000
        return Int32(clamping: max(0, milliseconds))
    }
}
