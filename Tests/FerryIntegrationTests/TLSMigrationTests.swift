import APIModels
import FerryClient
import FerryTestSupport
import Foundation
import Testing

/// Live migration over mutual TLS between two real `ferry` processes (`tls_dir`, docs/security.md):
/// it arrives as a plaintext one does, the bytes on the wire are not the guest's, and each way the
/// two sides can disagree about TLS fails before any guest memory moves, naming the problem on
/// both sides, with the guest running on the source and both VMMs ready for the next migration.
@Suite(.serialized, .enabled(if: Repository.kvmAvailable, needsKVM))
struct TLSMigrationTests {
    /// A CA, a sender and a receiver certificate it signed, and each side's `tls_dir`.
    struct Credentials {
        let certificates: TestCertificates
        let authority: TestCertificates.Authority
        let sender: String
        let receiver: String

        init(in directory: TemporaryDirectory) throws {
            certificates = try TestCertificates(in: directory.path("pki"))
            authority = try certificates.authority("ferry-ca")
            sender = try certificates.tlsDirectory("sender-tls", sender: true, trusting: authority,
                                                   presenting: try certificates.issue("source-host", by: authority))
            receiver = try certificates.tlsDirectory("receiver-tls", sender: false, trusting: authority,
                                                     presenting: try certificates.issue("destination-host", by: authority))
        }
    }

