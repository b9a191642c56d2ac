import FerryTestSupport
import Foundation
import Testing

/// The test guest's virtio driver against QEMU's virtio devices — an implementation nobody here
/// wrote — so that the guest and Ferry's devices are never checked only against each other.
@Suite(.enabled(if: Repository.kvmAvailable, needsKVM), .enabled(if: qemuExecutable != nil, needsQEMU))
struct QEMUDeviceTests {
    @Test(arguments: ["", ",event_idx=off,indirect_desc=off"])
    func theTestGuestsDriverWorksOnQEMUsDevices(features: String) throws {
        let directory = try TemporaryDirectory()
        let disk = directory.path("disk.img"), console = directory.path("console.txt")
        #expect(FileManager.default.createFile(atPath: disk, contents: nil) && truncate(disk, 64 << 20) == 0)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: try #require(qemuExecutable))
        // The CPU model this nested host can run (docs: -cpu host fails here).
        process.arguments = [
            "-enable-kvm", "-cpu", "qemu64,-cx16,-xsave", "-m", "512M", "-smp", "1", "-nographic", "-no-reboot",
            "-kernel", try TestGuest.path.get(),
            "-append", "workset_mib=16 dirty_rate=1000 heartbeat_ms=500 verify_ms=500 block_blocks=512 block_rate=200 block_verify_ms=500 poweroff_s=6",
            "-drive", "file=\(disk),if=none,id=d0,format=raw",
            "-device", "virtio-blk-pci,drive=d0,disable-legacy=on,serial=qemu-disk\(features)",
            "-device", "virtio-rng-pci,disable-legacy=on\(features)",
            "-device", "virtio-serial-pci,disable-legacy=on\(features)",
            "-chardev", "file,id=vc0,path=\(console)", "-device", "virtconsole,chardev=vc0",
        ]
        let output = Pipe()
        process.standardOutput = output
        process.standardError = output
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let watchdog = DispatchWorkItem { process.terminate() }
        DispatchQueue.global().asyncAfter(deadline: .now() + 120, execute: watchdog)
        let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        watchdog.cancel()
        let lines = text.split(separator: "\n").map { String($0).trimmingCharacters(in: .whitespacesAndNewlines) }
        #expect(lines.contains("POWEROFF"), "the guest ran to its power-off: \(lines.suffix(10))")
        #expect(lines.contains("ferry-test-guest: virtio blk id=qemu-disk"), "get-id answers QEMU's serial")
        #expect(lines.blockPasses.count >= 2, "the disk verified on QEMU: \(lines.filter { $0.hasPrefix("BLOCK") }.prefix(5))")
        #expect(lines.contains { $0.hasPrefix("RNG OK") })
        #expect(lines.deviceFailures.isEmpty && lines.verifyFailures.isEmpty, "\(lines.deviceFailures) \(lines.verifyFailures)")
        let consoleText = (try? String(contentsOfFile: console, encoding: .utf8)) ?? ""
        #expect(consoleText.contains("ferry-test-guest: virtio console hello") && consoleText.contains("CONSOLE seq=2 cpu=0"),
                "the guest's console output reached QEMU's virtconsole: \(consoleText.prefix(200))")
    }
}

let qemuExecutable: String? = ["/usr/bin/qemu-system-x86_64", "/usr/local/bin/qemu-system-x86_64"]
    .first { FileManager.default.isExecutableFile(atPath: $0) }
let needsQEMU = Comment(rawValue: "needs qemu-system-x86_64 (Debian's qemu-system-x86), absent on this machine")
