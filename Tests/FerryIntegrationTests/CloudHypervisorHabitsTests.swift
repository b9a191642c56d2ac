import APIModels
import FerryTestSupport
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// What clients written for Cloud Hypervisor (libvirt's ch driver, ch-remote, scripts) rely on:
/// its version line, its consoles (pseudo-terminals and a serial socket, both ways), `vm.nmi`,
/// its logging flags, and ch-remote's way of writing commands.
struct CloudHypervisorHabitsTests {
    static func remote(_ arguments: [String], input: FileHandle = .nullDevice) throws -> FerryProcess {
        try FerryProcess(arguments: arguments, executable: Repository.ferryRemote, standardInput: input)
    }

    /// libvirt reads `cloud-hypervisor vX.Y.Z` up to the first `-` and switches features on by it.
    @Test(arguments: [["--version"], ["-V"]])
    func versionLineIsCloudHypervisorsWithFerrysAfterIt(flag: [String]) throws {
        let ferry = try FerryProcess(arguments: flag)
        #expect(ferry.waitForExit(timeout: .seconds(20)) == 0)
        let line = try #require(ferry.consoleLines.first)
        let match = try #require(line.wholeMatch(of: /cloud-hypervisor v(\d+)\.(\d+)\.(\d+)-ferry-(\d+\.\d+\.\d+)/), "\(line)")
        #expect(Int(match.1)! >= 40, "libvirt needs 40 or later for restore with new network descriptors: \(line)")
    }

    /// `-v` raises the log level as Cloud Hypervisor's does (the boot is logged at info), and
    /// `--log-file` takes the log off standard error. Cloud Hypervisor's defaults: the serial port
    /// discards, the virtio console is the terminal.
    @Test(.enabled(if: Repository.kvmAvailable, needsKVM))
    func verboseLogGoesToTheLogFile() throws {
        let directory = try TemporaryDirectory()
        let log = directory.path("ferry.log")
        let ferry = try FerryProcess(arguments: ["--kernel", try TestGuest.path.get(), "--memory", "size=128M",
                                                 "--cmdline", "workset_mib=1 heartbeat_ms=100 poweroff_s=1", "-v", "--log-file", log])
        #expect(ferry.waitForExit(timeout: .seconds(60)) == 0, "the guest powers off: \(ferry.standardError)")
        let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        #expect(text.contains(" info ") && text.contains("VM booted"), "log: \(text)")
        #expect(text.contains("--seccomp true: every thread is held to its system-call list"), "log: \(text)")
        #expect(ferry.standardError.isEmpty, "stderr: \(ferry.standardError)")
        #expect(!ferry.consoleLines.contains { $0.hasPrefix("HEARTBEAT") }, "the serial port discards by default")
        #expect(ferry.consoleLines.contains { $0.hasPrefix("CONSOLE seq=") }, "the virtio console is the terminal: \(ferry.consoleLines.suffix(4))")
    }

