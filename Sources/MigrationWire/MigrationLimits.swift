import Machine

/// What a receiver accepts: the destination's guest RAM, which every memory range must lie in,
/// and the largest payload of each command. Checked against every header before a payload byte is
/// read.
public struct MigrationLimits: Sendable, Equatable {
    /// The default and largest sane size of a config or state payload.
    public static let defaultMaximumDocumentBytes = 64 << 20
    /// The default bound on one memory request's range table: 2 MiB of table. A pass with more
    /// discontiguous runs is sent as several memory requests.
    public static let defaultMaximumRanges = 1 << 17

    /// The destination's guest RAM.
    public var guestRAM: [GuestRAMRange]
    public var maximumConfigBytes: Int
    public var maximumStateBytes: Int
    public var maximumRanges: Int

    public init(guestRAM: [GuestRAMRange],
                maximumConfigBytes: Int = MigrationLimits.defaultMaximumDocumentBytes,
                maximumStateBytes: Int = MigrationLimits.defaultMaximumDocumentBytes,
                maximumRanges: Int = MigrationLimits.defaultMaximumRanges) {
        self.guestRAM = guestRAM
        self.maximumConfigBytes = maximumConfigBytes
        self.maximumStateBytes = maximumStateBytes
        self.maximumRanges = maximumRanges
    }

    /// The longest memory payload that can be valid: a full range table and every byte of RAM.
    var maximumMemoryPayloadBytes: UInt64 {
        let ram = guestRAM.reduce(UInt64(0)) { $0 &+ $1.size }
        return UInt64(MigrationProtocol.rangeTableCountSize + maximumRanges * MigrationProtocol.rangeEntrySize) &+ ram
    }
}
