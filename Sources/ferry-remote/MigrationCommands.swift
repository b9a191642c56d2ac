import APIModels
import ArgumentParser
import Events
import FerryClient
import Foundation
import HostOS

/// `--timeout-strategy`: what happens when pre-copy outlasts `--timeout-s`.
enum TimeoutStrategyArgument: String, ExpressibleByArgument, CaseIterable {
    case cancel, ignore

    /// The spelling of `SendMigrationData.timeout_strategy`.
    var apiValue: String {
        switch self {
        case .cancel: "Cancel"
        case .ignore: "Ignore"
        }
    }
}

struct SendMigration: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "send-migration",
        abstract: "Live-migrate the VM to a VMM that is receiving it (see receive-migration).",
        discussion: """
            Without --dispatch, follows the migration until it ends: a progress line while it \
            runs (pass, bytes sent, bytes left in the pass, rate, expected downtime), then a summary. \
            Exit status 0 only when the destination runs the guest. On failure or cancellation the \
            guest keeps running here and the reason goes to standard error. After a finished \
            migration the source VMM exits, unless --keep-alive.

            With --json, prints this migration's events as they arrive (one JSON object per line) \
            instead of the progress line and summary.
            """)

    @OptionGroup var connection: Connection
    @Argument(help: ArgumentHelp("Where the destination's receive-migration listens.", valueName: "tcp:HOST:PORT|unix:PATH"))
    var destination: String
    @Option(name: .customLong("downtime-ms"),
            help: ArgumentHelp("The longest the guest may be paused for the switch-over (default 300).", valueName: "ms"))
    var downtimeMs: Int64?
    @Option(name: .customLong("timeout-s"),
            help: ArgumentHelp("How long pre-copy may take before --timeout-strategy applies (default 3600).", valueName: "s"))
    var timeoutS: Int64?
    @Option(name: .customLong("timeout-strategy"),
            help: ArgumentHelp("At the timeout: cancel (the default; the guest keeps running here) or ignore (switch over anyway).",
                               valueName: "cancel|ignore"))
    var timeoutStrategy: TimeoutStrategyArgument?
    @Flag(name: .customLong("keep-alive"), help: "Keep the source VMM running after the migration finished.")
    var keepAlive = false
    @Option(name: .customLong("tls-dir"),
            help: ArgumentHelp("Migrate over mutual TLS (tcp: only) with ca-cert.pem, client-cert.pem and client-key.pem from this directory.",
                               valueName: "dir"))
    var tlsDir: String?
    @Option(help: ArgumentHelp("Connections guest memory goes over in parallel, 1 to 128 (default 1); with --tls-dir each is TLS.",
                               valueName: "n"))
    var connections: Int64?
    @Flag(help: "Migrate to a VMM on this host (unix: only) by handing it the guest's memory, which must be shared (--memory shared=on), instead of copying it.")
    var local = false
    @Flag(name: .customLong("no-auto-converge"),
          help: "Never slow the guest's vCPUs down, even if it dirties memory faster than the link carries it.")
    var noAutoConverge = false
    @Flag(help: "Start the migration and return at once; follow it with events or migration-progress.")
    var dispatch = false

    func validate() throws {
        if let downtimeMs, downtimeMs < 1 {
            throw ValidationError("--downtime-ms must be at least 1, e.g. --downtime-ms 300")
        }
        if let timeoutS, timeoutS < 1 {
            throw ValidationError("--timeout-s must be at least 1, e.g. --timeout-s 3600")
        }
        if let connections, !(1...128).contains(connections) {
            throw ValidationError("--connections must be 1 to 128, e.g. --connections 4")
        }
        _ = try request
    }

    /// The request; the argument may be ch-remote's `destination_url=URL[,downtime_ms=N]…` form.
    var request: SendMigrationData {
        get throws {
            let keys: Set = ["destination_url", "downtime_ms", "timeout_s", "timeout_strategy", "connections", "local", "keep_alive", "tls_dir",
                             "auto_converge"]
            guard let fields = try KeyValueArgument(destination, firstKey: "destination_url", keys: keys) else {
                return SendMigrationData(destination_url: destination, downtime_ms: downtimeMs, timeout_s: timeoutS,
                                         timeout_strategy: timeoutStrategy?.apiValue, connections: connections, local: local ? true : nil,
                                         keep_alive: keepAlive ? true : nil, tls_dir: tlsDir, auto_converge: noAutoConverge ? false : nil)
            }
            let strategy = try fields.string("timeout_strategy").map { text in
                guard let parsed = TimeoutStrategyArgument(rawValue: text.lowercased()) else {
                    throw ValidationError("timeout_strategy=\(text) must be cancel or ignore")
                }
                return parsed.apiValue
            }
            return SendMigrationData(destination_url: try fields.required("destination_url"),
                                     downtime_ms: try fields.number("downtime_ms") ?? downtimeMs,
                                     timeout_s: try fields.number("timeout_s") ?? timeoutS,
                                     timeout_strategy: strategy ?? timeoutStrategy?.apiValue,
                                     connections: try fields.number("connections") ?? connections, local: try fields.flag("local") ?? (local ? true : nil),
                                     keep_alive: try fields.flag("keep_alive") ?? (keepAlive ? true : nil),
                                     tls_dir: try fields.string("tls_dir") ?? tlsDir,
                                     auto_converge: try fields.flag("auto_converge") ?? (noAutoConverge ? false : nil))
        }
    }

    func run() async throws {
        if dispatch {
            return try await perform { try await connection.client.send(.vmSendMigration, body: try body(try request)) }
        }
        let watch = MigrationWatch(client: connection.client, json: connection.json)
        let ending = try await watch.follow(starting: try body(try request))
        guard ending.succeeded else { throw ExitCode.failure }
    }
}

