import FerryTestSupport
import Foundation
import KVM
import Synchronization
import Testing
@testable import Machine

/// Collects how machines stopped.
final class StopRecorder: Sendable {
    private let reasons = Mutex<[MachineStop]>([])
    var handler: @Sendable (Machine.ID, MachineStop) -> Void { { [self] _, reason in reasons.withLock { $0.append(reason) } } }
    var all: [MachineStop] { reasons.withLock { $0 } }
}

/// Saves a running test guest (state and memory), restores it into a new machine, and checks that
/// the guest carries on: its counters continue, its memory verifies, its timers still tick.
@Suite(.enabled(if: KVMSystem.isAvailable, kvmMissing), .serialized)
struct SnapshotRestoreTests {
    static let heartbeatMilliseconds = 200
    /// The test guest's LAPIC timer ticks per heartbeat (100 Hz timer, Guests/test-guest/README.md).
    static let ticksPerHeartbeat = heartbeatMilliseconds / 10
    static let timeout: Duration = .seconds(120)

    /// At 500 pages a second the vCPUs are mostly halted when paused; at `max` they are busy in the
    /// CPL-3 workload, so the saved state is mid-computation.
    @Test(arguments: [(1, "500"), (2, "500"), (2, "max")])
    func restoredTestGuestContinuesWhereItWasSaved(cpus: Int, dirtyRate: String) throws {
        let guest = try TestGuest.path.get()
        let directory = try TemporaryDirectory()
        let memoryFile = directory.path("memory")
        let configuration = MachineConfiguration(
            cpus: cpus, memorySize: 128 << 20, kernel: guest,
            commandLine: "workset_mib=16 dirty_rate=\(dirtyRate) heartbeat_ms=\(Self.heartbeatMilliseconds) verify_ms=400")

        // Run the guest until every CPU has verified its memory and sent a few heartbeats, then save it.
        let console = GuestConsole()
        let stops = StopRecorder()
        let original = try Machine.forBoot(configuration: configuration, serialOutput: console.output, onStop: stops.handler)
        defer { original.stop() }
        try original.start()
        let warmedUp = console.wait(timeout: Self.timeout) { lines in
            (0..<cpus).allSatisfy { cpu in
                lines.compactMap(Heartbeat.init).filter { $0.cpu == cpu }.count >= 3
                    && lines.compactMap(VerifyOK.init).contains { $0.cpu == cpu }
            }
        }
        try #require(warmedUp, "the guest warmed up; console: \(console.lines.suffix(20))")
        // Pause in the middle of a console line if the guest can be caught printing one (the vCPU
        // is then often inside the UART's port I/O): the restored guest must finish that line
        // without losing or repeating a byte.
        _ = console.waitUntilMidLine(timeout: .seconds(2))
        try original.pause()
        let state = try original.saveState()
        let summary = try original.saveMemory(toFile: memoryFile)
        #expect(original.stop(), "the saved machine's vCPU threads ended")
        let before = console.lines
        #expect(summary.fileSize < configuration.memorySize / 2, "zero pages are left out (\(summary.fileSize) bytes)")
        #expect(state.vcpus.count == cpus)

        // Restore into a new machine, from the state as a snapshot would store it, and run it.
        let stored = try JSONEncoder().encode(state)
        let decoded = try JSONDecoder().decode(MachineState.self, from: stored)
        #expect(decoded == state)
        let resumedConsole = GuestConsole(continuing: console)
        let restored = try Machine.forRestore(configuration: decoded.configuration, serialOutput: resumedConsole.output,
                                              onStop: stops.handler)
        defer { restored.stop() }
        try restored.loadMemory(fromFile: memoryFile)
        try restored.restore(decoded)
        #expect(restored.phase == .ready)
        try restored.start()

        let lastBeats = (0..<cpus).map { cpu in before.compactMap(Heartbeat.init).last { $0.cpu == cpu } }
        let lastPasses = (0..<cpus).map { cpu in before.compactMap(VerifyOK.init).last { $0.cpu == cpu }?.pass ?? 0 }
        let carriedOn = resumedConsole.wait(timeout: Self.timeout) { lines in
            (0..<cpus).allSatisfy { cpu in
                lines.compactMap(Heartbeat.init).filter { $0.cpu == cpu }.count >= 3
                    && lines.compactMap(VerifyOK.init).filter { $0.cpu == cpu }.count >= 2
            }
        }
        let after = resumedConsole.lines
        #expect(carriedOn, "the restored guest kept reporting; console: \(after.suffix(20))")
        #expect(stops.all.isEmpty, "no machine stopped by itself: \(stops.all)")

        for cpu in 0..<cpus {
            let last = try #require(lastBeats[cpu], "vCPU \(cpu) sent heartbeats before the save")
            let beats = after.compactMap(Heartbeat.init).filter { $0.cpu == cpu }
            let next = try #require(beats.first, "vCPU \(cpu) sends heartbeats after the restore")
            #expect(next.seq == last.seq + 1, "vCPU \(cpu): heartbeat \(next.seq) follows \(last.seq)")
            #expect(beats.map(\.seq) == Array(next.seq..<next.seq + beats.count), "vCPU \(cpu) counts on by one")
            let tickGap = next.ticks - last.ticks
            #expect(tickGap > 0 && tickGap <= 2 * Self.ticksPerHeartbeat,
                    "vCPU \(cpu): ticks continue (\(last.ticks) → \(next.ticks)), not from 0")
            #expect(next.written >= last.written, "vCPU \(cpu): pages written continue (\(last.written) → \(next.written))")
            #expect(beats.last.map { $0.written > last.written } == true, "vCPU \(cpu): the workload keeps writing")
            let passes = after.compactMap(VerifyOK.init).filter { $0.cpu == cpu }.map(\.pass)
            #expect(passes.first == lastPasses[cpu] + 1, "vCPU \(cpu): verification pass \(passes.first ?? -1) follows \(lastPasses[cpu])")
        }
        let knownLine = { (line: String) in
            line.hasPrefix("HEARTBEAT ") || line.hasPrefix("VERIFY OK ") || line.hasPrefix("ferry-test-guest: ")
        }
        #expect(after.allSatisfy(knownLine), "every line after the restore is whole: \(after.filter { !knownLine($0) })")
        #expect(after.filter { $0.hasPrefix("HEARTBEAT ") }.allSatisfy { Heartbeat($0) != nil })
        let failures = (before + after).filter { $0.hasPrefix("VERIFY FAIL") || $0.contains("exception") || $0.contains("page fault") }
        #expect(failures.isEmpty, "\(failures)")
    }
}
