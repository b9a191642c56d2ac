import FerryTestSupport
import APIModels
import FerryClient
import Foundation
import Testing

/// Drives a real `ferry` through its API socket: the whole VM lifecycle, its events, and bad
/// clients, while the test guest runs.
@Suite(.enabled(if: Repository.kvmAvailable, needsKVM))
struct APILifecycleTests {
    /// Waits until `path` exists (the VMM creates its socket once it listens).
    static func waitForFile(_ path: String, timeout: Duration) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if FileManager.default.fileExists(atPath: path) { return true }
            usleep(20_000)
        }
        return false
    }

    /// Heartbeat lines in the serial file.
    static func heartbeats(_ path: String) -> [Heartbeat] {
        ((try? String(contentsOfFile: path, encoding: .utf8)) ?? "").split(separator: "\n").compactMap { Heartbeat(String($0)) }
    }

    /// Waits until the serial file holds more than `count` heartbeats.
    static func waitForHeartbeats(after count: Int, in path: String, timeout: Duration) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if heartbeats(path).count > count { return true }
            usleep(50_000)
        }
        return false
    }

    /// Connects to the socket, sends `bytes` and closes without reading: a client that gives up.
    static func sendAndHangUp(_ socketPath: String, _ bytes: String) throws {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw TestFailure("socket failed") }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            for (index, byte) in socketPath.utf8.prefix(buffer.count - 1).enumerated() { buffer[index] = byte }
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else { throw TestFailure("connect failed") }
        _ = bytes.utf8CString.withUnsafeBytes { write(fd, $0.baseAddress, $0.count - 1) }
    }

    @Test func fullLifecycleOverTheAPIWithExactEventsAndBadClients() async throws {
        let guest = try TestGuest.path.get()
        let directory = try TemporaryDirectory()
        let socket = directory.path("api.sock")
        let events = directory.path("events.json")
        let serial = directory.path("serial.log")
        let ferry = try FerryProcess(arguments: ["--api-socket", "path=\(socket)", "--event-monitor", "path=\(events)"])
        #expect(Self.waitForFile(socket, timeout: .seconds(20)), "the API socket appears")
        var status = stat()
        #expect(stat(socket, &status) == 0 && status.st_mode & 0o777 == 0o600, "the socket is private to its owner")
        let client = APIClient(socketPath: socket)

        let config = #"{"cpus": {"boot_vcpus": 2}, "memory": {"size": 536870912}, "payload": {"kernel": "\#(guest)", "cmdline": "workset_mib=16 dirty_rate=500 heartbeat_ms=200 verify_ms=500"}, "serial": {"mode": "File", "file": "\#(serial)"}}"#
        try await client.send(.vmCreate, body: Data(config.utf8))
        try await client.send(.vmBoot)
        #expect(Self.waitForHeartbeats(after: 2, in: serial, timeout: .seconds(60)))

        try await client.send(.vmPause)
        let info = try JSONDecoder().decode(VmInfo.self, from: try await client.send(.vmInfo))
        #expect(info.state == "Paused" && info.config.cpus?.boot_vcpus == 2 && info.memory_actual_size == 512 << 20)
        try await client.send(.vmResume)

        // 100 concurrent vm.info requests while the guest runs.
        let states = try await withThrowingTaskGroup(of: String.self) { group in
            for _ in 0..<100 {
                group.addTask { try JSONDecoder().decode(VmInfo.self, from: try await client.send(.vmInfo)).state }
            }
            return try await group.reduce(into: [String]()) { $0.append($1) }
        }
        #expect(states.count == 100 && states.allSatisfy { $0 == "Running" })

        // A body cut off mid-way, and a client that hangs up before its request is complete.
        try Self.sendAndHangUp(socket, "PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{\"cpus\": {\"boo")
        try Self.sendAndHangUp(socket, "GET /api/v1/vm.in")
        await #expect(throws: APIError.self) { try await client.send(.vmPause, body: nil); try await client.send(.vmPause) }
        try await client.send(.vmResume)
        let seen = Self.heartbeats(serial).count
        #expect(Self.waitForHeartbeats(after: seen + 1, in: serial, timeout: .seconds(30)), "the guest keeps running")
        #expect((try? String(contentsOfFile: serial, encoding: .utf8))?.contains("VERIFY FAIL") == false)
        _ = try await client.send(.vmmPing)

        try await client.send(.vmShutdown)
        #expect(try JSONDecoder().decode(VmInfo.self, from: try await client.send(.vmInfo)).state == "Shutdown")
        try await client.send(.vmBoot)
        try await client.send(.vmReboot)
        try await client.send(.vmDelete)
        await #expect(throws: APIError.self) { try await client.send(.vmInfo) }

        let remote = try FerryProcess(arguments: ["shutdown-vmm", "--api-socket", socket],
                                      executable: Repository.ferryRemote)
        #expect(remote.waitForExit(timeout: .seconds(20)) == 0)
        #expect(ferry.waitForExit(timeout: .seconds(30)) == 0, "stderr: \(ferry.standardError)")
        #expect(!FileManager.default.fileExists(atPath: socket), "the socket is removed on exit")

        let recorded = recordedEvents(inFile: events)
        #expect(recorded.map(\.name) == [
            "vmm.starting",
            "vm.booting", "vm.booted",
            "vm.pausing", "vm.paused",
            "vm.resuming", "vm.resumed",
            "vm.pausing", "vm.paused",      // the pause between the bad clients
            "vm.resuming", "vm.resumed",
            "vm.shutdown",
            "vm.booting", "vm.booted",
            "vm.rebooting", "vm.rebooted",
            "vm.shutdown", "vm.deleted",
            "vmm.shutdown",
        ])
        #expect(recorded.filter { $0.name == "vm.shutdown" }.map { $0.properties["reason"] } == ["api", "api"])
    }

    @Test func ferryRemoteReportsTheServersErrorWithNonZeroStatus() throws {
        let directory = try TemporaryDirectory()
        let socket = directory.path("api.sock")
        let ferry = try FerryProcess(arguments: ["--api-socket", socket])
        #expect(Self.waitForFile(socket, timeout: .seconds(20)))
        let remote = { (arguments: [String]) throws -> FerryProcess in
            try FerryProcess(arguments: arguments + ["--api-socket", socket],
                             executable: Repository.ferryRemote)
        }
        let boot = try remote(["boot"])
        #expect(boot.waitForExit(timeout: .seconds(20)) == 1)
        #expect(boot.standardError.contains("no VM has been created (HTTP 404)"))
        let ping = try remote(["ping"])
        #expect(ping.waitForExit(timeout: .seconds(20)) == 0)
        #expect(ping.consoleLines.first?.hasPrefix("cloud-hypervisor v48.0.0-ferry-0.1.0 (pid \(ferry.pid))") == true,
                "\(ping.consoleLines)")
        ferry.signal(SIGTERM)
        #expect(ferry.waitForExit(timeout: .seconds(20)) == 0)
    }

    /// `--api-socket fd=N`: a parent binds and listens (as libvirt does), then execs ferry with the
    /// socket as descriptor 3.
    @Test func inheritedListeningSocketServesTheAPI() async throws {
        let directory = try TemporaryDirectory()
        let socket = directory.path("inherited.sock")
        let parent = """
            import os, socket, sys
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(sys.argv[1] + ".new"); listener.listen(16)
            os.rename(sys.argv[1] + ".new", sys.argv[1])  # appears only once it listens
            os.dup2(listener.fileno(), 3); os.set_inheritable(3, True)
            os.execv(sys.argv[2], [sys.argv[2], "--api-socket", "fd=3"])
            """
        let ferry = try FerryProcess(arguments: ["-c", parent, socket, Repository.ferry.path],
                                     executable: URL(fileURLWithPath: "/usr/bin/python3"))
        #expect(Self.waitForFile(socket, timeout: .seconds(20)))
        let client = APIClient(socketPath: socket)
        let ping = try JSONDecoder().decode(VmmPingResponse.self, from: try await client.send(.vmmPing))
        #expect(ping.pid == ferry.pid, "the exec'd ferry answers on the inherited socket")
        await #expect(throws: APIError.self) { try await client.send(.vmBoot) }
        try await client.send(.vmmShutdown)
        #expect(ferry.waitForExit(timeout: .seconds(20)) == 0, "stderr: \(ferry.standardError)")
    }

    @Test func descriptorThatIsNotAListeningSocketIsRefused() throws {
        let ferry = try FerryProcess(arguments: ["--api-socket", "fd=1000"])
        #expect(ferry.waitForExit(timeout: .seconds(20)) != 0)
        #expect(ferry.standardError.contains("--api-socket: fd=1000 is not an open descriptor"), "stderr: \(ferry.standardError)")
    }
}
