#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The open event sink. Owned by the writer thread, which alone writes to and closes it.
final class EventSink {
    /// How long the writer waits in one `poll(2)` before it checks again whether `close` gave up on a
    /// stalled or absent reader.
    static let pollSlice: Duration = .milliseconds(100)
    /// How often the writer tries again to open a FIFO that has no reader yet.
    static let fifoOpenRetryInterval: Duration = .milliseconds(20)
    /// Permissions of an event file that `path=` creates (events.md section 1).
    static let createdFileMode: mode_t = 0o644
    /// The highest descriptor number a process inherits as stdin, stdout and stderr; never closed.
    static let highestStandardDescriptor: Int32 = 2

    /// Answers how much longer the writer may wait for a reader: `nil` while nobody is closing the
    /// monitor, otherwise the time left until `close` gives up (zero or less: give up now).
    typealias PatienceCheck = () -> Duration?

    let descriptor: Int32
    private let isRegularFile: Bool
    private let ownsDescriptor: Bool
    private var isClosed = false

    private init(descriptor: Int32, isRegularFile: Bool, ownsDescriptor: Bool) {
        self.descriptor = descriptor
        self.isRegularFile = isRegularFile
        self.ownsDescriptor = ownsDescriptor
    }

    deinit {
        close()
    }

    /// Opens `target`. A FIFO without a reader is opened as soon as a reader comes; returns `nil` if
    /// `patience` runs out first.
    static func open(_ target: EventSinkTarget, patience: PatienceCheck) throws(EventsError) -> EventSink? {
        switch target {
        case .fileDescriptor(let descriptor):
            let isRegularFile = try regularFile(descriptor, describedAs: "fd=\(descriptor)")
            return EventSink(
                descriptor: descriptor,
                isRegularFile: isRegularFile,
                ownsDescriptor: descriptor > highestStandardDescriptor
            )
        case .path(let path):
            guard let descriptor = try openPath(path, patience: patience) else { return nil }
            do throws(EventsError) {
                let isRegularFile = try regularFile(descriptor, describedAs: path)
                return EventSink(descriptor: descriptor, isRegularFile: isRegularFile, ownsDescriptor: true)
            } catch {
                closeDescriptor(descriptor)
                throw error
            }
        }
    }

    /// Creates or truncates a regular file, or opens an existing FIFO for writing. `O_NONBLOCK` keeps
    /// the open from waiting for a FIFO reader (it fails with `ENXIO` instead, and is retried), and
    /// afterwards keeps every write from waiting for one.
    private static func openPath(_ path: String, patience: PatienceCheck) throws(EventsError) -> Int32? {
        let flags = O_WRONLY | O_CREAT | O_TRUNC | O_NONBLOCK | O_CLOEXEC
        while true {
            let descriptor = openFile(path, flags, createdFileMode)
            if descriptor >= 0 { return descriptor }
            let error = errno
            switch error {
            case EINTR:
                continue
            case ENXIO:
                // A FIFO that no one reads yet.
                let timeLeft = patience()
                if let timeLeft, timeLeft <= .zero { return nil }
                sleep(for: min(fifoOpenRetryInterval, timeLeft ?? fifoOpenRetryInterval))
            default:
                throw EventsError(code: .sinkFailed, message: "open(\(path)) for the event monitor failed", errno: error)
            }
        }
    }

    private static func regularFile(_ descriptor: Int32, describedAs name: String) throws(EventsError) -> Bool {
        var status = stat()
        try systemCall("fstat(\(name)) of the event monitor") { fstat(descriptor, &status) }
        return status.st_mode & S_IFMT == S_IFREG
    }

    enum WriteOutcome {
        case written
        case failed(EventsError)
        /// `patience` ran out while the reader did not read.
        case abandoned
    }

    /// Writes `bytes` with one `write(2)` (at most `PIPE_BUF` bytes, so a pipe takes them whole or
    /// not at all). Retries `EINTR`; waits for a full pipe with `poll(2)` as long as `patience`
    /// allows; finishes a short write, which only a regular file (or a socket) does.
    func write(_ bytes: [UInt8], patience: PatienceCheck) -> WriteOutcome {
        bytes.withUnsafeBytes { buffer in
            guard let base = buffer.baseAddress else { return .written }
            var offset = 0
            // An inherited descriptor may be blocking: ask first, so the writer rarely blocks in write.
            var mustWaitForSpace = !isRegularFile
            while offset < buffer.count {
                if mustWaitForSpace {
                    guard waitUntilWritable(patience: patience) else { return .abandoned }
                }
                let written = writeBytes(descriptor, base + offset, buffer.count - offset)
                if written > 0 {
                    offset += written
                    continue
                }
                if written == 0 {
                    return .failed(EventsError(code: .sinkFailed, message: "write to the event monitor wrote nothing"))
                }
                let error = errno
                switch error {
                case EINTR:
                    continue
                case EAGAIN, EWOULDBLOCK:
                    mustWaitForSpace = true
                default:
                    return .failed(EventsError(code: .sinkFailed, message: "write to the event monitor failed", errno: error))
                }
            }
            return .written
        }
    }

    /// Waits until `poll(2)` says the descriptor can take data (or has an error for `write` to
    /// report); `false` if `patience` ran out first.
    private func waitUntilWritable(patience: PatienceCheck) -> Bool {
        while true {
            let timeLeft = patience()
            if let timeLeft, timeLeft <= .zero { return false }
            let slice = min(Self.pollSlice, timeLeft ?? Self.pollSlice)
            var request = pollfd(fd: descriptor, events: Int16(POLLOUT), revents: 0)
            let ready = poll(&request, 1, Int32(milliseconds(roundingUp: slice)))
            if ready > 0 { return true }
            if ready < 0 && errno != EINTR { return true }
        }
    }

    /// Closes the descriptor unless it is one of 0–2 inherited through `fd=`. Idempotent.
    func close() {
        guard !isClosed else { return }
        isClosed = true
        guard ownsDescriptor else { return }
        closeDescriptor(descriptor)
    }
}

private func milliseconds(roundingUp duration: Duration) -> Int64 {
    let (seconds, attoseconds) = duration.components
    let attosecondsPerMillisecond: Int64 = 1_000_000_000_000_000
    return seconds * 1_000 + (attoseconds + attosecondsPerMillisecond - 1) / attosecondsPerMillisecond
}

private func sleep(for duration: Duration) {
    _ = poll(nil, 0, Int32(milliseconds(roundingUp: duration)))
}

// The C calls under names that `EventSink`'s own `open`, `write` and `close` do not shadow.

private func openFile(_ path: String, _ flags: Int32, _ mode: mode_t) -> Int32 {
    open(path, flags, mode)
}

private func writeBytes(_ descriptor: Int32, _ bytes: UnsafeRawPointer, _ count: Int) -> Int {
    write(descriptor, bytes, count)
}

/// Linux releases the descriptor even when `close(2)` reports an error (`EINTR` included): never retry.
private func closeDescriptor(_ descriptor: Int32) {
    _ = close(descriptor)
}