struct ReceiveMigration: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "receive-migration",
        abstract: "Wait for one incoming migration on a VMM without a VM, and run the guest here.",
        discussion: """
            Returns once the guest runs here (or stays paused, if it was paused on the source), \
            printing where it listens, who connected and what arrived. Port 0 listens on any free \
            port, which the first line names. Exit status 1 if the receive failed; the VMM can \
            receive again afterwards.

            Where the guest's consoles go here is this host's choice (--serial, --console), never \
            the source's: by default their output is discarded. Each of the guest's disks must be \
            placed with --disk id=ID,path=PATH (shared storage: the file the source uses, under \
            this host's path), and each network card given its tap here with --net id=ID,tap=NAME; \
            a disk or card left unplaced fails the receive, naming it.
            """)

    @OptionGroup var connection: Connection
    @Argument(help: ArgumentHelp("Where to listen for the source (or ch-remote's receiver_url=URL).", valueName: "tcp:HOST:PORT|unix:PATH"))
    var receiver: String

    /// The URL and TLS directory, also from ch-remote's `receiver_url=URL[,tls_dir=DIR]` form.
    var receiverURLAndTLS: (url: String, tlsDir: String?) {
        get throws {
            guard let fields = try KeyValueArgument(receiver, firstKey: "receiver_url", keys: ["receiver_url", "tls_dir"]) else {
                return (receiver, tlsDir)
            }
            return (try fields.required("receiver_url"), try fields.string("tls_dir") ?? tlsDir)
        }
    }
    @Option(name: .customLong("tls-dir"),
            help: ArgumentHelp("Let in only a sender over mutual TLS (tcp: only), with ca-cert.pem, server-cert.pem and server-key.pem from this directory.",
                               valueName: "dir"))
    var tlsDir: String?
    @Option(help: ArgumentHelp("Where the arriving guest's serial console goes on this host: null (the default), tty (the VMM's standard output), pty, file=PATH or socket=PATH.",
                               valueName: "null|tty|pty|file=PATH|socket=PATH"))
    var serial: String = "null"
    @Option(help: ArgumentHelp("Where the arriving guest's virtio console goes, if it has one: null, tty, pty or file=PATH.",
                               valueName: "null|tty|pty|file=PATH"))
    var console: String = "null"
    @Option(parsing: .singleValue,
            help: ArgumentHelp("Where an arriving disk is on this host (repeat for each disk).", valueName: "id=ID,path=PATH"))
    var disk: [String] = []
    @Option(parsing: .singleValue,
            help: ArgumentHelp("The tap an arriving network card uses on this host (repeat for each card).", valueName: "id=ID,tap=NAME"))
    var net: [String] = []

    func validate() throws {
        _ = try Self.console(serial, flag: "--serial")
        _ = try Self.console(console, flag: "--console")
        _ = try receiverURLAndTLS
        _ = try diskPlacements()
        _ = try netPlacements()
    }

    /// `--serial` or `--console` in `VmConfig`'s shape.
    static func console(_ text: String, flag: String) throws -> VmConfig.Console {
        switch text {
        case "null": return VmConfig.Console(mode: "Null")
        case "tty": return VmConfig.Console(mode: "Tty")
        case "pty": return VmConfig.Console(mode: "Pty")
        case let text where text.hasPrefix("file=") && text.count > "file=".count:
            return VmConfig.Console(mode: "File", file: String(text.dropFirst("file=".count)))
        case let text where flag == "--serial" && text.hasPrefix("socket=") && text.count > "socket=".count:
            return VmConfig.Console(mode: "Socket", socket: String(text.dropFirst("socket=".count)))
        default:
            let modes = flag == "--serial" ? "null, tty, pty, file=PATH or socket=PATH" : "null, tty, pty or file=PATH"
            throw ValidationError("\(flag): '\(text)' is not a console; use \(modes)")
        }
    }

    /// `--disk id=ID,path=PATH`, each.
    func diskPlacements() throws -> [ReceiveMigrationData.DiskPlacement] {
        try disk.map { text in
            let (id, path) = try Self.placement(text, flag: "--disk", key: "path")
            return ReceiveMigrationData.DiskPlacement(id: id, path: path)
        }
    }

    /// `--net id=ID,tap=NAME`, each.
    func netPlacements() throws -> [ReceiveMigrationData.NetPlacement] {
        try net.map { text in
            let (id, tap) = try Self.placement(text, flag: "--net", key: "tap")
            return ReceiveMigrationData.NetPlacement(id: id, tap: tap)
        }
    }

    /// `id=ID,KEY=VALUE`, both non-empty.
    private static func placement(_ text: String, flag: String, key: String) throws -> (String, String) {
        var fields: [String: String] = [:]
        let usage = "\(flag): '\(text)' is not id=ID,\(key)=\(key.uppercased())"
        for item in text.split(separator: ",") {
            let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2, ["id", key].contains(parts[0]), fields[parts[0]] == nil else { throw ValidationError(usage) }
            fields[parts[0]] = parts[1]
        }
        guard let id = fields["id"], !id.isEmpty, let value = fields[key], !value.isEmpty else { throw ValidationError(usage) }
        return (id, value)
    }

    func run() async throws {
        try await perform {
            let client = connection.client
            let events = try await client.events(sinceStart: false)
            let json = connection.json
            // Says where it listens and who connected while the request waits; ends with the receive.
            let narrator = Task {
                for try await line in events {
                    guard let event = try? EventReader.event(json: line) else { continue }
                    if json {
                        if event.name.hasPrefix("migration-receive") { printLine(String(decoding: line, as: UTF8.self)) }
                    } else if let ready = try? event.decode(VMEvent.MigrationReceiveReady.self) {
                        printLine("listening on \(ready.receiverURL)")
                    } else if let started = try? event.decode(VMEvent.MigrationReceiveStarted.self) {
                        printLine("receiving migration \(started.migrationID) from \(started.peer)\(started.tls ? " over TLS" : "")")
                    }
                    if event.is(VMEvent.MigrationReceiveFinished.self) || event.is(VMEvent.MigrationReceiveFailed.self) { return }
                }
            }
            defer { narrator.cancel() }
            do {
                let (url, tlsDir) = try receiverURLAndTLS
                let request = ReceiveMigrationData(receiver_url: url, serial: try Self.console(serial, flag: "--serial"),
                                                   console: try Self.console(console, flag: "--console"),
                                                   disks: try diskPlacements(), net: try netPlacements(), tls_dir: tlsDir)
                try await client.send(.vmReceiveMigration, body: try body(request), timeout: APIClient.unlimited)
            } catch {
                // A receive that failed after it began (500) has events still on their way.
                if (error as? APIError)?.status == 500 { await narrator.awaitEnd(cancellingAfter: .seconds(2)) }
                throw error
            }
            await narrator.awaitEnd(cancellingAfter: .seconds(5))
            if json { return }
            let progress = try JSONDecoder().decode(MigrationProgressReport.self, from: try await client.send(.vmMigrationProgress))
            let state = try JSONDecoder().decode(VmInfo.self, from: try await client.send(.vmInfo)).state
            let info = progress.memory_transmission_info
            printLine("received \(Human.bytes(info.memory_bytes_transmitted)) of guest memory in "
                      + "\(Human.milliseconds(progress.total_ms ?? 0)); the guest is \(state) here")
        }
    }
}

