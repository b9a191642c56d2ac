import APIModels
import Events
import FerryClient
import FerryTestSupport
import HostOS
import Foundation
import Synchronization
import Testing

/// The test guest's network stack talking to the host's own (ping, UDP echo, the guest's
/// numbered stream) through Ferry's virtio-net on a tap, and through QEMU's; live migration
/// with the host pinging and exchanging datagrams throughout. Every tap, bridge and address
/// lives in network namespaces the test makes.
@Suite(.serialized, .enabled(if: Repository.kvmAvailable, needsKVM),
       .enabled(if: NetworkTools.tapsAvailable, NetworkTools.tapsUnavailable))
struct NetworkTests {
    static let hostAddress = "10.0.0.1", guestAddress = "10.0.0.2"
    static let mac = "52:54:00:00:00:02"

    @Test func theHostPingsAndExchangesUDPWithTheGuestThroughAFerryTap() async throws {
        let namespace = try await NetworkNamespace.make("net")
        let directory = try TemporaryDirectory()
        let vmm = try await TestVMM("ferry", in: directory, launcher: namespace.launcher)
        // Ferry creates the tap and gives its host end the address.
        let network = TestGuestVM.Network(tap: "ftap0", mac: Self.mac, hostAddress: Self.hostAddress, streamRate: 50)
        try await vmm.boot(TestGuestVM(cpus: 1, memoryMiB: 128, workload: "workset_mib=8", network: network))
        try await vmm.waitForConsoleLine { $0.hasPrefix("NET ready mac=\(Self.mac) link=1") }
        #expect(try await namespace.run(["addr", "show", "ftap0"]).contains("\(Self.hostAddress)/24"))
        let stream = try namespace.udpSocket(address: Self.hostAddress, port: 5001)

        #expect(await Self.answering(namespace), "the guest answers")
        let ping = try await Self.ping(namespace, count: 20, interval: "0.01")
        #expect(ping.received == 20, "the host kernel's pings are answered: \(ping.summary)")

        let host = HostSide(namespace: namespace)
        let echoed = try await host.echo(count: 100, size: 1000)
        #expect(echoed.answered == 100 && echoed.corrupted == 0, "UDP echo: \(echoed)")

        let sequence = try await offThePool { Self.receiveStream(stream, count: 20) }
        #expect(sequence.count == 20 && zip(sequence, sequence.dropFirst()).allSatisfy { $1 == $0 + 1 },
                "the guest's stream arrives in order without gaps: \(sequence)")

