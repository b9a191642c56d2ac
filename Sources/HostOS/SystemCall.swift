#if canImport(Glibc)
import Glibc
#endif

/// A failed call into the host system: which operation, the `errno` it returned (0 when the
/// failure has none, e.g. a name that does not resolve), and what else is known. The error of
/// this layer and of the KVM layer above it, whose ioctls are system calls too.
public struct SystemError: Error, Equatable, Sendable, CustomStringConvertible {
    /// What was called, e.g. `open(/dev/kvm)` or `KVM_RUN(vCPU 0)`.
    public var operation: String
    public var errno: Int32
    /// Context beyond the errno, e.g. "KVM lacks KVM_CAP_IRQCHIP" or `gai_strerror`'s text.
    public var detail: String?

    public init(_ operation: String, errno: Int32, detail: String? = nil) {
        self.operation = operation
        self.errno = errno
        self.detail = detail
    }

    public var description: String {
        var text = "\(operation) failed"
        if errno != 0 { text += ": \(errnoDescription(errno)) (errno \(errno))" }
        if let detail { text += ": \(detail)" }
        return text
    }
}

/// `strerror(3)` as a Swift string.
public func errnoDescription(_ code: Int32) -> String {
    guard let text = strerror(code) else { return "errno \(code)" }
    return String(cString: text)
}

/// Runs a system call with the one policy every caller in Ferry uses: retry while it fails with
/// `EINTR`, and throw a `SystemError` naming `operation` for any other failure (a result of -1).
/// Returns the call's result. `EAGAIN` is not retried here: callers that expect it wait with
/// `Poll.wait` and call again.
@discardableResult
public func systemCall<Result: BinaryInteger>(_ operation: @autoclosure () -> String,
                                              _ call: () -> Result) throws(SystemError) -> Result {
    while true {
        let result = call()
        if result != -1 { return result }
        let code = errno
        if code == EINTR { continue }
        throw SystemError(operation(), errno: code)
    }
}
