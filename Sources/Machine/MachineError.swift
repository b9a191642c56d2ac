import HostOS

/// An error in the machine layer: what kind of failure, what went wrong in words a user can act
/// on, and the failed system or KVM call behind it, if any. Layers above map the kind to their own
/// (the API to an HTTP status) without reading the message.
public struct MachineError: Error, CustomStringConvertible, Equatable, Sendable {
    public enum Kind: Sendable, Equatable {
        /// A configuration value Ferry or this host cannot run (vCPU count, memory size).
        case invalidConfiguration
        /// A kernel, initramfs or command line that cannot be booted: unreadable, malformed, or
        /// not fitting in guest RAM.
        case invalidImage
        /// A saved state or memory file that does not fit this machine, or is corrupt.
        case invalidState
        /// A guest-physical range that is not guest RAM.
        case outsideRAM
        /// The machine is not in the phase the operation needs (e.g. saving a running machine).
        case wrongPhase
        /// KVM or the host failed (`cause` says which call).
        case hostFailure
    }

    public var kind: Kind
    public var message: String
    public var cause: SystemError?

    public init(_ kind: Kind, _ message: String, cause: SystemError? = nil) {
        self.kind = kind
        self.message = message
        self.cause = cause
    }

    /// A KVM or system call that failed while the machine was being built or run.
    static func host(_ what: String, _ error: any Error) -> MachineError {
        if let error = error as? MachineError { return error }
        let cause = error as? SystemError
        return MachineError(.hostFailure, "\(what): \(cause.map(\.description) ?? "\(error)")", cause: cause)
    }

    public var description: String { message }
}
