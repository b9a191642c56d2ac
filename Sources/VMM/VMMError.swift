import LiveMigration
import Machine
import MigrationWire

/// Why the VMM refused or failed an operation: a kind that says how the REST API answers it, a
/// message for people, and the error of the layer below that caused it.
public struct VMMError: Error, CustomStringConvertible, Equatable, Sendable {
    public enum Kind: Sendable, Equatable {
        /// The request itself is wrong: a field's value, a file that does not exist, an image or a
        /// saved state that cannot be used (HTTP 400).
        case invalidRequest
        /// There is no VM to act on (HTTP 404).
        case noVM
        /// The VM is in a state that does not allow the operation (HTTP 409).
        case wrongState
        /// Something failed inside the VMM or the host (HTTP 500).
        case internalFailure
    }

    public var kind: Kind
    public var message: String
    public var cause: (any Error & Sendable)?

    public init(_ kind: Kind, _ message: String, cause: (any Error & Sendable)? = nil) {
        self.kind = kind
        self.message = message
        self.cause = cause
    }

    /// A machine error, classified by its kind; `what` says what the VMM was doing.
    init(_ what: String, _ error: MachineError) {
        let kind: Kind = switch error.kind {
        case .invalidConfiguration, .invalidImage, .invalidState, .outsideRAM: .invalidRequest
        case .wrongPhase: .wrongState
        case .hostFailure: .internalFailure
        }
        self.init(kind, "\(what): \(error.message)", cause: error)
    }

    /// Any error of the layers below, classified where its type allows.
    init(_ what: String, _ error: any Error) {
        switch error {
        case let error as VMMError: self = error
        case let error as MachineError: self.init(what, error)
        case let error as MigrationError:
            self.init(error.kind == .invalidURL ? .invalidRequest : .internalFailure, "\(what): \(error.message)", cause: error)
        default: self.init(.internalFailure, "\(what): \(error)")
        }
    }

    public var description: String { message }

    public static func == (left: VMMError, right: VMMError) -> Bool {
        left.kind == right.kind && left.message == right.message
    }
}
