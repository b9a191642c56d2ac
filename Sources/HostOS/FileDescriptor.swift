#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// An open file descriptor with one owner, closed exactly once: by `close()` or when the owner
/// lets go of it.
///
/// `close()` and `shutdown()` run their system calls under one lock, so a shutdown from another
/// thread (to interrupt the owner's blocking read) either reaches this descriptor while it is open
/// or does nothing: it can never hit a descriptor number that a concurrent close has freed and the
/// process has already reused. Reads and writes use `rawValue` without the lock; only the owner
/// does I/O, and it closes the descriptor only after its I/O has returned.
public final class FileDescriptor: Sendable, CustomStringConvertible {
    /// The descriptor number; do not use it after `close()`.
    public let rawValue: Int32
    private let open: Mutex<Bool>
    /// Descriptors 0–2 (standard input, output, error) are borrowed, never closed.
    private let closesOnRelease: Bool

    /// Takes ownership of `rawValue`.
    public init(_ rawValue: Int32) {
        self.rawValue = rawValue
        open = Mutex(true)
        closesOnRelease = true
    }

    /// Uses `rawValue` without owning it: `close()` only marks it closed.
    public init(borrowing rawValue: Int32) {
        self.rawValue = rawValue
        open = Mutex(true)
        closesOnRelease = false
    }

    deinit { close() }

    public var isOpen: Bool { open.withLock { $0 } }

    /// Closes the descriptor, once. Linux frees the number even when close(2) reports an error,
    /// `EINTR` included, so it is never retried.
    public func close() {
        open.withLock { open in
            guard open else { return }
            open = false
            if closesOnRelease { _ = Glibc.close(rawValue) }
        }
    }

    /// Shuts a socket down in both directions without closing it: a thread blocked reading or
    /// writing it returns at once. Does nothing once the descriptor is closed. Safe from any thread.
    public func shutdown() {
        open.withLock { open in
            if open { _ = Glibc.shutdown(rawValue, Int32(SHUT_RDWR)) }
        }
    }

    public var description: String { "fd \(rawValue)" }
}

extension FileDescriptor {
    /// Writes all of `bytes` to a blocking descriptor (a file, a pipe), continuing short writes.
    public func writeAll(_ bytes: UnsafeRawBufferPointer, operation: @autoclosure () -> String = "write") throws(SystemError) {
        try HostOS.writeAll(rawValue, bytes, operation: operation())
    }

    public func writeAll(_ bytes: [UInt8], operation: @autoclosure () -> String = "write") throws(SystemError) {
        try HostOS.writeAll(rawValue, bytes, operation: operation())
    }

    /// Fills `buffer` from a blocking descriptor; returns how many bytes were read, fewer than
    /// `buffer.count` only where the file ends.
    public func read(into buffer: UnsafeMutableRawBufferPointer, operation: @autoclosure () -> String = "read") throws(SystemError) -> Int {
        guard let base = buffer.baseAddress else { return 0 }
        var done = 0
        while done < buffer.count {
            let got = try systemCall(operation()) { Glibc.read(rawValue, base + done, buffer.count - done) }
            if got == 0 { break }
            done += got
        }
        return done
    }
}

/// Writes all of `bytes` to the blocking descriptor `fd`, continuing short writes; for descriptors
/// the caller does not own (standard output).
public func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, operation: @autoclosure () -> String = "write") throws(SystemError) {
    guard let base = bytes.baseAddress else { return }
    var done = 0
    while done < bytes.count {
        done += try systemCall(operation()) { Glibc.write(fd, base + done, bytes.count - done) }
    }
}

public func writeAll(_ fd: Int32, _ bytes: [UInt8], operation: @autoclosure () -> String = "write") throws(SystemError) {
    let result = bytes.withUnsafeBytes { buffer in
        Result { () throws(SystemError) in try writeAll(fd, buffer, operation: operation()) }
    }
    try result.get()
}
