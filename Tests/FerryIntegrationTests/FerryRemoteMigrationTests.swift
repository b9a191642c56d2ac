import FerryTestSupport
import Foundation
import Testing

/// `ferry-remote`'s migration subcommands at their edges: arguments refused before any request,
/// and the VMM's refusals reported with exit status 1. (Migrations themselves are tested
/// elsewhere; the demo script runs one through these subcommands.)
struct FerryRemoteMigrationTests {
    static func remote(_ arguments: [String]) throws -> FerryProcess {
        try FerryProcess(arguments: arguments, executable: Repository.ferryRemote)
    }

    /// The socket does not exist, so an answer about the arguments proves no request was made
    /// (a request would fail to connect and say so).
    @Test(arguments: [
        (["--timeout-strategy", "sometimes"], "--timeout-strategy"),
        (["--downtime-ms", "0"], "--downtime-ms must be at least 1"),
        (["--timeout-s", "0"], "--timeout-s must be at least 1"),
        (["--connections", "129"], "--connections must be 1 to 128"),
    ])
    func sendMigrationRefusesBadArgumentsBeforeAnyRequest(extra: [String], message: String) throws {
        let directory = try TemporaryDirectory()
        let remote = try Self.remote(["send-migration", "--api-socket", directory.path("absent.sock"), "tcp:127.0.0.1:6000"] + extra)
        #expect(remote.waitForExit(timeout: .seconds(20)) == 64, "ArgumentParser's usage error status")
        #expect(remote.standardError.contains(message), "stderr: \(remote.standardError)")
        #expect(!remote.standardError.contains("absent.sock"), "no connection was attempted")
        if extra.first == "--timeout-strategy" {
            #expect(remote.standardError.contains("cancel") && remote.standardError.contains("ignore"), "names the choices")
        }
    }

    @Test(arguments: [
        (["--net", "id=net0"], "--net: 'id=net0' is not id=ID,tap=TAP"),
        (["--net", "id=net0,tap=t0,mac=52:54:00:00:00:01"], "is not id=ID,tap=TAP"),
        (["--net", "tap=t0"], "is not id=ID,tap=TAP"),
        (["--disk", "id=disk0,tap=t0"], "--disk: 'id=disk0,tap=t0' is not id=ID,path=PATH"),
    ])
    func receiveMigrationRefusesBadPlacementsBeforeAnyRequest(extra: [String], message: String) throws {
        let directory = try TemporaryDirectory()
        let remote = try Self.remote(["receive-migration", "--api-socket", directory.path("absent.sock"), "tcp:127.0.0.1:0"] + extra)
        #expect(remote.waitForExit(timeout: .seconds(20)) == 64, "ArgumentParser's usage error status")
        #expect(remote.standardError.contains(message), "stderr: \(remote.standardError)")
        #expect(!remote.standardError.contains("absent.sock"), "no connection was attempted")
    }

    @Test(.enabled(if: Repository.kvmAvailable, needsKVM))
    func migrationSubcommandsReportTheVMMsRefusalWithStatus1() throws {
        let directory = try TemporaryDirectory()
        let socket = directory.path("api.sock")
        let ferry = try FerryProcess(arguments: ["--api-socket", "path=\(socket)"])
        #expect(APILifecycleTests.waitForFile(socket, timeout: .seconds(20)), "the API socket appears")
        let cases: [(arguments: [String], error: String)] = [
            (["migration-progress"], "no migration has run in this VMM (HTTP 404)"),
            (["migration-progress", "--json"], "no migration has run in this VMM (HTTP 404)"),
            (["cancel-migration"], "no migration is in progress (HTTP 409)"),
            (["send-migration", "tcp:127.0.0.1:6000"], "no VM has been created (HTTP 404)"),
            (["send-migration", "--dispatch", "tcp:127.0.0.1:6000"], "no VM has been created (HTTP 404)"),
            (["receive-migration", "ftp:somewhere"], "receiver_url: "),
        ]
        for (arguments, error) in cases {
            let remote = try Self.remote(arguments + ["--api-socket", socket])
            #expect(remote.waitForExit(timeout: .seconds(20)) == 1, "\(arguments)")
            #expect(remote.standardError.contains(error), "\(arguments): stderr: \(remote.standardError)")
            #expect(remote.consoleLines.isEmpty, "\(arguments) prints nothing on standard output")
        }
        ferry.signal(SIGTERM)
        #expect(ferry.waitForExit(timeout: .seconds(20)) == 0)
    }
}
