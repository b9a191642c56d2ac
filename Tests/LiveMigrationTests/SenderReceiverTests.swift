import Events
import FerryTestSupport
import Foundation
import HostOS
import KVM
import Machine
import MigrationWire
import Synchronization
import Testing
@testable import LiveMigration

/// A sender and a receiver in one process, each driving a real machine on /dev/kvm through its
/// interface to the VMM (`SourceVM`, `DestinationVM`) — with no VMM, no API, no second process:
/// what the migration logic itself does with the guest, the connection and the events.
@Suite(.serialized, .enabled(if: KVMSystem.isAvailable, "needs /dev/kvm (absent or not accessible on this machine)"))
struct SenderReceiverTests {
    /// One side's events, read back after the migration.
    final class EventLog: Sendable {
        let monitor = EventMonitor(sink: nil)

        /// Every event so far (the monitor is closed: call once, at the end).
        func close() async -> [Event] {
            let stream = monitor.subscribe(sinceStart: true)
            monitor.close()
            var events: [Event] = []
            for await event in stream { events.append(event) }
            return events.filter { !$0.is(VMMEvent.Starting.self) }
        }
    }

    /// What the destination side's VMM would do: build a machine awaiting its state, and run it
    /// once adopted. Records what it was asked.
    final class Destination: Sendable {
        let console = GuestConsole()
        let machine = Mutex<Machine?>(nil)
        let adopted = Mutex<Bool?>(nil)
        let refusal: String?

        init(refusing refusal: String? = nil) {
            self.refusal = refusal
        }

        var vm: MigrationReceiver.DestinationVM {
            MigrationReceiver.DestinationVM(
                prepare: { [self] configuration, memoryFile in
                    if let refusal { throw TestFailure(refusal) }
                    let machine = try Machine.forRestore(configuration: configuration, memoryFile: memoryFile, serialOutput: console.output,
                                                         onStop: { _, _ in })
                    self.machine.withLock { $0 = machine }
                    return machine
                },
                adopt: { [self] machine, guestRunning in
                    if guestRunning { try machine.start() }
                    adopted.withLock { $0 = guestRunning }
                })
        }
    }

    /// What the source side's VMM would do: pause and resume the guest, counted.
    final class Source: Sendable {
        let console = GuestConsole()
        let machine: Machine
        let pauses = Atomic<Int>(0)
        let resumes = Atomic<Int>(0)

        init(_ guest: TestGuestVM) throws {
            machine = try Machine.forBoot(
                configuration: MachineConfiguration(cpus: guest.cpus, memorySize: guest.memoryBytes, kernel: try TestGuest.path.get(),
                                                    commandLine: "\(guest.workload) \(guest.reporting)"),
                serialOutput: console.output, onStop: { _, _ in })
            try machine.start()
            guard console.wait(timeout: .seconds(120), until: { lines in
                lines.contains("ferry-test-guest: ready") && (0..<guest.cpus).allSatisfy { cpu in lines.heartbeats.contains { $0.cpu == cpu } }
            }) else { throw TestFailure("the guest did not get ready: \(console.lines.suffix(5))") }
        }

        var vm: MigrationSender.SourceVM {
            MigrationSender.SourceVM(
                pause: { [self] in
                    pauses.add(1, ordering: .relaxed)
                    try machine.pause()
                },
                resume: { [self] in
                    resumes.add(1, ordering: .relaxed)
                    try? machine.resume()
                })
        }
    }

    /// A socket that carries what the sender sends at no more than `bytesPerSecond`: a slow link,
    /// in the process, through the transport interface the framing runs over.
    final class SlowLink: MigrationTransport {
        let socket: SocketTransport
        let bytesPerSecond: Double
        static let piece = 64 << 10

        init(_ socket: SocketTransport, bytesPerSecond: Double) {
            self.socket = socket
            self.bytesPerSecond = bytesPerSecond
        }

