import HostOS
import Machine

/// One run of guest-physical memory in a memory request.
public struct MigrationMemoryRange: Equatable, Hashable, Sendable {
    public var address: UInt64
    public var length: UInt64

    public init(address: UInt64, length: UInt64) {
        self.address = address
        self.length = length
    }
}

/// The table that opens a memory payload; the bytes of its ranges follow it in table order.
///
///     count u32
///     count × (guest-physical address u64, length u64)
///
/// A valid table's ranges are page-aligned, non-empty, in ascending address order without overlap,
/// and each lies entirely inside one range of the destination's guest RAM.
public struct MemoryRangeTable: Equatable, Sendable {
    public var ranges: [MigrationMemoryRange]

    public init(_ ranges: [MigrationMemoryRange]) { self.ranges = ranges }

    /// Size of the table on the wire.
    public var encodedSize: Int {
        MigrationProtocol.rangeTableCountSize + ranges.count * MigrationProtocol.rangeEntrySize
    }

    /// Bytes of guest memory that follow the table.
    public var dataBytes: UInt64 { ranges.reduce(0) { $0 &+ $1.length } }

    public var encoded: [UInt8] {
        var bytes = LittleEndianBytes(capacity: encodedSize)
        bytes.append(UInt32(ranges.count))
        for range in ranges {
            bytes.append(range.address)
            bytes.append(range.length)
        }
        return bytes.bytes
    }

    /// Decodes the entries that follow the count (`entries.count` is a multiple of 16).
    init(decodingEntries entries: [UInt8]) {
        let size = MigrationProtocol.rangeEntrySize
        ranges = stride(from: 0, to: entries.count, by: size).map {
            MigrationMemoryRange(address: entries.littleEndian(UInt64.self, at: $0) ?? 0,
                                 length: entries.littleEndian(UInt64.self, at: $0 + 8) ?? 0)
        }
    }

    /// Refuses a table a receiver must not act on: an unaligned or empty range, ranges that
    /// overlap or descend, a range not inside one range of `guestRAM`. Stops at the first problem
    /// and names the range by its index.
    public func validate(against guestRAM: [GuestRAMRange]) throws(MigrationError) {
        let page = MigrationProtocol.pageSize
        var previousEnd: UInt64?
        for (index, range) in ranges.enumerated() {
            let name = "memory range \(index) (0x\(hex(range.address))+0x\(hex(range.length)))"
            guard range.address % page == 0, range.length % page == 0 else {
                throw MigrationError(.unalignedRange, "\(name) is not page-aligned: address and length must be multiples of \(page)")
            }
            guard range.length > 0 else {
                throw MigrationError(.unalignedRange, "\(name) is empty")
            }
            let (end, overflow) = range.address.addingReportingOverflow(range.length)
            guard !overflow else {
                throw MigrationError(.rangeOutsideRAM, "\(name) runs past the end of the address space")
            }
            if let previousEnd, range.address < previousEnd {
                throw MigrationError(.overlappingRanges, "\(name) starts below the end of range \(index - 1) (0x\(hex(previousEnd))): ranges must ascend without overlapping")
            }
            guard guestRAM.contains(where: { range.address >= $0.start && end <= $0.end }) else {
                let ram = guestRAM.map { "0x\(hex($0.start))–0x\(hex($0.end))" }.joined(separator: ", ")
                throw MigrationError(.rangeOutsideRAM, "\(name) is not inside one range of guest RAM (\(ram))")
            }
            previousEnd = end
        }
    }
}

extension MemoryRangeTable {
    /// The largest memory request a sender makes: small enough that progress, the timeout and a
    /// cancel are looked at often, large enough that the table and header cost nothing.
    public static let defaultBatchBytes: UInt64 = 64 << 20
    /// Ranges per request a sender uses, well under any receiver's `maximumRanges`.
    public static let defaultBatchRanges = 8192

    /// Cuts `runs` (page-aligned, ascending, not overlapping) into the tables of consecutive
    /// memory requests, each with at most `maximumRanges` ranges and `maximumBytes` bytes of
    /// data; a run larger than what is left of a request's budget is split across requests.
    public static func batches(of runs: [GuestRAMRange], maximumBytes: UInt64 = defaultBatchBytes,
                               maximumRanges: Int = defaultBatchRanges) -> [MemoryRangeTable] {
        precondition(maximumBytes >= MigrationProtocol.pageSize && maximumBytes % MigrationProtocol.pageSize == 0 && maximumRanges > 0)
        var tables: [MemoryRangeTable] = []
        var current: [MigrationMemoryRange] = []
        var currentBytes: UInt64 = 0
        for run in runs {
            var address = run.start
            var left = run.size
            while left > 0 {
                if current.count == maximumRanges || currentBytes == maximumBytes {
                    tables.append(MemoryRangeTable(current))
                    current = []
                    currentBytes = 0
                }
                let length = min(left, maximumBytes - currentBytes)
                current.append(MigrationMemoryRange(address: address, length: length))
                currentBytes += length
                address += length
                left -= length
            }
        }
        if !current.isEmpty { tables.append(MemoryRangeTable(current)) }
        return tables
    }
}
