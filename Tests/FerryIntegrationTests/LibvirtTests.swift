import APIModels
import FerryClient
import FerryTestSupport
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// libvirt's own Cloud Hypervisor driver (libvirt 11.3, as Debian 13 ships it, built by
/// `scripts/libvirt-ch`) manages Ferry installed as `cloud-hypervisor`: it starts the VMM, reads
/// its pseudo-terminals from `vm.info`, finds its vCPU threads, suspends, resumes, saves, shuts
/// down and destroys the domain, and follows the guest's own power-off through the event monitor.
@Suite(.enabled(if: Libvirt.available, Libvirt.skipReason), .serialized)
struct LibvirtTests {
    @Test func libvirtsChDriverManagesFerry() async throws {
        let daemon = try await Libvirt.Daemon.start()
        defer { daemon.stop() }
        let name = "ferry-test-\(getpid())"
        let domain = try daemon.domain(name: name, commandLine: "workset_mib=1 heartbeat_ms=100")
        defer { domain.cleanUp() }

        // define + start: the VMM runs as libvirt's child's child, named in libvirt's pidfile.
        try await daemon.virsh(["define", domain.xmlPath])
        try await daemon.virsh(["start", name])
        #expect(try await daemon.state(of: name) == "running")
        let info = try await daemon.virsh(["dominfo", name])
        #expect(info.contains("CPU(s):         2") && info.contains("Max memory:     131072 KiB"), "\(info)")

        // The vCPU threads, by their names (vcpu0, vcpu1).
        let vcpus = try await daemon.virsh(["vcpuinfo", name])
        #expect(vcpus.contains("VCPU:           0") && vcpus.contains("VCPU:           1"), "\(vcpus)")
        #expect(!vcpus.contains("not supported"), "\(vcpus)")

        // The pseudo-terminals libvirt read from vm.info: COM1 and the virtio console.
        let xml = try await daemon.virsh(["dumpxml", name])
        let terminals = xml.matches(of: /<source path='(\/dev\/pts\/\d+)'\/>/).map { String($0.1) }
        #expect(terminals.count == 2 && Set(terminals).count == 2, "a pty each for serial and console: \(xml)")
        if terminals.count == 2 {
            let serial = try TerminalClient(path: terminals[0])
            let console = try TerminalClient(path: terminals[1])
            #expect(try await serial.read(until: "HEARTBEAT cpu=1 ", timeout: .seconds(60)), "serial: \(serial.received)")
            #expect(try await console.read(until: "CONSOLE seq=", timeout: .seconds(60)), "console: \(console.received)")
        }

        try await daemon.virsh(["suspend", name])
        #expect(try await daemon.state(of: name) == "paused")
        try await daemon.virsh(["resume", name])
        #expect(try await daemon.state(of: name) == "running")

        // save: vm.pause and vm.snapshot into the directory libvirt names.
        var vmm = try daemon.vmmPID(of: name)
        let saved = domain.directory.path("saved")
        try await daemon.virsh(["save", name, saved])
        #expect(try await daemon.state(of: name) == "shut off")
        #expect(FileManager.default.fileExists(atPath: "\(saved)/snapshot.json")
                && FileManager.default.fileExists(atPath: "\(saved)/libvirt-save.xml"))
        Libvirt.reap(vmm)  // libvirt 11.3 leaves its daemonized VMM running after a save

