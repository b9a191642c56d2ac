import APIModels
import FerryClient
import FerryTestSupport
import Foundation
import LiveMigration
import Testing

// A harness for live-migration tests between two real `ferry` processes on this host: start the
// VMMs, boot the test guest on the source, receive and send, and check what happened against
// docs/events.md §4 and §5. Every wait polls with a deadline; nothing sleeps a fixed time.

/// How a migration travels between two VMMs on this host.
enum MigrationTransport: String, CaseIterable, Sendable {
    case tcp
    case unix

    /// Where the destination listens: port 0 on loopback (the system picks a free port, which
    /// `vm.migration-receive-ready` names, so parallel tests never collide), or a socket in
    /// `directory`.
    func receiverURL(in directory: TemporaryDirectory, name: String = "migration.sock") -> String {
        switch self {
        case .tcp: "tcp:127.0.0.1:0"
        case .unix: "unix:\(directory.path(name))"
        }
    }
}

/// A source and a destination `ferry` in one temporary directory, the test guest running on the
/// source, and the steps of a migration between them.
struct MigrationPair: Sendable {
    let directory: TemporaryDirectory
    let transport: MigrationTransport
    let guest: TestGuestVM
    let source: TestVMM
    let destination: TestVMM

    /// Starts both VMMs, creates and boots `guest` on the source and waits until every vCPU has
    /// finished its initial fill and printed heartbeats.
    init(transport: MigrationTransport, guest: TestGuestVM) async throws {
        directory = try TemporaryDirectory()
        self.transport = transport
        self.guest = guest
        source = try await TestVMM("source", in: directory)
        destination = try await TestVMM("destination", in: directory)
        try await source.boot(guest)
    }

    /// Starts `vm.receive-migration` on the destination, with the arriving guest's console on the
    /// destination's standard output, and waits for the receive's `vm.migration-receive-ready`.
    func startReceive(socketName: String = "migration.sock") async throws -> IncomingMigration {
        try await destination.startReceive(at: transport.receiverURL(in: directory, name: socketName),
                                           console: guest.devices.map { VmConfig.Console(mode: "File", file: $0.consolePath) },
                                           disks: guest.devices?.placements)
    }

    /// `vm.send-migration` on the source; returns once the migration is under way.
    func send(_ request: SendMigrationData) async throws {
        try await source.api.send(.vmSendMigration, body: try JSONEncoder().encode(request))
    }

    /// Waits for the terminal event of the source's `occurrence`-th migration.
    func waitForSourceEnd(occurrence: Int = 1, timeout: Duration = .seconds(180)) async -> RecordedEvent? {
        await source.waitForTerminal(MigrationStreams.sourceTerminal, occurrence: occurrence, timeout: timeout)
    }

    /// Waits for the terminal event of the destination's `occurrence`-th receive.
    func waitForDestinationEnd(occurrence: Int = 1, timeout: Duration = .seconds(180)) async -> RecordedEvent? {
        await destination.waitForTerminal(MigrationStreams.destinationTerminal, occurrence: occurrence, timeout: timeout)
    }

    /// Receives and sends one migration that is expected to finish, and waits until both sides
    /// have ended it: the destination's call returned and its `vm.migration-receive-finished` is
    /// written, and the source `ferry` has exited (or, with `keep_alive`, written `vm.deleted`).
    /// `request` builds the `vm.send-migration` body from the URL the destination listens on.
    /// Returns what the checks of the streams need, and the source's exit status (nil with `keep_alive`).
    /// `incoming` is a receive the caller already started (e.g. to put a `ThrottledLink` in front of it).
    func migrate(receiveOccurrence: Int = 1, incoming started: IncomingMigration? = nil, _ request: (String) -> SendMigrationData,
                 sourceLocation: SourceLocation = #_sourceLocation) async throws -> (expectations: MigrationExpectations, sourceExit: Int32?) {
        let incoming: IncomingMigration
        if let started {
            incoming = started
        } else {
            incoming = try await startReceive()
        }
        let sendRequest = request(incoming.url)
        try await send(sendRequest)
        let end = await waitForSourceEnd(occurrence: receiveOccurrence)
        try #require(end?.name == "vm.migration-finished", "the migration ended with \(end.map { "\($0.name) \($0.properties)" } ?? "nothing")",
                     sourceLocation: sourceLocation)
        let failure = await incoming.outcome()
        #expect(failure == nil, "vm.receive-migration returned 204 once the guest was here: \(failure.map { "\($0)" } ?? "")",
                sourceLocation: sourceLocation)
        #expect(await waitForDestinationEnd(occurrence: receiveOccurrence)?.name == "vm.migration-receive-finished",
                sourceLocation: sourceLocation)
        let expectations = MigrationExpectations(request: sendRequest, incoming: incoming, guestRAMBytes: guest.memoryBytes)
        if sendRequest.keep_alive == true {
            #expect((try? await source.waitForEvent("vm.deleted")) != nil, sourceLocation: sourceLocation)
            return (expectations, nil)
        }
        return (expectations, await source.waitForExit(timeout: .seconds(60)))
    }
}

