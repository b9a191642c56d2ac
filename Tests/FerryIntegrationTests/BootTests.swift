import FerryTestSupport
import Foundation
import Testing

let needsKVM = Comment(rawValue: "needs /dev/kvm (absent or not accessible on this machine)")

/// Boots the test guest with Ferry and checks what it reports, how it ends and the event stream.
@Suite(.enabled(if: Repository.kvmAvailable, needsKVM), .serialized)
struct TestGuestBootTests {
    static let heartbeatMilliseconds = 500
    static let poweroffSeconds = 6
    /// The test guest's LAPIC timer rate (Guests/test-guest/README.md).
    static let ticksPerSecond = 100.0

    @Test(arguments: [1, 2])
    func testGuestRunsOnEveryVCPUVerifiesMemoryAndPowersOffCleanly(cpus: Int) throws {
        let guest = try TestGuest.path.get()
        let directory = try TemporaryDirectory()
        let events = directory.path("events.json")
        let ferry = try FerryProcess(arguments: [
            "--kernel", guest, "--cpus", "boot=\(cpus)", "--memory", "size=1G", "--serial", "tty",
            "--cmdline", "workset_mib=32 dirty_rate=1000 heartbeat_ms=\(Self.heartbeatMilliseconds) verify_ms=1000 poweroff_s=\(Self.poweroffSeconds)",
            "--event-monitor", "path=\(events)",
        ])
        let started = ContinuousClock.now
        let status = ferry.waitForExit(timeout: .seconds(120))
        let elapsed = ContinuousClock.now - started
        let console = ferry.consoleLines
        #expect(status == 0, "ferry exit status; stderr: \(ferry.standardError)")

        #expect(console.contains { $0.hasPrefix("ferry-test-guest: boot cpus=\(cpus) ") }, "the guest sees \(cpus) CPUs via the MP table")
        for cpu in 0..<cpus {
            #expect(console.contains("ferry-test-guest: cpu \(cpu) online"))
            let beats = console.heartbeats.filter { $0.cpu == cpu }
            #expect(beats.count >= 3, "heartbeats from vCPU \(cpu)")
            #expect(beats.map(\.seq) == Array(1...max(beats.count, 1)), "heartbeat sequence of vCPU \(cpu) counts up by one")
            // Each heartbeat comes heartbeat_ms of guest timer ticks after the previous one.
            for (previous, next) in zip(beats, beats.dropFirst()) {
                let ticks = next.ticks - previous.ticks
                #expect(abs(ticks - Self.heartbeatMilliseconds / 10) <= 2, "ticks between heartbeats: \(ticks)")
                #expect(next.written > previous.written, "the workload keeps rewriting pages")
            }
            #expect(!console.verifyOK(cpu: cpu).isEmpty, "VERIFY OK from vCPU \(cpu)")
        }
        #expect(console.verifyFailures.isEmpty)
        #expect(console.last == "POWEROFF")
        // The guest's clock keeps pace with the host's: the power-off comes after poweroff_s of
        // guest ticks, which must not have run ahead of wall time.
        #expect(elapsed >= .seconds(Self.poweroffSeconds), "guest timer ran \(elapsed) for \(Self.poweroffSeconds) s of ticks")

        let recorded = recordedEvents(inFile: events)
        #expect(recorded.map(\.name) == ["vmm.starting", "vm.booting", "vm.booted", "vm.shutdown", "vmm.shutdown"])
        #expect(recorded.first { $0.name == "vm.shutdown" }?.properties == ["reason": "guest"])
        #expect(zip(recorded, recorded.dropFirst()).allSatisfy { $0.seconds <= $1.seconds }, "timestamps never go backwards")
        let starting = try #require(recorded.first)
        #expect(starting.properties["pid"] == String(ferry.pid))
        #expect(starting.properties["version"]?.isEmpty == false)
    }

