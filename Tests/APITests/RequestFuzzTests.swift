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

/// Hostile request bodies: seeded random mutations of a valid body of every endpoint that takes
/// one, against the in-process router of a VMM with a Created VM. Every answer must be a 4xx
/// with Cloud Hypervisor's error body (a valid body meets the Created VM and gets a 409), and
/// nothing may change: the VM's configuration and state stay, and no event is emitted.
@Suite struct RequestFuzzTests {
    static let casesPerEndpoint = 600

    static func bases(kernel: String) -> [(Endpoint, String)] {
        [
            (.vmCreate, #"{"cpus": {"boot_vcpus": 2, "max_vcpus": 2}, "memory": {"size": 134217728, "thp": true}, "payload": {"kernel": "\#(kernel)", "cmdline": "console=ttyS0"}, "serial": {"mode": "Null"}, "console": {"mode": "Off"}, "disks": [{"path": "/nonexistent.img", "readonly": true, "rate_limiter_config": {"bandwidth": {"size": 1, "refill_time": 1}}}], "net": [{"tap": "fuzz0", "mac": "52:54:00:00:00:01", "num_queues": 2}], "rng": {"src": "/dev/urandom"}, "platform": {"num_pci_segments": 1}}"#),
            (.vmRestore, #"{"source_url": "file:///nonexistent/snapshot", "resume": false, "prefault": false, "net_fds": [{"id": "net0", "num_fds": 1}]}"#),
            (.vmSnapshot, #"{"destination_url": "file:///nonexistent/ferry-fuzz"}"#),
            (.vmSendMigration, #"{"destination_url": "tcp:127.0.0.1:1", "downtime_ms": 300, "timeout_s": 10, "timeout_strategy": "Cancel", "connections": 1, "keep_alive": false}"#),
            (.vmReceiveMigration, #"{"receiver_url": "tcp:127.0.0.1:0", "serial": {"mode": "Null"}, "disks": [{"id": "disk0", "path": "/nonexistent.img"}], "net": [{"id": "net0", "tap": "fuzz0"}]}"#),
        ]
    }

    @Test(.enabled(if: (try? TestGuest.path.get()) != nil, "needs the test guest (a kernel vm.create accepts)"),
          arguments: [0x5EED_0001, 0x5EED_0002] as [UInt64])
    func mutatedBodiesGet4xxAndChangeNothing(seed: UInt64) async throws {
        let kernel = try TestGuest.path.get()
        let vmm = VirtualMachineMonitor(events: EventMonitor(sink: nil), logger: Logger(label: "fuzz"), exitsWithVM: false)
        let application = Application(router: APIServer.router(vmm: vmm))
        try await application.test(.router) { client in
            let create = #"{"memory": {"size": 134217728}, "payload": {"kernel": "\#(kernel)"}, "serial": {"mode": "Null"}}"#
            try await client.execute(uri: Endpoint.vmCreate.path, method: .put, body: ByteBuffer(string: create)) {
                #expect($0.status == .noContent)
            }
            let before = try vmm.info()
            let events = vmm.events.subscribe(sinceStart: true)
            var generator = SplitMix64(seed: seed)
            var statuses: [Int: Int] = [:]
            for (endpoint, base) in Self.bases(kernel: kernel) {
                let document = try JSONSerialization.jsonObject(with: Data(base.utf8))
                for _ in 0..<Self.casesPerEndpoint {
                    let body = Mutation.body(from: document, text: base, using: &generator)
                    try await client.execute(uri: endpoint.path, method: .put, body: ByteBuffer(bytes: body)) { response in
                        let code = Int(response.status.code)
                        statuses[code, default: 0] += 1
                        let messages = try? JSONDecoder().decode([String].self, from: Data(buffer: response.body))
                        #expect((400..<500).contains(code) && messages?.isEmpty == false,
                                "\(endpoint.rawValue) answered \(code) \(String(buffer: response.body)) to \(String(decoding: body, as: UTF8.self).prefix(400))")
                    }
                }
            }
            #expect(try vmm.info() == before, "no refused request changed the VM")
            vmm.events.emit(.vmm, "fuzz-end")
            var names: [String] = []
            for await event in events {
                names.append("\(event.source.rawValue).\(event.name)")
                if event.name == "fuzz-end" { break }
            }
            #expect(names == ["vmm.starting", "vmm.fuzz-end"], "no refused request emitted an event: \(names.prefix(10))")
            print("request fuzzing (seed \(String(seed, radix: 16))): \(statuses.sorted { $0.key < $1.key }.map { "\($0.key)×\($0.value)" }.joined(separator: " "))")
        }
        vmm.events.close()
    }
}
