import APIModels
@testable import Events
import FerryTestSupport
import Foundation
import Hummingbird
import HummingbirdTesting
import Logging
import Testing
@testable import API
import VMM

/// Drives the API router in-process against a real VMM core with no VM booted: routes, status
/// codes, error bodies and the OpenAPI document. (Booting guests through the API is tested with
/// real processes in FerryIntegrationTests.)
@Suite struct RouterTests {
    func withRouter(_ body: @Sendable (any TestClientProtocol, VirtualMachineMonitor) async throws -> Void) async throws {
        let vmm = VirtualMachineMonitor(events: EventMonitor(sink: nil), logger: Logger(label: "test"), exitsWithVM: false)
        let application = Application(router: APIServer.router(vmm: vmm))
        try await application.test(.router) { client in try await body(client, vmm) }
        vmm.events.close()
    }

    /// (path, method) pairs the OpenAPI document declares, read from its `paths:` section.
    static func documentedOperations() throws -> Set<String> {
        let text = try String(contentsOf: Repository.root.appendingPathComponent("docs/openapi.yaml"), encoding: .utf8)
        var operations = Set<String>()
        var currentPath: String?
        var inPaths = false
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            if line == "paths:" { inPaths = true; continue }
            if inPaths, !line.hasPrefix(" "), !line.isEmpty { break }
            if line.hasPrefix("  /"), line.hasSuffix(":") {
                currentPath = String(line.dropFirst(2).dropLast())
            } else if let path = currentPath, line.hasPrefix("    "), !line.hasPrefix("     "), line.hasSuffix(":") {
                let method = line.trimmingCharacters(in: .whitespaces).dropLast().uppercased()
                if ["GET", "PUT", "POST", "DELETE", "PATCH"].contains(method) { operations.insert("\(method) \(path)") }
            }
        }
        return operations
    }

    @Test func openAPIDocumentListsExactlyTheEndpointsTheServerServes() async throws {
        let documented = try Self.documentedOperations()
        let served = Set(Endpoint.allCases.map { "\($0.method.rawValue) /\($0.rawValue)" })
        #expect(documented == served)
        try await withRouter { client, _ in
            for endpoint in Endpoint.allCases where endpoint != .vmmShutdown && endpoint != .vmmEvents {
                try await client.execute(uri: endpoint.path, method: endpoint.httpMethod) { response in
                    let body = String(buffer: response.body)
                    #expect(response.status != .methodNotAllowed && !body.contains("unknown endpoint"),
                            "\(endpoint.path) is routed")
                }
            }
            try await client.execute(uri: "/api/v1/vm.migrate", method: .put) { response in
                #expect(response.status == .notFound, "a path outside the document is not served")
            }
        }
    }

    /// As Cloud Hypervisor's: `version` the release whose API is served, `build_version` with
    /// Ferry's own version after it, the pid, and `kvm` among the features.
    @Test func pingReportsVersionAndPid() async throws {
        try await withRouter { client, _ in
            try await client.execute(uri: "/api/v1/vmm.ping", method: .get) { response in
                #expect(response.status == .ok)
                let ping = try JSONDecoder().decode(VmmPingResponse.self, from: Data(buffer: response.body))
                #expect(ping.version == VirtualMachineMonitor.cloudHypervisorVersion && ping.pid == getpid())
                #expect(ping.build_version == "v\(ping.version)-ferry-\(VirtualMachineMonitor.version)")
                #expect(ping.features.first == "kvm" && ping.features.contains("migration_events"))
            }
        }
    }

    @Test func wrongMethodGets405WithAllowAndUnknownPathGets404() async throws {
        try await withRouter { client, _ in
            try await client.execute(uri: "/api/v1/vm.boot", method: .get) { response in
                #expect(response.status == .methodNotAllowed)
                #expect(response.headers[.allow] == "PUT")
                let messages = try JSONDecoder().decode([String].self, from: Data(buffer: response.body))
                #expect(messages == ["vm.boot takes PUT, not GET"])
            }
            try await client.execute(uri: "/api/v2/vm.boot", method: .put) { response in
                #expect(response.status == .notFound)
            }
        }
    }

    /// A kernel for requests that fail before create looks at it.
    static let kernel = "/proc/self/exe"
    /// A kernel `vm.create` accepts: the test guest (create parses the kernel, so only a bootable one will do).
    static var bootableKernel: String { (try? TestGuest.path.get()) ?? "/nonexistent/test-guest" }

    @Test(arguments: [
        ("{bad json", "request body is not valid JSON"),
        ("", "request body is empty"),
        ("[1, 2]", "expected"),
        (#"{"cpus": {"boot_vcpus": "two"}, "payload": {"kernel": "\#(kernel)"}}"#, "cpus.boot_vcpus: expected an integer"),
        (#"{"cpus": {"boot_vcpus": 1}}"#, "payload: required field is missing"),
        (#"{"payload": {}}"#, "payload.kernel: required"),
        (#"{"cpus": {"boot_vcpus": 0}, "payload": {"kernel": "\#(kernel)"}}"#, "cpus.boot_vcpus: 0 is below the minimum of 1"),
        (#"{"cpus": {"boot_vcpus": 300}, "payload": {"kernel": "\#(kernel)"}}"#, "cpus.boot_vcpus: 300 is not between 1 and 254"),
        // Cloud Hypervisor's schema, also where Ferry does not use the member.
        (#"{"payload": {"kernel": "\#(kernel)"}, "net": [{"mac": 12}]}"#, "net[0].mac: expected a string"),
        (#"{"memory": {"size": 134217728, "hugepages": "yes"}, "payload": {"kernel": "\#(kernel)"}}"#, "memory.hugepages: expected true or false"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "disks": [{"path": "/tmp/d", "rate_limiter_config": {"bandwidth": {"size": -1, "refill_time": 100}}}]}"#,
         "disks[0].rate_limiter_config.bandwidth.size: -1 is below the minimum of 0"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "disks": [{"path": "/tmp/d", "rate_limiter_config": {"ops": {"size": 10}}}]}"#,
         "disks[0].rate_limiter_config.ops.refill_time: required field is missing"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "vsock": {"socket": "/tmp/v", "cid": 2}}"#, "vsock.cid: 2 is below the minimum of 3"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "serial": {"file": "/tmp/s"}}"#, "serial.mode: required field is missing"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "cpus": {"boot_vcpus": 1, "core_scheduling": "Sometimes"}}"#, "cpus.core_scheduling: 'Sometimes' is not one of"),
        (#"{"payload": {"kernel": "\#(kernel)", "cmdline": 7}}"#, "payload.cmdline: expected a string"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "iommu": "no"}"#, "iommu: expected true or false"),
        // Well-formed, but asking for what Ferry's machine does not do.
        (#"{"memory": {"size": 134217728, "hugepages": true}, "payload": {"kernel": "\#(kernel)"}}"#, "memory.hugepages: not supported"),
        (#"{"memory": {"size": 134217728, "mergeable": true}, "payload": {"kernel": "\#(kernel)"}}"#, "memory.mergeable: not supported"),
        (#"{"cpus": {"boot_vcpus": 2, "max_vcpus": 2, "topology": {"threads_per_core": 2, "cores_per_die": 1, "dies_per_package": 1, "packages": 1}}, "payload": {"kernel": "\#(kernel)"}}"#,
         "cpus.topology: not supported"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "disks": [{"path": "/tmp/d", "rate_limiter_config": {"bandwidth": {"size": 1000, "refill_time": 100}}}]}"#,
         "disks[0].rate_limiter_config: not supported"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "disks": [{"path": "/tmp/d", "image_type": "Qcow2"}]}"#, "disks[0].image_type: not supported"),
        (#"{"payload": {"kernel": "\#(kernel)", "firmware": "/usr/share/ovmf/OVMF.fd"}}"#, "payload.firmware: not supported"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "platform": {"tdx": true}}"#, "platform.tdx: not supported"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "balloon": {"size": 0}}"#, "balloon: not supported"),
        (#"{"cpus": {"boot_vcpus": 2, "max_vcpus": 4}, "payload": {"kernel": "\#(kernel)"}}"#, "cpus.max_vcpus"),
        (#"{"memory": {"size": 8796093022208}, "payload": {"kernel": "\#(kernel)"}}"#, "above the maximum of 4096 GiB"),
        (#"{"memory": {"size": 1048576}, "payload": {"kernel": "\#(kernel)"}}"#, "below the minimum"),
        (#"{"memory": {"size": -5}, "payload": {"kernel": "\#(kernel)"}}"#, "memory.size"),
        (#"{"payload": {"kernel": "/nonexistent/vmlinux"}}"#, "payload.kernel: /nonexistent/vmlinux does not exist"),
        (#"{"payload": {"kernel": "\#(kernel)", "initramfs": "/nonexistent/initrd"}}"#, "payload.initramfs"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "serial": {"mode": "File"}}"#, "serial.file: required"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "serial": {"mode": "Socket"}}"#, "serial.socket: required"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "serial": {"mode": "Bogus"}}"#, "serial.mode: 'Bogus' is not one of Off, Pty, Tty, File, Socket, Null"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "console": {"mode": "Socket", "socket": "/tmp/c"}}"#, "console.mode: Socket is not supported"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "serial": {"mode": "Tty"}, "console": {"mode": "Tty"}}"#, "only one of them can be Tty"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "serial": {"mode": "Null", "iommu": true}}"#, "serial.iommu"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "disks": [{"path": "/nonexistent.img"}]}"#, "disk disk0: cannot open /nonexistent.img"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "disks": [{"readonly": true}]}"#, "disks[0].path: required"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "disks": [{"path": "/proc/self/exe", "id": "a"}, {"path": "/proc/self/exe", "id": "b"}]}"#, "disks: b and a are the same file"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "net": [{"mac": "12:34:56:78:9a:bc"}]}"#, "net[0].tap: required"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "net": [{"tap": "t0", "mac": "52:54:00:zz:00:01"}]}"#, "net[0].mac: '52:54:00:zz:00:01' is not a MAC address"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "net": [{"tap": "t0", "mac": "01:00:5e:00:00:01"}]}"#, "is a multicast address"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "net": [{"tap": "t0", "queue_size": 100}]}"#, "queue_size 100 is not a power of two"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "net": [{"tap": "t0", "num_queues": 4}]}"#, "net[0].num_queues: 4 is not available"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "net": [{"tap": "t0", "vhost_user": true}]}"#, "net[0].vhost_user"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "net": [{"tap": "t0", "fds": [3]}]}"#, "net[0].fds"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "net": [{"tap": "t0", "ip": "10.0.0.300"}]}"#, "ip '10.0.0.300' is not an IPv4 address"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "vsock": {"cid": 3, "socket": "/tmp/v"}}"#, "vsock: Ferry has no such devices yet"),
        (#"{"payload": {"kernel": "\#(kernel)"}, "rng": {"src": "/nonexistent"}}"#, "rng.src: /nonexistent does not exist"),
    ])
    func invalidCreateBodyGets400NamingTheProblemAndCreatesNothing(body: String, message: String) async throws {
        try await withRouter { client, vmm in
            try await client.execute(uri: "/api/v1/vm.create", method: .put, body: ByteBuffer(string: body)) { response in
                #expect(response.status == .badRequest)
                let messages = try JSONDecoder().decode([String].self, from: Data(buffer: response.body))
                #expect(messages.count == 1 && messages[0].contains(message), "\(messages)")
            }
            await #expect(throws: VMMError.self) { try await vmm.info() }
        }
    }

    @Test(arguments: [
        (#"{"destination_url": "/tmp/x"}"#, "vm.snapshot", "destination_url: '/tmp/x' is not a file:///absolute/directory URL"),
        (#"{"destination_url": "file://relative"}"#, "vm.snapshot", "destination_url"),
        (#"{}"#, "vm.snapshot", "destination_url: required field is missing"),
        (#"{"source_url": "http://x/y"}"#, "vm.restore", "source_url: 'http://x/y' is not a file"),
        (#"{"source_url": "file:///nonexistent/snapshot"}"#, "vm.restore", "snapshot.json does not exist"),
        (#"{"source_url": "file:///tmp", "resume": "yes"}"#, "vm.restore", "resume: expected true or false"),
        (#"{"source_url": "file:///tmp", "memory_restore_mode": "Lazy"}"#, "vm.restore", "memory_restore_mode: 'Lazy' is not one of"),
        (#"{"source_url": "file:///tmp", "memory_restore_mode": "OnDemand"}"#, "vm.restore", "memory_restore_mode: only Copy"),
        (#"{"source_url": "file:///tmp", "net_fds": [{"id": "net0"}]}"#, "vm.restore", "net_fds[0].num_fds: required field is missing"),
        (#"{"source_url": "file:///tmp", "net_fds": [{"id": "net0", "num_fds": 1}]}"#, "vm.restore", "net_fds names 1 descriptors and 0 came with the request"),
        (#"{"mac": 12}"#, "vm.add-net", "mac: expected a string"),
        (#"{"tap": "t0", "rate_limiter_config": {}}"#, "vm.add-net", "vm.add-net.rate_limiter_config: not supported"),
    ])
    func invalidSnapshotAndRestoreRequestsGet400(body: String, endpoint: String, message: String) async throws {
        try await withRouter { client, vmm in
            // vm.snapshot checks its URL before it looks for a VM.
            try await client.execute(uri: "/api/v1/\(endpoint)", method: .put, body: ByteBuffer(string: body)) { response in
                let messages = try JSONDecoder().decode([String].self, from: Data(buffer: response.body))
                #expect(response.status == .badRequest && messages.first?.contains(message) == true, "\(messages)")
            }
            await #expect(throws: VMMError.self) { try await vmm.info() }
        }
    }

    @Test(arguments: [
        (#"{"destination_url": "http://x:1"}"#, "vm.send-migration", "destination_url: 'http://x:1'"),
        (#"{"destination_url": "tcp:host"}"#, "vm.send-migration", "destination_url:"),
        (#"{}"#, "vm.send-migration", "destination_url: required field is missing"),
        (#"{"destination_url": "tcp:127.0.0.1:1", "downtime_ms": 0}"#, "vm.send-migration", "downtime_ms: 0 must be at least 1"),
        (#"{"destination_url": "tcp:127.0.0.1:1", "timeout_s": -1}"#, "vm.send-migration", "timeout_s: -1"),
        (#"{"destination_url": "tcp:127.0.0.1:1", "timeout_strategy": "Abort"}"#, "vm.send-migration", "timeout_strategy: 'Abort' is not a strategy; use Cancel or Ignore"),
        (#"{"destination_url": "tcp:127.0.0.1:1", "connections": 0}"#, "vm.send-migration", "connections: 0 must be 1 to 128"),
        (#"{"destination_url": "tcp:127.0.0.1:1", "connections": 129}"#, "vm.send-migration", "connections: 129 must be 1 to 128"),
        (#"{"destination_url": "tcp:127.0.0.1:1", "local": true}"#, "vm.send-migration", "local: a local migration hands guest memory over a unix: socket"),
        (#"{"destination_url": "unix:/tmp/m.sock", "local": true, "connections": 2}"#, "vm.send-migration", "connections: a local migration"),
        (#"{"destination_url": "tcp:127.0.0.1:1", "keep_alive": "yes"}"#, "vm.send-migration", "keep_alive: expected true or false"),
        (#"{"receiver_url": "ftp:x"}"#, "vm.receive-migration", "receiver_url: 'ftp:x'"),
        (#"{"receiver_url": "unix:"}"#, "vm.receive-migration", "receiver_url:"),
        (#"{}"#, "vm.receive-migration", "receiver_url: required field is missing"),
        (#"{"receiver_url": "unix:/tmp/m.sock", "tls_dir": "/etc/ferry/tls"}"#, "vm.receive-migration", "tls_dir: TLS is for tcp: migrations"),
        (#"{"destination_url": "unix:/tmp/m.sock", "tls_dir": "/etc/ferry/tls"}"#, "vm.send-migration", "tls_dir: TLS is for tcp: migrations"),
        (#"{"receiver_url": "tcp:127.0.0.1:0", "tls_dir": ""}"#, "vm.receive-migration", "tls_dir: empty"),
        (#"{"receiver_url": "tcp:127.0.0.1:0", "tls_dir": "/nonexistent/tls"}"#, "vm.receive-migration",
         "tls_dir /nonexistent/tls: ca-cert.pem cannot be read: No such file or directory"),
        (#"{"receiver_url": "tcp:127.0.0.1:0", "net_fds": [{"id": "net0", "num_fds": 1}]}"#, "vm.receive-migration",
         "net_fds names 1 descriptors and 0 came with the request"),
        (#"{"receiver_url": "tcp:127.0.0.1:0", "net_fds": [{"id": "net0", "num_fds": 2}]}"#, "vm.receive-migration",
         "net_fds[0].num_fds: 2; Ferry's virtio-net has one queue pair"),
    ])
    func invalidMigrationRequestsGet400NamingTheField(body: String, endpoint: String, message: String) async throws {
        try await withRouter { client, vmm in
            try await client.execute(uri: "/api/v1/\(endpoint)", method: .put, body: ByteBuffer(string: body)) { response in
                let messages = try JSONDecoder().decode([String].self, from: Data(buffer: response.body))
                #expect(response.status == .badRequest && messages.first?.contains(message) == true, "\(messages)")
            }
            vmm.events.emit(.vmm, "test-marker")
            var names: [String] = []
            for await event in vmm.events.subscribe(sinceStart: true) {
                names.append("\(event.source.rawValue).\(event.name)")
                if event.name == "test-marker" { break }
            }
            #expect(names == ["vmm.starting", "vmm.test-marker"], "nothing started")
        }
    }

    @Test func migrationQueriesAndCancelWithoutAMigration() async throws {
        try await withRouter { client, _ in
            try await client.execute(uri: "/api/v1/vm.cancel-migration", method: .put) { response in
                let messages = try JSONDecoder().decode([String].self, from: Data(buffer: response.body))
                #expect(response.status == .conflict && messages == ["no migration is in progress"])
            }
            try await client.execute(uri: "/api/v1/vm.migration-progress", method: .get) { response in
                #expect(response.status == .notFound)
            }
            // A valid send without a VM: nothing to migrate.
            try await client.execute(uri: "/api/v1/vm.send-migration", method: .put,
                                     body: ByteBuffer(string: #"{"destination_url": "tcp:127.0.0.1:1"}"#)) { response in
                #expect(response.status == .notFound)
            }
        }
    }

    /// The progress document's `state` is encoded as Cloud Hypervisor encodes its Rust enum.
    @Test func progressStateEncodesLikeCloudHypervisor() throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let cases: [(MigrationProgressReport.State, String)] = [
            (.ongoing(phase: .memoryPrecopy, vcpuThrottlePercent: 0), #"{"Ongoing":{"phase":"MemoryPrecopy","vcpu_throttle_percent":0}}"#),
            (.finished, #"{"Finished":{}}"#),
            (.failed(errorMessage: "the destination went away"),
             #"{"Failed":{"error_msg":"the destination went away","error_msg_debug":"the destination went away"}}"#),
            (.cancelled, #"{"Cancelled":{}}"#),
        ]
        for (state, json) in cases {
            #expect(String(decoding: try encoder.encode(state), as: UTF8.self) == json)
            #expect(try JSONDecoder().decode(MigrationProgressReport.State.self, from: Data(json.utf8)) == state)
        }
    }

    @Test func unknownFieldsAreIgnoredAsCloudHypervisorDoes() async throws {
        try await withRouter { client, _ in
            let body = #"{"payload": {"kernel": "\#(Self.bootableKernel)", "firmware": null}, "iommu": false, "net": [], "platform": {"num_pci_segments": 1}}"#
            try await client.execute(uri: "/api/v1/vm.create", method: .put, body: ByteBuffer(string: body)) { response in
                #expect(response.status == .noContent)
            }
            try await client.execute(uri: "/api/v1/vm.info", method: .get) { response in
                let info = try JSONDecoder().decode(VmInfo.self, from: Data(buffer: response.body))
                #expect(info.state == "Created" && info.config.cpus?.boot_vcpus == 1 && info.memory_actual_size == 512 << 20)
            }
        }
    }

    @Test func operationsInTheWrongStateChangeNothingAndEmitNothing() async throws {
        try await withRouter { client, vmm in
            let stream = vmm.events.subscribe(sinceStart: true)
            let snapshot = ByteBuffer(string: #"{"destination_url": "file:///tmp/ferry-never-written"}"#)
            try await client.execute(uri: "/api/v1/vm.snapshot", method: .put, body: snapshot) { response in
                #expect(response.status == .notFound, "snapshot without a VM")
            }
            for endpoint in [Endpoint.vmBoot, .vmPause, .vmResume, .vmShutdown, .vmReboot, .vmInfo, .vmNmi, .vmPowerButton] {
                try await client.execute(uri: endpoint.path, method: endpoint.httpMethod) { response in
                    #expect(response.status == .notFound, "\(endpoint) without a VM")
                    #expect(String(buffer: response.body) == #"["no VM has been created"]"#)
                }
            }
            // As Cloud Hypervisor: deleting nothing succeeds, and emits nothing.
            try await client.execute(uri: "/api/v1/vm.delete", method: .put) { #expect($0.status == .noContent) }
            let create = ByteBuffer(string: #"{"payload": {"kernel": "\#(Self.bootableKernel)"}}"#)
            try await client.execute(uri: "/api/v1/vm.create", method: .put, body: create) { #expect($0.status == .noContent) }
            try await client.execute(uri: "/api/v1/vm.create", method: .put, body: create) { #expect($0.status == .conflict) }
            for endpoint in [Endpoint.vmPause, .vmResume, .vmShutdown, .vmReboot, .vmNmi] {
                try await client.execute(uri: endpoint.path, method: endpoint.httpMethod) { response in
                    #expect(response.status == .conflict, "\(endpoint) on a Created VM")
                    #expect(String(buffer: response.body).contains("the VM is Created"))
                }
            }
            try await client.execute(uri: "/api/v1/vm.power-button", method: .put) { response in
                #expect(response.status == .badRequest && String(buffer: response.body).contains("no ACPI power button"))
            }
            try await client.execute(uri: "/api/v1/vm.snapshot", method: .put, body: snapshot) { response in
                #expect(response.status == .conflict, "snapshot of a VM that is not paused")
            }
            let restore = ByteBuffer(string: #"{"source_url": "file:///tmp"}"#)
            try await client.execute(uri: "/api/v1/vm.restore", method: .put, body: restore) { response in
                #expect(response.status == .conflict, "restore while a VM exists")
            }
            #expect(!FileManager.default.fileExists(atPath: "/tmp/ferry-never-written"))
            try await client.execute(uri: "/api/v1/vm.info", method: .get) { response in
                let info = try JSONDecoder().decode(VmInfo.self, from: Data(buffer: response.body))
                #expect(info.state == "Created")
            }
            try await client.execute(uri: "/api/v1/vm.delete", method: .put) { #expect($0.status == .noContent) }
            vmm.events.emit(.vmm, "test-marker")
            var names: [String] = []
            for await event in stream {
                names.append("\(event.source.rawValue).\(event.name)")
                if event.name == "test-marker" { break }
            }
            #expect(names == ["vmm.starting", "vm.deleted", "vmm.test-marker"], "only the delete emitted an event")
        }
    }

    /// Every operation the VM's state does not allow, in every state a booted VM can be in,
    /// answers 409 and changes nothing: the event stream holds only the valid transitions.
    @Test(.enabled(if: Repository.kvmAvailable, "needs /dev/kvm (absent or not accessible on this machine)"))
    func everyOperationInEveryWrongStateGets409AndEmitsNothing() async throws {
        let guest = try TestGuest.path.get()
        try await withRouter { client, vmm in
            func put(_ endpoint: Endpoint, _ body: String? = nil) async throws -> HTTPResponse.Status {
                try await client.execute(uri: endpoint.path, method: .put, body: body.map { ByteBuffer(string: $0) }) { $0.status }
            }
            let create = #"{"memory": {"size": 134217728}, "payload": {"kernel": "\#(guest)"}, "serial": {"mode": "Null"}}"#
            let snapshot = #"{"destination_url": "file:///tmp/ferry-test-never-written"}"#
            let restore = #"{"source_url": "file:///tmp/ferry-test-never-written"}"#
            func expectConflicts(_ operations: [(Endpoint, String?)], in state: String) async throws {
                for (endpoint, body) in operations {
                    #expect(try await put(endpoint, body) == .conflict, "\(endpoint.rawValue) while \(state)")
                    #expect(try vmm.info().state.rawValue == state, "\(endpoint.rawValue) changed nothing")
                }
            }
            #expect(try await put(.vmCreate, create) == .noContent)
            #expect(try await put(.vmBoot) == .noContent)
            try await expectConflicts([(.vmBoot, nil), (.vmResume, nil), (.vmCreate, create), (.vmRestore, restore),
                                       (.vmSnapshot, snapshot)], in: "Running")
            #expect(try await put(.vmPause) == .noContent)
            try await expectConflicts([(.vmBoot, nil), (.vmPause, nil), (.vmCreate, create), (.vmRestore, restore)],
                                      in: "Paused")
            #expect(try await put(.vmShutdown) == .noContent)
            try await expectConflicts([(.vmPause, nil), (.vmResume, nil), (.vmShutdown, nil), (.vmReboot, nil), (.vmNmi, nil),
                                       (.vmSnapshot, snapshot), (.vmCreate, create), (.vmRestore, restore)], in: "Shutdown")
            #expect(try await put(.vmDelete) == .noContent)
            #expect(!FileManager.default.fileExists(atPath: "/tmp/ferry-test-never-written"))
            vmm.events.emit(.vmm, "test-marker")
            var names: [String] = []
            for await event in vmm.events.subscribe(sinceStart: true) {
                names.append("\(event.source.rawValue).\(event.name)")
                if event.name == "test-marker" { break }
            }
            #expect(names == ["vmm.starting", "vm.booting", "vm.booted", "vm.pausing", "vm.paused", "vm.shutdown",
                              "vm.deleted", "vmm.test-marker"])
        }
    }
}

extension Endpoint {
    /// The endpoint's method as Hummingbird's test client takes it.
    var httpMethod: HTTPRequest.Method {
        method == .get ? .get : .put
    }
}

/// The relay of an inherited API socket names the descriptors that came with a request in a
/// header after its request line, even when that line arrives in pieces.
@Suite struct PassedDescriptorTests {
    @Test func theHeaderFollowsTheRequestLineWhateverTheChunks() throws {
        let request = Array("PUT /api/v1/vm.add-net HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}".utf8)
        for split in [1, 10, 32, 33, request.count] {
            var tagger = RequestTagger()
            let descriptor = open("/dev/null", O_RDONLY)
            var relayed = tagger.tag(Array(request[..<split]), passing: [descriptor])
            relayed += tagger.tag(Array(request[split...]), passing: [])
            let text = String(decoding: relayed, as: UTF8.self)
            let token = try #require(tagger.tokens.first)
            #expect(text == "PUT /api/v1/vm.add-net HTTP/1.1\r\n\(PassedDescriptors.header): \(token)\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}",
                    "split at \(split): \(text)")
            #expect(PassedDescriptors.shared.take(token) == [descriptor])
            close(descriptor)
        }
    }

    /// The write end of a pipe is deposited and discarded: its read end then sees the end of the
    /// stream, which only the last close of the write end gives.
    @Test func descriptorsNoRouteTookAreClosed() {
        var ends: [Int32] = [-1, -1]
        #expect(pipe(&ends) == 0)
        let token = PassedDescriptors.shared.deposit([ends[1]])
        PassedDescriptors.shared.discard([token])
        var byte: UInt8 = 0
        #expect(read(ends[0], &byte, 1) == 0, "the write end was closed")
        #expect(PassedDescriptors.shared.take(token).isEmpty)
        close(ends[0])
    }

    @Test func aRequestWithoutDescriptorsPassesUnchanged() {
        var tagger = RequestTagger()
        let bytes = Array("GET /api/v1/vm.info HTTP/1.1\r\n\r\n".utf8)
        #expect(tagger.tag(bytes, passing: []) == bytes && tagger.tokens.isEmpty)
    }
}
