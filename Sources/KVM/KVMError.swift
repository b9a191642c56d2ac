#if canImport(Glibc)
import Glibc
#endif

/// A failed system call on a KVM file descriptor: which operation, and the errno it returned.
public struct KVMError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The operation's name, e.g. `KVM_CREATE_VM` or `open(/dev/kvm)`.
    public var operation: String
    /// The `errno` value the call failed with, or 0 for a failure that is not a system call's.
    public var errno: Int32
    /// Extra context, for failures that are not plain system call errors.
    public var detail: String?

    public init(operation: String, errno: Int32, detail: String? = nil) {
        self.operation = operation
        self.errno = errno
        self.detail = detail
    }

    public var description: String {
        var text = "\(operation) failed"
        if errno != 0 {
            text += ": \(String(cString: strerror(errno))) (errno \(errno))"
        }
        if let detail { text += ": \(detail)" }
        return text
    }
}

/// Runs a system call, retrying it while it fails with `EINTR`, and throws a `KVMError` naming the
/// operation for any other failure. Returns the call's non-negative result.
@discardableResult
func systemCall(_ operation: @autoclosure () -> String, _ call: () -> Int32) throws -> Int32 {
    while true {
        let result = call()
        if result >= 0 { return result }
        let code = Glibc.errno
        if code == EINTR { continue }
        throw KVMError(operation: operation(), errno: code)
    }
}
