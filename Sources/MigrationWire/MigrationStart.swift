import Foundation
import HostOS

/// The `start` payload: which protocol the sender speaks and which migration this is.
///
///     offset 0   protocol version u32
///     offset 4   migration id, 16 bytes: the UUID's bytes in RFC 4122 order
public struct MigrationStart: Equatable, Sendable {
    public var version: UInt32
    /// Joins the source's and the destination's migration events (`migration_id`).
    public var migrationID: UUID

    public init(version: UInt32 = MigrationProtocol.version, migrationID: UUID) {
        self.version = version
        self.migrationID = migrationID
    }

    public var encoded: [UInt8] {
        var bytes = LittleEndianBytes(capacity: MigrationProtocol.startPayloadSize)
        bytes.append(version)
        bytes.append(migrationID.wire)
        return bytes.bytes
    }

    /// Decodes a start payload of any version: the receiver reads the migration id first, so that
    /// even a refusal of the version can name the migration (`checkVersion()`).
    public init(decoding bytes: [UInt8]) throws(MigrationError) {
        guard bytes.count == MigrationProtocol.startPayloadSize else {
            throw MigrationError(.badPayloadLength, "start payload is \(bytes.count) bytes; it is exactly \(MigrationProtocol.startPayloadSize)")
        }
        version = bytes.littleEndian(UInt32.self, at: 0) ?? 0
        migrationID = UUID(wire: bytes[4..<20])
    }

    /// Refuses a protocol version other than `MigrationProtocol.version`.
    public func checkVersion() throws(MigrationError) {
        guard version == MigrationProtocol.version else {
            throw MigrationError(.unsupportedVersion, "the sender speaks migration protocol version \(version); this Ferry speaks version \(MigrationProtocol.version)")
        }
    }
}

/// The `join` payload: the first request on each extra connection of a migration that uses
/// several (`connections` > 1). It names the migration its main connection started, which extra
/// connection this is, and how many the migration uses in all.
///
///     offset 0   migration id, 16 bytes, as in `start`
///     offset 16  connection index u32: 1 ..< count (the main connection is 0)
///     offset 20  connection count u32: 2 ... `MigrationProtocol.maximumConnections`
public struct MigrationJoin: Equatable, Sendable {
    public var migrationID: UUID
    public var index: UInt32
    public var count: UInt32

    public init(migrationID: UUID, index: UInt32, count: UInt32) {
        self.migrationID = migrationID
        self.index = index
        self.count = count
    }

    public var encoded: [UInt8] {
        var bytes = LittleEndianBytes(capacity: MigrationProtocol.joinPayloadSize)
        bytes.append(migrationID.wire)
        bytes.append(index)
        bytes.append(count)
        return bytes.bytes
    }

    public init(decoding bytes: [UInt8]) throws(MigrationError) {
        guard bytes.count == MigrationProtocol.joinPayloadSize else {
            throw MigrationError(.badPayloadLength, "join payload is \(bytes.count) bytes; it is exactly \(MigrationProtocol.joinPayloadSize)")
        }
        migrationID = UUID(wire: bytes[0..<16])
        index = bytes.littleEndian(UInt32.self, at: 16) ?? 0
        count = bytes.littleEndian(UInt32.self, at: 20) ?? 0
    }

    /// Refuses a join that does not belong to migration `id`, or whose index or count is out of range.
    public func check(joining id: UUID) throws(MigrationError) {
        guard migrationID == id else {
            throw MigrationError(.protocolViolation, "the connection joins migration \(migrationID.uuidString.lowercased()), not this one (\(id.uuidString.lowercased()))")
        }
        guard count >= 2, count <= UInt32(MigrationProtocol.maximumConnections) else {
            throw MigrationError(.protocolViolation, "a migration uses 2 to \(MigrationProtocol.maximumConnections) connections when it joins extra ones, not \(count)")
        }
        guard index >= 1, index < count else {
            throw MigrationError(.protocolViolation, "extra connection index \(index) is outside 1..<\(count)")
        }
    }
}

extension UUID {
    /// A migration id as the wire carries it: the UUID's 16 bytes in RFC 4122 order.
    var wire: [UInt8] { withUnsafeBytes(of: uuid) { Array($0) } }

    /// The migration id in `bytes`, exactly 16 of them.
    init(wire bytes: ArraySlice<UInt8>) {
        let b = Array(bytes)
        self.init(uuid: (b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]))
    }
}
