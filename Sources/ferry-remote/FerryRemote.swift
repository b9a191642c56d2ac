import APIModels
import Events
import FerryClient
import ArgumentParser
import Foundation

/// `ferry-remote`: drives a `ferry` through its API socket, one subcommand per endpoint (like
/// Cloud Hypervisor's `ch-remote`).
@main
struct FerryRemote: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ferry-remote",
        abstract: "Control a ferry VMM through its REST API socket.",
        discussion: "Exit status 0 when the VMM carried out the request; otherwise the VMM's error text goes to standard error and the status is 1.",
        version: "0.1.0",
        subcommands: [Ping.self, Create.self, Boot.self, Pause.self, Resume.self, Info.self, Shutdown.self,
                      Reboot.self, Delete.self, Snapshot.self, Restore.self, SendMigration.self, ReceiveMigration.self,
                      CancelMigration.self, MigrationProgressCommand.self, ShutdownVMM.self, Events.self]
    )

    /// ch-remote puts `--api-socket` before the subcommand (`ch-remote --api-socket S info`);
    /// `ferry-remote` takes it there as well as after the subcommand.
    static func main() async {
        await main(Self.subcommandOptionsAfterSubcommand(Array(CommandLine.arguments.dropFirst())))
    }

    /// Moves a leading `--api-socket PATH` (or `--api-socket=PATH`) after the subcommand's name.
    static func subcommandOptionsAfterSubcommand(_ arguments: [String]) -> [String] {
        var leading: [String] = []
        var rest = arguments[...]
        while let first = rest.first {
            if first == "--api-socket", rest.count >= 2 {
                leading += rest.prefix(2)
                rest = rest.dropFirst(2)
            } else if first.hasPrefix("--api-socket=") {
                leading.append(first)
                rest = rest.dropFirst()
            } else {
                break
            }
        }
        guard !leading.isEmpty, let subcommand = rest.first else { return arguments }
        return [subcommand] + leading + rest.dropFirst()
    }
}

/// Options every subcommand takes.
struct Connection: ParsableArguments {
    @Option(name: .customLong("api-socket"), help: ArgumentHelp("The VMM's API socket.", valueName: "path"))
    var apiSocket: String

    @Flag(help: "Print the VMM's JSON answer instead of a readable summary.")
    var json = false

    var client: APIClient { APIClient(socketPath: apiSocket) }
}

/// Runs one request, turning an error answer into the VMM's message and exit status 1.
func perform(_ body: () async throws -> Void) async throws {
    do {
        try await body()
    } catch let error as APIError {
        FileHandle.standardError.write(Data("ferry-remote: \(error) (HTTP \(error.status))\n".utf8))
        throw ExitCode.failure
    } catch {
        FileHandle.standardError.write(Data("ferry-remote: \(error)\n".utf8))
        throw ExitCode.failure
    }
}

/// A subcommand that PUTs to one endpoint without a body and prints nothing on success.
protocol SimpleOperation: AsyncParsableCommand {
    static var endpoint: Endpoint { get }
    var connection: Connection { get }
}

extension SimpleOperation {
    func run() async throws {
        try await perform { try await connection.client.send(Self.endpoint) }
    }
}

struct Ping: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Check that the VMM answers; print its version and pid.")
    @OptionGroup var connection: Connection

    func run() async throws {
        try await perform {
            let data = try await connection.client.send(.vmmPing)
            if connection.json { return print(String(decoding: data, as: UTF8.self)) }
            let ping = try JSONDecoder().decode(VmmPingResponse.self, from: data)
            print("cloud-hypervisor \(ping.build_version) (pid \(ping.pid))")
        }
    }
}

struct Create: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create the VM from a Cloud Hypervisor VmConfig JSON file (standard input without one, or with -).",
        discussion: """
            Example CONFIG.json:
              {"cpus": {"boot_vcpus": 2}, "memory": {"size": 1073741824},
               "payload": {"kernel": "/path/vmlinux", "cmdline": "console=ttyS0"},
               "serial": {"mode": "Tty"}}
            """)
    @OptionGroup var connection: Connection
    @Argument(help: ArgumentHelp("The VM configuration.", valueName: "CONFIG.json"))
    var config: String?

    func run() async throws {
        try await perform {
            let data = config == nil || config == "-" ? FileHandle.standardInput.readDataToEndOfFile()
                : try Data(contentsOf: URL(fileURLWithPath: config!))
            try await connection.client.send(.vmCreate, body: data)
        }
    }
}

struct Boot: SimpleOperation {
    static let configuration = CommandConfiguration(abstract: "Boot the created (or shut down) VM.")
    static let endpoint = Endpoint.vmBoot
    @OptionGroup var connection: Connection
}

struct Pause: SimpleOperation {
    static let configuration = CommandConfiguration(abstract: "Pause the running VM.")
    static let endpoint = Endpoint.vmPause
    @OptionGroup var connection: Connection
}

struct Resume: SimpleOperation {
    static let configuration = CommandConfiguration(abstract: "Resume the paused VM.")
    static let endpoint = Endpoint.vmResume
    @OptionGroup var connection: Connection
}

struct Shutdown: SimpleOperation {
    static let configuration = CommandConfiguration(abstract: "Shut the VM down; it can boot again.")
    static let endpoint = Endpoint.vmShutdown
    @OptionGroup var connection: Connection
}

struct Reboot: SimpleOperation {
    static let configuration = CommandConfiguration(abstract: "Reboot the VM from its kernel.")
    static let endpoint = Endpoint.vmReboot
    @OptionGroup var connection: Connection
}