    /// 5 GiB of guest RAM: 3 GiB below the MMIO hole and 2 GiB above 4 GiB. A working set larger
    /// than the RAM below the hole must use RAM above 4 GiB, and all of it must verify.
    @Test func memoryAboveTheFourGiBHoleIsUsableAndVerifies() throws {
        let guest = try TestGuest.path.get()
        let ferry = try FerryProcess(arguments: [
            "--kernel", guest, "--cpus", "boot=2", "--memory", "size=5G", "--serial", "tty",
            "--cmdline", "workset_mib=3400 heartbeat_ms=1000 verify_ms=1000",
        ])
        let boot = ferry.waitForConsoleLine(timeout: .seconds(60)) { $0.hasPrefix("ferry-test-guest: boot ") }
        #expect(boot.map(keyValues)?["ram_mib"].flatMap(Int.init).map { $0 > 5000 } == true, "the guest sees about 5 GiB: \(boot ?? "")")
        #expect(boot.map(keyValues)?["workset_mib"] == "3400", "the working set was not clamped")
        for cpu in 0..<2 {
            #expect(ferry.waitForConsoleLine(timeout: .seconds(300)) { $0.hasPrefix("VERIFY OK cpu=\(cpu) ") } != nil)
        }
        #expect(ferry.consoleLines.verifyFailures.isEmpty)
        ferry.signal(SIGTERM)
        #expect(ferry.waitForExit(timeout: .seconds(30)) == 0)
    }

    @Test func sigtermStopsTheGuestAndTheProcessCleanly() throws {
        let guest = try TestGuest.path.get()
        let directory = try TemporaryDirectory()
        let events = directory.path("events.json")
        let ferry = try FerryProcess(arguments: [
            "--kernel", guest, "--memory", "size=256M", "--cmdline", "heartbeat_ms=200", "--serial", "tty",
            "--event-monitor", "path=\(events)",
        ])
        #expect(ferry.waitForConsoleLine(timeout: .seconds(60)) { $0.hasPrefix("HEARTBEAT cpu=0 seq=2 ") } != nil)
        ferry.signal(SIGTERM)
        #expect(ferry.waitForExit(timeout: .seconds(20)) == 0)
        let recorded = recordedEvents(inFile: events)
        #expect(recorded.map(\.name) == ["vmm.starting", "vm.booting", "vm.booted", "vm.shutdown", "vmm.shutdown"])
        #expect(recorded.first { $0.name == "vm.shutdown" }?.properties["reason"] == "api")
    }

    @Test func serialFileModeWritesTheConsoleToAFile() throws {
        let guest = try TestGuest.path.get()
        let directory = try TemporaryDirectory()
        let consolePath = directory.path("console.log")
        let ferry = try FerryProcess(arguments: [
            "--kernel", guest, "--memory", "size=128M", "--serial", "file=\(consolePath)", "--console", "off",
            "--cmdline", "workset_mib=8 heartbeat_ms=200 poweroff_s=2",
        ])
        #expect(ferry.waitForExit(timeout: .seconds(60)) == 0)
        #expect(ferry.consoleLines.isEmpty, "nothing on standard output")
        let text = try String(contentsOfFile: consolePath, encoding: .utf8)
        #expect(text.contains("ferry-test-guest: ready"))
        #expect(text.hasSuffix("POWEROFF\n"))
    }
}