/// A link of limited bandwidth between a sender and a destination on this host: a relay process
/// that listens as the destination would (port 0 on loopback, or a Unix socket), connects to the
/// destination for each sender and forwards the sender's bytes at no more than `bytesPerSecond`
/// (the answers unthrottled). Closing one side half-closes the other and a reset one resets the
/// other, so an abandon, a cancel or a killed peer reaches the far end as it would over a direct
/// connection.
///
/// On this host the guest cannot outrun loopback: while dirty logging is on, every first write to
/// a page traps to KVM, which caps a vCPU at a few hundred MB/s, about what a loopback socket
/// carries; a slow link makes "faster than the link" hold on any machine.
struct ThrottledLink: Sendable {
    let relay: FerryProcess
    /// Where the sender connects.
    let url: String

    /// Python's socket module keeps the relay short; it is not part of what is tested.
    private static let program = """
        import socket, struct, sys, threading, time
        listen_url, target_url, rate = sys.argv[1], sys.argv[2], float(sys.argv[3])
        capture = open(sys.argv[4], "wb") if len(sys.argv) > 4 else None
        def address(url):
            scheme, rest = url.split(":", 1)
            if scheme == "unix":
                return socket.AF_UNIX, rest
            host, port = rest.rsplit(":", 1)
            return socket.AF_INET, (host, int(port))
        def connected(family, sock):
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        def pump(source, sink, limit):
            due = time.monotonic()
            try:
                while True:
                    data = source.recv(65536)
                    if not data:
                        break
                    sink.sendall(data)
                    if capture and limit is not None:
                        capture.write(data)
                        capture.flush()
                    if limit:
                        due = max(due, time.monotonic()) + len(data) / limit
                        time.sleep(max(0.0, due - time.monotonic()))
            except OSError:
                # A peer reset its connection (it was killed): reset the other one too.
                for sock in (source, sink):
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        sock.shutdown(socket.SHUT_RDWR)
                        sock.close()
                    except OSError:
                        pass
                return
            for sock, how in ((sink, socket.SHUT_WR), (source, socket.SHUT_RD)):
                try:
                    sock.shutdown(how)
                except OSError:
                    pass
        family, where = address(listen_url)
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.bind(where)
        listener.listen(4)
        print("listening " + ("unix:" + where if family == socket.AF_UNIX else "tcp:%s:%d" % listener.getsockname()), flush=True)
        while True:
            sender, _ = listener.accept()
            target_family, target = address(target_url)
            receiver = connected(target_family, socket.socket(target_family, socket.SOCK_STREAM))
            receiver.connect(target)
            connected(family, sender)
            threading.Thread(target=pump, args=(sender, receiver, rate), daemon=True).start()
            threading.Thread(target=pump, args=(receiver, sender, None), daemon=True).start()
        """

    /// `bytesPerSecond` 0: no limit. `capture`: a file that receives every byte the sender sent.
    init(to destinationURL: String, transport: MigrationTransport, in directory: TemporaryDirectory, bytesPerSecond: Int,
         capture: String? = nil) throws {
        relay = try FerryProcess(arguments: ["-c", Self.program, transport.receiverURL(in: directory, name: "link.sock"),
                                             destinationURL, "\(bytesPerSecond)"] + (capture.map { [$0] } ?? []),
                                 executable: URL(fileURLWithPath: "/usr/bin/python3"))
        guard let line = relay.waitForConsoleLine(timeout: .seconds(20), where: { $0.hasPrefix("listening ") }) else {
            throw TestFailure("the relay does not listen: \(relay.standardError)")
        }
        url = String(line.dropFirst("listening ".count))
    }
}

