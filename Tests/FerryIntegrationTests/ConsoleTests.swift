import APIModels
import FerryClient
import FerryTestSupport
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The host side of the guest's serial console over a VM's life: a console file is closed with its
/// VM, a terminal's keystrokes reach whichever VM runs now (restored ones included), and a VM that
/// is gone is not kept alive by the terminal.
@Suite(.enabled(if: Repository.kvmAvailable, needsKVM))
struct ConsoleTests {
    /// The VMM's descriptors open on `path`.
    static func descriptors(of vmm: TestVMM, on path: String) -> Int {
        vmm.openFiles().filter { $0 == path }.count
    }

    @Test func aConsoleFileIsClosedWithItsVMAcrossReboots() async throws {
        let directory = try TemporaryDirectory()
        let serial = directory.path("serial.log")
        let vmm = try await TestVMM("vmm", in: directory)
        let guest = TestGuestVM(cpus: 1, memoryMiB: 128, workload: "workset_mib=1")
        try await vmm.api.send(.vmCreate, body: guest.configuration(kernel: try TestGuest.path.get(),
                                                                    serial: #"{"mode": "File", "file": "\#(serial)"}"#))
        try await vmm.api.send(.vmBoot)
        #expect(Self.descriptors(of: vmm, on: serial) == 1, "the booted VM writes its console file")
        for reboot in 1...3 {
            try await vmm.api.send(.vmReboot)
            #expect(await waitUntil(.seconds(60)) {
                ((try? String(contentsOfFile: serial, encoding: .utf8)) ?? "").contains("ferry-test-guest: ready")
            }, "reboot \(reboot) boots the guest again")
            #expect(Self.descriptors(of: vmm, on: serial) == 1, "after reboot \(reboot): one descriptor on the console file, not \(reboot + 1)")
        }
        try await vmm.api.send(.vmShutdown)
        #expect(Self.descriptors(of: vmm, on: serial) == 0, "a stopped VM's console file is closed")
        try await vmm.api.send(.vmDelete)
        #expect(await vmm.shutDown())
    }

    @Test func aTerminalKeepsNoOldVMAliveAndTypesIntoARestoredOne() async throws {
        let terminal = try PseudoTerminal()
        let directory = try TemporaryDirectory()
        let vmm = try await TestVMM("vmm", in: directory, standardInput: terminal.follower)
        let guest = TestGuestVM(cpus: 1, memoryMiB: 512, workload: "workset_mib=1")
        try await vmm.boot(guest)
        let booted = try #require(vmm.statusKilobytes("VmSize"))
        for _ in 1...2 {
            try await vmm.api.send(.vmReboot)
            try await vmm.waitForConsoleLine(after: vmm.process.consoleLines.count) { $0.hasPrefix("HEARTBEAT ") }
        }
        let rebooted = try #require(vmm.statusKilobytes("VmSize"))
        // Each machine maps its 512 MiB of RAM: two that lingered would add 1 GiB.
        #expect(rebooted < booted + (256 << 10), "the terminal holds no rebooted-away machine: VmSize \(booted) kB → \(rebooted) kB")

        // Snapshot, delete, restore paused: keys typed now wait in the restored UART's receive FIFO,
        // which a second snapshot shows.
        try await vmm.api.send(.vmPause)
        let first = directory.path("first")
        try await vmm.api.send(.vmSnapshot, body: try JSONEncoder().encode(VmSnapshotConfig(destination_url: "file://\(first)")))
        try await vmm.api.send(.vmDelete)
        try await vmm.api.send(.vmRestore, body: try JSONEncoder().encode(RestoreConfig(source_url: "file://\(first)", resume: false)))
        try terminal.type("ferry\r")
        let second = directory.path("second")
        var received: [UInt8] = []
        let deadline = ContinuousClock.now + .seconds(20)
        repeat {
            try? FileManager.default.removeItem(atPath: second)
            try await vmm.api.send(.vmSnapshot, body: try JSONEncoder().encode(VmSnapshotConfig(destination_url: "file://\(second)")))
            received = Self.serialReceiveBuffer(inSnapshot: second)
            if received == Array("ferry\r".utf8) { break }
            try await Task.sleep(for: .milliseconds(200))
        } while ContinuousClock.now < deadline
        #expect(received == Array("ferry\r".utf8), "the restored VM's UART received the keystrokes: \(received)")
        #expect(await vmm.shutDown())
    }

    /// The bytes waiting in the UART's receive FIFO of the snapshot in `directory`.
    static func serialReceiveBuffer(inSnapshot directory: String) -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: "\(directory)/snapshot.json"),
              let snapshot = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
              let machine = snapshot["machine"] as? [String: Any],
              let devices = machine["devices"] as? [[String: Any]],
              let serial = devices.first(where: { $0["id"] as? String == "serial0" })?["json"] as? String,
              let state = try? JSONSerialization.jsonObject(with: Data(serial.utf8)) as? [String: Any],
              let receive = state["receive"] as? [Int]
        else { return [] }
        return receive.map { UInt8(truncatingIfNeeded: $0) }
    }
}

/// A pseudo-terminal pair: the VMM reads the follower as its standard input; the test types into
/// the controller.
final class PseudoTerminal: Sendable {
    let controller: FileHandle
    let follower: FileHandle

    /// `TIOCSPTLCK` and `TIOCGPTN` (asm-generic/ioctls.h): unlock the follower, and get its number.
    static let unlockFollower: UInt = 0x4004_5431
    static let followerNumber: UInt = 0x8004_5430

    init() throws {
        let controllerFD = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC)
        var unlock: Int32 = 0
        var number: UInt32 = 0
        guard controllerFD >= 0, ioctl(controllerFD, Self.unlockFollower, &unlock) == 0,
              ioctl(controllerFD, Self.followerNumber, &number) == 0
        else {
            throw TestFailure("no pseudo-terminal: errno \(errno)")
        }
        let name = "/dev/pts/\(number)"
        let followerFD = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC)
        guard followerFD >= 0 else { throw TestFailure("cannot open \(name): errno \(errno)") }
        controller = FileHandle(fileDescriptor: controllerFD, closeOnDealloc: true)
        follower = FileHandle(fileDescriptor: followerFD, closeOnDealloc: true)
    }

    func type(_ text: String) throws {
        try controller.write(contentsOf: Data(text.utf8))
    }
}