/// Ferry fails cleanly: bad flags before anything starts, a guest that cannot run with the reason.
@Suite struct FailureTests {
    @Test(arguments: [
        (["--cpus", "boot=0"], "--cpus"),
        (["--memory", "size=1X"], "--memory"),
        (["--memory", "size=16M"], "--memory"),
        (["--serial", "socket="], "--serial"),
        (["--console", "socket=/x"], "--console"),
        (["--serial", "tty", "--console", "tty"], "--console"),
        (["--seccomp", "maybe"], "--seccomp"),
        (["--disk", "path=/nonexistent.img"], "--disk"),
        (["--disk", "size=1G"], "--disk"),
        (["--rng", "src=/nonexistent"], "--rng"),
        (["--event-monitor", "socket=/x"], "--event-monitor"),
    ])
    func badFlagValueFailsBeforeAnythingStartsNamingTheFlag(arguments: [String], flag: String) throws {
        let directory = try TemporaryDirectory()
        let kernel = directory.path("kernel")
        _ = FileManager.default.createFile(atPath: kernel, contents: Data([0]))
        let events = directory.path("events.json")
        let ferry = try FerryProcess(arguments: ["--kernel", kernel, "--event-monitor", "path=\(events)"] + arguments)
        let status = ferry.waitForExit(timeout: .seconds(20))
        #expect(status != nil && status != 0)
        #expect(ferry.standardError.contains(flag), "stderr: \(ferry.standardError)")
        #expect(!FileManager.default.fileExists(atPath: events) || flag == "--event-monitor",
                "nothing started: no event stream was opened")
    }

    @Test func missingKernelFileIsNamed() throws {
        let ferry = try FerryProcess(arguments: ["--kernel", "/nonexistent/vmlinux"])
        #expect(ferry.waitForExit(timeout: .seconds(20)) != 0)
        #expect(ferry.standardError.contains("--kernel: /nonexistent/vmlinux does not exist"))
    }

    @Test(.enabled(if: Repository.kvmAvailable, needsKVM))
    func fileThatIsNoKernelIsRefusedWithAReason() throws {
        let directory = try TemporaryDirectory()
        let kernel = directory.path("not-a-kernel")
        _ = FileManager.default.createFile(atPath: kernel, contents: Data(repeating: 0x90, count: 8192))
        let ferry = try FerryProcess(arguments: ["--kernel", kernel])
        #expect(ferry.waitForExit(timeout: .seconds(20)) == 1)
        #expect(ferry.standardError.contains("neither an ELF with a PVH note nor a bzImage"))
    }

    /// A PVH kernel whose first instruction is `ud2` with no IDT: the fault cannot be delivered, the
    /// vCPU shuts down, and Ferry reports the exit and RIP instead of crashing.
    @Test(.enabled(if: Repository.kvmAvailable, needsKVM))
    func guestThatCannotContinueEndsTheRunWithExitReasonAndRIP() throws {
        let directory = try TemporaryDirectory()
        let kernel = directory.path("ud2.elf")
        _ = FileManager.default.createFile(atPath: kernel, contents: Data(pvhELF(code: [0x0F, 0x0B])))
        let events = directory.path("events.json")
        let ferry = try FerryProcess(arguments: ["--kernel", kernel, "--memory", "size=64M", "--event-monitor", "path=\(events)"])
        #expect(ferry.waitForExit(timeout: .seconds(30)) == 1)
        #expect(ferry.standardError.contains("vCPU 0 at RIP 0x"), "stderr: \(ferry.standardError)")
        let recorded = recordedEvents(inFile: events)
        #expect(recorded.map(\.name).suffix(2) == ["vm.shutdown", "vmm.shutdown"])
        #expect(recorded.first { $0.name == "vm.shutdown" }?.properties["error"]?.isEmpty == false)
    }
}

/// An ELF64 with one PT_LOAD at 1 MiB holding `code`, and the Xen PVH entry note pointing at it.
func pvhELF(code: [UInt8]) -> [UInt8] {
    var image = [UInt8](repeating: 0, count: 0x200)
    func put<T: FixedWidthInteger>(_ value: T, _ offset: Int) {
        withUnsafeBytes(of: value.littleEndian) { for (i, b) in $0.enumerated() { image[offset + i] = b } }
    }
    image[0..<4] = [0x7F, 0x45, 0x4C, 0x46]
    image[4] = 2; image[5] = 1; image[6] = 1
    put(UInt16(2), 16); put(UInt16(62), 18); put(UInt32(1), 20); put(UInt64(0x10_0000), 24)
    put(UInt64(0x40), 32); put(UInt16(64), 52); put(UInt16(56), 54); put(UInt16(2), 56)
    put(UInt32(1), 0x40); put(UInt64(0x180), 0x48); put(UInt64(0x10_0000), 0x50); put(UInt64(0x10_0000), 0x58)
    put(UInt64(code.count), 0x60); put(UInt64(0x1000), 0x68)
    put(UInt32(4), 0x78); put(UInt64(0x140), 0x80); put(UInt64(20), 0x98); put(UInt64(20), 0xA0)
    put(UInt32(4), 0x140); put(UInt32(4), 0x144); put(UInt32(18), 0x148)
    image[0x14C..<0x150] = [0x58, 0x65, 0x6E, 0x00]
    put(UInt32(0x10_0000), 0x150)
    image.replaceSubrange(0x180..<0x180 + code.count, with: code)
    return image
}