    /// ch-remote's habits: `--api-socket` before the subcommand, `create` from standard input,
    /// and `restore source_url=…`'s key=value form (checked up to the VMM's answer).
    @Test(.enabled(if: Repository.kvmAvailable, needsKVM))
    func aChRemoteSessionWorksVerbatim() async throws {
        let directory = try TemporaryDirectory()
        let vmm = try await TestVMM("vmm", in: directory)
        let socket = vmm.socketPath
        let config = directory.path("vm.json")
        let kernel = try TestGuest.path.get()
        try Data(#"{"memory": {"size": 134217728}, "payload": {"kernel": "\#(kernel)", "cmdline": "workset_mib=1 heartbeat_ms=100"}, "serial": {"mode": "Tty"}}"#.utf8)
            .write(to: URL(fileURLWithPath: config))
        func run(_ arguments: [String], input: FileHandle = .nullDevice) throws -> (status: Int32?, output: String, error: String) {
            let remote = try Self.remote(["--api-socket", socket] + arguments, input: input)
            let status = remote.waitForExit(timeout: .seconds(30))
            return (status, remote.consoleLines.joined(separator: "\n"), remote.standardError)
        }
        let ping = try run(["ping"])
        #expect(ping.status == 0 && ping.output.contains("(pid \(vmm.process.pid))"), "\(ping)")
        let created = try run(["create"], input: try #require(FileHandle(forReadingAtPath: config)))
        #expect(created.status == 0, "create reads standard input without a file: \(created)")
        for command in [["boot"], ["pause"], ["resume"]] {
            let result = try run(command)
            #expect(result.status == 0, "\(command): \(result)")
        }
        let info = try run(["info", "--json"])
        let decoded = try JSONDecoder().decode(VmInfo.self, from: Data(info.output.utf8))
        #expect(decoded.state == "Running" && decoded.config.memory?.size == 134_217_728)
        let readable = try run(["info"])
        #expect(readable.output.contains("state:   Running"), "\(readable)")

        let snapshot = directory.path("snapshot")
        #expect(try run(["pause"]).status == 0)
        #expect(try run(["snapshot", "file://\(snapshot)"]).status == 0)
        #expect(try run(["delete"]).status == 0)
        let restored = try run(["restore", "source_url=file://\(snapshot),prefault=on"])
        #expect(restored.status == 0, "\(restored)")
        #expect(try await vmm.info().state == "Paused")
        let badKey = try run(["restore", "source_url=file://\(snapshot),colour=blue"])
        #expect(badKey.status == 64 && badKey.error.contains("'colour' is not a key here"), "\(badKey)")
        let badMigration = try run(["send-migration", "destination_url=tcp:127.0.0.1:1,downtime_ms=soon"])
        #expect(badMigration.status == 64 && badMigration.error.contains("downtime_ms=soon is not a number"), "\(badMigration)")
        #expect(try run(["shutdown-vmm"]).status == 0)
        #expect(await vmm.waitForExit(timeout: .seconds(30)) == 0)
    }
}

/// Consoles that are also inputs, as Cloud Hypervisor has them: `Pty` (a new pseudo-terminal that
/// `vm.info` names) and the serial port's `Socket`.
@Suite(.enabled(if: Repository.kvmAvailable, needsKVM))
struct TwoWayConsoleTests {
    static func guestBody(_ kernel: String, _ consoles: String) -> String {
        #"{"cpus": {"boot_vcpus": 2}, "memory": {"size": 134217728}, "payload": {"kernel": "\#(kernel)", "cmdline": "workset_mib=1 heartbeat_ms=100"}, \#(consoles)}"#
    }

    /// Both consoles on pseudo-terminals: the guest's UART lines come out of the serial one, its
    /// virtio console lines out of the console one, and keys typed into the serial one reach the
    /// UART (its receive FIFO, which a snapshot shows). A stopped VM closes its terminals.
    @Test func ptyConsolesCarryOutputAndInput() async throws {
        let directory = try TemporaryDirectory()
        let vmm = try await TestVMM("vmm", in: directory)
        let body = Self.guestBody(try TestGuest.path.get(), #""serial": {"mode": "Pty"}, "console": {"mode": "Pty"}"#)
        try await vmm.api.send(.vmCreate, body: Data(body.utf8))
        try await vmm.api.send(.vmBoot)
        let info = try await vmm.info()
        let serialPath = try #require(info.config.serial?.file)
        let consolePath = try #require(info.config.console?.file)
        #expect(info.config.serial?.mode == "Pty" && info.config.console?.mode == "Pty")
        #expect(serialPath.hasPrefix("/dev/pts/") && consolePath.hasPrefix("/dev/pts/") && serialPath != consolePath)

        let serial = try TerminalClient(path: serialPath)
        let console = try TerminalClient(path: consolePath)
        #expect(try await serial.read(until: "HEARTBEAT cpu=1 seq=", timeout: .seconds(60)), "serial: \(serial.received)")
        #expect(try await console.read(until: "CONSOLE seq=", timeout: .seconds(60)), "console: \(console.received)")
        #expect(!serial.received.contains("CONSOLE seq=") && !console.received.contains("HEARTBEAT"), "each console its own lines")

        try serial.write("ferry\r")
        try await vmm.api.send(.vmPause)
        #expect(await Self.receiveBufferBecomes(Array("ferry\r".utf8), vmm: vmm, in: directory))

        try await vmm.api.send(.vmShutdown)
        #expect(await waitUntil(.seconds(10)) { !vmm.openFiles().contains("/dev/ptmx") },
                "a stopped VM's terminals are closed: \(vmm.openFiles())")
        #expect(await vmm.shutDown())
    }

    /// `socket=PATH` serial: the VMM listens; a client reads the UART's output and types into it;
    /// a second client takes over from the first.
    @Test func serialSocketCarriesOutputAndInputToOneClientAtATime() async throws {
        let directory = try TemporaryDirectory()
        let path = directory.path("serial.sock")
        let vmm = try await TestVMM("vmm", in: directory)
        let body = Self.guestBody(try TestGuest.path.get(), #""serial": {"mode": "Socket", "socket": "\#(path)"}"#)
        try await vmm.api.send(.vmCreate, body: Data(body.utf8))
        try await vmm.api.send(.vmBoot)
        #expect(try await vmm.info().config.serial == VmConfig.Console(mode: "Socket", socket: path))
        let first = try TerminalClient(unixSocket: path)
        #expect(try await first.read(until: "HEARTBEAT cpu=0 seq=", timeout: .seconds(60)), "first: \(first.received)")
        let second = try TerminalClient(unixSocket: path)
        #expect(try await second.read(until: "HEARTBEAT cpu=0 seq=", timeout: .seconds(60)), "second: \(second.received)")
        try second.write("ok\r")
        try await vmm.api.send(.vmPause)
        #expect(await Self.receiveBufferBecomes(Array("ok\r".utf8), vmm: vmm, in: directory))
        try await vmm.api.send(.vmShutdown)
        #expect(await waitUntil(.seconds(10)) { !FileManager.default.fileExists(atPath: path) }, "the socket goes with the VM")
        #expect(await vmm.shutDown())
    }

    /// As soon as `vm.boot` has answered, each vCPU thread carries its name (`vcpuN`) in
    /// `/proc/PID/task/*/comm`: libvirt reads them at once to pin the vCPUs.
    @Test func vcpuThreadsAreNamedWhenBootAnswers() async throws {
        let directory = try TemporaryDirectory()
        let vmm = try await TestVMM("vmm", in: directory)
        let body = Self.guestBody(try TestGuest.path.get(), #""serial": {"mode": "Null"}"#)
        try await vmm.api.send(.vmCreate, body: Data(body.utf8))
        try await vmm.api.send(.vmBoot)
        let names = vmm.process.threadNames
        #expect(names.filter { $0.hasPrefix("vcpu") }.sorted() == ["vcpu0", "vcpu1"], "\(names)")
        #expect(await vmm.shutDown())
    }

    /// `vm.nmi` reaches every vCPU (the guest counts NMIs and says so), and the guest goes on.
    @Test func nmiReachesEveryVCPUAndTheGuestGoesOn() async throws {
        let directory = try TemporaryDirectory()
        let vmm = try await TestVMM("vmm", in: directory)
        try await vmm.boot(TestGuestVM(cpus: 2, memoryMiB: 128, workload: "workset_mib=1"))
        try await vmm.api.send(.vmNmi)
        for cpu in 0..<2 {
            try await vmm.waitForConsoleLine { $0 == "ferry-test-guest: NMI cpu=\(cpu) count=1" }
        }
        try await vmm.api.send(.vmPause)
        try await vmm.api.send(.vmNmi)
        try await vmm.api.send(.vmResume)
        let mark = vmm.process.consoleLines.count
        for cpu in 0..<2 {
            try await vmm.waitForConsoleLine { $0 == "ferry-test-guest: NMI cpu=\(cpu) count=2" }
            try await vmm.waitForConsoleLine(after: mark) { $0.hasPrefix("HEARTBEAT cpu=\(cpu) ") }
        }
        #expect(!vmm.process.consoleLines.contains { $0.contains("exception") })
        #expect(await vmm.shutDown())
    }

    /// Snapshots the paused VM until its UART's receive FIFO holds `expected` (keys travel
    /// through the VMM's input thread), at most 20 s.
    static func receiveBufferBecomes(_ expected: [UInt8], vmm: TestVMM, in directory: TemporaryDirectory) async -> Bool {
        let deadline = ContinuousClock.now + .seconds(20)
        var attempt = 0
        repeat {
            attempt += 1
            let snapshot = directory.path("fifo-\(attempt)")
            if (try? await vmm.api.send(.vmSnapshot, body: try JSONEncoder().encode(VmSnapshotConfig(destination_url: "file://\(snapshot)")))) != nil,
               ConsoleTests.serialReceiveBuffer(inSnapshot: snapshot) == expected {
                return true
            }
            try? await Task.sleep(for: .milliseconds(200))
        } while ContinuousClock.now < deadline
        return false
    }
}

/// A console client: a pseudo-terminal opened by path, or a connection to a Unix socket.
final class TerminalClient: @unchecked Sendable {
    let descriptor: Int32
    private(set) var received = ""

    init(path: String) throws {
        descriptor = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK)
        guard descriptor >= 0 else { throw TestFailure("cannot open \(path): errno \(errno)") }
    }

    init(unixSocket path: String) throws {
        descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { bytes in
            for (index, byte) in path.utf8.prefix(bytes.count - 1).enumerated() { bytes[index] = byte }
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else { throw TestFailure("cannot connect to \(path): errno \(errno)") }
        _ = fcntl(descriptor, F_SETFL, O_NONBLOCK)
    }

    deinit { close(descriptor) }

    /// Reads until what arrived contains `text`; false at the deadline.
    func read(until text: String, timeout: Duration) async throws -> Bool {
        let deadline = ContinuousClock.now + timeout
        var buffer = [UInt8](repeating: 0, count: 4096)
        while ContinuousClock.now < deadline {
            let count = buffer.withUnsafeMutableBytes { Glibc.read(descriptor, $0.baseAddress, $0.count) }
            if count > 0 {
                received += String(decoding: buffer[0..<count], as: UTF8.self)
                if received.contains(text) { return true }
            } else {
                try await Task.sleep(for: .milliseconds(20))
            }
        }
        return false
    }

    func write(_ text: String) throws {
        let bytes = Array(text.utf8)
        let written = bytes.withUnsafeBytes { Glibc.write(descriptor, $0.baseAddress, $0.count) }
        guard written == bytes.count else { throw TestFailure("wrote \(written) of \(bytes.count) bytes: errno \(errno)") }
    }
}
