import FerryTestSupport
import Foundation
import KVM
import Testing
@testable import Machine

@Suite struct DirtyPagesTests {
    @Test func bitmapBecomesCoalescedGuestPhysicalRuns() {
        // Pages 0-1, 5, 63-65 of a slot starting at 4 GiB.
        var bitmap: [UInt64] = [0, 0]
        for page in [0, 1, 5, 63, 64, 65] { bitmap[page / 64] |= 1 << UInt64(page % 64) }
        let runs = DirtyPages.runs(bitmap: bitmap, slotStart: 4 << 30, pageCount: 100)
        #expect(runs == [
            GuestRAMRange(start: 4 << 30, size: 2 * 4096),
            GuestRAMRange(start: (4 << 30) + 5 * 4096, size: 4096),
            GuestRAMRange(start: (4 << 30) + 63 * 4096, size: 3 * 4096),
        ])
        #expect(DirtyPages(runs: runs).pageCount == 6)
    }

    @Test func lastPageOfTheSlotClosesItsRun() {
        let runs = DirtyPages.runs(bitmap: [UInt64(1) << 63], slotStart: 0, pageCount: 64)
        #expect(runs == [GuestRAMRange(start: 63 * 4096, size: 4096)])
        #expect(DirtyPages.runs(bitmap: [0], slotStart: 0, pageCount: 64).isEmpty)
    }

    /// A running test guest rewriting its working set: KVM's log reports pages inside the working
    /// set, and nothing is reported once the guest is paused.
    @Test(.enabled(if: KVMSystem.isAvailable, "needs /dev/kvm (absent or not accessible on this machine)"))
    func runningGuestsWritesShowUpInTheDirtyLogAndStopWhenPaused() throws {
        let guest = try TestGuest.path.get()
        let configuration = MachineConfiguration(cpus: 2, memorySize: 256 << 20, kernel: guest,
                                                 commandLine: "workset_mib=32 dirty_rate=4000 heartbeat_ms=100")
        let console = Console()
        let machine = try Machine(configuration: configuration, serialOutput: console.output, onStop: { _ in })
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
