/// The error type of the Events module: what went wrong (`code`), a message a person can act on, and
/// the `errno` of the system call that failed, if one did.
public struct EventsError: Error, Sendable, Equatable, CustomStringConvertible {
    /// What kind of failure this is.
    public enum Code: Sendable, Equatable {
        /// An `--event-monitor` argument that is neither `path=PATH` nor `fd=N`.
        case invalidSinkTarget
        /// Opening, writing or closing the event sink failed.
        case sinkFailed
    }

    public var code: Code
    public var message: String
    /// The `errno` of the failed system call, if the failure came from one.
    public var errno: Int32?

    public init(code: Code, message: String, errno: Int32? = nil) {
        self.code = code
        self.message = message
        self.errno = errno
    }

    public var description: String {
        guard let errno else { return message }
        return "\(message): \(errnoDescription(errno)) (errno \(errno))"
    }
}
