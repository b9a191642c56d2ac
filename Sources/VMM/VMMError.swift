/// Why the VMM refused or failed an operation, classified the way the REST API answers it.
public struct VMMError: Error, CustomStringConvertible, Equatable, Sendable {
    public enum Kind: Sendable, Equatable {
        /// The request itself is wrong: a field's value, a file that does not exist (HTTP 400).
        case invalidRequest
        /// There is no VM to act on (HTTP 404).
        case noVM
        /// The VM is in a state that does not allow the operation (HTTP 409).
        case wrongState
        /// Something failed inside the VMM (HTTP 500).
        case internalFailure
    }

    public var kind: Kind
    public var message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { message }
}