        let counters = try JSONDecoder().decode([String: [String: UInt64]].self, from: try await vmm.api.send(.vmCounters))
        let card = try #require(counters["net0"], "vm.counters has the card: \(counters)")
        #expect((card["rx_frames"] ?? 0) >= 120 && (card["tx_frames"] ?? 0) >= 140 && card["rx_dropped"] == 0 && card["tx_dropped"] == 0,
                "\(card)")
        let info = try await vmm.info()
        #expect(info.config.net?.first?.tap == "ftap0" && info.config.net?.first?.mac == Self.mac)
        #expect(vmm.process.consoleLines.deviceFailures.isEmpty)
        #expect(await vmm.shutDown())
    }

    @Test func theSameGuestTalksToTheHostThroughQEMUsVirtioNet() async throws {
        let qemu = try #require(qemuExecutable, "QEMU is needed")
        let namespace = try await NetworkNamespace.make("qemu-net")
        try await namespace.run(["tuntap", "add", "qtap0", "mode", "tap"])
        try await namespace.run(["addr", "add", "\(Self.hostAddress)/24", "dev", "qtap0"])
        try await namespace.run(["link", "set", "qtap0", "up"])
        let stream = try namespace.udpSocket(address: Self.hostAddress, port: 5001)
        let network = TestGuestVM.Network(tap: "qtap0", streamRate: 50)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: namespace.launcher[0])
        process.arguments = Array(namespace.launcher.dropFirst()) + [
            qemu, "-enable-kvm", "-cpu", "qemu64,-cx16,-xsave", "-m", "256M", "-smp", "1", "-nographic", "-no-reboot",
            "-kernel", try TestGuest.path.get(), "-append", "workset_mib=8 heartbeat_ms=500 \(network.guestKeys)",
            "-netdev", "tap,id=n0,ifname=qtap0,script=no,downscript=no",
            "-device", "virtio-net-pci,netdev=n0,mac=\(Self.mac),disable-legacy=on",
        ]
        // QEMU's console goes to a file: a pipe nobody drains would stall it.
        let directory = try TemporaryDirectory()
        let log = directory.path("qemu.txt")
        #expect(FileManager.default.createFile(atPath: log, contents: nil))
        let output = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        process.standardOutput = output
        process.standardError = output
        process.standardInput = FileHandle.nullDevice
        try process.run()
        defer {
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
        }
        let text = { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }
        let deadline = ContinuousClock.now + .seconds(60)
        // Up to the end of the line: QEMU may have written only part of it when the file is read.
        let ready = { text().split(separator: "\n").dropLast().contains { $0.contains("NET ready") } }
        while ContinuousClock.now < deadline, !ready() { try await Task.sleep(for: .milliseconds(50)) }
        #expect(text().contains("NET ready mac=\(Self.mac) link=1"), "the guest drives QEMU's card: \(text().suffix(500))")

        let ping = try await Self.ping(namespace, count: 20, interval: "0.01")
        #expect(ping.received == 20, "pings through QEMU: \(ping.summary)")
        let echoed = try await HostSide(namespace: namespace).echo(count: 100, size: 1000)
        #expect(echoed.answered == 100 && echoed.corrupted == 0, "UDP echo through QEMU: \(echoed)")
        let sequence = try await offThePool { Self.receiveStream(stream, count: 20) }
        #expect(sequence.count == 20 && zip(sequence, sequence.dropFirst()).allSatisfy { $1 == $0 + 1 }, "\(sequence)")
    }

    @Test func aGuestKeepsItsConnectionsThroughAMigrationOnOneHost() async throws {
        // One host: a bridge with the host's address and two taps on it, the source's and the destination's.
        let namespace = try await NetworkNamespace.make("net-mig")
        try await namespace.run(["link", "add", "br0", "type", "bridge"])
        try await namespace.run(["addr", "add", "\(Self.hostAddress)/24", "dev", "br0"])
        try await namespace.run(["link", "set", "br0", "up"])
        for tap in ["tapsrc", "tapdst"] {
            try await namespace.run(["tuntap", "add", tap, "mode", "tap"])
            try await namespace.run(["link", "set", tap, "master", "br0", "up"])
        }
        let directory = try TemporaryDirectory()
        let source = try await TestVMM("source", in: directory, launcher: namespace.launcher)
        let destination = try await TestVMM("destination", in: directory, launcher: namespace.launcher)
        let report = try await Self.migrateWithTraffic(
            hostSide: namespace, source: source, destination: destination, sourceTap: "tapsrc", destinationTap: "tapdst",
            url: "unix:\(directory.path("migration.sock"))", streamRate: 100)
        #expect(try await namespace.run(["neigh", "show", Self.guestAddress]).contains(Self.mac), "the guest kept its MAC")
        #expect(try await namespace.run(["link", "show", "master", "br0"]).contains("tapdst"))
        print("network migration, one host: \(report)")
    }

    @Test func aGuestKeepsItsConnectionsThroughAMigrationBetweenTwoHosts() async throws {
        // Two hosts, each with a bridge and its VMM's tap; the bridges are joined by a link (the
        // guests' network), the migration crosses another. The pinger is on the source host. The
        // guest sends nothing of its own here, so only Ferry's announcement tells the source's
        // bridge that the guest's MAC has moved behind the link (its old tap stays, unread).
        let hosts = try await offThePool { try TwoHosts() }
        for (namespace, peer) in [(hosts.source, "lan0"), (hosts.destination, "lan1")] {
            try await namespace.run(["link", "add", "br0", "type", "bridge"])
            try await namespace.run(["link", "set", "br0", "up"])
            try await namespace.run(["tuntap", "add", "tap0", "mode", "tap"])
            try await namespace.run(["link", "set", "tap0", "master", "br0", "up"])
            if peer == "lan0" {
                try await namespace.run(["link", "add", "lan0", "type", "veth", "peer", "name", "lan1", "netns", hosts.destination.name])
            }
            try await namespace.run(["link", "set", peer, "master", "br0", "up"])
        }
        try await hosts.source.run(["addr", "add", "\(Self.hostAddress)/24", "dev", "br0"])
        let directory = try TemporaryDirectory()
        let source = try await hosts.startVMM(on: .source, directory, "source")
        let destination = try await hosts.startVMM(on: .destination, directory, "destination")
        let report = try await Self.migrateWithTraffic(
            hostSide: hosts.source, source: source, destination: destination, sourceTap: "tap0", destinationTap: "tap0",
            url: "tcp:\(TwoHosts.destinationAddress):0", streamRate: 0)
        #expect(try await hosts.source.run(["neigh", "show", Self.guestAddress]).contains(Self.mac), "the guest kept its MAC")
        #expect(try await hosts.source.run(["link", "show", "master", "br0"]).contains("lan0"))
        print("network migration, two hosts: \(report)")
    }

    /// `--net fd=N`: a parent opens the tap (as libvirt does) and execs ferry with it as descriptor 3.
    @Test func aTapHandedOverAsADescriptorCarriesTheGuest() async throws {
        let namespace = try await NetworkNamespace.make("net-fd")
        let parent = """
            import fcntl, os, struct, sys
            tap = os.open("/dev/net/tun", os.O_RDWR)
            fcntl.ioctl(tap, 0x400454ca, struct.pack("16sH", b"ltap0", 0x0002 | 0x1000 | 0x4000))  # TUNSETIFF: tap, no PI, vnet header
            os.dup2(tap, 3); os.set_inheritable(3, True)
            os.execv(sys.argv[1], sys.argv[1:])
            """
        let guest = TestGuestVM.Network(tap: "unused")
        let ferry = try FerryProcess(
            arguments: Array(namespace.launcher.dropFirst()) + [
                "/usr/bin/python3", "-c", parent, Repository.ferry.path, "--kernel", try TestGuest.path.get(), "--memory", "size=128M", "--serial", "tty",
                "--cmdline", "workset_mib=8 heartbeat_ms=500 \(guest.guestKeys)", "--net", "fd=3,mac=\(Self.mac)",
            ],
            executable: URL(fileURLWithPath: namespace.launcher[0]))
        defer { ferry.signal(SIGTERM) }
        #expect(await waitUntil(.seconds(60)) { ferry.consoleLines.contains { $0.hasPrefix("NET ready mac=\(Self.mac)") } },
                "stderr: \(ferry.standardError)")
        try await namespace.run(["addr", "add", "\(Self.hostAddress)/24", "dev", "ltap0"])
        #expect(try await namespace.run(["link", "show", "ltap0"]).contains("UP"), "ferry brought the inherited tap up")
        #expect(await Self.answering(namespace), "the guest answers")
        let ping = try await Self.ping(namespace, count: 10, interval: "0.02")
        #expect(ping.received == 10, "\(ping.summary)")
        ferry.signal(SIGTERM)
        #expect(try await offThePool { ferry.waitForExit(timeout: .seconds(20)) } == 0)
    }

    /// Tap descriptors sent with requests on an inherited API socket (libvirt's way: SCM_RIGHTS
    /// with `vm.add-net` before boot, with `vm.restore`'s and `vm.receive-migration`'s `net_fds`)
    /// carry the guest, also after a reboot on the same descriptor; requests the descriptors
    /// cannot serve are refused.
    @Test func tapDescriptorsSentOnTheAPISocketCarryTheGuest() async throws {
        let namespace = try await NetworkNamespace.make("net-passed")
        let directory = try TemporaryDirectory()
        let socket = directory.path("api.sock")
        let parent = """
            import os, socket, sys
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(sys.argv[1] + ".new"); listener.listen(16)
            os.rename(sys.argv[1] + ".new", sys.argv[1])
            os.dup2(listener.fileno(), 3); os.set_inheritable(3, True)
            os.execv(sys.argv[2], [sys.argv[2], "--api-socket", "fd=3", "--serial", "tty"])
            """
        // Opens each named tap and sends the request with their descriptors; prints the status line.
        let sender = """
            import fcntl, os, socket, struct, sys
            path, endpoint, body = sys.argv[1:4]
            fds = []
            for name in sys.argv[4:]:
                tap = os.open("/dev/net/tun", os.O_RDWR)
                fcntl.ioctl(tap, 0x400454ca, struct.pack("16sH", name.encode(), 0x0002 | 0x1000 | 0x4000))
                fds.append(tap)
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); connection.connect(path)
            request = ("PUT /api/v1/%s HTTP/1.1\\r\\nHost: localhost\\r\\nContent-Type: application/json\\r\\n"
                       "Content-Length: %d\\r\\n\\r\\n%s" % (endpoint, len(body), body)).encode()
            control = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))] if fds else []
            connection.sendmsg([request], control)
            answer = connection.recv(4096).decode()
            print(answer.split("\\r\\n")[0], answer.split("\\r\\n\\r\\n")[-1])
            """
        @Sendable func send(to api: String = socket, _ endpoint: String, _ body: String, taps: [String]) async throws -> String {
            try await offThePool {
                try runTool(namespace.launcher[0], Array(namespace.launcher.dropFirst())
                            + ["/usr/bin/python3", "-c", sender, api, endpoint, body] + taps)
            }
        }
        func start(on api: String) throws -> FerryProcess {
            try FerryProcess(arguments: Array(namespace.launcher.dropFirst()) + ["/usr/bin/python3", "-c", parent, api, Repository.ferry.path],
                             executable: URL(fileURLWithPath: namespace.launcher[0]))
        }
        let ferry = try start(on: socket)
        defer { ferry.signal(SIGKILL) }
        #expect(APILifecycleTests.waitForFile(socket, timeout: .seconds(20)))
        let client = APIClient(socketPath: socket)
        let guest = TestGuestVM(cpus: 1, memoryMiB: 128, workload: "workset_mib=8",
                                reporting: "heartbeat_ms=500 \(TestGuestVM.Network(tap: "unused").guestKeys)")
        try await client.send(.vmCreate, body: guest.configuration(kernel: try TestGuest.path.get()))
        let card = #"{"id": "net0", "mac": "\#(Self.mac)", "num_queues": 2}"#
        #expect(try await send("vm.add-net", card, taps: ["ptap1", "ptap2"]).contains("400"), "two descriptors: two queue pairs")
        #expect(try await send("vm.add-net", #"{"id": "net0", "fds": [3]}"#, taps: []).contains("400"), "descriptor numbers in the body")
        #expect(try await send("vm.add-net", card, taps: ["ptap0"]).hasPrefix("HTTP/1.1 204"))
        #expect(try await !namespace.run(["link", "show"]).contains("ptap1"), "the refused request's taps were closed (and went away)")
        try await client.send(.vmBoot)
        #expect(await waitUntil(.seconds(60)) { ferry.consoleLines.contains { $0.hasPrefix("NET ready mac=\(Self.mac)") } },
                "stderr: \(ferry.standardError)")
        try await namespace.run(["addr", "add", "\(Self.hostAddress)/24", "dev", "ptap0"])
        #expect(await Self.answering(namespace), "the guest answers")
        #expect(try await Self.ping(namespace, count: 5, interval: "0.05").received == 5, "through the descriptor sent with vm.add-net")
        #expect(try await send("vm.add-net", #"{"id": "net1", "mac": "52:54:00:00:00:09"}"#, taps: ["ptap3"]).contains("409"),
                "no hotplug into a running guest")

        let mark = ferry.consoleLines.count
        try await client.send(.vmReboot)
        #expect(await waitUntil(.seconds(60)) { ferry.consoleLines[mark...].contains { $0.hasPrefix("NET ready") } }, "the rebooted guest has its card")
        // Whether the card works, not how fast the rebooted guest's stack starts answering on a
        // loaded machine: some replies are enough.
        #expect(try await Self.ping(namespace, count: 10, interval: "0.1").received > 0, "the same descriptor after a reboot")

        try await client.send(.vmPause)
        let snapshot = directory.path("snapshot")
        try await client.send(.vmSnapshot, body: Data(#"{"destination_url": "file://\#(snapshot)"}"#.utf8))
        try await client.send(.vmDelete)
        let restore = #"{"source_url": "file://\#(snapshot)", "resume": true, "net_fds": [{"id": "net0", "num_fds": 1}]}"#
        #expect(try await send("vm.restore", restore, taps: []).contains("400"), "net_fds without descriptors")
        #expect(try await send("vm.restore", restore, taps: ["ptap0"]).hasPrefix("HTTP/1.1 204"))
        try await namespace.run(["addr", "replace", "\(Self.hostAddress)/24", "dev", "ptap0"])
        #expect(try await Self.ping(namespace, count: 10, interval: "0.1").received > 0, "through the descriptor sent with vm.restore")

        // A migration to a second Ferry, whose receive places the card on a descriptor it sent.
        let destinationSocket = directory.path("destination.sock")
        let destination = try start(on: destinationSocket)
        defer { destination.signal(SIGKILL) }
        #expect(APILifecycleTests.waitForFile(destinationSocket, timeout: .seconds(20)))
        let migrationSocket = directory.path("migration.sock")
        let receiveBody = #"{"receiver_url": "unix:\#(migrationSocket)", "serial": {"mode": "Tty"}, "net_fds": [{"id": "net0", "num_fds": 1}]}"#
        let receive = Task { try await send(to: destinationSocket, "vm.receive-migration", receiveBody, taps: ["ptap5"]) }
        #expect(await waitUntil(.seconds(30)) { FileManager.default.fileExists(atPath: migrationSocket) }, "the destination listens")
        try await client.send(.vmSendMigration, body: Data(#"{"destination_url": "unix:\#(migrationSocket)"}"#.utf8))
        #expect(try await receive.value.hasPrefix("HTTP/1.1 204"), "the guest arrived on the descriptor sent with vm.receive-migration")
        #expect(try await offThePool { ferry.waitForExit(timeout: .seconds(30)) } == 0, "the source ends with its migrated VM")
        try await namespace.run(["addr", "add", "\(Self.hostAddress)/24", "dev", "ptap5"])
        #expect(try await Self.ping(namespace, count: 10, interval: "0.1").received > 0, "through the descriptor sent with vm.receive-migration")
        try await APIClient(socketPath: destinationSocket).send(.vmmShutdown)
        #expect(try await offThePool { destination.waitForExit(timeout: .seconds(20)) } == 0)
    }

    @Test func aRestoredGuestAnswersOnTheSameTap() async throws {
        let namespace = try await NetworkNamespace.make("net-snap")
        let directory = try TemporaryDirectory()
        let source = try await TestVMM("source", in: directory, launcher: namespace.launcher)
        let network = TestGuestVM.Network(tap: "ftap0", mac: Self.mac, hostAddress: Self.hostAddress)
        try await source.boot(TestGuestVM(cpus: 1, memoryMiB: 128, workload: "workset_mib=8", network: network))
        try await source.waitForConsoleLine { $0.hasPrefix("NET ready") }
        #expect(await Self.answering(namespace), "the guest answers")
        #expect(try await Self.ping(namespace, count: 5, interval: "0.05").received == 5)
        try await source.api.send(.vmPause)
        let snapshot = directory.path("snapshot")
        try await source.api.send(.vmSnapshot, body: Data(#"{"destination_url": "file://\#(snapshot)"}"#.utf8))
        #expect(await source.shutDown())

        // The tap Ferry created went with the source; the restored VM creates it again, with its address.
        let target = try await TestVMM("target", in: directory, launcher: namespace.launcher)
        try await target.api.send(.vmRestore, body: Data(#"{"source_url": "file://\#(snapshot)", "resume": true}"#.utf8))
        #expect(await Self.answering(namespace), "the restored guest answers")
        let ping = try await Self.ping(namespace, count: 20, interval: "0.01")
        #expect(ping.received == 20, "the restored guest answers: \(ping.summary)")
        let echoed = try await HostSide(namespace: namespace).echo(count: 20, size: 500)
        #expect(echoed.answered == 20, "\(echoed)")
        #expect(!target.process.consoleLines.contains { $0.hasPrefix("NET ready") }, "the guest did not set its card up again")
        #expect(await target.shutDown())
    }

    @Test func aReceiveThatDoesNotPlaceTheCardFailsNamingItAndTheGuestRunsOn() async throws {
        let namespace = try await NetworkNamespace.make("net-place")
        let directory = try TemporaryDirectory()
        let source = try await TestVMM("source", in: directory, launcher: namespace.launcher)
        let destination = try await TestVMM("destination", in: directory, launcher: namespace.launcher)
        let network = TestGuestVM.Network(tap: "ftap0", mac: Self.mac, hostAddress: Self.hostAddress)
        try await source.boot(TestGuestVM(cpus: 1, memoryMiB: 128, workload: "workset_mib=8", network: network))
        let receive = try await destination.startReceive(at: "unix:\(directory.path("m.sock"))")
        let id = try await source.startSend(to: receive.url)
        let end = try await source.waitForEvent(MigrationStreams.sourceTerminal, id: id)
        #expect(end.name == "vm.migration-failed")
        let failed = try await destination.waitForEvent(MigrationStreams.destinationTerminal, id: id)
        #expect(failed.name == "vm.migration-receive-failed" && (failed.properties["error"] ?? "").contains("net net0"),
                "\(failed.properties)")
        #expect(try await source.info().state == "Running")
        #expect(try await Self.ping(namespace, count: 5, interval: "0.05").received == 5, "the guest still answers on the source")

        // Another VMM cannot take the busy tap: a 400 that names the card, nothing created.
        await #expect(throws: APIError.self) {
            try await destination.api.send(.vmCreate, body: TestGuestVM(cpus: 1, memoryMiB: 64, workload: "", network: network)
                .configuration(kernel: try TestGuest.path.get()))
        }
        #expect(await source.shutDown())
        #expect(await destination.shutDown())
    }

    @Test func badNetFlagsFailBeforeAnythingStarts() async throws {
        let namespace = try await NetworkNamespace.make("net-flags")
        try await namespace.run(["link", "add", "br9", "type", "bridge"])
        let kernel = try TestGuest.path.get()
        // Without CAP_NET_ADMIN (dropped from the bounding set, so the exec'd ferry lacks it) no tap can be made.
        let unprivileged = FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv")
            ? ["/usr/bin/setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin"] : nil
        var cases: [(prefix: [String], flag: String, message: String)] = [
            ([], "tap=t0,mac=52:54:00:00:00", "is not a MAC address"), ([], "tap=t0,queue_size=100", "not a power of two"),
            ([], "tap=br9", "exists and is not a tap"), ([], "tap=this-name-is-too-long", "not a valid interface name"),
        ]
        if let unprivileged { cases.append((unprivileged, "tap=t0", "needs CAP_NET_ADMIN")) }
        for (prefix, flag, message) in cases {
            let process = try FerryProcess(arguments: Array(namespace.launcher.dropFirst()) + prefix
                                           + [Repository.ferry.path, "--kernel", kernel, "--net", flag],
                                           executable: URL(fileURLWithPath: namespace.launcher[0]))
            #expect(try await offThePool { process.waitForExit(timeout: .seconds(30)) } != 0)
            #expect(process.standardError.contains("--net") && process.standardError.contains(message), "\(flag): \(process.standardError)")
        }
        #expect(try await !namespace.run(["link", "show"]).contains("t0:"), "no tap was left behind")
    }

    // MARK: Traffic through a migration

    /// Boots the guest on `source` (tap `sourceTap`), then migrates it to `destination` (tap
    /// `destinationTap`) while the host side pings it every 10 ms, sends it a numbered UDP
    /// datagram every 10 ms to echo, and receives its numbered stream (100 per second). Checks
    /// what the issue promises and returns the figures.
    static func migrateWithTraffic(hostSide: NetworkNamespace, source: TestVMM, destination: TestVMM, sourceTap: String,
                                   destinationTap: String, url: String, streamRate: Int) async throws -> String {
        let stream = try hostSide.udpSocket(address: hostAddress, port: 5001)
        let network = TestGuestVM.Network(tap: sourceTap, mac: mac, streamRate: streamRate)
        try await source.boot(TestGuestVM(cpus: 1, memoryMiB: 256, workload: "workset_mib=32 dirty_rate=1000", network: network))
        try await source.waitForConsoleLine { $0.hasPrefix("NET peer found") }

        let traffic = try await offThePool { try Traffic(hostSide: hostSide, stream: stream) }
        try await Task.sleep(for: .seconds(1))
        let receive = try await destination.startReceive(at: url, net: [.init(id: "net0", tap: destinationTap)])
        let id = try await source.startSend(to: receive.url)
        let end = try await source.waitForEvent(MigrationStreams.sourceTerminal, id: id)
        try #require(end.name == "vm.migration-finished", "\(end.properties)")
        try await receive.call.value
        try await Task.sleep(for: .seconds(2))
        let result = try await offThePool { try traffic.stop() }

        let paused = try #require(source.events().last { $0.name == "vm.paused" })
        let resumed = try #require(destination.events().last { $0.name == "vm.resumed" })
        let stop = source.date(of: paused), resume = destination.date(of: resumed)
        let pause = resume.timeIntervalSince(stop)
        // Datagrams sent this close to the pause may meet a stopped guest or a bridge that has not
        // yet learned the new port (it learns from the announcement right after the resume).
        let window = stop.addingTimeInterval(-0.1)...resume.addingTimeInterval(0.2)

        let lostOutside = result.echoSent.filter { !result.echoed.keys.contains($0.key) && !window.contains($0.value) }
        #expect(lostOutside.isEmpty, "no echo datagram is lost outside the pause window: \(lostOutside.keys.sorted().prefix(10))")
        #expect(result.echoDuplicates == 0, "no echo arrives twice")
        let after = result.echoOrder.filter { (result.echoSent[$0] ?? .distantPast) > window.upperBound }
        #expect(after.count > 100 && zip(after, after.dropFirst()).allSatisfy { $0 < $1 }, "echoes after the pause come in order")
        let streamSeqs = result.stream.map(\.seq)
        if streamRate > 0 {
            #expect(streamSeqs.count > 200 && zip(streamSeqs, streamSeqs.dropFirst()).allSatisfy { $1 == $0 + 1 },
                    "the guest's own stream loses, repeats and reorders nothing: \(Self.gaps(streamSeqs))")
        }
        #expect(result.ping.received > 0 && result.ping.lastAnswered, "pings are answered after the migration: \(result.ping.summary)")
        let firstOnDestination = result.echoed.filter { (result.echoSent[$0.key] ?? .distantPast) > resume }
            .min { $0.value < $1.value }.map { $0.value.timeIntervalSince(resume) }
        let lostEchoes = result.echoSent.count - result.echoed.count
        #expect(destination.process.consoleLines.deviceFailures.isEmpty)
        #expect(await destination.shutDown())
        let streamText = streamRate > 0 ? "guest stream \(streamSeqs.count) datagrams, none lost or repeated" : "no guest stream"
        return String(format: "pause %.1f ms (source vm.paused → destination vm.resumed); pings lost %d of %d; echo datagrams lost %d of %d; "
                      + "first echo answered on the destination %.1f ms after its resume; ",
                      pause * 1000, result.ping.transmitted - result.ping.received, result.ping.transmitted, lostEchoes,
                      result.echoSent.count, (firstOnDestination ?? .nan) * 1000) + streamText
    }

    static func gaps(_ values: [UInt64]) -> [String] {
        zip(values, values.dropFirst()).filter { $1 != $0 + 1 }.prefix(10).map { "\($0)→\($1)" }
    }

    struct PingResult: Sendable {
        var transmitted = 0, received = 0
        var lastAnswered = false
        var summary = ""
    }

    /// Runs ping(8) `count` times in `namespace`, off the concurrency pool.
    /// Waits, at most 30 s, until the guest answers a ping: a guest that has just started (or
    /// been restored) on a loaded host may take more than ping's second to answer its first
    /// one. The pings after it measure the steady state.
    static func answering(_ namespace: NetworkNamespace) async -> Bool {
        for _ in 0..<30 {
            if let result = try? await ping(namespace, count: 1, interval: "0.2"), result.received == 1 { return true }
        }
        return false
    }

    static func ping(_ namespace: NetworkNamespace, count: Int, interval: String) async throws -> PingResult {
        let ping = try #require(NetworkTools.ping)
        return try await offThePool { try pingBlocking(namespace, ping: ping, count: count, interval: interval) }
    }

    private static func pingBlocking(_ namespace: NetworkNamespace, ping: String, count: Int, interval: String) throws -> PingResult {
        let output = try runTool(namespace.launcher[0], Array(namespace.launcher.dropFirst()) + [
            ping, "-n", "-q", "-c", "\(count)", "-i", interval, "-W", "1", guestAddress,
        ])
        return parsePing(output)
    }

    static func parsePing(_ output: String) -> PingResult {
        var result = PingResult(summary: output.split(separator: "\n").suffix(2).joined(separator: "; "))
        if let line = output.split(separator: "\n").first(where: { $0.contains("packets transmitted") }) {
            let numbers = line.split(separator: " ").compactMap { Int($0) }
            if numbers.count >= 2 { (result.transmitted, result.received) = (numbers[0], numbers[1]) }
        }
        return result
    }

    /// The next `count` sequence numbers of the guest's stream (within 10 s).
    static func receiveStream(_ socket: UDPSocket, count: Int) -> [UInt64] {
        var sequence: [UInt64] = []
        while sequence.count < count, let datagram = socket.receive(timeout: .seconds(10)), datagram.count >= 8 {
            sequence.append(datagram.littleEndian(UInt64.self, at: 0) ?? 0)
        }
        return sequence
    }
}

/// The host's end of UDP echo: numbered datagrams to the guest's port 7 and their echoes.
struct HostSide: Sendable {
    let namespace: NetworkNamespace

    struct Echo: CustomStringConvertible, Sendable {
        var answered = 0, corrupted = 0
        var description: String { "\(answered) answered, \(corrupted) corrupted" }
    }

    /// Sends `count` datagrams of `size` bytes one after the other, each waiting for its echo
    /// (off the concurrency pool).
    func echo(count: Int, size: Int) async throws -> Echo {
        try await offThePool { try echoBlocking(count: count, size: size) }
    }

    private func echoBlocking(count: Int, size: Int) throws -> Echo {
        let socket = try namespace.udpSocket(address: NetworkTests.hostAddress)
        var result = Echo()
        for index in 0..<count {
            let payload = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ index) }
            socket.send(payload, to: NetworkTests.guestAddress, port: 7)
            guard let answer = socket.receive(timeout: .seconds(2)) else { continue }
            if answer == payload { result.answered += 1 } else { result.corrupted += 1 }
        }
        return result
    }
}

/// Traffic during a migration: ping every 10 ms, a numbered echo datagram every 10 ms, and the
/// guest's stream, each with the times things were sent and received.
final class Traffic: @unchecked Sendable {
    struct Result {
        var ping: NetworkTests.PingResult
        var echoSent: [UInt64: Date]
        var echoed: [UInt64: Date]
        var echoOrder: [UInt64]
        var echoDuplicates: Int
        var stream: [(seq: UInt64, at: Date)]
    }

    private let running = Atomic(true)
    private let sending = Atomic(true)
    private let pinger = Process()
    private let pingOutput = Pipe()
    private let state = Mutex(Result(ping: .init(), echoSent: [:], echoed: [:], echoOrder: [], echoDuplicates: 0, stream: []))
    private var threads: [Thread] = []
    private let finished = DispatchGroup()

    init(hostSide: NetworkNamespace, stream: UDPSocket) throws {
        pinger.executableURL = URL(fileURLWithPath: hostSide.launcher[0])
        pinger.arguments = Array(hostSide.launcher.dropFirst()) + [
            try #require(NetworkTools.ping), "-n", "-i", "0.01", "-W", "1", NetworkTests.guestAddress,
        ]
        pinger.standardOutput = pingOutput
        pinger.standardError = pingOutput
        try pinger.run()
        let echo = try hostSide.udpSocket(address: NetworkTests.hostAddress)
        start {
            var sequence: UInt64 = 0
            while self.sending.load(ordering: .relaxed) {
                let payload = withUnsafeBytes(of: sequence.littleEndian, Array.init) + [UInt8](repeating: 0xA5, count: 56)
                self.state.withLock { $0.echoSent[sequence] = Date() }
                echo.send(payload, to: NetworkTests.guestAddress, port: 7)
                sequence += 1
                Thread.sleep(forTimeInterval: 0.01)
            }
        }
        start {
            while self.running.load(ordering: .relaxed) {
                guard let answer = echo.receive(timeout: .milliseconds(100)), answer.count >= 8 else { continue }
                let seq = answer.littleEndian(UInt64.self, at: 0) ?? 0
                let now = Date()
                self.state.withLock { state in
                    if state.echoed.updateValue(now, forKey: seq) != nil { state.echoDuplicates += 1 } else { state.echoOrder.append(seq) }
                }
            }
        }
        start {
            while self.running.load(ordering: .relaxed) {
                guard let datagram = stream.receive(timeout: .milliseconds(100)), datagram.count >= 8 else { continue }
                let seq = datagram.littleEndian(UInt64.self, at: 0) ?? 0
                let now = Date()
                self.state.withLock { $0.stream.append((seq, now)) }
            }
        }
    }

    private func start(_ body: @escaping @Sendable () -> Void) {
        finished.enter()
        let thread = Thread { [finished] in
            body()
            finished.leave()
        }
        thread.start()
        threads.append(thread)
    }

    /// Stops everything and returns what happened.
    func stop() throws -> Result {
        // Stop sending, then give the last echoes time to come back before the receivers stop.
        sending.store(false, ordering: .relaxed)
        pinger.interrupt()
        let output = String(decoding: pingOutput.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        pinger.waitUntilExit()
        Thread.sleep(forTimeInterval: 0.5)
        running.store(false, ordering: .relaxed)
        finished.wait()
        var result = state.withLock { $0 }
        result.ping = NetworkTests.parsePing(output)
        // The last five replies before the interrupt: the guest answers on the destination.
        let replies = output.split(separator: "\n").filter { $0.contains("bytes from") }
        let lastSequences = replies.suffix(5).compactMap { line in
            line.split(separator: " ").first { $0.hasPrefix("icmp_seq=") }.flatMap { Int($0.dropFirst("icmp_seq=".count)) }
        }
        result.ping.lastAnswered = lastSequences.count == 5 && (lastSequences.last ?? 0) >= result.ping.transmitted - 20
        return result
    }
}