        // restore: libvirt 11.3 fails before it talks to the VMM (its restore path never sets the
        // pidfile it then reads), whatever the VMM; the save itself restores in Ferry.
        await #expect {
            try await daemon.virsh(["restore", saved])
        } throws: { "\($0)".contains("failed to create connection to CH socket") }
        Libvirt.reapVMMs(of: name, daemon: daemon)
        try await Self.expectRestorable(saved, in: domain.directory)

        // shutdown: vm.shutdown, then the vm.shutdown event tells libvirt the domain is off.
        try await daemon.virsh(["start", name])
        vmm = try daemon.vmmPID(of: name)
        try await daemon.virsh(["shutdown", name])
        #expect(await daemon.waitForState(of: name, "shut off"), "the shutdown event reached libvirt")
        Libvirt.reap(vmm)

        // destroy: libvirt's own act; the domain is off at once.
        try await daemon.virsh(["start", name])
        vmm = try daemon.vmmPID(of: name)
        try await daemon.virsh(["destroy", name])
        #expect(try await daemon.state(of: name) == "shut off")
        Libvirt.reap(vmm)

        // The guest powers off by itself: libvirt learns it from the event monitor alone.
        try domain.writeXML(commandLine: "workset_mib=1 heartbeat_ms=100 poweroff_s=2")
        try await daemon.virsh(["define", domain.xmlPath])
        try await daemon.virsh(["start", name])
        vmm = try daemon.vmmPID(of: name)
        #expect(await daemon.waitForState(of: name, "shut off", timeout: .seconds(60)), "the guest's power-off reached libvirt")
        Libvirt.reap(vmm)

        try await daemon.virsh(["undefine", name])
        #expect(try await !daemon.virsh(["list", "--all", "--name"]).contains(name))
    }

    /// libvirt's own network card: in a namespace of the test's, libvirt creates a tap for an
    /// `<interface type='ethernet'>` and hands Ferry its descriptor with `vm.add-net` (SCM_RIGHTS
    /// on the API socket it inherited); the guest answers the host's pings through it.
    @Test(.enabled(if: NetworkTools.tapsAvailable, NetworkTools.tapsUnavailable))
    func libvirtsTapReachesTheGuestThroughTheAPISocket() async throws {
        let namespace = try await NetworkNamespace.make("libvirt")
        let daemon = try await Libvirt.Daemon.start(launcher: namespace.launcher)
        defer { daemon.stop() }
        let name = "ferry-net-\(getpid())"
        let guest = TestGuestVM.Network(tap: "lvtap0")
        let domain = try daemon.domain(name: name, commandLine: "workset_mib=1 heartbeat_ms=200 \(guest.guestKeys)",
                                       interface: (tap: guest.tap, mac: guest.mac))
        defer { domain.cleanUp() }
        try await daemon.virsh(["create", domain.xmlPath])
        let vmm = try daemon.vmmPID(of: name)
        defer { Libvirt.reap(vmm) }
        try await namespace.run(["address", "add", "\(guest.peerAddress)/24", "dev", guest.tap])
        try await namespace.run(["link", "set", guest.tap, "up"])
        let ping = try #require(NetworkTools.ping)
        var replies = 0
        for _ in 0..<3 where replies == 0 {
            let output = (try? await offThePool {
                try runTool(namespace.launcher[0], Array(namespace.launcher.dropFirst())
                            + [ping, "-n", "-c", "5", "-i", "0.2", "-W", "2", guest.guestAddress])
            }) ?? ""
            replies = output.split(separator: "\n").filter { $0.contains("bytes from \(guest.guestAddress)") }.count
        }
        #expect(replies > 0, "the guest answers pings through the tap libvirt made")
        let api = APIClient(socketPath: "\(Libvirt.stateDirectory)/\(name)-socket")
        let info = try JSONDecoder().decode(VmInfo.self, from: try await api.send(.vmInfo))
        #expect(info.config.net?.first?.mac == guest.mac && info.config.net?.first?.tap == nil,
                "the card is on the descriptor libvirt sent: \(String(describing: info.config.net))")
        try await daemon.virsh(["destroy", name])
    }

    /// The directory libvirt saved into restores in a Ferry of its own, and the guest goes on.
    static func expectRestorable(_ saved: String, in directory: TemporaryDirectory) async throws {
        let vmm = try await TestVMM("restorer", in: directory)
        try await vmm.api.send(.vmRestore, body: try JSONEncoder().encode(RestoreConfig(source_url: "file://\(saved)", resume: true)))
        let info = try await vmm.info()
        #expect(info.state == "Running" && info.config.serial?.mode == "Pty", "\(info)")
        let serial = try TerminalClient(path: try #require(info.config.serial?.file))
        #expect(try await serial.read(until: "HEARTBEAT cpu=0 ", timeout: .seconds(60)), "the restored guest goes on: \(serial.received)")
        #expect(await vmm.shutDown())
    }
}

