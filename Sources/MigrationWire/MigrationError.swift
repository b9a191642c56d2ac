import HostOS

/// Any failure of the migration protocol or its transport: what kind of failure, and one line a
/// person can act on that names what was wrong.
public struct MigrationError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Kind: String, Sendable, Equatable, CaseIterable {
        /// A header does not start with the protocol's magic.
        case badMagic
        /// A request names a command this protocol does not have.
        case unknownCommand
        /// A header field other than magic and command is invalid (reserved not zero, bad status).
        case malformedHeader
        /// A payload length the command never has (start not 20 bytes, complete with a payload, …).
        case badPayloadLength
        /// A payload longer than the receiver's limit for its command.
        case payloadTooLarge
        /// `start` carries a protocol version this Ferry does not speak.
        case unsupportedVersion
        /// A memory range table with more entries than the limit allows.
        case tooManyRanges
        /// A memory range whose address or length is not a multiple of the page size, or is empty.
        case unalignedRange
        /// Memory ranges that overlap or are not in ascending address order.
        case overlappingRanges
        /// A memory range not entirely inside one range of the destination's guest RAM.
        case rangeOutsideRAM
        /// The bytes a memory range table announces do not match the payload length.
        case tableSizeMismatch
        /// A request arrived that cannot come now (memory bytes still owed, connection failed).
        case protocolViolation
        /// A config or state payload that does not decode as the document it must be.
        case malformedPayload
        /// The peer answered a request with an error response.
        case refusedByPeer
        /// The peer closed or reset the connection, possibly in the middle of a message.
        case peerWentAway
        /// The peer sent or accepted nothing before the deadline.
        case timedOut
        /// A migration URL that cannot be used: unknown scheme, bad port, missing path.
        case invalidURL
        /// Connecting, listening or accepting failed.
        case connectionFailed
        /// The TLS credentials cannot be used: a file missing, unreadable, not PEM, or a key that
        /// does not match its certificate.
        case tlsSetup
        /// The TLS handshake failed, or the peer refused it: a certificate the CA did not sign,
        /// expired, or for another host; no certificate; a peer that does not speak TLS.
        case tlsHandshake
        /// A system call failed otherwise.
        case systemError
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

    public var description: String { message }

    /// A failed system call; the message names it and its errno.
    static func system(_ error: SystemError, kind: Kind = .systemError) -> MigrationError {
        MigrationError(kind, error.description, cause: error)
    }
}
