import HostOS

/// Constants of Ferry's live-migration wire protocol; docs/migration-protocol.md describes every
/// byte. All integers on the wire are little-endian.
public enum MigrationProtocol {
    /// The protocol version a `start` request carries; a receiver refuses any other. Version 2:
    /// the config payload carries only what the guest sees (`MigrationConfig`).
    public static let version: UInt32 = 2
    /// First four bytes of every request header: "FMRQ" (Ferry migration request).
    public static let requestMagic: UInt32 = 0x5152_4D46
    /// First four bytes of every response header: "FMRS" (Ferry migration response).
    public static let responseMagic: UInt32 = 0x5352_4D46
    /// Size of a request header: magic u32, command u16, reserved u16, payload length u64.
    public static let requestHeaderSize = 16
    /// Size of a response header: magic u32, status u16, reserved u16, error text length u64.
    public static let responseHeaderSize = 16
    /// Size of a `start` payload: version u32, then the migration id as 16 UUID bytes.
    public static let startPayloadSize = 20
    /// Size of the count that opens a memory range table.
    public static let rangeTableCountSize = 4
    /// Size of one memory range table entry: guest-physical address u64, length u64.
    public static let rangeEntrySize = 16
    /// The x86-64 page size: memory ranges start and end on page boundaries.
    public static let pageSize: UInt64 = 4096
    /// The longest error text a response may carry; longer texts are cut by the sender.
    public static let maximumErrorTextBytes = 4096
}

/// What a request asks the receiver to do. The raw value is the command field on the wire.
public enum MigrationCommand: UInt16, Sendable, CaseIterable, CustomStringConvertible {
    /// Begin a migration: protocol version and migration id.
    case start = 1
    /// The VM configuration as the guest sees it (`MigrationConfig`, JSON).
    case config = 2
    /// A memory range table, then the bytes of those ranges in table order.
    case memory = 3
    /// The machine state and whether the guest ran (`MigrationState`, JSON).
    case state = 4
    /// Everything was sent: the receiver may run the guest.
    case complete = 5
    /// The sender gives up: the receiver discards what it received.
    case abandon = 6

    public var description: String {
        switch self {
        case .start: "start"
        case .config: "config"
        case .memory: "memory"
        case .state: "state"
        case .complete: "complete"
        case .abandon: "abandon"
        }
    }
}

/// The fixed-size header that opens every request.
///
///     offset 0   magic u32 (`MigrationProtocol.requestMagic`)
///     offset 4   command u16 (`MigrationCommand`)
///     offset 6   reserved u16, zero
///     offset 8   payload length u64 (bytes that follow the header)
public struct MigrationRequestHeader: Equatable, Sendable {
    public var command: MigrationCommand
    public var length: UInt64

    public init(command: MigrationCommand, length: UInt64) {
        self.command = command
        self.length = length
    }

    public var encoded: [UInt8] {
        var bytes = LittleEndianBytes()
        bytes.append(MigrationProtocol.requestMagic)
        bytes.append(command.rawValue)
        bytes.append(UInt16(0))
        bytes.append(length)
        return bytes.bytes
    }

    /// Decodes and checks a header: magic, reserved field and command. Payload limits are checked
    /// by `check(_:)` against the receiver's `MigrationLimits`.
    public init(decoding bytes: [UInt8]) throws(MigrationError) {
        guard bytes.count == MigrationProtocol.requestHeaderSize else {
            throw MigrationError(.malformedHeader, "a request header is \(MigrationProtocol.requestHeaderSize) bytes, not \(bytes.count)")
        }
        let magic = bytes.littleEndian(UInt32.self, at: 0) ?? 0
        guard magic == MigrationProtocol.requestMagic else {
            throw MigrationError(.badMagic, "request header starts with 0x\(hex(magic)), not the migration request magic 0x\(hex(MigrationProtocol.requestMagic)): the peer does not speak Ferry's migration protocol or the stream is out of step")
        }
        let rawCommand = bytes.littleEndian(UInt16.self, at: 4) ?? 0
        guard let command = MigrationCommand(rawValue: rawCommand) else {
            throw MigrationError(.unknownCommand, "request command \(rawCommand) is not a migration command (1–6)")
        }
        let reserved = bytes.littleEndian(UInt16.self, at: 6) ?? 0
        guard reserved == 0 else {
            throw MigrationError(.malformedHeader, "\(command) request has reserved field 0x\(hex(reserved)); it must be 0")
        }
        self.command = command
        self.length = bytes.littleEndian(UInt64.self, at: 8) ?? 0
    }

