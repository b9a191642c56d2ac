import APIModels
import FerryClient
import FerryTestSupport
import Foundation
import Testing

/// The test guest with a virtio-blk disk, a virtio-rng and a virtio console, on Ferry's devices:
/// it boots and its workloads verify; snapshot/restore and live migration carry the devices with
/// the disk busy; the destination places the disk itself; and the pages devices write are migrated.
@Suite(.serialized, .enabled(if: Repository.kvmAvailable, needsKVM))
struct DeviceTests {
    /// One vCPU, the block workload rewriting 200 blocks/s and verifying every 500 ms.
    static func guest(_ directory: TemporaryDirectory, workload: String = "workset_mib=16 dirty_rate=1000 block_blocks=512 block_rate=200 block_verify_ms=500") throws -> TestGuestVM {
        TestGuestVM(cpus: 1, memoryMiB: 256, workload: workload, devices: try .init(in: directory))
    }

    /// Waits until `host`'s guest has verified its disk `passes` more times, with nothing wrong.
    static func expectBlockPasses(on host: FerryProcess, after pass: Int, passes: Int = 2,
                                  sourceLocation: SourceLocation = #_sourceLocation) async {
        #expect(await waitUntil(.seconds(60)) { (host.consoleLines.blockPasses.last ?? 0) >= pass + passes },
                "the disk verifies again after pass \(pass): \(host.consoleLines.suffix(5))", sourceLocation: sourceLocation)
        #expect(host.consoleLines.deviceFailures.isEmpty, "\(host.consoleLines.deviceFailures)", sourceLocation: sourceLocation)
    }

    @Test func guestUsesDiskEntropyAndConsole() async throws {
        let directory = try TemporaryDirectory()
        let vmm = try await TestVMM("vmm", in: directory)
        let guest = try Self.guest(directory)
        try await vmm.boot(guest)
        await Self.expectBlockPasses(on: vmm.process, after: 0)
        let lines = vmm.process.consoleLines
        #expect(lines.contains { $0.hasPrefix("ferry-test-guest: virtio blk at 00:01.0") && $0.contains("capacity=131072") })
        #expect(lines.contains("ferry-test-guest: virtio blk id=disk0"), "get-id answers the disk's id")
        #expect(lines.contains { $0.hasPrefix("RNG OK bytes=64") })
        #expect(await waitUntil(.seconds(30)) {
            ((try? String(contentsOfFile: guest.devices!.consolePath, encoding: .utf8)) ?? "").contains("CONSOLE seq=2 cpu=0")
        }, "the guest's virtio console output reaches the console file")
        // Threads are named where tools and management software look (libvirt finds vCPUs so).
        let names = vmm.process.threadNames
        #expect(names.contains("vcpu0") && names.contains("virtio-blk disk") && names.contains("virtio-rng"), "\(names)")
        let info = try await vmm.info()
        #expect(info.config.disks == [VmConfig.Disk(path: guest.devices!.diskPath, readonly: false, direct: false, id: "disk0")])
        #expect(info.config.rng == VmConfig.Rng(src: "/dev/urandom"))
        #expect(await vmm.shutDown())
    }

    @Test func snapshotAndRestoreCarryTheDevicesWithTheDiskBusy() async throws {
        let directory = try TemporaryDirectory()
        let source = try await TestVMM("source", in: directory)
        let guest = try Self.guest(directory)
        try await source.boot(guest)
        await Self.expectBlockPasses(on: source.process, after: 0, passes: 1)
        try await source.api.send(.vmPause)
        let snapshot = directory.path("snapshot")
        try await source.api.send(.vmSnapshot, body: Data(#"{"destination_url": "file://\#(snapshot)"}"#.utf8))
        let lastPass = source.process.consoleLines.blockPasses.last ?? 0
        #expect(await source.shutDown())

        let target = try await TestVMM("target", in: directory)
        try await target.api.send(.vmRestore, body: Data(#"{"source_url": "file://\#(snapshot)", "resume": true}"#.utf8))
        await Self.expectBlockPasses(on: target.process, after: lastPass)
        let first = target.process.consoleLines.blockPasses.first ?? 0
        #expect(first == lastPass + 1 || first == lastPass + 2, "the block workload continues: \(lastPass) → \(first)")
        #expect(!target.process.consoleLines.contains { $0.contains("virtio blk at") || $0.contains("block fill done") },
                "the guest did not set its devices up again")
        #expect(await target.shutDown())
    }

    @Test(arguments: MigrationTransport.allCases)
    func liveMigrationCarriesTheDevicesWithTheDiskBusy(transport: MigrationTransport) async throws {
        let directory = try TemporaryDirectory()
        let pair = try await MigrationPair(transport: transport, guest: try Self.guest(directory))
        await Self.expectBlockPasses(on: pair.source.process, after: 0, passes: 1)
        let consoleLinesBefore = (try String(contentsOfFile: pair.guest.devices!.consolePath, encoding: .utf8))
            .split(separator: "\n").count
        let lastPass = pair.source.process.consoleLines.blockPasses.last ?? 0
        try await MigrationTests.expectLiveMigration(pair, afterContinuing: {
            await Self.expectBlockPasses(on: pair.destination.process, after: lastPass)
        }) { SendMigrationData(destination_url: $0) }
        #expect(!pair.destination.process.consoleLines.contains { $0.contains("virtio blk at") || $0.contains("block fill done") },
                "the guest did not set its devices up again")
        let consoleLinesAfter = (try String(contentsOfFile: pair.guest.devices!.consolePath, encoding: .utf8)).split(separator: "\n")
        #expect(consoleLinesAfter.count > consoleLinesBefore && consoleLinesAfter.filter { $0.contains("hello") }.count == 1,
                "the virtio console goes on writing on the destination without starting over")
    }

    /// Unplaced, or placed where the destination cannot open it.
    @Test(arguments: [[], [ReceiveMigrationData.DiskPlacement(id: "disk0", path: "/nonexistent/disk0.img")]])
    func aDiskTheDestinationCannotHostFailsTheReceiveNamingItAndTheSourceKeepsTheGuest(
        placements: [ReceiveMigrationData.DiskPlacement]) async throws {
        let directory = try TemporaryDirectory()
        let pair = try await MigrationPair(transport: .tcp, guest: try Self.guest(directory))
        let incoming = try await pair.destination.startReceive(at: "tcp:127.0.0.1:0", disks: placements)
        try await pair.send(SendMigrationData(destination_url: incoming.url))
        let failed = await pair.waitForDestinationEnd()
        #expect(failed?.name == "vm.migration-receive-failed")
        #expect(failed?.event.properties?["error"]?.contains("disk disk0") == true, "\(String(describing: failed?.event.properties))")
        #expect(await pair.waitForSourceEnd()?.name == "vm.migration-failed")
        #expect(try await pair.source.info().state == "Running")
        await Self.expectBlockPasses(on: pair.source.process, after: pair.source.process.consoleLines.blockPasses.last ?? 0, passes: 1)
        _ = await pair.source.shutDown()
        _ = await pair.destination.shutDown()
    }

    /// With the debug switch that stops recording the pages devices write, the destination gets
    /// stale copies of what the disk read into guest memory, and the guest notices; with recording
    /// on (every other migration test) it never does. A 20 MB/s link stretches pass 0 to seconds,
    /// so the guest rereads blocks into memory pass 0 has already sent — unless, on a loaded host,
    /// its vCPUs hardly ran meanwhile: then the attempt proves nothing and is made again.
    @Test func untrackedDeviceWritesCorruptTheDestinationsMemory() async throws {
        try await retryingInconclusive("without device-write tracking the destination's guest found nothing stale",
                                       prefix: "untracked device writes: ") {
            try await untrackedDeviceWritesAttempt()
        }
    }

    /// One migration without device-write tracking; whether the destination's guest found stale memory.
    func untrackedDeviceWritesAttempt() async throws -> Bool {
        let directory = try TemporaryDirectory()
        let guest = try Self.guest(directory, workload: "workset_mib=64 dirty_rate=1000 block_blocks=2048 block_rate=400 block_verify_ms=1000")
        let source = try await TestVMM("source", in: directory, launcher: ["/usr/bin/env", "FERRY_DEBUG_UNTRACKED_DEVICE_WRITES=1"])
        let destination = try await TestVMM("destination", in: directory)
        try await source.boot(guest)
        // The first pass over 2048 blocks has taken over a minute with every suite running at once.
        #expect(await waitUntil(.seconds(180)) { !source.process.consoleLines.blockPasses.isEmpty })
        let incoming = try await destination.startReceive(at: "tcp:127.0.0.1:0", disks: guest.devices!.placements)
        let link = try ThrottledLink(to: incoming.url, transport: .tcp, in: directory, bytesPerSecond: 20_000_000)
        try await source.api.send(.vmSendMigration, body: try JSONEncoder().encode(SendMigrationData(destination_url: link.url)))
        #expect(await destination.waitForTerminal(MigrationStreams.destinationTerminal, occurrence: 1, timeout: .seconds(120))?.name
                == "vm.migration-receive-finished")
        let found = await waitUntil(.seconds(30)) { !destination.process.consoleLines.deviceFailures.isEmpty }
        if found {
            print("without device-write tracking the destination's guest reports: \(destination.process.consoleLines.deviceFailures.prefix(3))")
        }
        _ = await destination.shutDown()
        _ = await source.shutDown()
        return found
    }
}
