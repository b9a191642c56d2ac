#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The one policy for every system call in this module: retry `EINTR`, and turn any other failure
/// into an `EventsError` that names the call and carries `errno`.
@discardableResult
func systemCall<Result: BinaryInteger>(
    _ name: String,
    code: EventsError.Code = .sinkFailed,
    _ body: () -> Result
) throws(EventsError) -> Result {
    while true {
        let result = body()
        if result != -1 { return result }
        let error = errno
        if error == EINTR { continue }
        throw EventsError(code: code, message: "\(name) failed", errno: error)
    }
}

/// `strerror(3)` as a Swift string.
func errnoDescription(_ error: Int32) -> String {
    guard let text = strerror(error) else { return "errno \(error)" }
    return String(cString: text)
}
