import FerryTestSupport
import APIModels
import FerryClient
import Foundation
import Synchronization
import Testing

/// Snapshots a running test guest in one `ferry` and restores it in another: the guest continues
/// its counters and timer ticks, and its memory verifies.
@Suite(.enabled(if: Repository.kvmAvailable, needsKVM))
struct SnapshotRestoreTests {
    /// A `ferry` (the shared `TestVMM`), as the process, its API client and its event file.
    static func startVMM(_ directory: TemporaryDirectory, _ name: String) async throws -> (FerryProcess, APIClient, String) {
        let vmm = try await TestVMM(name, in: directory)
        return (vmm.process, vmm.api, vmm.eventFile)
    }

    @Test(arguments: [1, 2])
    func restoredGuestContinuesCountersTicksAndVerifiedMemory(cpus: Int) async throws {
        let guest = try TestGuest.path.get()
        let directory = try TemporaryDirectory()
        let snapshot = directory.path("snapshot")
        let (source, sourceAPI, sourceEvents) = try await Self.startVMM(directory, "source")
        let config = #"{"cpus": {"boot_vcpus": \#(cpus)}, "memory": {"size": 268435456}, "payload": {"kernel": "\#(guest)", "cmdline": "workset_mib=16 dirty_rate=1000 heartbeat_ms=200 verify_ms=400"}, "serial": {"mode": "Tty"}}"#
        try await sourceAPI.send(.vmCreate, body: Data(config.utf8))
        try await sourceAPI.send(.vmBoot)
        #expect(source.waitForConsoleLine(timeout: .seconds(60)) { $0.hasPrefix("HEARTBEAT cpu=\(cpus - 1) seq=3 ") } != nil)
        try await sourceAPI.send(.vmPause)
        try await sourceAPI.send(.vmSnapshot, body: Data(#"{"destination_url": "file://\#(snapshot)"}"#.utf8))
        let before = source.consoleLines.heartbeats
        try await sourceAPI.send(.vmmShutdown)
        #expect(source.waitForExit(timeout: .seconds(30)) == 0)

        let (target, targetAPI, targetEvents) = try await Self.startVMM(directory, "target")
        try await targetAPI.send(.vmRestore, body: Data(#"{"source_url": "file://\#(snapshot)"}"#.utf8))
        let restored = try JSONDecoder().decode(VmInfo.self, from: try await targetAPI.send(.vmInfo))
        #expect(restored.state == "Paused" && restored.config.cpus?.boot_vcpus == cpus)
        try await targetAPI.send(.vmResume)
        for cpu in 0..<cpus {
            #expect(target.waitForConsoleLine(timeout: .seconds(60)) { $0.hasPrefix("VERIFY OK cpu=\(cpu) ") } != nil,
                    "memory verifies after the restore on vCPU \(cpu)")
            #expect(target.waitForConsoleLine(timeout: .seconds(60)) { Heartbeat($0)?.cpu == cpu } != nil)
            let last = try #require(before.last { $0.cpu == cpu })
            let first = try #require(target.consoleLines.heartbeats.first { $0.cpu == cpu })
            // The pause may have cut a heartbeat line in half: its number is then the one skipped.
            #expect(first.seq > last.seq && first.seq <= last.seq + 2, "seq continues: \(last.seq) → \(first.seq)")
            #expect(first.ticks > last.ticks, "timer ticks continue: \(last.ticks) → \(first.ticks)")
            #expect(first.written >= last.written, "the workload's page count continues")
        }
        #expect(target.consoleLines.verifyFailures.isEmpty)
        #expect(!target.consoleLines.contains { $0.contains("ferry-test-guest: boot") }, "the guest did not boot again")
        try await targetAPI.send(.vmmShutdown)
        #expect(target.waitForExit(timeout: .seconds(30)) == 0)

        #expect(recordedEvents(inFile: sourceEvents).map(\.name) == [
            "vmm.starting", "vm.booting", "vm.booted", "vm.pausing", "vm.paused",
            "vm.snapshotting", "vm.snapshotted", "vm.shutdown", "vmm.shutdown",
        ])
        #expect(recordedEvents(inFile: targetEvents).map(\.name) == [
            "vmm.starting", "vm.restoring", "vm.restored", "vm.resuming", "vm.resumed", "vm.shutdown", "vmm.shutdown",
        ])
    }

    @Test func damagedSnapshotsAreRefusedAndTheVMMCanStillRestore() async throws {
        let guest = try TestGuest.path.get()
        let directory = try TemporaryDirectory()
        let good = directory.path("good")
        let (source, sourceAPI, _) = try await Self.startVMM(directory, "source")
        let config = #"{"memory": {"size": 134217728}, "payload": {"kernel": "\#(guest)", "cmdline": "workset_mib=8 heartbeat_ms=200"}, "serial": {"mode": "Null"}}"#
        try await sourceAPI.send(.vmCreate, body: Data(config.utf8))
        try await sourceAPI.send(.vmBoot)
        try await sourceAPI.send(.vmPause)
        try await sourceAPI.send(.vmSnapshot, body: Data(#"{"destination_url": "file://\#(good)"}"#.utf8))
        try await sourceAPI.send(.vmmShutdown)
        _ = source.waitForExit(timeout: .seconds(30))

        let files = FileManager.default
        func damaged(_ name: String, _ damage: (String) throws -> Void) throws -> String {
            let copy = directory.path(name)
            try files.copyItem(atPath: good, toPath: copy)
            try damage(copy)
            return copy
        }
        let state = "snapshot.json", memory = "memory.bin"
        let memorySize = try #require(files.attributesOfItem(atPath: "\(good)/\(memory)")[.size] as? Int)
        let cases: [(String, String)] = [
            (try damaged("truncated-memory") { try FileHandle(forWritingTo: URL(fileURLWithPath: "\($0)/\(memory)")).truncate(atOffset: UInt64(memorySize / 2)) }, "memory"),
            (try damaged("no-memory") { try files.removeItem(atPath: "\($0)/\(memory)") }, "memory"),
            (try damaged("truncated-state") { try Data(try Data(contentsOf: URL(fileURLWithPath: "\($0)/\(state)")).prefix(100)).write(to: URL(fileURLWithPath: "\($0)/\(state)")) }, "truncated or corrupted"),
            (try damaged("other-version") {
                let url = URL(fileURLWithPath: "\($0)/\(state)")
                let text = try String(contentsOf: url, encoding: .utf8).replacingOccurrences(of: #""formatVersion":3"#, with: #""formatVersion":99"#)
                try text.write(to: url, atomically: true, encoding: .utf8)
            }, "format version 99"),
        ]
        let (target, targetAPI, targetEvents) = try await Self.startVMM(directory, "target")
        for (path, message) in cases {
            await #expect {
                try await targetAPI.send(.vmRestore, body: Data(#"{"source_url": "file://\#(path)"}"#.utf8))
            } throws: { error in
                let error = error as? APIError
                return error?.status == 400 && error?.messages.first?.contains(message) == true
            }
            await #expect(throws: APIError.self) { try await targetAPI.send(.vmInfo) }
        }
        try await targetAPI.send(.vmRestore, body: Data(#"{"source_url": "file://\#(good)", "resume": true}"#.utf8))
        #expect(try JSONDecoder().decode(VmInfo.self, from: try await targetAPI.send(.vmInfo)).state == "Running")
        try await targetAPI.send(.vmmShutdown)
        #expect(target.waitForExit(timeout: .seconds(30)) == 0)
        let names = recordedEvents(inFile: targetEvents).map(\.name)
        #expect(names.filter { $0 == "vm.restore-failed" }.count == 2, "the memory-file failures happen after restoring began: \(names)")
        #expect(names.suffix(6) == ["vm.restoring", "vm.restored", "vm.resuming", "vm.resumed", "vm.shutdown", "vmm.shutdown"])
    }

    @Test func apiAnswersWhileASnapshotIsWritten() async throws {
        let guest = try TestGuest.path.get()
        let directory = try TemporaryDirectory()
        let (ferry, api, _) = try await Self.startVMM(directory, "vmm")
        let config = #"{"memory": {"size": 1073741824}, "payload": {"kernel": "\#(guest)", "cmdline": "workset_mib=384 heartbeat_ms=200"}, "serial": {"mode": "Tty"}}"#
        try await api.send(.vmCreate, body: Data(config.utf8))
        try await api.send(.vmBoot)
        #expect(ferry.waitForConsoleLine(timeout: .seconds(120)) { $0 == "ferry-test-guest: ready" } != nil)
        try await api.send(.vmPause)
        final class Flag: Sendable {
            let raised = Mutex(false)
        }
        let snapshotDone = Flag()
        let answersDuringSnapshot = try await withThrowingTaskGroup(of: Int.self) { group in
            group.addTask {
                try await api.send(.vmSnapshot, body: Data(#"{"destination_url": "file://\#(directory.path("snapshot"))"}"#.utf8))
                snapshotDone.raised.withLock { $0 = true }
                return 0
            }
            group.addTask {
                var answered = 0
                while !snapshotDone.raised.withLock({ $0 }) {
                    let info = try JSONDecoder().decode(VmInfo.self, from: try await api.send(.vmInfo))
                    _ = try await api.send(.vmmPing)
                    if info.state == "Paused", !snapshotDone.raised.withLock({ $0 }) { answered += 1 }
                }
                return answered
            }
            return try await group.reduce(0, +)
        }
        #expect(answersDuringSnapshot > 0, "vm.info and vmm.ping were answered while the snapshot was being written")
        try await api.send(.vmmShutdown)
        #expect(ferry.waitForExit(timeout: .seconds(30)) == 0)
    }
}
