import FerryTestSupport
import Foundation
import HostOS
@testable import MigrationWire
import Testing

/// The TLS transport on real loopback sockets with certificates made by `openssl`: the handshake
/// is mutual and TLS 1.3, bytes arrive whole and in order in both directions and in sizes that
/// span many records, and the transport's failure modes are a socket's (a shutdown from another
/// thread, a peer that goes away) plus what TLS adds (a record that does not authenticate).
@Suite struct TLSTransportTests {
    /// Credentials for both sides from one CA, loaded.
    struct Pair {
        let directory: TemporaryDirectory
        let sender: MigrationTLS
        let receiver: MigrationTLS

        init() throws {
            directory = try TemporaryDirectory()
            let certificates = try TestCertificates(in: directory.path("pki"))
            let ca = try certificates.authority("ca")
            sender = try MigrationTLS(directory: try certificates.tlsDirectory(
                "sender", sender: true, trusting: ca, presenting: try certificates.issue("sender", by: ca)), role: .sender)
            receiver = try MigrationTLS(directory: try certificates.tlsDirectory(
                "receiver", sender: false, trusting: ca, presenting: try certificates.issue("receiver", by: ca)), role: .receiver)
        }

        /// A handshaken TLS transport each way over loopback TCP.
        func connect() throws -> (sender: TLSTransport, receiver: TLSTransport) {
            let listener = try ListeningSocket(on: .tcp(host: "127.0.0.1", port: 0))
            defer { listener.close() }
            let tls = sender
            let endpoint = listener.endpoint
            let connecting = BackgroundThread { () throws -> TLSTransport in
                let transport = try TLSTransport(try Socket.connect(to: endpoint, timeout: .seconds(5)), tls: tls, peerHost: "127.0.0.1")
                try transport.handshake(progressTimeout: .seconds(10))
                return transport
            }
            guard let socket = try listener.accept(until: .now + .seconds(5)) else { throw TestFailure("no connection") }
            let accepted = try TLSTransport(socket, tls: receiver, peerHost: nil)
            try accepted.handshake(progressTimeout: .seconds(10))
            return (try connecting.join(), accepted)
        }
    }

    @Test func bothSidesHandshakeTLS13AndManyRecordsArriveWholeBothWays() throws {
        let pair = try Pair()
        let (sender, receiver) = try pair.connect()
        #expect(sender.encryption?.hasPrefix("TLSv1.3 TLS_") == true, "\(sender.encryption ?? "none")")
        #expect(receiver.encryption == sender.encryption)

        // 8 MiB of a seeded pattern, over 500 records of 16 KiB, sent while the other side reads.
        var generator = SplitMix64(seed: 0x71_5EED)
        let payload = (0..<(8 << 20) / 8).flatMap { _ in withUnsafeBytes(of: generator.next()) { Array($0) } }
        for (from, to) in [(sender, receiver), (receiver, sender)] {
            let writing = BackgroundThread { () throws -> Void in
                try payload.withUnsafeBytes { try from.send($0, progressTimeout: .seconds(10)) }
            }
            var received = [UInt8](repeating: 0, count: payload.count)
            try received.withUnsafeMutableBytes { try to.receive(into: $0, progressTimeout: .seconds(10)) }
            try writing.join()
            #expect(received == payload, "the bytes arrived whole and in order")
        }
        sender.close()
        receiver.close()
    }

    @Test func aShutdownFromAnotherThreadEndsABlockedReceive() throws {
        let pair = try Pair()
        let (sender, receiver) = try pair.connect()
        let connection = MigrationConnection(receiver, ioTimeout: .seconds(30))
        let waiting = BackgroundThread { () throws -> Void in
            _ = try connection.receiveRequest(limits: MigrationLimits(guestRAM: []))
        }
        Poll.sleep(for: .milliseconds(100))
        connection.shutdown()
        #expect(throws: MigrationError.self) { try waiting.join() }
        sender.close()
    }

    @Test func aPeerThatGoesAwayIsPeerWentAway() throws {
        let pair = try Pair()
        let (sender, receiver) = try pair.connect()
        sender.close()
        do {
            _ = try MigrationConnection(receiver).receiveRequest(limits: MigrationLimits(guestRAM: []))
            Issue.record("a request arrived from a closed peer")
        } catch {
            #expect(error.kind == .peerWentAway, "\(error)")
        }
    }

    /// Credentials that cannot be used fail naming the file, before any connection.
    @Test func unusableCredentialsNameTheFile() throws {
        let pair = try Pair()
        let directory = pair.sender.directory
        try Data("not a certificate".utf8).write(to: URL(fileURLWithPath: "\(directory)/client-cert.pem"))
        #expect(throws: MigrationError(.tlsSetup, "tls_dir \(directory): client-cert.pem: no start line")) {
            _ = try MigrationTLS(directory: directory, role: .sender)
        }
        try FileManager.default.removeItem(atPath: "\(directory)/ca-cert.pem")
        #expect(throws: MigrationError(.tlsSetup, "tls_dir \(directory): ca-cert.pem cannot be read: No such file or directory")) {
            _ = try MigrationTLS(directory: directory, role: .sender)
        }
    }
}