        func send(_ bytes: UnsafeRawBufferPointer, progressTimeout: Duration) throws(StreamTransferError) {
            var offset = 0
            while offset < bytes.count {
                let count = min(Self.piece, bytes.count - offset)
                try socket.send(UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + count]), progressTimeout: progressTimeout)
                Poll.sleep(for: .nanoseconds(Int64(Double(count) / bytesPerSecond * 1e9)))
                offset += count
            }
        }

        func receive(into buffer: UnsafeMutableRawBufferPointer, progressTimeout: Duration) throws(StreamTransferError) {
            try socket.receive(into: buffer, progressTimeout: progressTimeout)
        }

        func shutdown() { socket.shutdown() }
        func close() { socket.close() }
        var peer: String { socket.peer }
    }

    /// Starts a receiver on a Unix socket and a sender connected to it (over a link of
    /// `linkBytesPerSecond`, if given); returns both, and a way to wait for their endings.
    static func migrate(_ source: Source, to destination: Destination, options: (MigrationURL) -> SendMigrationOptions,
                        sourceEvents: EventLog, destinationEvents: EventLog, directory: TemporaryDirectory,
                        linkBytesPerSecond: Double? = nil)
        throws -> (sender: MigrationSender, sent: BackgroundThread<MigrationSender.Ending>, received: BackgroundThread<MigrationReceiver.Ending>,
                   receiver: MigrationReceiver) {
        let listener = try MigrationListener(listeningOn: .unix(path: directory.path("migration.sock")))
        let receiver = MigrationReceiver(listener: listener, events: destinationEvents.monitor, destinationVM: destination.vm)
        receiver.announce()
        let received = BackgroundThread { receiver.run() }
        let socket = SocketTransport(try Socket.connect(to: listener.url.endpoint, timeout: .seconds(10)))
        let connection = MigrationConnection(linkBytesPerSecond.map { SlowLink(socket, bytesPerSecond: $0) } ?? socket)
        let sender = MigrationSender(options: options(listener.url), machine: source.machine, connection: connection,
                                     events: sourceEvents.monitor, guestWasRunning: true, sourceVM: source.vm)
        let ending = Mutex<MigrationSender.Ending?>(nil)
        let done = DispatchSemaphore(value: 0)
        sender.start { result in
            ending.withLock { $0 = result }
            done.signal()
        }
        let sent = BackgroundThread { () throws -> MigrationSender.Ending in
            done.wait()
            guard let result = ending.withLock({ $0 }) else { throw TestFailure("no ending") }
            return result
        }
        return (sender, sent, received, receiver)
    }

    @Test func theGuestMovesAndRunsOnTheDestinationWithEveryEventOnBothSides() async throws {
        let directory = try TemporaryDirectory()
        let guest = TestGuestVM(cpus: 2, memoryMiB: 256, workload: "workset_mib=32 dirty_rate=2000")
        let source = try Source(guest)
        defer { source.machine.stop() }
        let destination = Destination()
        defer { destination.machine.withLock { $0 }?.stop() }
        let (sourceEvents, destinationEvents) = (EventLog(), EventLog())
        let (sender, sent, received, _) = try Self.migrate(source, to: destination, options: { SendMigrationOptions(destination: $0) },
                                                         sourceEvents: sourceEvents, destinationEvents: destinationEvents,
                                                         directory: directory)
        #expect(try sent.join() == .finished)
        #expect(try received.join() == .received)
        #expect(source.pauses.load(ordering: .relaxed) == 1 && source.resumes.load(ordering: .relaxed) == 0,
                "the sender paused the source's guest once, for the switch-over, and never resumed it")
        #expect(source.machine.phase == .paused)
        #expect(destination.adopted.withLock { $0 } == true, "the destination was asked to run the guest")

        let id = sender.id.uuidString.lowercased()
        let sourceStream = await sourceEvents.close()
        let names = sourceStream.map(\.qualifiedName)
        #expect(names.first == "vm.migration-started" && names.suffix(2) == ["vm.migration-downtime", "vm.migration-finished"],
                "\(names)")
        #expect(names.dropFirst().dropLast(2).allSatisfy { $0 == "vm.migration-memory-iteration" }, "\(names)")
        let finished = try #require(try sourceStream.last?.decode(VMEvent.MigrationFinished.self))
        #expect(finished.migrationID == id && finished.iterations == names.count - 3)
        let passes = try sourceStream.compactMap { try $0.decode(VMEvent.MigrationMemoryIteration.self) }
        #expect(passes.map(\.id) == Array(0..<passes.count) && passes.allSatisfy { $0.migrationID == id })

        let destinationStream = await destinationEvents.close()
        #expect(destinationStream.map(\.qualifiedName) == ["vm.migration-receive-ready", "vm.migration-receive-started",
                                                           "vm.migration-receive-finished"])
        let arrived = try #require(try destinationStream.last?.decode(VMEvent.MigrationReceiveFinished.self))
        #expect(arrived.migrationID == id && arrived.bytesTotal == finished.bytesTotal)

        // The guest goes on where it stopped: heartbeats continue and memory verifies.
        let before = source.console.lines.heartbeats
        #expect(destination.console.wait(timeout: .seconds(60)) { lines in
            (0..<guest.cpus).allSatisfy { cpu in lines.contains { $0.hasPrefix("VERIFY OK cpu=\(cpu) ") } && lines.heartbeats.contains { $0.cpu == cpu } }
        }, "the guest runs and verifies on the destination: \(destination.console.lines.suffix(5))")
        for cpu in 0..<guest.cpus {
            let last = try #require(before.last { $0.cpu == cpu })
            let first = try #require(destination.console.lines.heartbeats.first { $0.cpu == cpu })
            #expect(first.seq > last.seq && first.seq <= last.seq + 2, "vCPU \(cpu): \(last.seq) → \(first.seq)")
        }
        #expect(destination.console.lines.verifyFailures.isEmpty)
    }

    /// Memory goes over four connections at once and the guest verifies; connections that do not
    /// join this migration properly are refused, each with its reason, and change nothing.
    @Test func theGuestMovesOverFourConnectionsAndStraysAreRefused() async throws {
        let directory = try TemporaryDirectory()
        let guest = TestGuestVM(cpus: 2, memoryMiB: 256, workload: "workset_mib=32 dirty_rate=2000")
        let source = try Source(guest)
        defer { source.machine.stop() }
        let destination = Destination()
        defer { destination.machine.withLock { $0 }?.stop() }
        let (sourceEvents, destinationEvents) = (EventLog(), EventLog())
        let (sender, sent, received, receiver) = try Self.migrate(source, to: destination,
                                                         options: { SendMigrationOptions(destination: $0, connections: 4) },
                                                         sourceEvents: sourceEvents, destinationEvents: destinationEvents,
                                                         directory: directory)
        // Queued behind the main connection, ahead of the sender's own extra ones.
        let strays: [(String, (MigrationConnection) throws -> Void, String)] = [
            ("another migration's id", { try $0.sendJoin(MigrationJoin(migrationID: UUID(), index: 1, count: 4)) }, "the connection joins migration"),
            ("an index out of range", { try $0.sendJoin(MigrationJoin(migrationID: sender.id, index: 4, count: 4)) }, "extra connection index 4 is outside 1..<4"),
            ("a count over the limit", { try $0.sendJoin(MigrationJoin(migrationID: sender.id, index: 1, count: 129)) }, "2 to 128 connections"),
            ("no join first", { try $0.sendRequest(.complete) }, "must be join, not complete"),
        ]
        let answers = try strays.map { _, request, _ in
            let stray = MigrationConnection(SocketTransport(try Socket.connect(to: .unix(path: directory.path("migration.sock")), timeout: .seconds(10))))
            try request(stray)
            return BackgroundThread { try stray.receiveResponse() }
        }
        for ((what, _, reason), answer) in zip(strays, answers) {
            let response = try answer.join()
            guard case .error(let text) = response else {
                Issue.record("a stray with \(what) was answered \(response)")
                continue
            }
            #expect(text.contains(reason), "a stray with \(what): \(text)")
        }
        #expect(try sent.join() == .finished)
        #expect(try received.join() == .received)
        #expect(sender.progress.snapshot().connections == 4 && receiver.progress.snapshot().connections == 4,
                "both sides report four connections")
        let finished = try #require(try await sourceEvents.close().last?.decode(VMEvent.MigrationFinished.self))
        let arrived = try #require(try await destinationEvents.close().last?.decode(VMEvent.MigrationReceiveFinished.self))
        #expect(arrived.bytesTotal == finished.bytesTotal, "every connection's bytes are counted on both sides")
        #expect(destination.console.wait(timeout: .seconds(60)) { lines in
            (0..<guest.cpus).allSatisfy { cpu in lines.contains { $0.hasPrefix("VERIFY OK cpu=\(cpu) ") } && lines.heartbeats.contains { $0.cpu == cpu } }
        }, "the guest runs and verifies on the destination: \(destination.console.lines.suffix(5))")
        #expect(destination.console.lines.verifyFailures.isEmpty)
    }

    @Test func aCancelDuringPrecopyResumesNothingAndEndsBothSidesOnce() async throws {
        let directory = try TemporaryDirectory()
        let source = try Source(TestGuestVM(cpus: 1, memoryMiB: 256, workload: "workset_mib=64 dirty_rate=max"))
        defer { source.machine.stop() }
        let destination = Destination()
        defer { destination.machine.withLock { $0 }?.stop() }
        let (sourceEvents, destinationEvents) = (EventLog(), EventLog())
        // A 1 ms downtime limit is out of reach of a guest rewriting 64 MiB as fast as it can over
        // a 50 MB/s link.
        let (sender, sent, received, _) = try Self.migrate(
            source, to: destination, options: { SendMigrationOptions(destination: $0, policy: PrecopyPolicy(downtimeLimit: .milliseconds(1))) },
            sourceEvents: sourceEvents, destinationEvents: destinationEvents, directory: directory, linkBytesPerSecond: 50e6)
        #expect(await waitUntil(.seconds(60)) { sender.progress.snapshot().memory.pass >= 1 }, "pre-copy reached its second pass")
        #expect(sender.requestStop(.cancelled))
        #expect(try sent.join() == .cancelled)
        guard case .failed(let error) = try received.join() else {
            Issue.record("the receive did not fail")
            return
        }
        // The cancel shuts the connection down at once, so the receiver sees the sender go.
        #expect(error.contains("the sender went away") || error.contains("abandoned"), "\(error)")
        #expect(source.pauses.load(ordering: .relaxed) == 0, "the guest was never paused")
        #expect(source.machine.phase == .running)
        #expect(destination.adopted.withLock { $0 } == nil, "nothing was adopted")
        #expect(destination.machine.withLock { $0 }?.phase == .stopped, "the half-received machine was stopped")
        let sourceStream = await sourceEvents.close()
        #expect(sourceStream.map(\.qualifiedName).last == "vm.migration-cancelled")
        #expect(try sourceStream.last?.decode(VMEvent.MigrationCancelled.self)?.reason == .requested)
        #expect(sourceStream.filter { [VMEvent.MigrationFailed.qualifiedName, VMEvent.MigrationFinished.qualifiedName,
                                       VMEvent.MigrationCancelled.qualifiedName].contains($0.qualifiedName) }.count == 1)
        let destinationStream = await destinationEvents.close()
        #expect(destinationStream.map(\.qualifiedName) == ["vm.migration-receive-ready", "vm.migration-receive-started",
                                                           "vm.migration-receive-failed"])
        #expect(sender.requestStop(.cancelled), "a cancel after the end changes nothing and is not refused")
    }

    /// A connection that joins the migration properly and then sends memory outside guest RAM
    /// fails the whole receive at once, under its own reason; the sender fails with one terminal
    /// event and the guest never leaves the source.
    @Test func aJoinedConnectionsBadRequestFailsTheReceiveAndTheGuestStays() async throws {
        let directory = try TemporaryDirectory()
        let source = try Source(TestGuestVM(cpus: 1, memoryMiB: 256, workload: "workset_mib=64 dirty_rate=100"))
        defer { source.machine.stop() }
        let destination = Destination()
        defer { destination.machine.withLock { $0 }?.stop() }
        let (sourceEvents, destinationEvents) = (EventLog(), EventLog())
        // A slow main connection keeps the migration in pass 0 while the intruder works.
        let (sender, sent, received, _) = try Self.migrate(
            source, to: destination, options: { SendMigrationOptions(destination: $0) },
            sourceEvents: sourceEvents, destinationEvents: destinationEvents, directory: directory, linkBytesPerSecond: 20e6)
        let intruder = MigrationConnection(SocketTransport(try Socket.connect(to: .unix(path: directory.path("migration.sock")), timeout: .seconds(10))))
        try intruder.sendJoin(MigrationJoin(migrationID: sender.id, index: 1, count: 2))
        #expect(try intruder.receiveResponse() == .ok, "a join naming the migration is taken")
        var outsideRAM = LittleEndianBytes(capacity: 20 + 4096)
        outsideRAM.append(UInt32(1))
        outsideRAM.append(GuestRAMLayout.mmioHoleStart)
        outsideRAM.append(UInt64(4096))
        try intruder.sendRequest(.memory, payload: outsideRAM.bytes + [UInt8](repeating: 0xAA, count: 4096))
        guard case .error(let refusal) = try intruder.receiveResponse() else {
            Issue.record("memory outside guest RAM was accepted")
            return
        }
        #expect(refusal.contains("extra connection 1 failed") && refusal.contains("not inside"), "\(refusal)")

        guard case .failed(let error) = try received.join() else {
            Issue.record("the receive did not fail")
            return
        }
        #expect(error == refusal, "the receive fails with the extra connection's reason: \(error)")
        #expect(try sent.join() == .failed)
        #expect(source.pauses.load(ordering: .relaxed) == 0 && source.machine.phase == .running, "the guest stays on the source")
        #expect(destination.machine.withLock { $0 }?.phase == .stopped, "the half-received machine was stopped")
        let sourceStream = await sourceEvents.close()
        #expect(sourceStream.filter { [VMEvent.MigrationFailed.qualifiedName, VMEvent.MigrationFinished.qualifiedName,
                                       VMEvent.MigrationCancelled.qualifiedName].contains($0.qualifiedName) }.count == 1)
        #expect(sourceStream.last?.qualifiedName == VMEvent.MigrationFailed.qualifiedName)
        let destinationStream = await destinationEvents.close()
        #expect(destinationStream.map(\.qualifiedName) == ["vm.migration-receive-ready", "vm.migration-receive-started",
                                                           "vm.migration-receive-failed"])
        #expect(try destinationStream.last?.decode(VMEvent.MigrationReceiveFailed.self)?.error == refusal)
    }

    @Test func aDestinationThatCannotHostTheVMFailsTheMigrationBeforeTheGuestStops() async throws {
        let directory = try TemporaryDirectory()
        let source = try Source(TestGuestVM(cpus: 1, memoryMiB: 128, workload: "workset_mib=8"))
        defer { source.machine.stop() }
        let destination = Destination(refusing: "no room for this guest here")
        let (sourceEvents, destinationEvents) = (EventLog(), EventLog())
        let (_, sent, received, _) = try Self.migrate(source, to: destination, options: { SendMigrationOptions(destination: $0) },
                                                   sourceEvents: sourceEvents, destinationEvents: destinationEvents, directory: directory)
        #expect(try sent.join() == .failed)
        #expect(try received.join() != .received)
        #expect(source.pauses.load(ordering: .relaxed) == 0 && source.machine.phase == .running)
        let failed = try #require(try await sourceEvents.close().last?.decode(VMEvent.MigrationFailed.self))
        #expect(failed.phase == .starting && failed.error.contains("no room for this guest here"), "\(failed)")
        let receiveFailed = try #require(try await destinationEvents.close().last?.decode(VMEvent.MigrationReceiveFailed.self))
        #expect(receiveFailed.phase == .starting && receiveFailed.error.contains("cannot run the VM"), "\(receiveFailed)")
    }
}
