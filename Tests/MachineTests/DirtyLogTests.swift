import FerryTestSupport
import Foundation
import KVM
import Testing
@testable import Machine

@Suite struct PageRunsTests {
    /// The word-skipping bitmap walk agrees with the page-by-page one on seeded random bitmaps:
    /// empty and full words, runs across words, a partial last word with bits beyond the slot.
    @Test func bitmapWalkAgreesWithThePageByPageOne() {
        var random = SplitMix64(seed: 0x5EED)
        for _ in 0..<500 {
            let pageCount = 1 + Int(random.next() % 1000)
            let bitmap = (0..<(pageCount + 63) / 64).map { _ -> UInt64 in
                switch random.next() % 4 { case 0: 0; case 1: .max; case 2: random.next(); default: random.next() & random.next() }
            }
            let expected = PageRuns.runs(start: 1 << 32, pageCount: pageCount) { bitmap[$0 / 64] & (1 << UInt64($0 % 64)) != 0 }
            #expect(PageRuns.runs(bitmap: bitmap, slotStart: 1 << 32, pageCount: pageCount) == expected)
        }
    }

    @Test func bitmapBecomesCoalescedGuestPhysicalRuns() {
        // Pages 0-1, 5, 63-65 of a slot starting at 4 GiB.
        var bitmap: [UInt64] = [0, 0]
        for page in [0, 1, 5, 63, 64, 65] { bitmap[page / 64] |= 1 << UInt64(page % 64) }
        let runs = PageRuns.runs(bitmap: bitmap, slotStart: 4 << 30, pageCount: 100)
        #expect(runs == [
            GuestRAMRange(start: 4 << 30, size: 2 * 4096),
            GuestRAMRange(start: (4 << 30) + 5 * 4096, size: 4096),
            GuestRAMRange(start: (4 << 30) + 63 * 4096, size: 3 * 4096),
        ])
        #expect(PageRuns(runs: runs).pageCount == 6)
    }

    @Test func unionCoalescesOverlappingAndAdjacentRuns() {
        let page = PageRuns.pageSize
        let a = PageRuns(runs: [GuestRAMRange(start: 0, size: 2 * page), GuestRAMRange(start: 10 * page, size: page)])
        let b = PageRuns(runs: [GuestRAMRange(start: page, size: 3 * page), GuestRAMRange(start: 11 * page, size: page),
                                  GuestRAMRange(start: 1 << 32, size: page)])
        #expect(a.union(b).runs == [
            GuestRAMRange(start: 0, size: 4 * page),
            GuestRAMRange(start: 10 * page, size: 2 * page),
            GuestRAMRange(start: 1 << 32, size: page),
        ])
        #expect(a.union(PageRuns(runs: [])) == a)
        #expect(a.union(a) == a)
    }

    /// Only pages holding a non-zero byte are reported, across both sides of the MMIO hole, and a
    /// scan of part of RAM reports only that part.
    @Test func nonZeroPagesFindsEveryWrittenPageAndNothingElse() throws {
        let memory = try GuestMemory(ranges: GuestRAMLayout.ranges(size: (3 << 30) + (64 << 20)))
        let page = PageRuns.pageSize
        try memory.write(UInt8(1), at: 0)                     // first byte of page 0
        try memory.write(UInt8(7), at: 2 * page - 1)          // last byte of page 1
        try memory.write(UInt64.max, at: 100 * page + 8)
        try memory.write(UInt8(9), at: (1 << 32) + 5 * page)  // above the hole
        #expect(memory.nonZeroPages().runs == [
            GuestRAMRange(start: 0, size: 2 * page),
            GuestRAMRange(start: 100 * page, size: page),
            GuestRAMRange(start: (1 << 32) + 5 * page, size: page),
        ])
        #expect(memory.nonZeroPages(in: GuestRAMRange(start: page, size: 200 * page)).runs == [
            GuestRAMRange(start: page, size: page),
            GuestRAMRange(start: 100 * page, size: page),
        ])
        #expect(memory.nonZeroPages(in: GuestRAMRange(start: 0xC000_0000, size: page)).runs.isEmpty, "the MMIO hole is not RAM")
    }

    @Test func lastPageOfTheSlotClosesItsRun() {
        let runs = PageRuns.runs(bitmap: [UInt64(1) << 63], slotStart: 0, pageCount: 64)
        #expect(runs == [GuestRAMRange(start: 63 * 4096, size: 4096)])
        #expect(PageRuns.runs(bitmap: [0], slotStart: 0, pageCount: 64).isEmpty)
    }

    /// A running test guest rewriting its working set: KVM's log reports pages inside the working
    /// set, and nothing is reported once the guest is paused.
    @Test(.enabled(if: KVMSystem.isAvailable, "needs /dev/kvm (absent or not accessible on this machine)"))
    func runningGuestsWritesShowUpInTheDirtyLogAndStopWhenPaused() throws {
        let guest = try TestGuest.path.get()
        let configuration = MachineConfiguration(cpus: 2, memorySize: 256 << 20, kernel: guest,
                                                 commandLine: "workset_mib=32 dirty_rate=4000 heartbeat_ms=100")
        let console = GuestConsole()
        let machine = try Machine.forBoot(configuration: configuration, serialOutput: console.output, onStop: { _, _ in })
        try machine.start()
        defer { machine.stop() }
        #expect(console.wait(timeout: .seconds(60)) { $0.contains { $0.hasPrefix("HEARTBEAT cpu=1 seq=2 ") } },
                "the workload runs")
        try machine.setDirtyLogging(true)
        Thread.sleep(forTimeInterval: 0.5)
        let dirty = try machine.collectDirtyPages()
        #expect(dirty.pageCount > 100, "about 2000 pages are rewritten in 0.5 s; saw \(dirty.pageCount)")
        #expect(dirty.runs.allSatisfy { $0.end <= 256 << 20 })
        try machine.pause()
        _ = try machine.collectDirtyPages()
        Thread.sleep(forTimeInterval: 0.3)
        #expect(try machine.collectDirtyPages().pageCount == 0, "a paused guest writes nothing")
        try machine.resume()
        try machine.setDirtyLogging(false)
    }
}