    /// Over one connection, and over four, each with its own handshake.
    @Test(arguments: [1, 4])
    func aTLSMigrationArrivesAsAPlaintextOneDoes(connections: Int) async throws {
        let pair = try await MigrationPair(transport: .tcp, guest: TestGuestVM(cpus: 2, memoryMiB: 256, workload: "workset_mib=32 dirty_rate=1000"))
        let credentials = try Credentials(in: pair.directory)
        let incoming = try await pair.destination.startReceive(at: "tcp:127.0.0.1:0", tlsDir: credentials.receiver)
        // The harness checks that both sides' start events say tls=true.
        try await MigrationTests.expectLiveMigration(pair, incoming: incoming, afterContinuing: {
            let received = try? await pair.destination.progress()
            #expect(received?.transportation_mode == .tcp(connections: connections, tls: true),
                    "\(String(describing: received?.transportation_mode))")
        }) { SendMigrationData(destination_url: $0, connections: Int64(connections), tls_dir: credentials.sender) }
    }

    /// A relay between the two sides keeps every byte the source sent, on every connection. The
    /// guest's own text (its boot message, in guest RAM, which pass 0 carries) is in a plaintext
    /// capture and never in a TLS one, over one connection or four.
    @Test(arguments: [(false, 1), (true, 1), (true, 4)])
    func theGuestsMemoryIsNotOnTheWireOverTLS(tls: Bool, connections: Int64) async throws {
        let directory = try TemporaryDirectory()
        let credentials = try Credentials(in: directory)
        let source = try await TestVMM("source", in: directory)
        try await source.boot(TestGuestVM(cpus: 1, memoryMiB: 128, workload: "workset_mib=8 dirty_rate=100"))
        let destination = try await TestVMM("destination", in: directory)
        let incoming = try await destination.startReceive(at: "tcp:127.0.0.1:0", tlsDir: tls ? credentials.receiver : nil)
        let capture = directory.path("wire.bin")
        let relay = try ThrottledLink(to: incoming.url, transport: .tcp, in: directory, bytesPerSecond: 0, capture: capture)
        let id = try await source.startSend(to: relay.url, keepAlive: true, tlsDir: tls ? credentials.sender : nil, connections: connections)
        let end = try await source.waitForEvent(MigrationStreams.sourceTerminal, id: id)
        #expect(end.name == "vm.migration-finished", "\(end.properties)")
        #expect(await incoming.outcome() == nil)
        relay.relay.signal(SIGTERM)
        let wire = try Data(contentsOf: URL(fileURLWithPath: capture))
        let guestText = Data("ferry-test-guest: boot".utf8)
        #expect(wire.count > 8 << 20, "the capture holds the migration: \(wire.count) bytes")
        if tls {
            #expect(wire.range(of: guestText) == nil, "the guest's text is not on the wire")
            #expect(wire.prefix(3) == Data([0x16, 0x03, 0x01]), "the stream opens with a TLS handshake record: \(Array(wire.prefix(3)))")
        } else {
            #expect(wire.range(of: guestText) != nil, "the control: without TLS the guest's text is on the wire")
        }
        print("tls wire check (tls=\(tls), \(connections) connection(s)): \(wire.count) bytes captured, guest text \(wire.range(of: guestText) == nil ? "absent" : "present")")
        #expect(await destination.shutDown())
        #expect(await source.shutDown())
    }

    /// One way the two sides disagree: what each is given, and what each must say.
    struct Disagreement: CustomStringConvertible {
        var description: String
        /// The sender's and the receiver's `tls_dir`, nil for plaintext.
        var sender: String?
        var receiver: String?
        var sourceSays: String
        var destinationSays: String
    }

    @Test func eachTLSDisagreementFailsBeforeMemoryMovesAndNamesTheProblemOnBothSides() async throws {
        let directory = try TemporaryDirectory()
        let credentials = try Credentials(in: directory)
        let certificates = credentials.certificates
        let ca = credentials.authority
        let rogue = try certificates.authority("rogue-ca")
        let cases = [
            Disagreement(description: "the sender's certificate is from another CA",
                         sender: try certificates.tlsDirectory("s-rogue", sender: true, trusting: ca,
                                                               presenting: try certificates.issue("s-rogue", by: rogue)),
                         receiver: credentials.receiver,
                         sourceSays: "refused this host's certificate", destinationSays: "the sender's certificate was refused"),
            Disagreement(description: "the receiver's certificate is from another CA",
                         sender: credentials.sender,
                         receiver: try certificates.tlsDirectory("r-rogue", sender: false, trusting: ca,
                                                                 presenting: try certificates.issue("r-rogue", by: rogue)),
                         sourceSays: "the destination's certificate was refused (certificate verify failed: unable to get local issuer certificate)",
                         destinationSays: "refused this host's certificate"),
            Disagreement(description: "the receiver's certificate has expired",
                         sender: credentials.sender,
                         receiver: try certificates.tlsDirectory("r-expired", sender: false, trusting: ca,
                                                                 presenting: try certificates.issue("r-expired", by: ca, expired: true)),
                         sourceSays: "certificate has expired", destinationSays: "refused this host's certificate"),
            Disagreement(description: "the sender's certificate has expired",
                         sender: try certificates.tlsDirectory("s-expired", sender: true, trusting: ca,
                                                               presenting: try certificates.issue("s-expired", by: ca, expired: true)),
                         receiver: credentials.receiver,
                         sourceSays: "refused this host's certificate", destinationSays: "certificate has expired"),
            Disagreement(description: "the receiver's certificate names another host",
                         sender: credentials.sender,
                         receiver: try certificates.tlsDirectory("r-elsewhere", sender: false, trusting: ca,
                                                                 presenting: try certificates.issue("r-elsewhere", by: ca,
                                                                                                    subjectAltNames: ["DNS:elsewhere.example"])),
                         sourceSays: "IP address mismatch", destinationSays: "refused this host's certificate"),
            Disagreement(description: "a plaintext sender meets a TLS receiver",
                         sender: nil, receiver: credentials.receiver,
                         sourceSays: "a destination that expects TLS", destinationSays: "the sender does not speak TLS"),
            Disagreement(description: "a TLS sender meets a plaintext receiver",
                         sender: credentials.sender, receiver: nil,
                         sourceSays: "the destination does not speak TLS", destinationSays: "the peer uses TLS (tls_dir) and this side does not"),
        ]
        let source = try await TestVMM("source", in: directory)
        try await source.boot(.calm)
        let destination = try await TestVMM("destination", in: directory)
        for disagreement in cases {
            let context = disagreement.description
            let mark = source.process.consoleLines.count
            let receive = try await destination.startReceive(at: "tcp:127.0.0.1:0", tlsDir: disagreement.receiver)
            let id = try await source.startSend(to: receive.url, tlsDir: disagreement.sender)
            let end = try await source.waitForEvent(MigrationStreams.sourceTerminal, id: id)
            let sourceError = end.properties["error"] ?? ""
            print("tls disagreement: \(context): source: \(sourceError)")
            #expect(end.name == "vm.migration-failed", "\(context): \(end.properties)")
            #expect(end.properties["phase"] == "starting", "\(context): it failed before memory moved: \(end.properties)")
            #expect(sourceError.contains(disagreement.sourceSays), "\(context): the source says \(sourceError)")
            MigrationFaultTests.expectSourceStream(source, id: id, endsWith: "vm.migration-failed", switchedOver: false)
            #expect(!source.events().contains { $0.name == MigrationStreams.iteration && $0.properties["migration_id"] == id },
                    "\(context): no pass was sent")

            let failure = try await MigrationFaultTests.expectReceiveFailed(receive, containing: disagreement.destinationSays, context)
            print("tls disagreement: \(context): destination: \(failure?.description ?? "?")")
            // Nothing identified a migration on the destination: no receive-started, so no terminal event either.
            #expect(!destination.events().contains { $0.name == "vm.migration-receive-started" }, "\(context)")
            try await MigrationFaultTests.expectReadyToReceive(destination, context)
            try await MigrationFaultTests.expectGuestRuns(on: source, after: mark, cpus: TestGuestVM.calm.cpus, context)
        }

        // Both VMMs are fine: with matching credentials the guest now moves.
        let receive = try await destination.startReceive(at: "tcp:127.0.0.1:0", tlsDir: credentials.receiver)
        let id = try await source.startSend(to: receive.url, downtimeMs: 300, timeoutS: 5, strategy: "Ignore", tlsDir: credentials.sender)
        #expect(try await source.waitForEvent(MigrationStreams.sourceTerminal, id: id).name == "vm.migration-finished")
        try await MigrationFaultTests.expectReceiveSucceeded(receive, on: destination, id: id, from: source, cpus: TestGuestVM.calm.cpus)
        #expect(await destination.shutDown())
    }

    /// Credentials that cannot be used are the request's fault: a 400 naming the file, before
    /// anything connects or listens, and no events.
    @Test func missingOrMismatchedFilesAreRefusedWithA400NamingTheFile() async throws {
        let directory = try TemporaryDirectory()
        let credentials = try Credentials(in: directory)
        let vmm = try await TestVMM("vmm", in: directory)
        try FileManager.default.removeItem(atPath: "\(credentials.receiver)/server-cert.pem")
        try await MigrationTests.expectRefusal(400, containing: "server-cert.pem cannot be read: No such file or directory") {
            _ = try await vmm.api.send(.vmReceiveMigration, body: try JSONEncoder().encode(
                ReceiveMigrationData(receiver_url: "tcp:127.0.0.1:0", tls_dir: credentials.receiver)))
        }
        try await MigrationTests.expectRefusal(400, containing: "TLS is for tcp: migrations") {
            _ = try await vmm.api.send(.vmReceiveMigration, body: try JSONEncoder().encode(
                ReceiveMigrationData(receiver_url: "unix:\(directory.path("m.sock"))", tls_dir: credentials.sender)))
        }

        try await vmm.boot(TestGuestVM(cpus: 1, memoryMiB: 64, workload: "workset_mib=1 dirty_rate=10"))
        // A key that is not the certificate's.
        let other = try credentials.certificates.issue("other", by: credentials.authority)
        try FileManager.default.removeItem(atPath: "\(credentials.sender)/client-key.pem")
        try FileManager.default.copyItem(atPath: other.key, toPath: "\(credentials.sender)/client-key.pem")
        try await MigrationTests.expectRefusal(400, containing: "client-key.pem does not match client-cert.pem") {
            _ = try await vmm.api.send(.vmSendMigration, body: try JSONEncoder().encode(
                SendMigrationData(destination_url: "tcp:127.0.0.1:9", tls_dir: credentials.sender)))
        }
        try await MigrationTests.expectRefusal(400, containing: "ca-cert.pem cannot be read") {
            _ = try await vmm.api.send(.vmSendMigration, body: try JSONEncoder().encode(
                SendMigrationData(destination_url: "tcp:127.0.0.1:9", tls_dir: directory.path("nowhere"))))
        }
        try await MigrationTests.expectRefusal(400, containing: "TLS is for tcp: migrations") {
            _ = try await vmm.api.send(.vmSendMigration, body: try JSONEncoder().encode(
                SendMigrationData(destination_url: "unix:\(directory.path("m.sock"))", tls_dir: credentials.sender)))
        }
        #expect(!vmm.events().contains { $0.name.hasPrefix("vm.migration") }, "\(vmm.events().map(\.name))")
        #expect(try await vmm.info().state == "Running")
        #expect(await vmm.shutDown())
    }
}
