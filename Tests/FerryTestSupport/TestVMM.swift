import APIModels
import Events
import FerryClient
import Foundation
import Synchronization

/// One event of a VMM under test, read back with the event reader every client uses.
public struct RecordedEvent: Sendable {
    public var event: Event

    /// `source.event`, e.g. `vm.migration-started`.
    public var name: String { event.qualifiedName }
    /// The properties; empty for `null`.
    public var properties: [String: String] { event.properties ?? [:] }
    /// The event's timestamp in seconds.
    public var seconds: Double { event.timestamp.inSecondsForTests }

    public init(_ event: Event) {
        self.event = event
    }

    /// The event as `type`'s payload, if it is one; a payload whose properties do not fit fails the decode.
    public func decode<P: EventPayload>(_ type: P.Type) throws -> P? {
        try event.decode(type)
    }
}

extension Duration {
    fileprivate var inSecondsForTests: Double {
        Double(components.seconds) + Double(components.attoseconds) / 1e18
    }
}

/// Every event in an event monitor file, leaving out one still being written.
public func recordedEvents(inFile path: String) -> [RecordedEvent] {
    ((try? EventReader.events(inFile: path)) ?? []).map(RecordedEvent.init)
}

/// A `ferry` started with an API socket and an event file in a test's directory, and what tests
/// do with it: its API client, its events as they are written, its console.
public final class TestVMM: Sendable {
    public let name: String
    public let process: FerryProcess
    public let api: APIClient
    public let socketPath: String
    public let eventFile: String
    private let log = Mutex(EventLog())

    /// The event file read so far: whole events, and the bytes of one still being written.
    private struct EventLog {
        var offset: UInt64 = 0
        var pending: [UInt8] = []
        var events: [RecordedEvent] = []
        /// Wall-clock seconds since 1970 at the VMM's event timestamp 0 (`vmm.starting`'s `wall_clock`).
        var wallClockAtZero: Double?
    }

