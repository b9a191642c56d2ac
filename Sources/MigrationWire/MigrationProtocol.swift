import HostOS

/// Constants of Ferry's live-migration wire protocol; docs/migration-protocol.md describes every
/// byte. All integers on the wire are little-endian.
public enum MigrationProtocol {
    /// The protocol version a `start` request carries; a receiver refuses any other. Version 2:
    /// the config payload carries only what the guest sees (`MigrationConfig`). Version 3: extra
    /// connections join a migration (`join`) and carry memory requests beside the main one.
    /// Version 4: the state payload is CBOR, not JSON.
    public static let version: UInt32 = 4
    /// First four bytes of every request header: "FMRQ" (Ferry migration request).
    public static let requestMagic: UInt32 = 0x5152_4D46
    /// First four bytes of every response header: "FMRS" (Ferry migration response).
    public static let responseMagic: UInt32 = 0x5352_4D46
    /// Size of a request header: magic u32, command u16, reserved u16, payload length u64.
    public static let requestHeaderSize = 16
    /// Size of a response header: magic u32, status u16, reserved u16, error text length u64 (the
    /// same layout as a request's).
    public static let responseHeaderSize = requestHeaderSize
    /// Size of a `start` payload: version u32, then the migration id as 16 UUID bytes.
    public static let startPayloadSize = 20
    /// Size of a `join` payload: migration id (16 bytes), connection index u32, connection count u32.
    public static let joinPayloadSize = 24
    /// The most connections one migration uses, the main one included (Cloud Hypervisor's limit).
    public static let maximumConnections = 128
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
    /// The machine state and whether the guest ran (`MigrationState`, CBOR).
    case state = 4
    /// Everything was sent: the receiver may run the guest.
    case complete = 5
    /// The sender gives up: the receiver discards what it received.
    case abandon = 6
    /// The first request on an extra connection: which migration it joins (`MigrationJoin`).
    case join = 7
    /// A local migration's guest RAM: one byte that carries the memory file's descriptor
    /// (SCM_RIGHTS), over a Unix socket only.
    case memoryFile = 8

    public var description: String {
        switch self {
        case .start: "start"
        case .config: "config"
        case .memory: "memory"
        case .state: "state"
        case .complete: "complete"
        case .abandon: "abandon"
        case .join: "join"
        case .memoryFile: "memory-file"
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
        FrameHeader(magic: MigrationProtocol.requestMagic, field: command.rawValue, length: length).encoded
    }

    /// Decodes and checks a header: magic, reserved field and command. Payload limits are checked
    /// by `check(_:)` against the receiver's `MigrationLimits`.
    public init(decoding bytes: [UInt8]) throws(MigrationError) {
        let frame = try FrameHeader(decoding: bytes, of: "request", magic: MigrationProtocol.requestMagic,
                                    notMagic: ": the peer does not speak Ferry's migration protocol or the stream is out of step")
        guard let command = MigrationCommand(rawValue: frame.field) else {
            throw MigrationError(.unknownCommand, "request command \(frame.field) is not a migration command (1–7)")
        }
        try frame.checkReserved(naming: "\(command) request")
        self.command = command
        self.length = frame.length
    }

    /// Refuses a payload length the command never has or the limits do not allow.
    public func check(_ limits: MigrationLimits) throws(MigrationError) {
        switch command {
        case .start:
            guard length == UInt64(MigrationProtocol.startPayloadSize) else {
                throw MigrationError(.badPayloadLength, "start request has a \(length)-byte payload; it is exactly \(MigrationProtocol.startPayloadSize) bytes")
            }
        case .join:
            guard length == UInt64(MigrationProtocol.joinPayloadSize) else {
                throw MigrationError(.badPayloadLength, "join request has a \(length)-byte payload; it is exactly \(MigrationProtocol.joinPayloadSize) bytes")
            }
        case .memoryFile:
            guard length == 1 else {
                throw MigrationError(.badPayloadLength, "memory-file request has a \(length)-byte payload; it is exactly 1 byte")
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
        FrameHeader(magic: MigrationProtocol.responseMagic, field: status.rawValue, length: length).encoded
    }

    /// Decodes and checks a header: magic, status, reserved field, and a text length that is zero
    /// for ok and at most `MigrationProtocol.maximumErrorTextBytes` for an error.
    public init(decoding bytes: [UInt8]) throws(MigrationError) {
        let frame = try FrameHeader(decoding: bytes, of: "response", magic: MigrationProtocol.responseMagic)
        guard let status = Status(rawValue: frame.field) else {
            throw MigrationError(.malformedHeader, "response status \(frame.field) is neither 0 (ok) nor 1 (error)")
        }
        try frame.checkReserved(naming: "response")
        let length = frame.length
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

/// The 16 bytes that open requests and responses alike: magic u32, a u16 field (the command or the
/// status), reserved u16, length u64.
struct FrameHeader {
    var magic: UInt32
    var field: UInt16
    var reserved: UInt16 = 0
    var length: UInt64

    init(magic: UInt32, field: UInt16, length: UInt64) {
        self.magic = magic
        self.field = field
        self.length = length
    }

    var encoded: [UInt8] {
        var bytes = LittleEndianBytes(capacity: MigrationProtocol.requestHeaderSize)
        bytes.append(magic)
        bytes.append(field)
        bytes.append(reserved)
        bytes.append(length)
        return bytes.bytes
    }

    /// Reads a `kind` header ("request", "response") and refuses one of the wrong size or magic;
    /// `notMagic` ends the message for a wrong magic.
    init(decoding bytes: [UInt8], of kind: String, magic expected: UInt32, notMagic: String = "") throws(MigrationError) {
        guard bytes.count == MigrationProtocol.requestHeaderSize else {
            throw MigrationError(.malformedHeader, "a \(kind) header is \(MigrationProtocol.requestHeaderSize) bytes, not \(bytes.count)")
        }
        magic = bytes.littleEndian(UInt32.self, at: 0) ?? 0
        guard magic == expected else {
            // A TLS record: content type handshake (22), alert (21) or data (23), then version 3.x.
            let tls = (21...23).contains(bytes[0]) && bytes[1] == 3
            let why = tls ? ": the bytes are TLS; the peer uses TLS (tls_dir) and this side does not" : notMagic
            throw MigrationError(.badMagic, "\(kind) header starts with 0x\(hex(magic)), not the migration \(kind) magic 0x\(hex(expected))\(why)")
        }
        field = bytes.littleEndian(UInt16.self, at: 4) ?? 0
        reserved = bytes.littleEndian(UInt16.self, at: 6) ?? 0
        length = bytes.littleEndian(UInt64.self, at: 8) ?? 0
    }

    func checkReserved(naming name: String) throws(MigrationError) {
        guard reserved == 0 else {
            throw MigrationError(.malformedHeader, "\(name) has reserved field 0x\(hex(reserved)); it must be 0")
        }
    }
}

func hex<T: FixedWidthInteger>(_ value: T) -> String { String(value, radix: 16) }
