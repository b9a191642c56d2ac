import APIModels
import FerryClient
import FerryTestSupport
import Foundation
import Testing

/// Hostile snapshot files: seeded random mutations of a real snapshot's `snapshot.json`, and a
/// memory file cut short or grown, restored by one VMM in turn. Each restore either succeeds (a
/// mutation the format cannot tell from a real state, such as another register value) or is
/// refused with a 400 and leaves no VM behind; none may end in a 5xx or take the VMM down.
@Suite(.enabled(if: Repository.kvmAvailable, needsKVM))
struct SnapshotFuzzTests {
    static let cases = 150

    @Test func mutatedSnapshotsAreRefusedWholeOrRestoredWhole() async throws {
        let directory = try TemporaryDirectory()
        let source = try await TestVMM("source", in: directory)
        try await source.boot(TestGuestVM(cpus: 1, memoryMiB: 64, workload: "workset_mib=1"))
        try await source.api.send(.vmPause)
        let original = directory.path("original")
        try await source.api.send(.vmSnapshot, body: try JSONEncoder().encode(VmSnapshotConfig(destination_url: "file://\(original)")))
        #expect(await source.shutDown())

        let vmm = try await TestVMM("restorer", in: directory)
        let stateText = try String(contentsOfFile: "\(original)/snapshot.json", encoding: .utf8)
        let state = try JSONSerialization.jsonObject(with: Data(stateText.utf8))
        let memory = try Data(contentsOf: URL(fileURLWithPath: "\(original)/memory.bin"))
        var generator = SplitMix64(seed: 0x5EED_5AFE)
        var outcomes: [String: Int] = [:]
        for index in 0..<(Self.cases + 4) {
            let snapshot = directory.path("case-\(index)")
            try FileManager.default.createDirectory(atPath: snapshot, withIntermediateDirectories: false)
            var stateBytes = Array(stateText.utf8)
            var memoryBytes = memory
            if index < Self.cases {
                stateBytes = Mutation.body(from: state, text: stateText, using: &generator)
            } else {
                // The memory file: empty, cut in half, one byte short, one page longer.
                memoryBytes = [Data(), memory.prefix(memory.count / 2), memory.dropLast(), memory + Data(count: 4096)][index - Self.cases]
            }
            try Data(stateBytes).write(to: URL(fileURLWithPath: "\(snapshot)/snapshot.json"))
            try memoryBytes.write(to: URL(fileURLWithPath: "\(snapshot)/memory.bin"))
            let request = try JSONEncoder().encode(RestoreConfig(source_url: "file://\(snapshot)", resume: false))
            do {
                try await vmm.api.send(.vmRestore, body: request)
                outcomes["restored", default: 0] += 1
                #expect(index < Self.cases, "memory file case \(index - Self.cases) must be refused: a memory file of the wrong size is no snapshot")
                #expect(try await vmm.info().state == "Paused")
                try await vmm.api.send(.vmDelete)
            } catch let error as APIError {
                outcomes["\(error.status)", default: 0] += 1
                #expect(error.status == 400, "case \(index): \(error) for \(String(decoding: stateBytes.prefix(300), as: UTF8.self))")
                await #expect(throws: APIError.self, "case \(index): a refused restore leaves no VM") { try await vmm.api.send(.vmInfo) }
            }
            try? FileManager.default.removeItem(atPath: snapshot)
        }
        // The untouched snapshot still restores, and the guest runs on.
        try await vmm.api.send(.vmRestore, body: try JSONEncoder().encode(RestoreConfig(source_url: "file://\(original)", resume: true)))
        let mark = vmm.process.consoleLines.count
        try await vmm.waitForConsoleLine(after: mark) { $0.hasPrefix("HEARTBEAT cpu=0 ") }
        print("snapshot fuzzing: \(outcomes.sorted { $0.key < $1.key }.map { "\($0.key)×\($0.value)" }.joined(separator: " "))")
        #expect(await vmm.shutDown())
    }
}