enum MigrationHarness {
    /// Whether `line` is one the test guest prints whole (the first destination line may instead
    /// be the rest of a line the switch-over cut in half).
    static func isWholeGuestLine(_ line: String) -> Bool {
        Heartbeat(line) != nil || line.hasPrefix("VERIFY ") || line.hasPrefix("ferry-test-guest:") || line == "POWEROFF"
    }

    /// The guest left `source` and continues on `destination`: every vCPU's first heartbeat there
    /// follows its last one on the source (seq + 1, or + 2 where the switch-over cut that line in
    /// half), with later ticks and no fewer pages written; memory verifies on every vCPU; the
    /// guest did not boot again and nothing failed to verify on either side.
    /// `source` must have stopped printing (exited, or its VM deleted) before this is called.
    static func expectGuestContinued(from source: FerryProcess, on destination: FerryProcess, cpus: Int,
                                     sourceLocation: SourceLocation = #_sourceLocation) async throws {
        let before = source.consoleLines.heartbeats
        for cpu in 0..<cpus {
            #expect(await waitUntil(.seconds(60)) { !destination.consoleLines.verifyOK(cpu: cpu).isEmpty },
                    "memory verifies on the destination on vCPU \(cpu)", sourceLocation: sourceLocation)
            #expect(await waitUntil(.seconds(60)) { destination.consoleLines.heartbeats.contains { $0.cpu == cpu } },
                    "vCPU \(cpu) prints heartbeats on the destination", sourceLocation: sourceLocation)
        }
        let lines = destination.consoleLines
        let cutLine = lines.first.flatMap { isWholeGuestLine($0) ? nil : $0 }
        var skipped: [Int] = []
        for cpu in 0..<cpus {
            let last = try #require(before.last { $0.cpu == cpu }, sourceLocation: sourceLocation)
            let first = try #require(lines.heartbeats.first { $0.cpu == cpu }, sourceLocation: sourceLocation)
            #expect(first.seq == last.seq + 1 || (first.seq == last.seq + 2 && cutLine != nil),
                    "vCPU \(cpu) seq continues: \(last.seq) → \(first.seq) (first destination line: \(lines.first ?? "none"))",
                    sourceLocation: sourceLocation)
            if first.seq == last.seq + 2 { skipped.append(cpu) }
            #expect(first.ticks > last.ticks, "vCPU \(cpu) timer ticks continue: \(last.ticks) → \(first.ticks)",
                    sourceLocation: sourceLocation)
            #expect(first.written >= last.written, "vCPU \(cpu) pages written continue: \(last.written) → \(first.written)",
                    sourceLocation: sourceLocation)
        }
        #expect(skipped.count <= 1, "one cut line skips one heartbeat at most: \(skipped)", sourceLocation: sourceLocation)
        #expect(destination.consoleLines.verifyFailures.isEmpty, "\(destination.consoleLines.verifyFailures)", sourceLocation: sourceLocation)
        #expect(source.consoleLines.verifyFailures.isEmpty, "\(source.consoleLines.verifyFailures)", sourceLocation: sourceLocation)
        #expect(!destination.consoleLines.contains { $0.hasPrefix("ferry-test-guest: boot") }, "the guest did not boot again",
                sourceLocation: sourceLocation)
    }

    /// The guest goes on running on `host`: every vCPU prints a heartbeat it had not printed yet
    /// and verifies its memory again, and nothing failed to verify.
    static func expectGuestKeepsRunning(on host: FerryProcess, cpus: Int, sourceLocation: SourceLocation = #_sourceLocation) async {
        let lines = host.consoleLines
        for cpu in 0..<cpus {
            let seq = lines.heartbeats.last { $0.cpu == cpu }?.seq ?? -1
            let verified = lines.verifyOK(cpu: cpu).count
            #expect(await waitUntil(.seconds(60)) { host.consoleLines.heartbeats.contains { $0.cpu == cpu && $0.seq > seq } },
                    "vCPU \(cpu) heartbeats continue after seq \(seq)", sourceLocation: sourceLocation)
            #expect(await waitUntil(.seconds(60)) { host.consoleLines.verifyOK(cpu: cpu).count > verified },
                    "vCPU \(cpu) verifies its memory again", sourceLocation: sourceLocation)
        }
        #expect(host.consoleLines.verifyFailures.isEmpty, "\(host.consoleLines.verifyFailures)", sourceLocation: sourceLocation)
    }
}