struct CancelMigration: SimpleOperation {
    static let configuration = CommandConfiguration(
        commandName: "cancel-migration",
        abstract: "Stop the migration under way: the guest keeps running on the source; a destination discards what it received.")
    static let endpoint = Endpoint.vmCancelMigration
    @OptionGroup var connection: Connection
}

struct MigrationProgressCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migration-progress",
        abstract: "Show the current or last migration of this VMM, either direction.")
    @OptionGroup var connection: Connection

    func run() async throws {
        try await perform {
            let data = try await connection.client.send(.vmMigrationProgress)
            if connection.json { return printLine(String(decoding: data, as: UTF8.self)) }
            let progress = try JSONDecoder().decode(MigrationProgressReport.self, from: data)
            for line in Self.summary(progress) { printLine(line) }
        }
    }

    /// The readable form of a progress report, one labelled fact per line. A destination knows
    /// what it received, not the passes, rates and limits the source worked with.
    static func summary(_ progress: MigrationProgressReport) -> [String] {
        let info = progress.memory_transmission_info
        let count = progress.transportation_mode.connections
        let connections = count == 1 ? "1 connection" : "\(count) connections"
        let outgoing = progress.direction == .outgoing
        var lines = [
            "migration:  \(progress.migration_id ?? "-") (\(progress.direction.rawValue), \(progress.transportation_mode), \(connections))",
            "state:      \(describe(progress.state))",
        ]
        let memory = "\(Human.bytes(info.memory_bytes_transmitted)) (\(info.memory_pages_4k_transmitted) pages) of \(Human.bytes(info.memory_bytes_total)) RAM"
        if outgoing {
            lines += [
                "pass:       \(info.memory_iteration)",
                "sent:       \(memory); \(info.memory_pages_constant_count) zero pages not sent",
                "remaining:  \(Human.bytes(info.memory_bytes_remaining_iteration)) in this pass",
                "rate:       \(Human.rate(info.memory_transmission_bps)); the guest dirtied \(info.memory_dirty_rate_pps) pages/s in the last pass",
            ]
            var downtime = "limit \(Human.milliseconds(progress.downtime_configured_ms))"
            if progress.downtime_estimated_ms > 0 { downtime += ", expected \(Human.milliseconds(progress.downtime_estimated_ms))" }
            if let measured = progress.downtime_ms { downtime += ", measured \(Human.milliseconds(measured))" }
            lines.append("downtime:   \(downtime)")
        } else {
            lines += [
                "received:   \(memory)",
                "rate:       \(Human.rate(info.memory_transmission_bps))",
            ]
        }
        if let total = progress.total_ms {
            lines.append("took:       \(Human.milliseconds(total))")
        } else {
            lines.append("running:    \(Human.milliseconds(progress.timestamp_snapshot_relative_ms))")
        }
        return lines
    }

    static func describe(_ state: MigrationProgressReport.State) -> String {
        switch state {
        case let .ongoing(phase, throttle):
            "ongoing (\(phase.rawValue)\(throttle > 0 ? ", vCPUs throttled \(throttle)%" : ""))"
        case .finished: "finished"
        case let .failed(message): "failed: \(message)"
        case .cancelled: "cancelled"
        }
    }
}