    /// Starts `ferry` (behind `launcher`, e.g. `ip netns exec NAME`) and waits until its API answers.
    public init(_ name: String, in directory: TemporaryDirectory, launcher: [String] = [], extraArguments: [String] = [],
                standardInput: FileHandle = .nullDevice) async throws {
        self.name = name
        socketPath = directory.path("\(name).sock")
        eventFile = directory.path("\(name).events")
        let arguments = ["--api-socket", "path=\(socketPath)", "--event-monitor", "path=\(eventFile)"] + extraArguments
        if let tool = launcher.first {
            process = try FerryProcess(arguments: Array(launcher.dropFirst()) + [Repository.ferry.path] + arguments,
                                       executable: URL(fileURLWithPath: tool), standardInput: standardInput)
        } else {
            process = try FerryProcess(arguments: arguments, standardInput: standardInput)
        }
        api = APIClient(socketPath: socketPath)
        let deadline = ContinuousClock.now + .seconds(30)
        while (try? await api.send(.vmmPing)) == nil {
            guard ContinuousClock.now < deadline, process.waitForExit(timeout: .zero) == nil else {
                throw TestFailure("\(name): the API did not answer: \(process.standardError)")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    // MARK: Events

    /// Every whole event written so far, in order.
    public func events() -> [RecordedEvent] {
        log.withLock { log in
            guard let file = FileHandle(forReadingAtPath: eventFile) else { return log.events }
            defer { try? file.close() }
            try? file.seek(toOffset: log.offset)
            let data = (try? file.readToEnd()) ?? Data()
            log.offset += UInt64(data.count)
            log.pending += data
            guard let (events, rest) = try? EventReader.events(cloudHypervisorStream: log.pending) else { return log.events }
            for event in events.map(RecordedEvent.init) {
                if let starting = try? event.decode(VMMEvent.Starting.self) {
                    log.wallClockAtZero = Self.secondsSince1970(starting.wallClock)
                }
                log.events.append(event)
            }
            log.pending = Array(rest)
            return log.events
        }
    }

    /// The names of every event written so far.
    public var eventNames: [String] { events().map(\.name) }

    /// When `event` was emitted, on the wall clock.
    public func date(of event: RecordedEvent) -> Date {
        _ = events()
        return Date(timeIntervalSince1970: (log.withLock { $0.wallClockAtZero } ?? 0) + event.seconds)
    }

    /// Waits for the first event from `index` on whose name is in `names`, of migration `id` if
    /// given, for which `predicate` holds.
    @discardableResult
    public func waitForEvent(_ names: Set<String>, id: String? = nil, after index: Int = 0, timeout: Duration = .seconds(120),
                             where predicate: (RecordedEvent) -> Bool = { _ in true }) async throws -> RecordedEvent {
        let deadline = ContinuousClock.now + timeout
        while true {
            let events = events()
            if index < events.count, let event = events[index...].first(where: {
                names.contains($0.name) && (id == nil || $0.properties["migration_id"] == id) && predicate($0)
            }) {
                return event
            }
            guard ContinuousClock.now < deadline else {
                throw TestFailure("\(name): no \(names.sorted()) within \(timeout); events: \(events.map(\.name))")
            }
            try await Task.sleep(for: .milliseconds(5))
        }
    }

    /// Waits for the `occurrence`-th event named `name`.
    @discardableResult
    public func waitForEvent(_ name: String, occurrence: Int = 1, timeout: Duration = .seconds(120)) async throws -> RecordedEvent {
        let deadline = ContinuousClock.now + timeout
        while true {
            let matching = events().filter { $0.name == name }
            if matching.count >= occurrence { return matching[occurrence - 1] }
            guard ContinuousClock.now < deadline else {
                throw TestFailure("\(self.name): fewer than \(occurrence) \(name) within \(timeout); events: \(events().map(\.name))")
            }
            try await Task.sleep(for: .milliseconds(5))
        }
    }

    /// Waits until the stream from `index` on holds exactly `names`, in order, as its next
    /// events, and returns them.
    @discardableResult
    public func waitForEvents(_ names: [String], after index: Int, timeout: Duration = .seconds(30)) async throws -> [RecordedEvent] {
        let found = await waitUntil(timeout) { events().count >= index + names.count }
        let following = Array(events().dropFirst(index))
        guard found, following.prefix(names.count).map(\.name) == names else {
            throw TestFailure("\(name): expected \(names) after event \(index), got \(following.map(\.name))")
        }
        return Array(following.prefix(names.count))
    }

    /// Waits for the `occurrence`-th event whose name is in `names`; nil at the deadline.
    public func waitForTerminal(_ names: Set<String>, occurrence: Int = 1, timeout: Duration = .seconds(180)) async -> RecordedEvent? {
        var found: RecordedEvent?
        _ = await waitUntil(timeout) {
            let matching = events().filter { names.contains($0.name) }
            found = matching.count >= occurrence ? matching[occurrence - 1] : nil
            return found != nil
        }
        return found
    }

    // MARK: Migrations

    /// Starts `vm.receive-migration` at `url` and returns once the VMM emitted the
    /// `vm.migration-receive-ready` of this receive. The arriving guest's console goes where
    /// `serial` says (the VMM's standard output by default, so that tests see the guest there).
    public func startReceive(at url: String, serial: VmConfig.Console? = VmConfig.Console(mode: "Tty"),
                             console: VmConfig.Console? = nil,
                             disks: [ReceiveMigrationData.DiskPlacement]? = nil,
                             net: [ReceiveMigrationData.NetPlacement]? = nil, tlsDir: String? = nil) async throws -> IncomingMigration {
        let mark = events().count
        let api = api
        let body = try JSONEncoder().encode(ReceiveMigrationData(receiver_url: url, serial: serial, console: console, disks: disks,
                                                                 net: net, tls_dir: tlsDir))
        let call = Task { _ = try await api.send(.vmReceiveMigration, body: body, timeout: APIClient.unlimited) }
        do {
            // Generous: on a loaded machine (every suite runs at once) a VMM has taken over 30 s to answer.
            let ready = try await waitForEvent([VMEvent.MigrationReceiveReady.qualifiedName], after: mark, timeout: .seconds(90))
            guard let listening = try ready.decode(VMEvent.MigrationReceiveReady.self)?.receiverURL else { throw TestFailure("no URL") }
            return IncomingMigration(call: call, url: listening, requestedURL: url)
        } catch {
            call.cancel()
            throw TestFailure("\(name) does not listen on \(url): \(error); stderr: \(process.standardError)")
        }
    }

    /// Sends the VM to `url`; returns the migration id once `vm.migration-started` is out.
    public func startSend(to url: String, downtimeMs: Int64? = nil, timeoutS: Int64? = nil, strategy: String? = nil,
                          keepAlive: Bool? = nil, tlsDir: String? = nil, connections: Int64? = nil,
                          autoConverge: Bool? = nil) async throws -> String {
        let mark = events().count
        let body = try JSONEncoder().encode(SendMigrationData(destination_url: url, downtime_ms: downtimeMs, timeout_s: timeoutS,
                                                              timeout_strategy: strategy, connections: connections, keep_alive: keepAlive,
                                                              tls_dir: tlsDir, auto_converge: autoConverge))
        try await api.send(.vmSendMigration, body: body)
        let started = try await waitForEvent([VMEvent.MigrationStarted.qualifiedName], after: mark, timeout: .seconds(10))
        guard let id = try started.decode(VMEvent.MigrationStarted.self)?.migrationID else { throw TestFailure("no migration id") }
        return id
    }

    /// Asks the VMM to shut down; returns whether the call was answered and the process exited
    /// with status 0.
    public func shutDown() async -> Bool {
        do {
            try await api.send(.vmmShutdown)
        } catch {
            print("\(name): vmm.shutdown failed: \(error); stderr: \(process.standardError.suffix(2000))")
            return false
        }
        let status = await waitForExit(timeout: .seconds(30))
        if status != 0 {
            print("\(name): after vmm.shutdown, exit status \(status.map(String.init) ?? "none within 30 s"); stderr: \(process.standardError.suffix(2000))")
        }
        return status == 0
    }

    // MARK: Console and process

    /// Waits for a console line from line `mark` on for which `predicate` holds.
    @discardableResult
    public func waitForConsoleLine(after mark: Int = 0, timeout: Duration = .seconds(60),
                                   where predicate: (String) -> Bool) async throws -> String {
        let deadline = ContinuousClock.now + timeout
        while true {
            let lines = process.consoleLines
            if mark < lines.count, let line = lines[mark...].first(where: predicate) { return line }
            guard ContinuousClock.now < deadline else {
                throw TestFailure("\(name): no such console line within \(timeout); the last ones: \(lines.suffix(6))")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    /// The exit status once the process has exited, or nil at the deadline.
    public func waitForExit(timeout: Duration) async -> Int32? {
        let deadline = ContinuousClock.now + timeout
        while true {
            if let status = process.waitForExit(timeout: .zero) { return status }
            if ContinuousClock.now >= deadline { return nil }
            try? await Task.sleep(for: .milliseconds(20))
        }
    }

    // MARK: API

    public func info() async throws -> VmInfo {
        try JSONDecoder().decode(VmInfo.self, from: try await api.send(.vmInfo))
    }

    public func progress() async throws -> MigrationProgressReport {
        try JSONDecoder().decode(MigrationProgressReport.self, from: try await api.send(.vmMigrationProgress))
    }

    /// Creates and boots `guest` and waits until every vCPU has finished its initial fill and
    /// printed heartbeats.
    public func boot(_ guest: TestGuestVM) async throws {
        let kernel = try TestGuest.path.get()
        try await api.send(.vmCreate, body: guest.configuration(kernel: kernel))
        try await api.send(.vmBoot)
        let ready = await waitUntil(.seconds(120), interval: .milliseconds(50)) {
            let lines = process.consoleLines
            return lines.contains("ferry-test-guest: ready")
                && (0..<guest.cpus).allSatisfy { cpu in lines.heartbeats.contains { $0.cpu == cpu && $0.seq >= 2 } }
        }
        guard ready else {
            throw TestFailure("\(name): the test guest did not get ready; console: \(process.consoleLines.suffix(10)); stderr: \(process.standardError)")
        }
    }

    /// The process's open descriptors, by what they point to.
    public func openFiles() -> [String] {
        let directory = "/proc/\(process.pid)/fd"
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        return entries.compactMap { try? FileManager.default.destinationOfSymbolicLink(atPath: "\(directory)/\($0)") }
    }

    /// A field of `/proc/PID/status` in kB (`VmSize`, `VmRSS`).
    public func statusKilobytes(_ field: String) -> UInt64? {
        let status = (try? String(contentsOfFile: "/proc/\(process.pid)/status", encoding: .utf8)) ?? ""
        guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix("\(field):") }) else { return nil }
        return line.split(separator: " ").dropFirst().first.flatMap { UInt64($0) }
    }

    /// Parses `2026-11-27T18:26:05.207974Z`.
    private static func secondsSince1970(_ text: String) -> Double? {
        let parts = text.dropLast().split(separator: ".")
        guard text.hasSuffix("Z"), parts.count == 2,
              let whole = ISO8601DateFormatter().date(from: "\(parts[0])Z"), let fraction = Double("0.\(parts[1])")
        else { return nil }
        return whole.timeIntervalSince1970 + fraction
    }
}

/// A receive under way on a destination: the `vm.receive-migration` call (which returns only when
/// the receive has ended) and the URL the destination listens on.
public struct IncomingMigration: Sendable {
    public let call: Task<Void, any Error>
    /// From `vm.migration-receive-ready`: with the real port where port 0 was asked for.
    public let url: String
    /// What the destination was asked to listen on.
    public let requestedURL: String

    init(call: Task<Void, any Error>, url: String, requestedURL: String) {
        self.call = call
        self.url = url
        self.requestedURL = requestedURL
    }

    /// The call's outcome: nil when it succeeded (204), else the error it threw.
    public func outcome() async -> (any Error)? {
        do {
            try await call.value
            return nil
        } catch {
            return error
        }
    }
}

/// The test guest as a VM configuration: `Guests/test-guest/README.md` has the command-line keys.
public struct TestGuestVM: Sendable {
    public var cpus: Int
    public var memoryMiB: Int
    /// Workload keys, e.g. `workset_mib=64 dirty_rate=2000`.
    public var workload: String
    /// Frequent heartbeats and verification passes, so that a test sees the guest continue quickly.
    public var reporting = "heartbeat_ms=200 verify_ms=500"

    /// virtio devices: a disk on a raw image, an entropy device, a console into a file.
    public struct Devices: Sendable {
        public var diskPath: String
        public var consolePath: String

        public init(diskPath: String, consolePath: String) {
            self.diskPath = diskPath
            self.consolePath = consolePath
        }

        /// A zero-filled 64 MiB image and a console file in `directory`.
        public init(in directory: TemporaryDirectory) throws {
            diskPath = directory.path("disk0.img")
            consolePath = directory.path("virtio-console.txt")
            guard FileManager.default.createFile(atPath: diskPath, contents: nil),
                  truncate(diskPath, 64 << 20) == 0 else { throw TestFailure("cannot make \(diskPath)") }
        }

        /// The disk's place for `vm.receive-migration` (shared storage on this one host).
        public var placements: [ReceiveMigrationData.DiskPlacement] { [.init(id: "disk0", path: diskPath)] }
    }

    public var devices: Devices?

    /// A virtio-net card on a tap, and the guest's network stack (its address, the host it
    /// streams numbered UDP datagrams to, and how many per second).
    public struct Network: Sendable {
        public var tap: String
        public var mac: String
        /// The tap's host end, if Ferry should configure it (a tap on a bridge has none).
        public var hostAddress: String?
        public var guestAddress: String
        public var peerAddress: String
        public var streamRate: Int
        public var streamPort: Int

        public init(tap: String, mac: String = "52:54:00:00:00:02", hostAddress: String? = nil, guestAddress: String = "10.0.0.2",
                    peerAddress: String = "10.0.0.1", streamRate: Int = 0, streamPort: Int = 5001) {
            self.tap = tap
            self.mac = mac
            self.hostAddress = hostAddress
            self.guestAddress = guestAddress
            self.peerAddress = peerAddress
            self.streamRate = streamRate
            self.streamPort = streamPort
        }

        /// The guest's command-line keys.
        public var guestKeys: String {
            "net_ip=\(guestAddress) net_peer=\(peerAddress) net_stream_rate=\(streamRate) net_stream_port=\(streamPort)"
        }
    }

    public var network: Network?
    /// Guest RAM is a memory file (`memory.shared`), as a local migration needs.
    public var sharedMemory: Bool

    public init(cpus: Int, memoryMiB: Int, workload: String, reporting: String = "heartbeat_ms=200 verify_ms=500",
                devices: Devices? = nil, network: Network? = nil, sharedMemory: Bool = false) {
        self.sharedMemory = sharedMemory
        self.cpus = cpus
        self.memoryMiB = memoryMiB
        self.workload = workload
        self.reporting = reporting
        self.devices = devices
        self.network = network
    }

    public var memoryBytes: UInt64 { UInt64(memoryMiB) << 20 }

    /// Rewrites its 128 MiB working set as fast as its vCPUs can, so pre-copy under a 1 ms downtime
    /// limit goes on pass after pass. It can still converge: a pass during which its vCPUs got no
    /// host CPU finds nothing dirty, and the sender switches over.
    public static let busy = TestGuestVM(cpus: 2, memoryMiB: 512, workload: "workset_mib=128 dirty_rate=max",
                                         reporting: "heartbeat_ms=100 verify_ms=500")
    /// The busy workload over 512 MiB: pass 0 carries the whole working set, long enough that a
    /// fault aimed at it lands in it even when the machine is loaded.
    public static let large = TestGuestVM(cpus: 2, memoryMiB: 1024, workload: "workset_mib=512 dirty_rate=max",
                                          reporting: "heartbeat_ms=100 verify_ms=1000")
    /// A light workload that converges under the default downtime limit.
    public static let calm = TestGuestVM(cpus: 2, memoryMiB: 256, workload: "workset_mib=16 dirty_rate=2000",
                                         reporting: "heartbeat_ms=100 verify_ms=300")

    /// The `vm.create` body; the console goes to the VMM's standard output.
    public func configuration(kernel: String, serial: String = #"{"mode": "Tty"}"#) -> Data {
        var deviceFields = ""
        if let devices {
            deviceFields = #", "disks": [{"path": "\#(devices.diskPath)", "id": "disk0"}], "rng": {"src": "/dev/urandom"}, "console": {"mode": "File", "file": "\#(devices.consolePath)"}"#
        }
        var commandLine = "\(workload) \(reporting)"
        if let network {
            let address = network.hostAddress.map { #", "ip": "\#($0)", "mask": "255.255.255.0""# } ?? ""
            deviceFields += #", "net": [{"tap": "\#(network.tap)", "mac": "\#(network.mac)"\#(address)}]"#
            commandLine += " " + network.guestKeys
        }
        return Data(#"{"cpus": {"boot_vcpus": \#(cpus)}, "memory": {"size": \#(memoryBytes)\#(sharedMemory ? #", "shared": true"# : "")}, "payload": {"kernel": "\#(kernel)", "cmdline": "\#(commandLine)"}, "serial": \#(serial)\#(deviceFields)}"#.utf8)
    }
}
