import FerryTestSupport
import Foundation
import Testing

/// Boots Debian's Linux kernel through PVH. On a nested KVM that emulates CPL-0 code (this project's
/// CI machine) the first console line takes about 40 s and init is out of reach, so the test checks
/// the first milestones of the boot (console, memory map, MP table); on a host with hardware
/// virtualization the same boot reaches them in well under a second.
@Suite(.enabled(if: Repository.kvmAvailable, needsKVM))
struct LinuxBootTests {
    @Test func linuxBootsThroughPVHAndSeesFerrysMemoryMapAndCPUs() throws {
        let paths = try LinuxGuest.paths.get()
        let directory = try TemporaryDirectory()
        let events = directory.path("events.json")
        let ferry = try FerryProcess(arguments: [
            "--kernel", try #require(paths["vmlinux"]), "--initramfs", try #require(paths["initramfs"]),
            "--cpus", "boot=2", "--memory", "size=512M", "--serial", "tty",
            "--cmdline", "console=ttyS0 earlyprintk=serial reboot=k panic=-1",
            "--event-monitor", "path=\(events)",
        ])
        let version = ferry.waitForConsoleLine(timeout: .seconds(300)) { $0.contains("Linux version 6.") }
        #expect(version != nil, "the kernel's first console line; console: \(ferry.consoleLines.suffix(3)); stderr: \(ferry.standardError)")
        #expect(ferry.waitForConsoleLine(timeout: .seconds(30)) { $0.contains("Command line: console=ttyS0 earlyprintk=serial") } != nil)
        #expect(ferry.waitForConsoleLine(timeout: .seconds(30)) {
            $0.contains("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable")
        } != nil, "the e820 map from hvm_start_info")
        #expect(ferry.waitForConsoleLine(timeout: .seconds(240)) { $0.contains("MPTABLE: OEM ID: FERRY") } != nil)
        #expect(ferry.waitForConsoleLine(timeout: .seconds(60)) { $0.contains("Processors: 2") } != nil,
                "Linux counts both vCPUs in Ferry's MP table")
        ferry.signal(SIGTERM)
        #expect(ferry.waitForExit(timeout: .seconds(60)) == 0)
        let recorded = recordedEvents(inFile: events)
        #expect(recorded.map(\.name) == ["vmm.starting", "vm.booting", "vm.booted", "vm.shutdown", "vmm.shutdown"])
    }
}