/// libvirt as `scripts/libvirt-ch` builds it, and a private ch daemon.
enum Libvirt {
    static let prefix = Repository.root.appendingPathComponent(".build-libvirt/prefix").path
    static let virtchd = prefix + "/sbin/virtchd"
    static let virsh = prefix + "/bin/virsh"
    /// Where libvirt's ch driver keeps each domain's socket, FIFO and pidfile.
    static let stateDirectory = prefix + "/var/run/libvirt/ch"

    static var available: Bool {
        FileManager.default.isExecutableFile(atPath: virtchd) && FileManager.default.isExecutableFile(atPath: virsh)
            && Repository.kvmAvailable && getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/bin/unshare")
    }

    static let skipReason: Comment = "needs libvirt's ch driver (scripts/libvirt-ch builds it), /dev/kvm, root and unshare(1)"

    /// Ends a VMM libvirt left running (libvirt 11.3 signals only its own children, and the VMM
    /// it starts is its child's child), or a daemon of this test's: only while `pid` is still
    /// such a process, never one that took the pid over.
    static func reap(_ pid: pid_t?) {
        guard let pid, pid > 0, isOurs(pid) else { return }
        kill(pid, SIGKILL)
        let deadline = ContinuousClock.now + .seconds(10)
        while isOurs(pid), ContinuousClock.now < deadline { usleep(20_000) }
    }

    /// Whether `pid` runs a VMM started as `cloud-hypervisor` or this build's virtchd (a zombie
    /// has no command line any more).
    private static func isOurs(_ pid: pid_t) -> Bool {
        guard let command = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
        let text = String(decoding: command, as: UTF8.self)
        return text.contains("cloud-hypervisor") || text.contains(virtchd)
    }

