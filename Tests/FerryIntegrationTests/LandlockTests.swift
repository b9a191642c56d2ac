import APIModels
import FerryClient
import FerryTestSupport
import Foundation
import HostOS
import Testing

/// `--landlock` on a real `ferry` (docs/security.md): the VM its configuration names boots and
/// runs, a path its rules give may be written, and one outside them is refused — the process's
/// user could write it, Landlock forbids it.
@Suite(.enabled(if: Repository.kvmAvailable, needsKVM), .enabled(if: Landlock.abi != nil, "this kernel has no Landlock"))
struct LandlockTests {
    @Test func aPathOutsideTheRulesIsRefusedAndOneInsideIsWritten() async throws {
        let directory = try TemporaryDirectory()  // the API socket's: read-write under the rules
        let elsewhere = try TemporaryDirectory()  // outside every rule
        let snapshots = try TemporaryDirectory()  // read-write by a rule of its own
        let allowed = snapshots.path("snapshots")
        try FileManager.default.createDirectory(atPath: allowed, withIntermediateDirectories: true)
        let vmm = try await TestVMM("vmm", in: directory, extraArguments: [
            "--landlock", "--landlock-rules", "path=\(try TestGuest.path.get()),access=r", "--landlock-rules", "path=\(allowed),access=rw",
        ])
        try await vmm.boot(TestGuestVM(cpus: 1, memoryMiB: 64, workload: "workset_mib=1 dirty_rate=10"))
        try await vmm.api.send(.vmPause)
        do {
            try await vmm.api.send(.vmSnapshot, body: Data(#"{"destination_url": "file://\#(elsewhere.path("snapshot"))"}"#.utf8))
            Issue.record("a snapshot outside the rules was written")
        } catch let error as APIError {
            #expect(error.description.contains("Permission denied"), "\(error)")
        }
        #expect(!FileManager.default.fileExists(atPath: elsewhere.path("snapshot/snapshot.json")))
        try await vmm.api.send(.vmSnapshot, body: Data(#"{"destination_url": "file://\#(allowed)/vm1"}"#.utf8))
        #expect(FileManager.default.fileExists(atPath: "\(allowed)/vm1/snapshot.json"), "the snapshot inside the rules was written")
        try await vmm.api.send(.vmResume)
        let mark = vmm.process.consoleLines.count
        _ = try await vmm.waitForConsoleLine(after: mark) { $0.hasPrefix("HEARTBEAT") }
        #expect(await vmm.shutDown())
    }

    @Test func rulesWithoutLandlockAreRefused() throws {
        let ferry = try FerryProcess(arguments: ["--api-socket", "path=/tmp/unused-\(UUID()).sock", "--landlock-rules", "path=/tmp,access=rw"])
        #expect(ferry.waitForExit(timeout: .seconds(20)) != 0)
        #expect(ferry.standardError.contains("--landlock-rules: only with --landlock"), "\(ferry.standardError)")
    }
}
