import Machine
import Testing
@testable import MigrationWire

@Suite struct MemoryBatchTests {
    static let page: UInt64 = 4096

    /// The batches cover exactly the runs, in order, and each respects both budgets.
    @Test(arguments: [(UInt64(16 * 4096), 3), (UInt64(4096), 1), (UInt64(64 << 20), 8192)])
    func batchesCoverTheRunsExactlyWithinTheirBudgets(maximumBytes: UInt64, maximumRanges: Int) throws {
        let runs = [
            GuestRAMRange(start: 0, size: 5 * Self.page),
            GuestRAMRange(start: 10 * Self.page, size: 40 * Self.page),
            GuestRAMRange(start: 1 << 32, size: Self.page),
            GuestRAMRange(start: (1 << 32) + 2 * Self.page, size: 17 * Self.page),
        ]
        let batches = MemoryRangeTable.batches(of: runs, maximumBytes: maximumBytes, maximumRanges: maximumRanges)
        for batch in batches {
            #expect(batch.dataBytes <= maximumBytes && batch.ranges.count <= maximumRanges && !batch.ranges.isEmpty)
            try batch.validate(against: [GuestRAMRange(start: 0, size: 3 << 30), GuestRAMRange(start: 1 << 32, size: 1 << 30)])
        }
        // Joined back together, adjacent pieces of a split run form the original runs.
        var joined: [GuestRAMRange] = []
        for range in batches.flatMap(\.ranges) {
            if let last = joined.last, last.end == range.address {
                joined[joined.count - 1].size += range.length
            } else {
                joined.append(GuestRAMRange(start: range.address, size: range.length))
            }
        }
        #expect(joined == runs)
    }

    @Test func noRunsMakeNoRequests() {
        #expect(MemoryRangeTable.batches(of: []).isEmpty)
    }
}