    /// Ends every VMM started for `name` (found by its event FIFO's path on its command line).
    static func reapVMMs(of name: String, daemon: Daemon) {
        let fifo = "\(stateDirectory)/\(name)-event-monitor-fifo"
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = pid_t(entry),
                  let command = FileManager.default.contents(atPath: "/proc/\(entry)/cmdline"),
                  String(decoding: command, as: UTF8.self).contains(fifo) else { continue }
            reap(pid)
        }
    }

    /// A virtchd in a private mount namespace without the cgroup tree (so that libvirt sets up
    /// no cgroups), with `ferry` as the `cloud-hypervisor` on its PATH.
    final class Daemon: Sendable {
        let directory: TemporaryDirectory
        let pidFile: String
        let process: Process

        /// `launcher` runs the daemon, e.g. inside a network namespace (`ip netns exec NAME`).
        static func start(launcher: [String] = []) async throws -> Daemon {
            let daemon = try Daemon(launcher: launcher)
            // Generous: with every suite running at once, starting the daemon has taken over 30 s.
            let deadline = ContinuousClock.now + .seconds(120)
            while true {
                do {
                    try await daemon.virsh(["version"])
                    return daemon
                } catch {
                    guard daemon.process.isRunning, ContinuousClock.now < deadline else {
                        let state = daemon.process.isRunning ? "running" : "exited with status \(daemon.process.terminationStatus)"
                        daemon.stop()
                        throw TestFailure("virtchd (\(state)) did not answer: \(error)")
                    }
                }
                try await Task.sleep(for: .milliseconds(200))
            }
        }

        private init(launcher: [String]) throws {
            directory = try TemporaryDirectory()
            // A daemon left by an earlier run holds the sockets under the prefix.
            pidFile = Libvirt.prefix + "/var/run/ferry-test-virtchd.pid"
            if let text = try? String(contentsOfFile: pidFile, encoding: .utf8) {
                Libvirt.reap(pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)))
            }
            let bin = directory.path("bin")
            try FileManager.default.createDirectory(atPath: bin, withIntermediateDirectories: true)
            try FileManager.default.createSymbolicLink(atPath: "\(bin)/cloud-hypervisor", withDestinationPath: Repository.ferry.path)
            let configuration = directory.path("virtchd.conf")
            try Data(#"log_filters="1:ch 1:util.command"\#nlog_outputs="1:file:\#(directory.path("virtchd.log"))""#.utf8).write(to: URL(fileURLWithPath: configuration))
            process = Process()
            let command = ["/usr/bin/unshare", "-m", "--propagation", "private", "sh", "-c",
                           "umount -R /sys/fs/cgroup 2>/dev/null; exec \(Libvirt.virtchd) -f \(configuration) -p \(pidFile)"]
            let full = launcher + command
            process.executableURL = URL(fileURLWithPath: full[0])
            process.arguments = Array(full.dropFirst())
            var environment = ProcessInfo.processInfo.environment
            environment["PATH"] = "\(bin):" + (environment["PATH"] ?? "/usr/bin:/bin")
            process.environment = environment
            process.standardInput = FileHandle.nullDevice
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
        }

        var log: String { (try? String(contentsOfFile: directory.path("virtchd.log"), encoding: .utf8)) ?? "" }

        func stop() {
            if process.isRunning {
                process.terminate()
                process.waitUntilExit()
            }
        }

        /// Runs `virsh -c ch:///system ARGUMENTS`; its output, or a failure carrying it and the
        /// end of the daemon's log.
        @discardableResult
        func virsh(_ arguments: [String]) async throws -> String {
            do {
                return try await offThePool { try runTool(Libvirt.virsh, ["-c", "ch:///system"] + arguments) }
            } catch {
                throw TestFailure("\(error)\nvirtchd's log ends: \(log.suffix(3000))")
            }
        }

        func state(of name: String) async throws -> String {
            try await virsh(["domstate", name]).trimmingCharacters(in: .whitespacesAndNewlines)
        }

        func waitForState(of name: String, _ state: String, timeout: Duration = .seconds(30)) async -> Bool {
            let deadline = ContinuousClock.now + timeout
            while ContinuousClock.now < deadline {
                if (try? await self.state(of: name)) == state { return true }
                try? await Task.sleep(for: .milliseconds(100))
            }
            return false
        }

        /// The VMM's pid, from the pidfile libvirt writes when it starts the domain.
        func vmmPID(of name: String) throws -> pid_t {
            let text = try String(contentsOfFile: "\(Libvirt.stateDirectory)/\(name).pid", encoding: .utf8)
            guard let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)) else {
                throw TestFailure("\(name).pid holds no pid: \(text)")
            }
            return pid
        }

        func domain(name: String, commandLine: String, interface: (tap: String, mac: String)? = nil) throws -> Domain {
            let domain = Domain(name: name, directory: try TemporaryDirectory(), daemon: self, interface: interface.map { [$0.tap, $0.mac] })
            try domain.writeXML(commandLine: commandLine)
            return domain
        }
    }

    /// A domain that direct-boots the test guest: 2 vCPUs, 128 MiB, COM1 and a virtio console on
    /// pseudo-terminals.
    struct Domain: Sendable {
        let name: String
        let directory: TemporaryDirectory
        let daemon: Daemon
        /// An `<interface type='ethernet'>` on a tap libvirt creates: its name and the card's MAC.
        let interface: [String]?
        /// Kept across redefinitions: a new definition of the same name must carry its UUID.
        let uuid = UUID().uuidString.lowercased()
        var xmlPath: String { directory.path("domain.xml") }

        func writeXML(commandLine: String) throws {
            let xml = """
                <domain type='kvm'>
                  <name>\(name)</name>
                  <uuid>\(uuid)</uuid>
                  <memory unit='MiB'>128</memory>
                  <vcpu>2</vcpu>
                  <os>
                    <type>hvm</type>
                    <kernel>\(try TestGuest.path.get())</kernel>
                    <cmdline>\(commandLine)</cmdline>
                  </os>
                  <devices>
                    <serial type='pty'/>
                    <console type='pty'><target type='virtio'/></console>
                    \(interface.map { "<interface type='ethernet'><target dev='\($0[0])'/><mac address='\($0[1])'/></interface>" } ?? "")
                  </devices>
                </domain>
                """
            try Data(xml.utf8).write(to: URL(fileURLWithPath: xmlPath))
        }

        /// Leaves nothing behind when the test fails half-way: the domain, its VMMs.
        func cleanUp() {
            _ = try? runTool(Libvirt.virsh, ["-c", "ch:///system", "destroy", name])
            _ = try? runTool(Libvirt.virsh, ["-c", "ch:///system", "undefine", name])
            Libvirt.reapVMMs(of: name, daemon: daemon)
        }
    }
}
