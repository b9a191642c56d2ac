import FerryTestSupport
import APIModels
import FerryClient
import Foundation
import Testing

/// Live migration between two real `ferry` processes on this host, over TCP on loopback and over
/// a Unix socket: the guest continues on the destination where it stopped on the source, and both
/// event streams are exactly those of docs/events.md §4 and §5.
///
/// Serialized: each test runs two VMMs with guests of up to two busy vCPUs (and a relay), which
/// is all a two-core machine has; in parallel they would slow each other down for no gain in
/// what is tested (the whole suite takes about 40 s this way).
@Suite(.serialized, .enabled(if: Repository.kvmAvailable, needsKVM))
struct MigrationTests {
    static let bootedStream = ["vmm.starting", "vm.booting", "vm.booted"]

    /// Migrates the running guest of `pair` with `request`, then checks everything a finished
    /// migration promises: the source `ferry` exited 0 on its own, both streams, the guest
    /// continuing on the destination and running there. Shuts the destination down.
    static func expectLiveMigration(_ pair: MigrationPair, receiveOccurrence: Int = 1, incoming: IncomingMigration? = nil,
                                    sourceBefore: [String] = bootedStream, destinationBefore: [String] = ["vmm.starting"],
                                    switchOver: MigrationExpectations.SwitchOver = .converged,
                                    sourceLocation: SourceLocation = #_sourceLocation,
                                    afterContinuing: () async -> Void = {},
                                    _ request: (String) -> SendMigrationData) async throws {
        var (expected, sourceExit) = try await pair.migrate(receiveOccurrence: receiveOccurrence, incoming: incoming, request,
                                                            sourceLocation: sourceLocation)
        expected.switchOver = switchOver
        #expect(sourceExit == 0, "the source ferry exits with status 0 on its own; stderr: \(pair.source.process.standardError)",
                sourceLocation: sourceLocation)
        let finished = MigrationStreams.expectFinished(source: pair.source.events(),
                                                       destination: pair.destination.events(),
                                                       sourceBefore: sourceBefore, destinationBefore: destinationBefore, expected,
                                                       sourceLocation: sourceLocation)
        if let finished {
            print("migration over \(pair.transport) of \(pair.guest.cpus) vCPU(s), \(pair.guest.memoryMiB) MiB, \(pair.guest.workload): "
                  + "\(finished.iterations) passes, \(finished.bytesTotal) bytes, total \(finished.totalMs) ms, downtime \(finished.downtimeMs) ms")
        }
        try await MigrationHarness.expectGuestContinued(from: pair.source.process, on: pair.destination.process, cpus: pair.guest.cpus,
                                                        sourceLocation: sourceLocation)
        #expect(try await pair.destination.info().state == "Running", sourceLocation: sourceLocation)
        await afterContinuing()
        #expect(await pair.destination.shutDown(), "\(pair.destination.name) shuts down cleanly: \(pair.destination.process.standardError.suffix(2000))", sourceLocation: sourceLocation)
    }

    // MARK: Migrations that finish

    @Test(arguments: MigrationTransport.allCases)
    func idleOneGiBGuestMovesAndContinuesOnTheDestination(transport: MigrationTransport) async throws {
        let pair = try await MigrationPair(transport: transport,
                                           guest: TestGuestVM(cpus: 1, memoryMiB: 1024, workload: "workset_mib=1 dirty_rate=10"))
        try await Self.expectLiveMigration(pair) { SendMigrationData(destination_url: $0) }
    }

    /// A 64 GiB guest that uses 64 MiB: guest RAM is mapped without reserving host memory, pass 0
    /// skips the pages the host never backed, and they stay unbacked on the destination.
    @Test func sparseSixtyFourGiBGuestMovesAndStaysSparse() async throws {
        let pair = try await MigrationPair(transport: .tcp,
                                           guest: TestGuestVM(cpus: 1, memoryMiB: 64 << 10, workload: "workset_mib=64 dirty_rate=10"))
        let resident = { (node: TestVMM) in (node.statusKilobytes("VmRSS") ?? 0) << 10 }
        #expect(resident(pair.source) < 2 << 30, "the source backs what the guest used: \(resident(pair.source) >> 20) MiB")
        try await Self.expectLiveMigration(pair, afterContinuing: {
            #expect(resident(pair.destination) < 2 << 30,
                    "the destination backs what arrived: \(resident(pair.destination) >> 20) MiB")
        }) { SendMigrationData(destination_url: $0) }
    }

    @Test(arguments: MigrationTransport.allCases)
    func twoVCPUGuestRewriting64MiBConvergesAndContinuesOnTheDestination(transport: MigrationTransport) async throws {
        let pair = try await MigrationPair(transport: transport,
                                           guest: TestGuestVM(cpus: 2, memoryMiB: 256, workload: "workset_mib=64 dirty_rate=2000"))
        try await Self.expectLiveMigration(pair) { SendMigrationData(destination_url: $0, downtime_ms: 300, timeout_s: 600) }
    }

    /// Memory over four connections at once (`connections: 4`): the guest arrives as over one,
    /// and the destination's progress says four.
    @Test(arguments: MigrationTransport.allCases)
    func fourConnectionsCarryABusyGuest(transport: MigrationTransport) async throws {
        let pair = try await MigrationPair(transport: transport,
                                           guest: TestGuestVM(cpus: 2, memoryMiB: 512, workload: "workset_mib=128 dirty_rate=2000"))
        try await Self.expectLiveMigration(pair, afterContinuing: {
            let received = try? await pair.destination.progress()
            let four: MigrationProgressReport.TransportationMode = transport == .tcp ? .tcp(connections: 4, tls: false) : .unix(connections: 4)
            #expect(received?.transportation_mode == four, "\(String(describing: received?.transportation_mode))")
        }) { SendMigrationData(destination_url: $0, timeout_s: 600, connections: 4) }
    }

    @Test(arguments: MigrationTransport.allCases)
    func guestPausedBeforehandArrivesPausedWithoutPauseEventsAndResumes(transport: MigrationTransport) async throws {
        let pair = try await MigrationPair(transport: transport,
                                           guest: TestGuestVM(cpus: 2, memoryMiB: 256, workload: "workset_mib=16 dirty_rate=1000"))
        try await pair.source.api.send(.vmPause)
        let (expected0, sourceExit) = try await pair.migrate { SendMigrationData(destination_url: $0) }
        var expected = expected0
        expected.guestWasRunning = false
        #expect(sourceExit == 0, "the source ferry exits with status 0 on its own; stderr: \(pair.source.process.standardError)")
        MigrationStreams.expectFinished(source: pair.source.events(),
                                        destination: pair.destination.events(),
                                        sourceBefore: Self.bootedStream + ["vm.pausing", "vm.paused"],
                                        destinationBefore: ["vmm.starting"], expected)
        #expect(try await pair.destination.info().state == "Paused", "the guest arrives paused")
        #expect(pair.destination.process.consoleLines.heartbeats.isEmpty, "the paused guest has not run on the destination")

        let beforeResume = pair.destination.events().count
        try await pair.destination.api.send(.vmResume)
        try await MigrationHarness.expectGuestContinued(from: pair.source.process, on: pair.destination.process, cpus: pair.guest.cpus)
        #expect(try await pair.destination.info().state == "Running")
        try await pair.destination.waitForEvents(["vm.resuming", "vm.resumed"], after: beforeResume)
        #expect(pair.destination.events().map(\.name).suffix(3)
                == ["vm.migration-receive-finished", "vm.resuming", "vm.resumed"], "the API resume, and only it, resumes the guest")
        #expect(await pair.destination.shutDown(), "\(pair.destination.name) shuts down cleanly: \(pair.destination.process.standardError.suffix(2000))")
    }

    // MARK: Host-local settings

    /// The guest's console goes where each host says: the source's file stays the source's, the
    /// destination writes where its own receive request says, and without one it opens nothing.
    @Test func theGuestsConsoleGoesWhereEachDestinationSaysNeverWhereTheSourceDid() async throws {
        let directory = try TemporaryDirectory()
        let sourceConsole = directory.path("source-console.log")
        let destinationConsole = directory.path("destination-console.log")
        let guest = TestGuestVM(cpus: 1, memoryMiB: 256, workload: "workset_mib=16 dirty_rate=1000")
        let source = try await TestVMM("source", in: directory)
        try await source.api.send(.vmCreate, body: guest.configuration(kernel: try TestGuest.path.get(),
                                                                     serial: #"{"mode": "File", "file": "\#(sourceConsole)"}"#))
        try await source.api.send(.vmBoot)
        #expect(await waitUntil(.seconds(120)) { Self.heartbeats(in: sourceConsole).count >= 2 }, "the guest runs on the source")

        // First hop: the destination writes the console to a file of its own.
        let destination = try await TestVMM("destination", in: directory)
        let receive = try await destination.startReceive(at: "tcp:127.0.0.1:0",
                                                         serial: VmConfig.Console(mode: "File", file: destinationConsole))
        let id = try await source.startSend(to: receive.url)
        let end = try await source.waitForEvent(MigrationStreams.sourceTerminal, id: id)
        #expect(end.name == "vm.migration-finished", "\(end.properties)")
        #expect(await receive.outcome() == nil)
        #expect(await source.waitForExit(timeout: .seconds(60)) == 0)
        let sourceLines = Self.heartbeats(in: sourceConsole)
        #expect(await waitUntil(.seconds(60)) { Self.heartbeats(in: destinationConsole).count >= 2 },
                "the destination writes the guest's console where its receive said")
        let last = try #require(sourceLines.last)
        let first = try #require(Self.heartbeats(in: destinationConsole).first)
        #expect(first.seq > last.seq && first.seq <= last.seq + 2, "the heartbeats go on: \(last.seq) → \(first.seq)")
        #expect(Self.heartbeats(in: sourceConsole) == sourceLines, "nothing is written to the source's console file after the migration")
        #expect(!destination.openFiles().contains(sourceConsole), "the destination never opened the source's console file")
        #expect(try await destination.info().config.serial == VmConfig.Console(mode: "File", file: destinationConsole))

        // Second hop: a receive that says nothing discards the console and opens no file.
        let third = try await TestVMM("third", in: directory)
        let bare = try await third.startReceive(at: "tcp:127.0.0.1:0", serial: nil)
        let secondID = try await destination.startSend(to: bare.url)
        #expect(try await destination.waitForEvent(MigrationStreams.sourceTerminal, id: secondID).name == "vm.migration-finished")
        #expect(await bare.outcome() == nil)
        #expect(try await third.info().state == "Running")
        #expect(try await third.info().config.serial == VmConfig.Console(mode: "Null"))
        let opened = third.openFiles().filter { $0.hasPrefix(directory.url.path) && !$0.hasSuffix(".events") && !$0.hasSuffix(".sock") }
        #expect(opened.isEmpty, "the third VMM opened no file in the test's directory besides its own: \(opened)")
        #expect(await third.shutDown())
    }

    static func heartbeats(in path: String) -> [Heartbeat] {
        ((try? String(contentsOfFile: path, encoding: .utf8)) ?? "").split(separator: "\n").compactMap { Heartbeat(String($0)) }
    }

    // MARK: timeout_strategy

    /// Two vCPUs rewrite 32 MiB as fast as they can, the link carries 40 MB/s and the downtime
    /// limit is 1 ms: every pass leaves the whole working set dirty (about 0.8 s of sending), so
    /// pre-copy cannot converge and the 2 s timeout decides.
    static let fastWriter = TestGuestVM(cpus: 2, memoryMiB: 256, workload: "workset_mib=32 dirty_rate=max")
    static let linkBytesPerSecond = 40_000_000

    @Test(arguments: MigrationTransport.allCases)
    func timeoutWithCancelKeepsTheGuestOnTheSourceAndTheDestinationReceivesAgain(transport: MigrationTransport) async throws {
        let pair = try await MigrationPair(transport: transport, guest: Self.fastWriter)
        let incoming = try await pair.startReceive()
        let link = try ThrottledLink(to: incoming.url, transport: transport, in: pair.directory, bytesPerSecond: Self.linkBytesPerSecond)
        let request = SendMigrationData(destination_url: link.url, downtime_ms: 1, timeout_s: 2, timeout_strategy: "Cancel", auto_converge: false)
        try await pair.send(request)
        let end = try #require(await pair.waitForSourceEnd())
        try #require(end.name == "vm.migration-cancelled" && end.properties["reason"] == "timeout", "\(end.name) \(end.properties)")

        // The destination gives the receive up, and its call fails.
        let failure = await incoming.outcome()
        #expect((failure as? APIError)?.status == 500, "vm.receive-migration fails: \(failure.map { "\($0)" } ?? "it succeeded")")
        #expect(await pair.waitForDestinationEnd()?.name == "vm.migration-receive-failed")

        // The guest never stopped on the source.
        await MigrationHarness.expectGuestKeepsRunning(on: pair.source.process, cpus: Self.fastWriter.cpus)
        #expect(try await pair.source.info().state == "Running")
        _ = try await pair.source.api.send(.vmmPing)

        let sourceEvents = pair.source.events()
        let destinationEvents = pair.destination.events()
        let cancelledSegment = sourceEvents.dropFirst(Self.bootedStream.count)
        #expect(sourceEvents.map(\.name).prefix(Self.bootedStream.count).elementsEqual(Self.bootedStream))
        let expected = MigrationExpectations(request: request, incoming: incoming, guestRAMBytes: Self.fastWriter.memoryBytes)
        let cancelledID = MigrationStreams.expectCancelledBeforeSwitchOver(cancelledSegment, reason: "timeout", expected)
        #expect(cancelledSegment.last?.name == "vm.migration-cancelled", "the cancel is the only terminal event, and the last")
        #expect(destinationEvents.first?.name == "vmm.starting")
        let receiveFailed = MigrationStreams.expectReceiveFailed(destinationEvents.dropFirst(), expected, migrationID: cancelledID)
        #expect(receiveFailed?["phase"] == "memory-precopy", "\(receiveFailed ?? [:])")
        #expect(receiveFailed?["error"] == "the sender abandoned the migration", "the source said so: \(receiveFailed ?? [:])")
        #expect(destinationEvents.count == 4, "\(destinationEvents.map(\.name))")

        // The same destination VMM receives the same guest, directly and with a downtime it can meet.
        try await Self.expectLiveMigration(pair, receiveOccurrence: 2,
                                           sourceBefore: sourceEvents.map(\.name), destinationBefore: destinationEvents.map(\.name)) {
            SendMigrationData(destination_url: $0, downtime_ms: 10_000)
        }
        let second = pair.source.events().last { $0.name == "vm.migration-started" }
        #expect(second?.properties["migration_id"] != cancelledID, "each migration has an id of its own")
    }

    @Test(arguments: MigrationTransport.allCases)
    func timeoutWithIgnoreSwitchesOverAndFinishesOnTheDestination(transport: MigrationTransport) async throws {
        let pair = try await MigrationPair(transport: transport, guest: Self.fastWriter)
        let incoming = try await pair.startReceive()
        let link = try ThrottledLink(to: incoming.url, transport: transport, in: pair.directory, bytesPerSecond: Self.linkBytesPerSecond)
        try await Self.expectLiveMigration(pair, incoming: incoming, switchOver: .timeoutIgnored) { _ in
            SendMigrationData(destination_url: link.url, downtime_ms: 1, timeout_s: 2, timeout_strategy: "Ignore", auto_converge: false)
        }
    }

    // MARK: Local migration

    /// `local: true` over a Unix socket: the destination maps the guest's memory file instead of
    /// receiving its pages. Nothing is copied (no pass, bytes_total 0), the destination's guest
    /// RAM is the same memory file, and the guest continues there with its memory verified.
    @Test func aLocalMigrationHandsTheMemoryOverAndTheGuestContinues() async throws {
        let guest = TestGuestVM(cpus: 2, memoryMiB: 512, workload: "workset_mib=64 dirty_rate=2000", sharedMemory: true)
        let pair = try await MigrationPair(transport: .unix, guest: guest)
        let memoryFile = { (node: TestVMM) in
            ((try? String(contentsOfFile: "/proc/\(node.process.pid)/maps", encoding: .utf8)) ?? "").contains("/memfd:ferry-guest-ram")
        }
        #expect(memoryFile(pair.source), "the source's guest RAM is a memory file")
        try await Self.expectLiveMigration(pair, switchOver: .local, afterContinuing: {
            #expect(memoryFile(pair.destination), "the destination maps the memory file it was handed")
            let progress = try? await pair.destination.progress()
            #expect(progress?.transportation_mode == .local, "\(String(describing: progress?.transportation_mode))")
            let shared = try? await pair.destination.info().config.memory?.shared
            #expect(shared == true, "vm.info says the memory is shared")
        }) { SendMigrationData(destination_url: $0, local: true) }
        let finished = pair.source.events().last { $0.name == "vm.migration-finished" }
        #expect(finished?.properties["bytes_total"] == "0" && finished?.properties["iterations"] == "0", "\(finished?.properties ?? [:])")
    }

    /// A local migration whose destination cannot build the VM fails on both sides after the
    /// memory file was handed over; the guest keeps running on the source, its memory intact.
    @Test func aLocalMigrationTheDestinationRefusesLeavesTheGuestOnTheSource() async throws {
        let directory = try TemporaryDirectory()
        let guest = TestGuestVM(cpus: 1, memoryMiB: 256, workload: "workset_mib=32 dirty_rate=2000",
                                devices: try TestGuestVM.Devices(in: directory), sharedMemory: true)
        let pair = try await MigrationPair(transport: .unix, guest: guest)
        _ = try await pair.destination.startReceive(at: MigrationTransport.unix.receiverURL(in: pair.directory, name: "migration.sock"),
                                                    disks: [.init(id: "disk0", path: "/nonexistent/ferry/disk0.img")])
        try await pair.send(SendMigrationData(destination_url: MigrationTransport.unix.receiverURL(in: pair.directory, name: "migration.sock"),
                                              local: true))
        let end = try #require(await pair.waitForSourceEnd())
        #expect(end.name == "vm.migration-failed", "\(end.name) \(end.properties)")
        #expect(end.properties["error"]?.contains("cannot run the VM") == true, "\(end.properties)")
        #expect(await pair.destination.waitForTerminal(MigrationStreams.destinationTerminal, occurrence: 1, timeout: .seconds(30))?.name
                == "vm.migration-receive-failed")
        await MigrationHarness.expectGuestKeepsRunning(on: pair.source.process, cpus: guest.cpus)
        #expect(pair.source.process.consoleLines.verifyFailures.isEmpty, "\(pair.source.process.consoleLines.verifyFailures)")
        #expect(try await pair.source.info().state == "Running")
        #expect(await pair.source.shutDown())
        _ = await pair.destination.shutDown()
    }

    /// What a local migration needs is checked before anything starts: a `unix:` destination, one
    /// connection, and a VM whose memory is shared.
    @Test func aLocalMigrationIsRefusedWhereItCannotWork() async throws {
        let pair = try await MigrationPair(transport: .unix, guest: TestGuestVM(cpus: 1, memoryMiB: 128, workload: "workset_mib=1 dirty_rate=10"))
        let url = MigrationTransport.unix.receiverURL(in: pair.directory, name: "nobody.sock")
        try await Self.expectRefusal(400, containing: "not shared", "the guest's memory is private") {
            try await pair.send(SendMigrationData(destination_url: url, local: true))
        }
        try await Self.expectRefusal(400, startingWith: "local:", "over TCP") {
            try await pair.send(SendMigrationData(destination_url: "tcp:127.0.0.1:1", local: true))
        }
        try await Self.expectRefusal(400, startingWith: "connections:", "over two connections") {
            try await pair.send(SendMigrationData(destination_url: url, connections: 2, local: true))
        }
        #expect(try await pair.source.info().state == "Running")
        #expect(!pair.source.events().contains { $0.name == "vm.migration-started" }, "no migration started")
        #expect(await pair.source.shutDown())
        _ = await pair.destination.shutDown()
    }

    // MARK: Auto-converge

    /// The throttle of each pass, from the source's iteration events.
    static func throttles(_ events: [RecordedEvent]) -> [Int] {
        events.filter { $0.name == MigrationStreams.iteration }.compactMap { $0.properties["vcpu_throttle_percent"].flatMap(Int.init) }
    }

    /// QEMU's steps: none during passes 0 and 1, then 20 %, 10 more after each pass that still
    /// dirties too fast, at most 99 %.
    static func expectThrottleSteps(_ throttles: [Int], sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(throttles.prefix(2).allSatisfy { $0 == 0 }, "no throttle in passes 0 and 1: \(throttles)", sourceLocation: sourceLocation)
        for (previous, next) in zip(throttles, throttles.dropFirst()) {
            #expect(next == previous || next == (previous == 0 ? 20 : min(previous + 10, 99)),
                    "throttle steps \(previous) → \(next): \(throttles)", sourceLocation: sourceLocation)
        }
    }

    /// Pages the guest's vCPU 0 wrote per timer tick over `beats` heartbeats after `seq`: the
    /// first such window, or the best of all so far with `best`.
    static func writesPerTick(_ process: FerryProcess, after seq: Int, beats: Int = 4, best: Bool = false) -> Double? {
        let heartbeats = process.consoleLines.heartbeats.filter { $0.cpu == 0 && $0.seq > seq }
        let rates = zip(heartbeats, heartbeats.dropFirst(beats - 1)).compactMap { first, last in
            last.ticks > first.ticks ? Double(last.written - first.written) / Double(last.ticks - first.ticks) : nil
        }
        return best ? rates.max() : rates.first
    }

    /// The fast writer outruns a 40 MB/s link many times over: with auto-converge (the default)
    /// its vCPUs are slowed step by step until the pause fits the limit, and it arrives; without,
    /// the same migration never converges and its timeout cancels it.
    @Test(arguments: [true, false])
    func autoConvergeLetsAGuestThatOutrunsTheLinkArrive(autoConverge: Bool) async throws {
        let pair = try await MigrationPair(transport: .tcp, guest: Self.fastWriter)
        let incoming = try await pair.startReceive()
        let link = try ThrottledLink(to: incoming.url, transport: .tcp, in: pair.directory, bytesPerSecond: Self.linkBytesPerSecond)
        if autoConverge {
            try await Self.expectLiveMigration(pair, incoming: incoming) { _ in
                SendMigrationData(destination_url: link.url, timeout_s: 120)
            }
            let throttles = Self.throttles(pair.source.events())
            Self.expectThrottleSteps(throttles)
            #expect((throttles.last ?? 0) >= 20, "the guest was slowed down: \(throttles)")
            print("auto-converge: \(throttles.count) passes, throttle \(throttles)")
        } else {
            try await pair.send(SendMigrationData(destination_url: link.url, timeout_s: 8, timeout_strategy: "Cancel", auto_converge: false))
            let end = try #require(await pair.waitForSourceEnd())
            #expect(end.name == "vm.migration-cancelled" && end.properties["reason"] == "timeout", "\(end.name) \(end.properties)")
            let throttles = Self.throttles(pair.source.events())
            #expect(throttles.count >= 3 && throttles.allSatisfy { $0 == 0 }, "never throttled: \(throttles)")
            #expect(await pair.source.shutDown())
            _ = await pair.destination.shutDown()
        }
    }

    /// A cancel lifts the throttle at once: the progress shows it while it is on, its ticker
    /// thread ends with the cancel, and afterwards the guest writes per timer tick well over what
    /// it wrote throttled to 60 % (2.5 times as much unthrottled; at least 1.5 times over the best
    /// window of four heartbeats, since other tests share these two cores). The rate before the
    /// migration is only printed: right after boot it varies twofold from run to run.
    @Test func aCancelLiftsTheThrottle() async throws {
        // Heartbeats five times a second, so that four of them fall within a pass or two.
        let guest = TestGuestVM(cpus: 2, memoryMiB: 256, workload: "workset_mib=32 dirty_rate=max heartbeat_ms=200")
        let pair = try await MigrationPair(transport: .tcp, guest: guest)
        let source = pair.source
        let before = try #require(source.process.consoleLines.heartbeats.last { $0.cpu == 0 }?.seq)
        #expect(await waitUntil(.seconds(30)) { Self.writesPerTick(source.process, after: before) != nil })
        let freely = Self.writesPerTick(source.process, after: before) ?? 0

        let incoming = try await pair.startReceive()
        let link = try ThrottledLink(to: incoming.url, transport: .tcp, in: pair.directory, bytesPerSecond: Self.linkBytesPerSecond)
        try await pair.send(SendMigrationData(destination_url: link.url, downtime_ms: 1, timeout_s: 120))
        var throttled = 0
        let deadline = ContinuousClock.now + .seconds(90)
        while throttled < 60, ContinuousClock.now < deadline {
            if case .ongoing(_, let percent)? = try? await source.progress().state { throttled = percent }
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(throttled >= 60, "vm.migration-progress shows the throttle rising: \(throttled) %")
        #expect(source.process.threadNames.contains("vcpu-throttle"), "\(source.process.threadNames)")
        let duringSeq = source.process.consoleLines.heartbeats.last { $0.cpu == 0 }?.seq ?? before
        let throttledFrom = source.process.consoleLines.heartbeats.filter { $0.cpu == 0 }.dropLast(4).last?.seq ?? before
        let during = try #require(Self.writesPerTick(source.process, after: throttledFrom))
        try await source.api.send(.vmCancelMigration)
        let end = try #require(await pair.waitForSourceEnd())
        #expect(end.name == "vm.migration-cancelled", "\(end.name) \(end.properties)")
        Self.expectThrottleSteps(Self.throttles(source.events()))
        #expect(await waitUntil(.seconds(5)) { !source.process.threadNames.contains("vcpu-throttle") },
                "the throttle's thread ends with the cancel: \(source.process.threadNames)")

        let after = source.process.consoleLines.heartbeats.last { $0.cpu == 0 }?.seq ?? duringSeq
        var freed = 0.0
        #expect(await waitUntil(.seconds(30)) {
            freed = Self.writesPerTick(source.process, after: after, best: true) ?? 0
            return freed >= during * 1.5
        }, "the guest writes freely again: at best \(freed) pages per tick against \(during) throttled")
        print("auto-converge cancel: \(freely) pages per tick before, \(during) throttled to \(throttled) %, at best \(freed) after the cancel")
        #expect(await source.shutDown())
        _ = await pair.destination.shutDown()
    }

    // MARK: The API around a migration

    @Test func conflictingRequestsAreRefusedWhileAMigrationRunsAndCancelEndsIt() async throws {
        let guest = TestGuestVM(cpus: 1, memoryMiB: 256, workload: "workset_mib=32 dirty_rate=max")
        let pair = try await MigrationPair(transport: .tcp, guest: guest)
        let source = pair.source
        let receiveHere = try JSONEncoder().encode(ReceiveMigrationData(receiver_url: "tcp:127.0.0.1:0"))
        try await Self.expectRefusal(409, containing: "already exists", "a VMM with a VM does not receive") {
            try await source.api.send(.vmReceiveMigration, body: receiveHere)
        }
        try await Self.expectRefusal(409, containing: "no migration is in progress") { try await source.api.send(.vmCancelMigration) }

        let incoming = try await pair.startReceive()
        try await Self.expectRefusal(409, containing: "migration is already in progress", "one receive at a time") {
            try await pair.destination.api.send(.vmReceiveMigration,
                                                body: try JSONEncoder().encode(ReceiveMigrationData(receiver_url: "tcp:127.0.0.1:0")))
        }
        try await Self.expectRefusal(400, startingWith: "connections:") {
            try await pair.send(SendMigrationData(destination_url: incoming.url, connections: 129))
        }
        try await Self.expectRefusal(400, startingWith: "local:") {
            try await pair.send(SendMigrationData(destination_url: incoming.url, local: true))
        }
        #expect(source.events().map(\.name) == Self.bootedStream, "refused requests start nothing")
        #expect(pair.destination.events().map(\.name) == ["vmm.starting", "vm.migration-receive-ready"], "nobody connected")

        // 1 ms cannot be met while the vCPU rewrites 32 MiB as fast as it can over a 40 MB/s link:
        // this migration runs until it is cancelled.
        let link = try ThrottledLink(to: incoming.url, transport: .tcp, in: pair.directory, bytesPerSecond: Self.linkBytesPerSecond)
        let request = SendMigrationData(destination_url: link.url, downtime_ms: 1, auto_converge: false)
        try await pair.send(request)
        try await source.waitForEvent(MigrationStreams.iteration)  // pre-copy is under way
        try await Self.expectRefusal(409, containing: "already in progress", "a second vm.send-migration") {
            try await pair.send(request)
        }
        try await Self.expectRefusal(409, containing: "being migrated", "vm.pause during the migration") {
            try await source.api.send(.vmPause)
        }
        #expect(try await source.info().state == "Running", "vm.info answers during the migration")
        let ongoing = try await source.progress()
        #expect(ongoing.state.isOngoing && ongoing.direction == .outgoing, "\(ongoing.state)")
        #expect(!source.events().contains { MigrationStreams.sourceTerminal.contains($0.name) },
                "the migration was still running while the API was asked")

        try await source.api.send(.vmCancelMigration)
        let end = try #require(await pair.waitForSourceEnd())
        #expect(end.name == "vm.migration-cancelled" && end.properties["reason"] == "requested", "\(end.name) \(end.properties)")
        let failure = await incoming.outcome()
        #expect((failure as? APIError)?.status == 500, "the receive fails: \(failure.map { "\($0)" } ?? "it succeeded")")
        #expect(await pair.waitForDestinationEnd()?.name == "vm.migration-receive-failed")
        try await Self.expectRefusal(409, containing: "no migration is in progress") { try await source.api.send(.vmCancelMigration) }

        // The guest runs on the source as before, and the VM takes operations again.
        await MigrationHarness.expectGuestKeepsRunning(on: source.process, cpus: guest.cpus)
        let beforePause = source.events().count
        try await source.api.send(.vmPause)
        try await source.api.send(.vmResume)
        // The events of an answered request may still be on their way to the file: wait for them.
        try await source.waitForEvents(["vm.pausing", "vm.paused", "vm.resuming", "vm.resumed"], after: beforePause)
        #expect(try await source.progress().state == .cancelled)

        let sourceEvents = source.events()
        let expected = MigrationExpectations(request: request, incoming: incoming, guestRAMBytes: guest.memoryBytes)
        let id = MigrationStreams.expectCancelledBeforeSwitchOver(sourceEvents.dropFirst(Self.bootedStream.count), reason: "requested", expected)
        let migrationEvents = sourceEvents.map(\.name).dropFirst(Self.bootedStream.count).prefix { $0 != "vm.pausing" }
        #expect(sourceEvents.map(\.name) == Self.bootedStream + migrationEvents + ["vm.pausing", "vm.paused", "vm.resuming", "vm.resumed"])
        let destinationEvents = pair.destination.events()
        MigrationStreams.expectReceiveFailed(destinationEvents.dropFirst(), expected, migrationID: id)
        #expect(destinationEvents.map(\.name).count == 4, "\(destinationEvents.map(\.name))")
        #expect(await source.shutDown(), "\(source.name) shuts down cleanly: \(source.process.standardError.suffix(2000))")
        #expect(await pair.destination.shutDown(), "the destination shuts down cleanly: \(pair.destination.process.standardError.suffix(2000))")
    }

    @Test(arguments: MigrationTransport.allCases)
    func progressAfterAFinishedMigrationSaysFinishedOnBothSidesWithTheEventsNumbers(transport: MigrationTransport) async throws {
        let pair = try await MigrationPair(transport: transport,
                                           guest: TestGuestVM(cpus: 1, memoryMiB: 256, workload: "workset_mib=16 dirty_rate=500"))
        // keep_alive: the source stays up, so that its progress can be read afterwards.
        let (expected, sourceExit) = try await pair.migrate { SendMigrationData(destination_url: $0, keep_alive: true) }
        #expect(sourceExit == nil)
        let finished = try #require(MigrationStreams.expectFinished(
            source: pair.source.events(), destination: pair.destination.events(),
            sourceBefore: Self.bootedStream, destinationBefore: ["vmm.starting"], expected))
        let mode: MigrationProgressReport.TransportationMode = transport == .tcp ? .tcp(connections: 1, tls: false) : .unix(connections: 1)

        let outgoing = try await pair.source.progress()
        #expect(outgoing.state == .finished && outgoing.direction == .outgoing && outgoing.migration_id == finished.id, "\(outgoing)")
        #expect(outgoing.memory_transmission_info.memory_bytes_transmitted == finished.bytesTotal,
                "source: \(outgoing.memory_transmission_info.memory_bytes_transmitted) bytes transmitted; events: \(finished.bytesTotal)")
        #expect(outgoing.total_ms == finished.totalMs && outgoing.downtime_ms == finished.downtimeMs,
                "source: total_ms \(outgoing.total_ms.map(String.init) ?? "absent"), downtime_ms \(outgoing.downtime_ms.map(String.init) ?? "absent")")
        #expect(outgoing.transportation_mode == mode && outgoing.downtime_configured_ms == 300)

        let incoming = try await pair.destination.progress()
        let receiveFinished = try #require(pair.destination.events().last { $0.name == "vm.migration-receive-finished" })
        #expect(incoming.state == .finished && incoming.direction == .incoming && incoming.migration_id == finished.id, "\(incoming)")
        #expect(incoming.memory_transmission_info.memory_bytes_transmitted == finished.bytesTotal,
                "destination: \(incoming.memory_transmission_info.memory_bytes_transmitted) bytes received; events: \(finished.bytesTotal)")
        #expect(incoming.total_ms.map(String.init) == receiveFinished.properties["total_ms"],
                "destination: total_ms \(incoming.total_ms.map(String.init) ?? "absent") as in receive-finished")
        // Downtime runs from the pause on the source to the resume here: only the source measures it.
        #expect(incoming.downtime_ms == nil, "destination: downtime_ms is the source's measurement")
        #expect(incoming.transportation_mode == mode)

        // The source VMM stays up without its VM.
        try await Self.expectRefusal(404, containing: "no VM", "the source has no VM any more") { try await pair.source.api.send(.vmInfo) }
        try await MigrationHarness.expectGuestContinued(from: pair.source.process, on: pair.destination.process, cpus: 1)
        #expect(await pair.source.shutDown(), "\(pair.source.name) shuts down cleanly: \(pair.source.process.standardError.suffix(2000))")
        #expect(pair.source.events().map(\.name).suffix(3) == ["vm.migration-finished", "vm.deleted", "vmm.shutdown"])
        #expect(await pair.destination.shutDown(), "\(pair.destination.name) shuts down cleanly: \(pair.destination.process.standardError.suffix(2000))")
    }

    /// Runs `body` and expects it to fail with `status` and a first message that contains (or starts with) the given text.
    static func expectRefusal(_ status: Int, containing text: String? = nil, startingWith prefix: String? = nil, _ comment: Comment? = nil,
                              sourceLocation: SourceLocation = #_sourceLocation, _ body: () async throws -> Void) async throws {
        do {
            try await body()
            Issue.record("expected HTTP \(status), got success\(comment.map { ": \($0)" } ?? "")", sourceLocation: sourceLocation)
        } catch let error as APIError {
            let message = error.messages.first ?? ""
            #expect(error.status == status, "HTTP \(error.status): \(error)\(comment.map { " (\($0))" } ?? "")", sourceLocation: sourceLocation)
            if let text {
                #expect(message.contains(text), "'\(message)' says '\(text)'", sourceLocation: sourceLocation)
            }
            if let prefix {
                #expect(message.hasPrefix(prefix), "'\(message)' names the field: '\(prefix)'", sourceLocation: sourceLocation)
            }
        }
    }
}
