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
        withUnsafeBytes(of: migrationID.uuid) { bytes.append(Array($0)) }
        return bytes.bytes
    }

    /// Decodes a start payload of any version: the receiver reads the migration id first, so that
    /// even a refusal of the version can name the migration (`checkVersion()`).
    public init(decoding bytes: [UInt8]) throws(MigrationError) {
        guard bytes.count == MigrationProtocol.startPayloadSize else {
            throw MigrationError(.badPayloadLength, "start payload is \(bytes.count) bytes; it is exactly \(MigrationProtocol.startPayloadSize)")
        }
        let version = bytes.littleEndian(UInt32.self, at: 0) ?? 0
        let b = Array(bytes[4..<20])
        self.version = version
        self.migrationID = UUID(uuid: (b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
                                       b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]))
    }

    /// Refuses a protocol version other than `MigrationProtocol.version`.
    public func checkVersion() throws(MigrationError) {
        guard version == MigrationProtocol.version else {
            throw MigrationError(.unsupportedVersion, "the sender speaks migration protocol version \(version); this Ferry speaks version \(MigrationProtocol.version)")
        }
    }
}
