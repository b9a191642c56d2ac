import Events
import Machine

/// Where the guest's serial console goes on this host: `--serial` in Cloud Hypervisor's spelling.
public enum SerialMode: Codable, Equatable, Sendable {
    /// The VMM's standard output (and, on a terminal, its standard input).
    case tty
    /// Appended to a file created or truncated at start.
    case file(String)
    /// The UART exists; its output is discarded.
    case null
    /// No UART at all.
    case off

    /// `--serial` or `--console`, as `flag` says.
    public init(parsing text: String, flag: String = "--serial") throws(ConfigurationError) {
        let options = try OptionList(parsing: text, flag: flag, allowedKeys: ["file"])
        switch (options.words, options["file"]) {
        case (["tty"], nil): self = .tty
        case (["null"], nil): self = .null
        case (["off"], nil): self = .off
        case ([], let path?) where !path.isEmpty: self = .file(path)
        default:
            throw ConfigurationError(flag: flag, "'\(text)' is not a console mode; use tty, file=PATH, null or off")
        }
    }
}

extension DiskConfiguration {
    /// `--disk path=FILE[,readonly=on][,id=ID][,direct=on]`, Cloud Hypervisor's spelling; the
    /// `index`th disk without an id is `disk<index>`.
    public init(parsing text: String, index: Int) throws(ConfigurationError) {
        let options = try OptionList(parsing: text, flag: "--disk", allowedKeys: ["path", "readonly", "id", "direct"])
        guard options.words.isEmpty, let path = options["path"], !path.isEmpty else {
            throw ConfigurationError(flag: "--disk", "write path=FILE[,readonly=on][,id=ID][,direct=on]")
        }
        func flag(_ key: String) throws(ConfigurationError) -> Bool {
            switch options[key] {
            case nil, "off", "false": return false
            case "on", "true": return true
            case let other?: throw ConfigurationError(flag: "--disk", "\(key)=\(other) must be on or off")
            }
        }
        self.init(id: options["id"] ?? Self.defaultID(index: index), path: path, readOnly: try flag("readonly"), direct: try flag("direct"))
    }
}

/// `--rng src=PATH`: the host file the guest's virtio-rng reads (Cloud Hypervisor's default is
/// `/dev/urandom`).
public func parseEntropySource(_ text: String) throws(ConfigurationError) -> String {
    let options = try OptionList(parsing: text, flag: "--rng", allowedKeys: ["src"])
    guard options.words.isEmpty, let source = options["src"], !source.isEmpty else {
        throw ConfigurationError(flag: "--rng", "write src=PATH, e.g. --rng src=/dev/urandom")
    }
    return source
}

/// Everything `ferry` needs to create and boot one VM: what the guest sees (`machine`) and where
/// this host puts its consoles (`serial`, `console`). They agree by construction: the guest has a
/// UART unless `serial` is `off`, and a virtio console unless `console` is `off`.
public struct VMConfiguration: Codable, Equatable, Sendable {
    public private(set) var machine: MachineConfiguration
    public private(set) var serial: SerialMode
    /// Where the virtio console's output goes.
    public private(set) var console: SerialMode

    /// Ferry's default kernel command line when `--cmdline` is not given: console on the UART.
    public static let defaultCommandLine = "console=ttyS0"

    public init(machine: MachineConfiguration, serial: SerialMode = .tty, console: SerialMode = .off) {
        var machine = machine
        machine.serialPort = serial != .off
        machine.virtioConsole = console != .off
        self.machine = machine
        self.serial = serial
        self.console = console
    }

    /// The configuration of a guest that arrives with `machine`: its consoles go where this host
    /// says (nowhere, for a device the guest does not have), and each of its disks is the file
    /// this host names for the disk's id (`diskPaths`), never the path the sender used. A disk
    /// without a place here is refused, naming it.
    public init(arriving machine: MachineConfiguration, serial: SerialMode, console: SerialMode = .null,
                diskPaths: [String: String] = [:]) throws(VMMError) {
        var machine = machine
        for index in machine.disks.indices {
            let id = machine.disks[index].id
            guard let path = diskPaths[id] else {
                throw VMMError(.invalidRequest, "disk \(id): the arriving guest has this disk and the receive request does not place it (disks: [{\"id\": \"\(id)\", \"path\": ...}])")
            }
            machine.disks[index].path = path
        }
        if let extra = Set(diskPaths.keys).subtracting(machine.disks.map(\.id)).sorted().first {
            throw VMMError(.invalidRequest, "disk \(extra): the receive request places a disk the arriving guest does not have")
        }
        self.init(machine: machine, serial: machine.serialPort ? serial : .off, console: machine.virtioConsole ? console : .off)
    }

    private enum CodingKeys: String, CodingKey { case machine, serial, console }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        self.init(machine: try container.decode(MachineConfiguration.self, forKey: .machine),
                  serial: try container.decode(SerialMode.self, forKey: .serial),
                  console: try container.decode(SerialMode.self, forKey: .console))
    }

    /// `--cpus boot=N`.
    public static func parseCPUs(_ text: String) throws(ConfigurationError) -> Int {
        let options = try OptionList(parsing: text, flag: "--cpus", allowedKeys: ["boot"])
        guard options.words.isEmpty, let boot = options["boot"] else {
            throw ConfigurationError(flag: "--cpus", "write boot=N, e.g. --cpus boot=2")
        }
        guard let count = Int(boot), (1...MachineConfiguration.maximumCPUs).contains(count) else {
            throw ConfigurationError(flag: "--cpus", "boot=\(boot) must be a number from 1 to \(MachineConfiguration.maximumCPUs)")
        }
        return count
    }

    /// `--memory size=SIZE`.
    public static func parseMemory(_ text: String) throws(ConfigurationError) -> UInt64 {
        let options = try OptionList(parsing: text, flag: "--memory", allowedKeys: ["size"])
        guard options.words.isEmpty, let size = options["size"] else {
            throw ConfigurationError(flag: "--memory", "write size=SIZE, e.g. --memory size=1G")
        }
        let bytes = try ByteSize.parse(size, flag: "--memory")
        guard bytes >= GuestRAMLayout.minimumSize else {
            throw ConfigurationError(flag: "--memory", "size=\(size) is below the minimum of \(GuestRAMLayout.minimumSize >> 20)M")
        }
        guard bytes % 4096 == 0 else { throw ConfigurationError(flag: "--memory", "size=\(size) is not a multiple of 4K") }
        return bytes
    }


    /// `--event-monitor path=PATH|fd=N`.
    public static func parseEventMonitor(_ text: String) throws(ConfigurationError) -> EventSinkTarget {
        do {
            return try EventSinkTarget(parsing: text)
        } catch {
            throw ConfigurationError(flag: "--event-monitor", "\(error)")
        }
    }
}