/// What a test asked for and knows about one migration, against which its events are checked.
struct MigrationExpectations: Sendable {
    /// Why pre-copy ended and the guest was switched over.
    enum SwitchOver: Sendable {
        /// The estimated downtime fit in the limit (or nothing was dirty).
        case converged
        /// `timeout_s` passed and `timeout_strategy` was `Ignore`.
        case timeoutIgnored
        /// A local migration: no pre-copy pass, nothing copied.
        case local
    }

    var request: SendMigrationData
    var incoming: IncomingMigration
    var guestRAMBytes: UInt64
    /// The guest ran when the migration began; a paused one stays paused and no pause or resume
    /// events are emitted for it.
    var guestWasRunning = true
    var switchOver = SwitchOver.converged

    var downtimeLimitMs: Int64 { request.downtime_ms ?? 300 }
    var timeoutSeconds: Int64 { request.timeout_s ?? 3600 }
}

/// What a finished migration's events said.
struct FinishedMigration: Sendable {
    var id: String
    var iterations: Int
    var bytesTotal: UInt64
    var totalMs: UInt64
    var downtimeMs: UInt64
}

/// Checks event streams against docs/events.md §4 and §5: the exact order of names, one
/// `migration_id` joining both sides, every listed property present, and numbers that add up.
enum MigrationStreams {
    static let sourceTerminal: Set = ["vm.migration-finished", "vm.migration-failed", "vm.migration-cancelled"]
    static let destinationTerminal: Set = ["vm.migration-receive-finished", "vm.migration-receive-failed"]
    static let iteration = "vm.migration-memory-iteration"
    static let pageSize: UInt64 = 4096
    /// A timestamp taken just before an event is emitted may precede the event's own by this much.
    static let emitSlackSeconds = 0.05

    /// The complete streams of both VMMs after one finished migration, read once both sides
    /// ended it. `sourceBefore` and `destinationBefore` are the names expected before the
    /// migration's first event (`vm.migration-started`, `vm.migration-receive-ready`).
    @discardableResult
    static func expectFinished(source: [RecordedEvent], destination: [RecordedEvent],
                               sourceBefore: [String], destinationBefore: [String],
                               _ expected: MigrationExpectations,
                               sourceLocation: SourceLocation = #_sourceLocation) -> FinishedMigration? {
        expectStreamBasics(source, "source", sourceLocation)
        expectStreamBasics(destination, "destination", sourceLocation)
        let sourceNames = source.map(\.name)
        let iterations = sourceNames.dropFirst(sourceBefore.count + 1).prefix { $0 == iteration }.count
        let pause = expected.guestWasRunning ? ["vm.pausing", "vm.paused"] : []
        let resume = expected.guestWasRunning ? ["vm.resuming", "vm.resumed"] : []
        let sourceMigration = ["vm.migration-started"] + Array(repeating: iteration, count: iterations)
            + ["vm.migration-downtime"] + pause + ["vm.migration-finished", "vm.deleted"]
            + (expected.request.keep_alive == true ? [] : ["vmm.shutdown"])
        if expected.switchOver == .local {
            #expect(iterations == 0, "a local migration makes no pre-copy pass: \(sourceNames)", sourceLocation: sourceLocation)
        } else {
            #expect(iterations >= 1, "at least one pre-copy pass: \(sourceNames)", sourceLocation: sourceLocation)
        }
        #expect(sourceNames == sourceBefore + sourceMigration, "the source stream", sourceLocation: sourceLocation)
        let destinationMigration = ["vm.migration-receive-ready", "vm.migration-receive-started"] + resume
            + ["vm.migration-receive-finished"]
        #expect(destination.map(\.name) == destinationBefore + destinationMigration, "the destination stream",
                sourceLocation: sourceLocation)
        guard sourceNames == sourceBefore + sourceMigration,
              destination.map(\.name) == destinationBefore + destinationMigration else { return nil }

