#if canImport(Glibc)
import Glibc
#endif
import HostOS

/// The open event sink. Owned by the writer thread, which alone writes to and closes it.
final class EventSink {
    /// How long the writer waits in one `poll(2)` before it checks again whether `close` gave up on a
    /// stalled or absent reader.
    static let pollSlice: Duration = .milliseconds(100)
    /// How often the writer tries again to open a FIFO that has no reader yet.
    static let fifoOpenRetryInterval: Duration = .milliseconds(20)
    /// Permissions of an event file that `path=` creates (docs/events.md §1).
    static let createdFileMode: mode_t = 0o644
    /// The highest descriptor number a process inherits as stdin, stdout and stderr; never closed.
    static let highestStandardDescriptor: Int32 = 2

    /// Answers how much longer the writer may wait for a reader: `nil` while nobody is closing the
    /// monitor, otherwise the time left until `close` gives up (zero or less: give up now).
    typealias PatienceCheck = () -> Duration?

    let descriptor: FileDescriptor
    private let isRegularFile: Bool

    private init(descriptor: FileDescriptor, isRegularFile: Bool) {
        self.descriptor = descriptor
        self.isRegularFile = isRegularFile
    }

    /// Opens `target`. A FIFO without a reader is opened as soon as a reader comes; returns `nil` if
    /// `patience` runs out first.
    static func open(_ target: EventSinkTarget, patience: PatienceCheck) throws(EventsError) -> EventSink? {
        switch target {
        case .fileDescriptor(let number):
            let descriptor = number > highestStandardDescriptor ? FileDescriptor(number) : FileDescriptor(borrowing: number)
            return EventSink(descriptor: descriptor, isRegularFile: try regularFile(descriptor, describedAs: "fd=\(number)"))
        case .path(let path):
            guard let descriptor = try openPath(path, patience: patience) else { return nil }
            return EventSink(descriptor: descriptor, isRegularFile: try regularFile(descriptor, describedAs: path))
        }
    }

    /// Creates or truncates a regular file, or opens an existing FIFO for writing. `O_NONBLOCK` keeps
    /// the open from waiting for a FIFO reader (it fails with `ENXIO` instead, and is retried), and
    /// afterwards keeps every write from waiting for one.
    private static func openPath(_ path: String, patience: PatienceCheck) throws(EventsError) -> FileDescriptor? {
        let flags = O_WRONLY | O_CREAT | O_TRUNC | O_NONBLOCK | O_CLOEXEC
        while true {
            do throws(SystemError) {
                return FileDescriptor(try systemCall("open(\(path))") { Glibc.open(path, flags, createdFileMode) })
            } catch where error.errno == ENXIO {
                // A FIFO that no one reads yet.
                let timeLeft = patience()
                if let timeLeft, timeLeft <= .zero { return nil }
                Poll.sleep(for: min(fifoOpenRetryInterval, timeLeft ?? fifoOpenRetryInterval))
            } catch {
                throw EventsError(.sinkFailed, "open(\(path)) for the event monitor failed", cause: error)
            }
        }
    }

    private static func regularFile(_ descriptor: FileDescriptor, describedAs name: String) throws(EventsError) -> Bool {
        var status = stat()
        do throws(SystemError) {
            try systemCall("fstat(\(name))") { fstat(descriptor.rawValue, &status) }
        } catch {
            throw EventsError(.sinkFailed, "fstat(\(name)) of the event monitor failed", cause: error)
        }
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
                do throws(SystemError) {
                    let written = try systemCall("write") { Glibc.write(descriptor.rawValue, base + offset, buffer.count - offset) }
                    guard written > 0 else {
                        return .failed(EventsError(.sinkFailed, "write to the event monitor wrote nothing"))
                    }
                    offset += written
                } catch where error.errno == EAGAIN || error.errno == EWOULDBLOCK {
                    mustWaitForSpace = true
                } catch {
                    return .failed(EventsError(.sinkFailed, "write to the event monitor failed", cause: error))
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
            // A failed poll leaves the error for the write to report.
            guard let ready = try? Poll.wait(descriptor.rawValue, for: Int16(POLLOUT), until: .now + slice) else { return true }
            if ready { return true }
        }
    }

    /// Closes the descriptor unless it is one of 0–2 inherited through `fd=`. Idempotent.
    func close() {
        descriptor.close()
    }
}
