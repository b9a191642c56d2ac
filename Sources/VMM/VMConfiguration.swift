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

    public init(parsing text: String) throws(ConfigurationError) {
        let options = try OptionList(parsing: text, flag: "--serial", allowedKeys: ["file"])
        switch (options.words, options["file"]) {
        case (["tty"], nil): self = .tty
        case (["null"], nil): self = .null
        case (["off"], nil): self = .off
        case ([], let path?) where !path.isEmpty: self = .file(path)
        default:
            throw ConfigurationError(flag: "--serial", "'\(text)' is not a serial mode; use tty, file=PATH, null or off")
        }
    }
}

/// Everything `ferry` needs to create and boot one VM: what the guest sees (`machine`) and where
/// this host puts its console (`serial`). The two agree by construction: the guest has a UART
/// unless `serial` is `off`.
public struct VMConfiguration: Codable, Equatable, Sendable {
    public private(set) var machine: MachineConfiguration
    public private(set) var serial: SerialMode

    /// Ferry's default kernel command line when `--cmdline` is not given: console on the UART.
    public static let defaultCommandLine = "console=ttyS0"

    public init(machine: MachineConfiguration, serial: SerialMode = .tty) {
        var machine = machine
        machine.serialPort = serial != .off
        self.machine = machine
        self.serial = serial
    }

    /// The configuration of a guest that arrives with `machine` and whose console this host puts
    /// where `serial` says (nowhere, if the guest has no UART).
    public init(arriving machine: MachineConfiguration, serial: SerialMode) {
        self.init(machine: machine, serial: machine.serialPort ? serial : .off)
    }

    private enum CodingKeys: String, CodingKey { case machine, serial }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        self.init(machine: try container.decode(MachineConfiguration.self, forKey: .machine),
                  serial: try container.decode(SerialMode.self, forKey: .serial))
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

    /// `--console`: Ferry has no virtio console, so only `off` (and `null`) are accepted.
    public static func parseConsole(_ text: String) throws(ConfigurationError) {
        guard text == "off" || text == "null" else {
            throw ConfigurationError(flag: "--console", "'\(text)' is not available: Ferry has no virtio console; use --console off and --serial for the guest console")
        }
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