    /// Refuses a payload length the command never has or the limits do not allow.
    public func check(_ limits: MigrationLimits) throws(MigrationError) {
        switch command {
        case .start:
            guard length == UInt64(MigrationProtocol.startPayloadSize) else {
                throw MigrationError(.badPayloadLength, "start request has a \(length)-byte payload; it is exactly \(MigrationProtocol.startPayloadSize) bytes")
            }
        case .complete, .abandon:
            guard length == 0 else {
                throw MigrationError(.badPayloadLength, "\(command) request has a \(length)-byte payload; it has none")
            }
        case .config:
            guard length <= UInt64(limits.maximumConfigBytes) else {
                throw MigrationError(.payloadTooLarge, "config request has a \(length)-byte payload; the limit is \(limits.maximumConfigBytes) bytes")
            }
        case .state:
            guard length <= UInt64(limits.maximumStateBytes) else {
                throw MigrationError(.payloadTooLarge, "state request has a \(length)-byte payload; the limit is \(limits.maximumStateBytes) bytes")
            }
        case .memory:
            guard length >= UInt64(MigrationProtocol.rangeTableCountSize) else {
                throw MigrationError(.badPayloadLength, "memory request has a \(length)-byte payload, too short for its range count")
            }
            guard length <= limits.maximumMemoryPayloadBytes else {
                throw MigrationError(.payloadTooLarge, "memory request has a \(length)-byte payload; at most \(limits.maximumMemoryPayloadBytes) bytes (a full range table plus all guest RAM) can be valid")
            }
        }
    }
}

/// Whether the receiver accepted a request.
public enum MigrationResponse: Equatable, Sendable {
    case ok
    /// Refused, with a one-line reason.
    case error(String)
}

/// The fixed-size header that opens every response; an error text follows it.
///
///     offset 0   magic u32 (`MigrationProtocol.responseMagic`)
///     offset 4   status u16: 0 ok, 1 error
///     offset 6   reserved u16, zero
///     offset 8   error text length u64 (UTF-8 bytes that follow; 0 when ok)
public struct MigrationResponseHeader: Equatable, Sendable {
    /// The status field on the wire.
    public enum Status: UInt16, Sendable {
        case ok = 0
        case error = 1
    }

    public var status: Status
    public var length: UInt64

    public init(status: Status, length: UInt64) {
        self.status = status
        self.length = length
    }

    public var encoded: [UInt8] {
        var bytes = LittleEndianBytes()
        bytes.append(MigrationProtocol.responseMagic)
        bytes.append(status.rawValue)
        bytes.append(UInt16(0))
        bytes.append(length)
        return bytes.bytes
    }

    /// Decodes and checks a header: magic, status, reserved field, and a text length that is zero
    /// for ok and at most `MigrationProtocol.maximumErrorTextBytes` for an error.
    public init(decoding bytes: [UInt8]) throws(MigrationError) {
        guard bytes.count == MigrationProtocol.responseHeaderSize else {
            throw MigrationError(.malformedHeader, "a response header is \(MigrationProtocol.responseHeaderSize) bytes, not \(bytes.count)")
        }
        let magic = bytes.littleEndian(UInt32.self, at: 0) ?? 0
        guard magic == MigrationProtocol.responseMagic else {
            throw MigrationError(.badMagic, "response header starts with 0x\(hex(magic)), not the migration response magic 0x\(hex(MigrationProtocol.responseMagic))")
        }
        let rawStatus = bytes.littleEndian(UInt16.self, at: 4) ?? 0
        guard let status = Status(rawValue: rawStatus) else {
            throw MigrationError(.malformedHeader, "response status \(rawStatus) is neither 0 (ok) nor 1 (error)")
        }
        let reserved = bytes.littleEndian(UInt16.self, at: 6) ?? 0
        guard reserved == 0 else {
            throw MigrationError(.malformedHeader, "response has reserved field 0x\(hex(reserved)); it must be 0")
        }
        let length = bytes.littleEndian(UInt64.self, at: 8) ?? 0
        switch status {
        case .ok where length != 0:
            throw MigrationError(.badPayloadLength, "ok response carries \(length) bytes; it carries none")
        case .error where length > UInt64(MigrationProtocol.maximumErrorTextBytes):
            throw MigrationError(.payloadTooLarge, "error response carries \(length) bytes of text; the limit is \(MigrationProtocol.maximumErrorTextBytes)")
        default:
            break
        }
        self.status = status
        self.length = length
    }
}

func hex<T: FixedWidthInteger>(_ value: T) -> String { String(value, radix: 16) }
