import FerryTestSupport
import Foundation
import Testing
@testable import MigrationWire

@Suite struct MigrationURLTests {
    @Test(arguments: [
        ("tcp:192.0.2.1:6000", MigrationURL.tcp(host: "192.0.2.1", port: 6000)),
        ("tcp:localhost:1", .tcp(host: "localhost", port: 1)),
        ("tcp:0.0.0.0:0", .tcp(host: "0.0.0.0", port: 0)),
        ("tcp:[::1]:6000", .tcp(host: "::1", port: 6000)),
        ("unix:/run/ferry/migration.sock", .unix(path: "/run/ferry/migration.sock")),
        ("unix:relative.sock", .unix(path: "relative.sock")),
    ])
    func validURLsParse(text: String, url: MigrationURL) throws {
        #expect(try MigrationURL(parsing: text) == url)
        #expect(url.description == text)
    }

    @Test(arguments: [
        ("tcp:host:65536", "port '65536'"),
        ("tcp:host:-1", "port '-1'"),
        ("tcp:host:", "port ''"),
        ("tcp:host:60a", "port '60a'"),
        ("tcp:host", "no port"),
        ("tcp::6000", "no host"),
        ("tcp://host:6000", "without '//'"),
        ("tcp:::1:6000", "brackets"),
        ("tcp:[::1:6000", "never closes"),
        ("unix:", "no socket path"),
        ("unix:/" + String(repeating: "a", count: 120), "at most 107"),
        ("http://host:80", "unknown scheme 'http'"),
        ("file:///tmp/x", "unknown scheme 'file'"),
        ("localhost", "no scheme"),
    ])
    func invalidURLsSayWhatIsWrong(text: String, expected: String) {
        do {
            _ = try MigrationURL(parsing: text)
            Issue.record("'\(text)' parsed")
        } catch {
            #expect(error.kind == .invalidURL)
            #expect(error.message.contains(expected), "\(error.message)")
        }
    }

    @Test func connectingToPortZeroIsRefused() {
        #expect(throws: MigrationError(.invalidURL, "'tcp:127.0.0.1:0': port 0 can only be listened on; connect to the port the receiver listens on")) {
            _ = try MigrationConnection.connect(to: .tcp(host: "127.0.0.1", port: 0))
        }
    }

    @Test func tcpAndUnixListenersAcceptAndCarryARequest() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("ferry-mig-\(UUID().uuidString.prefix(8)).sock").path
        for url in [MigrationURL.tcp(host: "127.0.0.1", port: 0), .unix(path: path)] {
            let listener = try MigrationListener(listeningOn: url)
            let sender = BackgroundThread { () throws -> Void in
                let connection = try MigrationConnection.connect(to: listener.url, timeout: .seconds(5))
                try connection.sendRequest(.complete)
                try connection.expectOK(after: .complete)
            }
            let connection = try listener.accept(timeout: .seconds(5))
            #expect(try connection.receiveRequest(limits: MigrationLimits(guestRAM: [])) == .complete)
            try connection.sendResponse(.ok)
            try sender.join()
            listener.close()
        }
        #expect(!FileManager.default.fileExists(atPath: path), "the listener removes its socket file")
    }

    @Test func connectingWhereNobodyListensFailsWithConnectionFailed() throws {
        let listener = try MigrationListener(listeningOn: .tcp(host: "127.0.0.1", port: 0))
        let url = listener.url
        listener.close()
        #expect(throws: MigrationError.self) { _ = try MigrationConnection.connect(to: url, timeout: .seconds(2)) }
        do { _ = try MigrationConnection.connect(to: url, timeout: .seconds(2)) } catch { #expect(error.kind == .connectionFailed) }
    }

    @Test func acceptTimesOutWhenNoSenderComes() throws {
        let listener = try MigrationListener(listeningOn: .tcp(host: "127.0.0.1", port: 0))
        do {
            _ = try listener.accept(timeout: .milliseconds(100))
            Issue.record("accepted without a sender")
        } catch {
            #expect(error.kind == .timedOut)
        }
    }
}