struct Delete: SimpleOperation {
    static let configuration = CommandConfiguration(abstract: "Delete the VM (stopping it first if it runs).")
    static let endpoint = Endpoint.vmDelete
    @OptionGroup var connection: Connection
}

struct ShutdownVMM: SimpleOperation {
    static let configuration = CommandConfiguration(commandName: "shutdown-vmm", abstract: "Stop the VM if it runs and end the VMM process.")
    static let endpoint = Endpoint.vmmShutdown
    @OptionGroup var connection: Connection
}

/// Encodes a request body for the API.
func body(_ value: some Encodable) throws -> Data {
    try JSONEncoder().encode(value)
}

struct Snapshot: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Save the paused VM's state and memory into a directory.")
    @OptionGroup var connection: Connection
    @Argument(help: ArgumentHelp("Where to write the snapshot.", valueName: "file:///DIR"))
    var destination: String

    func run() async throws {
        try await perform {
            try await connection.client.send(.vmSnapshot, body: try body(VmSnapshotConfig(destination_url: destination)))
        }
    }
}

struct Restore: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create the VM from a snapshot directory (Paused unless --resume).",
        discussion: "ch-remote's form works too: source_url=file:///DIR[,prefault=on][,resume=on].")
    @OptionGroup var connection: Connection
    @Argument(help: ArgumentHelp("The snapshot to restore.", valueName: "file:///DIR"))
    var source: String
    @Flag(help: "Run the guest at once instead of leaving it Paused.")
    var resume = false

    func validate() throws { _ = try request }

    var request: RestoreConfig {
        get throws {
            guard let fields = try KeyValueArgument(source, firstKey: "source_url",
                                                    keys: ["source_url", "prefault", "resume"]) else {
                return RestoreConfig(source_url: source, resume: resume)
            }
            let resumes = try fields.flag("resume") ?? false
            return RestoreConfig(source_url: try fields.required("source_url"), resume: resume || resumes,
                                 prefault: try fields.flag("prefault"))
        }
    }

    func run() async throws {
        try await perform { try await connection.client.send(.vmRestore, body: try body(request)) }
    }
}

/// ch-remote's `key=value,…` form of a subcommand's argument (`source_url=file:///DIR,prefault=on`):
/// recognised by its first key, so that a plain URL is still a plain URL.
struct KeyValueArgument {
    private var fields: [String: String] = [:]

    /// nil when `text` does not start with `firstKey=`.
    init?(_ text: String, firstKey: String, keys: Set<String>) throws {
        guard text.hasPrefix(firstKey + "=") else { return nil }
        for item in text.split(separator: ",", omittingEmptySubsequences: false) {
            let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2, !parts[1].isEmpty else {
                throw ValidationError("'\(item)' is not key=value (in '\(text)')")
            }
            guard keys.contains(parts[0]) else {
                throw ValidationError("'\(parts[0])' is not a key here; use \(keys.sorted().joined(separator: ", "))")
            }
            guard fields[parts[0]] == nil else { throw ValidationError("'\(parts[0])' is given twice in '\(text)'") }
            fields[parts[0]] = parts[1]
        }
    }

    func required(_ key: String) throws -> String {
        guard let value = fields[key] else { throw ValidationError("\(key)= is required") }
        return value
    }

    func string(_ key: String) -> String? { fields[key] }

    func number(_ key: String) throws -> Int64? {
        try fields[key].map { text in
            guard let value = Int64(text) else { throw ValidationError("\(key)=\(text) is not a number") }
            return value
        }
    }

    func flag(_ key: String) throws -> Bool? {
        try fields[key].map { text in
            switch text {
            case "on", "true": return true
            case "off", "false": return false
            default: throw ValidationError("\(key)=\(text) must be on or off")
            }
        }
    }
}

struct Info: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show the VM's state and configuration.")
    @OptionGroup var connection: Connection

    func run() async throws {
        try await perform {
            let data = try await connection.client.send(.vmInfo)
            if connection.json { return print(String(decoding: data, as: UTF8.self)) }
            let info = try JSONDecoder().decode(VmInfo.self, from: data)
            print("state:   \(info.state)")
            print("cpus:    \(info.config.cpus?.boot_vcpus ?? 1)")
            print("memory:  \(info.memory_actual_size >> 20) MiB")
            print("kernel:  \(info.config.payload.kernel ?? "-")")
            if let initramfs = info.config.payload.initramfs { print("initramfs: \(initramfs)") }
            print("cmdline: \(info.config.payload.cmdline ?? "")")
        }
    }
}

struct Events: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Follow the VMM's event stream, one line per event, until interrupted.")
    @OptionGroup var connection: Connection
    @Flag(name: .customLong("since-start"), help: "Begin with every event the VMM still holds.")
    var sinceStart = false

    func run() async throws {
        try await perform {
            for try await line in try await connection.client.events(sinceStart: sinceStart) {
                if connection.json {
                    print(String(decoding: line, as: UTF8.self))
                } else {
                    print(Self.readable(line))
                }
                try? FileHandle.standardOutput.synchronize()
            }
        }
    }

    /// `[   12.345] vm.migration-started  id=0 bytes=1024` from one NDJSON event.
    static func readable(_ line: Data) -> String {
        guard let event = try? EventReader.event(json: line) else {
            return String(decoding: line, as: UTF8.self)
        }
        let (seconds, attoseconds) = event.timestamp.components
        let name = event.qualifiedName
        let properties = (event.properties ?? [:]).sorted { $0.key < $1.key }
            .map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        let stamp = String(format: "[%6lld.%03lld]", seconds, attoseconds / 1_000_000_000_000_000)
        return "\(stamp) \(name.padding(toLength: max(name.count, 30), withPad: " ", startingAt: 0)) \(properties)"
    }
}
