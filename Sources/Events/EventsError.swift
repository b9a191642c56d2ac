import HostOS

/// The error type of the Events module: what kind of failure, a message a person can act on, and
/// the system call that failed, if one did.
public struct EventsError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// An `--event-monitor` argument that is neither `path=PATH` nor `fd=N`.
        case invalidSinkTarget
        /// Opening, writing or closing the event sink failed.
        case sinkFailed
        /// Text that is not an event in the format docs/events.md §2 defines, or whose properties
        /// do not fit the event the catalogue says it is.
        case malformedEvent
    }

    public var kind: Kind
    public var message: String
    /// The failed system call behind this error, if any.
    public var cause: SystemError?

    public init(_ kind: Kind, _ message: String, cause: SystemError? = nil) {
        self.kind = kind
        self.message = message
        self.cause = cause
    }

    /// The `errno` of the failed system call, if the failure came from one.
    public var errno: Int32? { cause.map(\.errno) }

    public var description: String {
        guard let cause else { return message }
        return "\(message): \(errnoDescription(cause.errno)) (errno \(cause.errno))"
    }
}