/// Sizes, rates and durations as people read them.
enum Human {
    /// `512 B`, `4.0 KiB`, `63.9 MiB`, `1.00 GiB`.
    static func bytes(_ count: UInt64) -> String {
        let value = Double(count)
        switch count {
        case ..<(1 << 10): return "\(count) B"
        case ..<(1 << 20): return String(format: "%.1f KiB", value / 1024)
        case ..<(1 << 30): return String(format: "%.1f MiB", value / 1_048_576)
        default: return String(format: "%.2f GiB", value / 1_073_741_824)
        }
    }

    static func rate(_ bytesPerSecond: UInt64) -> String {
        "\(bytes(bytesPerSecond))/s"
    }

    /// `3.4 s`.
    static func seconds(_ duration: Duration) -> String {
        String(format: "%.1f s", duration.inSeconds)
    }

    /// `850 ms` below a second, `2.98 s` above.
    static func milliseconds(_ count: UInt64) -> String {
        count < 1000 ? "\(count) ms" : String(format: "%.2f s", Double(count) / 1000)
    }
}

/// Writes one line to standard output at once (no buffering between the lines of two processes
/// sharing a terminal).
func printLine(_ text: String) {
    FileHandle.standardOutput.write(Data((text + "\n").utf8))
}

extension Task where Failure == any Error {
    /// Waits up to `limit` for the task to end, then cancels it.
    func awaitEnd(cancellingAfter limit: Duration) async {
        let timer = Task<Void, Never> {
            try? await Task<Never, Never>.sleep(for: limit)
            self.cancel()
        }
        _ = await result
        timer.cancel()
    }
}