        let sent = expectSourceSegment(source[sourceBefore.count...], expected, sourceLocation: sourceLocation)
        guard let sent, let finished = source.last(where: { $0.name == "vm.migration-finished" }) else { return nil }
        let properties = finished.properties
        let totalMs = number(properties, "total_ms", finished, sourceLocation)
        let downtimeMs = number(properties, "downtime_ms", finished, sourceLocation)
        let bytesTotal = number(properties, "bytes_total", finished, sourceLocation)
        #expect(properties["iterations"] == "\(iterations)", "finished: iterations = the iteration events", sourceLocation: sourceLocation)
        guard let totalMs, let downtimeMs, let bytesTotal else { return nil }
        #expect(downtimeMs <= totalMs, "finished: downtime_ms \(downtimeMs) ≤ total_ms \(totalMs)", sourceLocation: sourceLocation)
        #expect(sent.precopyBytes + sent.remainingAtSwitchOver <= bytesTotal,
                "finished: bytes_total \(bytesTotal) ≥ Σ iteration bytes \(sent.precopyBytes) + downtime remaining_bytes \(sent.remainingAtSwitchOver)",
                sourceLocation: sourceLocation)
        #expect(bytesTotal <= sent.precopyBytes + expected.guestRAMBytes,
                "finished: bytes_total \(bytesTotal) ≤ Σ iteration bytes \(sent.precopyBytes) + guest RAM", sourceLocation: sourceLocation)
        #expect(bytesTotal % pageSize == 0, "finished: bytes_total is whole pages", sourceLocation: sourceLocation)

        expectDestinationSegment(destination[destinationBefore.count...], expected, migrationID: sent.id, sourceLocation: sourceLocation)
        let receiveFinished = destination.last { $0.name == "vm.migration-receive-finished" }
        #expect(receiveFinished?.properties["bytes_total"] == "\(bytesTotal)",
                "destination bytes_total = source bytes_total \(bytesTotal)", sourceLocation: sourceLocation)
        return FinishedMigration(id: sent.id, iterations: iterations, bytesTotal: bytesTotal, totalMs: totalMs, downtimeMs: downtimeMs)
    }

    /// One migration on the source that ended with `vm.migration-cancelled reason=<reason>` before
    /// any switch-over: the stream from `vm.migration-started` on is exactly started, iterations
    /// (at least one), cancelled. Returns the migration's id.
    @discardableResult
    static func expectCancelledBeforeSwitchOver(_ segment: ArraySlice<RecordedEvent>, reason: String, _ expected: MigrationExpectations,
                                                sourceLocation: SourceLocation = #_sourceLocation) -> String? {
        let names = segment.map(\.name)
        let iterations = names.dropFirst().prefix { $0 == iteration }.count
        let expectedNames = ["vm.migration-started"] + Array(repeating: iteration, count: iterations) + ["vm.migration-cancelled"]
        #expect(iterations >= 1, "at least one pre-copy pass before the cancel: \(names)", sourceLocation: sourceLocation)
        #expect(Array(names.prefix(expectedNames.count)) == expectedNames,
                "started, iterations, cancelled — no downtime, no pause or resume: \(names)", sourceLocation: sourceLocation)
        guard Array(names.prefix(expectedNames.count)) == expectedNames else { return nil }
        let migration = segment.prefix(expectedNames.count)
        let sent = expectSourceSegment(migration, expected, sourceLocation: sourceLocation)
        let cancelled = migration[migration.endIndex - 1]
        #expect(cancelled.properties["reason"] == reason, "cancelled: reason=\(reason): \(cancelled.properties)", sourceLocation: sourceLocation)
        return sent?.id
    }

    /// One receive on the destination that failed after it started: ready, started, failed, with
    /// the migration's id. Returns the failure's properties.
    @discardableResult
    static func expectReceiveFailed(_ segment: ArraySlice<RecordedEvent>, _ expected: MigrationExpectations, migrationID: String?,
                                    sourceLocation: SourceLocation = #_sourceLocation) -> [String: String]? {
        let names = Array(segment.map(\.name).prefix(3))
        #expect(names == ["vm.migration-receive-ready", "vm.migration-receive-started", "vm.migration-receive-failed"],
                "the destination stream of a failed receive: \(segment.map(\.name))", sourceLocation: sourceLocation)
        guard names.count == 3 else { return nil }
        let events = Array(segment.prefix(3))
        expectReady(events[0], expected, sourceLocation)
        expectStarted(events[1], expected, migrationID: migrationID, sourceLocation)
        let failed = events[2].properties
        #expect(failed["migration_id"] == migrationID, "receive-failed carries the migration's id", sourceLocation: sourceLocation)
        #expect(!(failed["error"] ?? "").isEmpty, "receive-failed: error: \(failed)", sourceLocation: sourceLocation)
        #expect(["starting", "memory-precopy", "completing"].contains(failed["phase"] ?? ""), "receive-failed: phase: \(failed)",
                sourceLocation: sourceLocation)
        return failed
    }

    // MARK: Pieces

    /// What the source's events of one migration add up to.
    struct SentMigration {
        var id: String
        var precopyBytes: UInt64
        /// `remaining_bytes` of `vm.migration-downtime` (0 if there was none).
        var remainingAtSwitchOver: UInt64
    }

    /// Checks every source event of one migration, from `vm.migration-started` through its
    /// terminal event (any `vm.deleted`/`vmm.shutdown` after it are ignored here).
    static func expectSourceSegment(_ segment: ArraySlice<RecordedEvent>, _ expected: MigrationExpectations,
                                    sourceLocation: SourceLocation) -> SentMigration? {
        guard let started = segment.first, started.name == "vm.migration-started" else { return nil }
        let request = expected.request
        let id = started.properties["migration_id"] ?? ""
        #expect(UUID(uuidString: id) != nil, "migration_id is a UUID: '\(id)'", sourceLocation: sourceLocation)
        #expect(started.properties["destination_url"] == request.destination_url, "started echoes destination_url: \(started.properties)",
                sourceLocation: sourceLocation)
        #expect(started.properties["downtime_ms"] == "\(expected.downtimeLimitMs)", "started echoes downtime_ms", sourceLocation: sourceLocation)
        #expect(started.properties["timeout_s"] == "\(expected.timeoutSeconds)", "started echoes timeout_s", sourceLocation: sourceLocation)
        #expect(started.properties["connections"] == "\(request.connections ?? 1)", "started echoes connections", sourceLocation: sourceLocation)
        #expect(started.properties["local"] == "\(request.local == true)", "started: local says whether local was asked",
                sourceLocation: sourceLocation)
        #expect(started.properties["tls"] == "\(expected.request.tls_dir != nil)", "started: tls says whether tls_dir was given",
                sourceLocation: sourceLocation)

        var end = segment.endIndex
        if let terminal = segment.firstIndex(where: { sourceTerminal.contains($0.name) }) { end = terminal + 1 }
        let migration = segment[segment.startIndex..<end]
        for event in migration.dropFirst() {
            #expect(event.properties["migration_id"] == id || ["vm.pausing", "vm.paused", "vm.resuming", "vm.resumed"].contains(event.name),
                    "\(event.name) carries the migration's id \(id): \(event.properties)", sourceLocation: sourceLocation)
        }

        // Pre-copy passes: numbered from 0, each sending what the one before found dirty.
        let passes = migration.filter { $0.name == iteration }
        var precopyBytes: UInt64 = 0
        var previousDirty: UInt64?
        var refiningPasses = 0
        for (index, pass) in passes.enumerated() {
            let values = pass.properties
            #expect(values["id"] == "\(index)", "iteration ids are 0, 1, 2, …: pass \(index) says \(values["id"] ?? "nothing")",
                    sourceLocation: sourceLocation)
            let fields = ["bytes", "pages", "duration_ms", "bandwidth_bytes_per_s", "dirty_pages", "remaining_bytes", "estimated_downtime_ms"]
            let numbers = fields.map { number(values, $0, pass, sourceLocation) }
            guard case let (bytes?, pages?, _?, bandwidth?, dirty?, remaining?, estimate?) =
                    (numbers[0], numbers[1], numbers[2], numbers[3], numbers[4], numbers[5], numbers[6]) else { continue }
            precopyBytes += bytes
            #expect(bytes == pages * pageSize, "iteration \(index): bytes = pages × 4096: \(values)", sourceLocation: sourceLocation)
            #expect(remaining == dirty * pageSize, "iteration \(index): remaining_bytes = dirty_pages × 4096: \(values)",
                    sourceLocation: sourceLocation)
            #expect(bytes <= expected.guestRAMBytes && remaining <= expected.guestRAMBytes,
                    "iteration \(index): no more than guest RAM: \(values)", sourceLocation: sourceLocation)
            if index == 0 {
                #expect(bytes > 0, "pass 0 sends the guest's non-zero pages", sourceLocation: sourceLocation)
            }
            if let previousDirty {
                #expect(pages == previousDirty, "iteration \(index) sends the \(previousDirty) pages the pass before found dirty: \(values)",
                        sourceLocation: sourceLocation)
            }
            previousDirty = dirty
            #expect(bandwidth > 0, "iteration \(index): a bandwidth was measured: \(values)", sourceLocation: sourceLocation)
            if bandwidth > 0 {
                let computed = Double(remaining) / Double(bandwidth) * 1000
                #expect(abs(Double(estimate) - computed) <= 1 + computed * 0.001,
                        "iteration \(index): estimated_downtime_ms \(estimate) = remaining_bytes ÷ bandwidth (\(computed))",
                        sourceLocation: sourceLocation)
            }
            if index < passes.count - 1, estimate <= UInt64(expected.downtimeLimitMs) {
                // It fit the limit and was followed by another pass: a refining pass (PrecopyPolicy).
                refiningPasses += 1
                #expect(remaining > 0 && refiningPasses <= PrecopyPolicy.maximumRefiningPasses,
                        "iteration \(index) fit the \(expected.downtimeLimitMs) ms limit and was followed by refining pass \(refiningPasses): \(values)",
                        sourceLocation: sourceLocation)
            }
        }

        var remainingAtSwitchOver: UInt64 = 0
        if let downtime = migration.first(where: { $0.name == "vm.migration-downtime" }) {
            let values = downtime.properties
            #expect(values["iterations"] == "\(passes.count)", "downtime: iterations = the iteration events", sourceLocation: sourceLocation)
            let reasons = switch expected.switchOver {
            case .converged: ["converged", "nothing-dirty"]
            case .timeoutIgnored: ["timeout-ignored"]
            case .local: ["local"]
            }
            #expect(reasons.contains(values["reason"] ?? ""), "downtime: reason: \(values)", sourceLocation: sourceLocation)
            remainingAtSwitchOver = number(values, "remaining_bytes", downtime, sourceLocation) ?? 0
            let estimate = number(values, "estimated_downtime_ms", downtime, sourceLocation)
            if let last = passes.last {
                #expect(values["remaining_bytes"] == last.properties["remaining_bytes"],
                        "downtime: remaining_bytes is what the last pass left dirty", sourceLocation: sourceLocation)
                #expect(values["estimated_downtime_ms"] == last.properties["estimated_downtime_ms"],
                        "downtime: the estimate of the last pass", sourceLocation: sourceLocation)
            }
            switch expected.switchOver {
            case .converged:
                #expect(remainingAtSwitchOver == 0 || (estimate ?? .max) <= UInt64(expected.downtimeLimitMs),
                        "switched over once the estimate fit the \(expected.downtimeLimitMs) ms limit: \(values)", sourceLocation: sourceLocation)
            case .timeoutIgnored:
                #expect(downtime.seconds - started.seconds >= Double(expected.timeoutSeconds) - emitSlackSeconds,
                        "switched over after timeout_s=\(expected.timeoutSeconds): \(downtime.seconds - started.seconds) s after started",
                        sourceLocation: sourceLocation)
            case .local:
                #expect(remainingAtSwitchOver == 0, "a local migration has nothing left to copy: \(values)", sourceLocation: sourceLocation)
            }
        }
        if let cancelled = migration.last, cancelled.name == "vm.migration-cancelled" {
            #expect(["requested", "timeout"].contains(cancelled.properties["reason"] ?? ""), "cancelled: reason: \(cancelled.properties)",
                    sourceLocation: sourceLocation)
            if cancelled.properties["reason"] == "timeout" {
                #expect(cancelled.seconds - started.seconds >= Double(expected.timeoutSeconds) - emitSlackSeconds,
                        "cancelled after timeout_s=\(expected.timeoutSeconds): \(cancelled.seconds - started.seconds) s after started",
                        sourceLocation: sourceLocation)
            }
        }
        if let failed = migration.last, failed.name == "vm.migration-failed" {
            #expect(!(failed.properties["error"] ?? "").isEmpty, "failed: error", sourceLocation: sourceLocation)
            #expect(["starting", "memory-precopy", "completing"].contains(failed.properties["phase"] ?? ""), "failed: phase: \(failed.properties)",
                    sourceLocation: sourceLocation)
        }
        return SentMigration(id: id, precopyBytes: precopyBytes, remainingAtSwitchOver: remainingAtSwitchOver)
    }

    /// Checks the destination's events of one successful receive: ready (no id), started (the
    /// source's id, a peer), [resuming, resumed], finished (the id, numbers).
    static func expectDestinationSegment(_ segment: ArraySlice<RecordedEvent>, _ expected: MigrationExpectations, migrationID: String,
                                         sourceLocation: SourceLocation) {
        let events = Array(segment)
        guard events.count >= 3 else { return }
        expectReady(events[0], expected, sourceLocation)
        expectStarted(events[1], expected, migrationID: migrationID, sourceLocation)
        let finished = events[events.count - 1]
        #expect(finished.properties["migration_id"] == migrationID, "receive-finished carries the migration's id", sourceLocation: sourceLocation)
        _ = number(finished.properties, "total_ms", finished, sourceLocation)
        _ = number(finished.properties, "bytes_total", finished, sourceLocation)
    }

    static func expectReady(_ ready: RecordedEvent, _ expected: MigrationExpectations, _ sourceLocation: SourceLocation) {
        #expect(ready.properties["migration_id"] == nil, "receive-ready has no migration_id yet", sourceLocation: sourceLocation)
        let url = ready.properties["receiver_url"] ?? ""
        #expect(url == expected.incoming.url, "receive-ready is where the source was sent", sourceLocation: sourceLocation)
        let requested = expected.incoming.requestedURL
        if requested.hasSuffix(":0") {
            let port = url.hasPrefix(String(requested.dropLast())) ? UInt16(url.dropFirst(requested.count - 1)) : nil
            #expect(port.map { $0 != 0 } == true, "receive-ready names the port the system picked for \(requested): \(url)",
                    sourceLocation: sourceLocation)
        } else {
            #expect(url == requested, "receive-ready echoes receiver_url", sourceLocation: sourceLocation)
        }
    }

    static func expectStarted(_ started: RecordedEvent, _ expected: MigrationExpectations, migrationID: String?,
                              _ sourceLocation: SourceLocation) {
        #expect(started.properties["migration_id"] == migrationID, "receive-started carries the source's migration_id \(migrationID ?? "?"): \(started.properties)",
                sourceLocation: sourceLocation)
        let peer = started.properties["peer"] ?? ""
        #expect(!peer.isEmpty, "receive-started names the peer", sourceLocation: sourceLocation)
        #expect(started.properties["tls"] == "\(expected.request.tls_dir != nil)", "receive-started: tls as the source's",
                sourceLocation: sourceLocation)
        if expected.incoming.requestedURL.hasPrefix("tcp:127.0.0.1:") {
            #expect(peer.contains("127.0.0.1"), "the peer is the loopback sender: \(peer)", sourceLocation: sourceLocation)
        }
    }

    /// `vmm.starting` first, timestamps that never go backwards, and (when the VMM exited) `vmm.shutdown` last.
    static func expectStreamBasics(_ events: [RecordedEvent], _ side: String, _ sourceLocation: SourceLocation) {
        #expect(events.first?.name == "vmm.starting", "\(side): vmm.starting comes first", sourceLocation: sourceLocation)
        let backwards = zip(events, events.dropFirst()).filter { $0.seconds > $1.seconds }
        #expect(backwards.isEmpty, "\(side): timestamps never go backwards: \(backwards.map { "\($0.name)→\($1.name)" })",
                sourceLocation: sourceLocation)
    }

    /// A property that must be present and a non-negative decimal number.
    static func number(_ properties: [String: String], _ key: String, _ event: RecordedEvent?,
                       _ sourceLocation: SourceLocation) -> UInt64? {
        let value = properties[key].flatMap { UInt64($0) }
        #expect(value != nil, "\(event?.name ?? "?"): \(key) is a number: \(properties)", sourceLocation: sourceLocation)
        return value
    }
}
