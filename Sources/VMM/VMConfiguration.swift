import Events
import Machine

/// Where the guest's serial console (or virtio console) goes on this host: `--serial` and
/// `--console` in Cloud Hypervisor's spelling.
public enum SerialMode: Codable, Equatable, Sendable {
    /// The VMM's standard output (and, on a terminal, its standard input).
    case tty
    /// Appended to a file created or truncated at start.
    case file(String)
    /// A new pseudo-terminal, both ways; `vm.info` names it.
    case pty
    /// A Unix socket the VMM listens on, both ways, one client at a time (the serial port only,
    /// as Cloud Hypervisor).
    case socket(String)
    /// The device exists; its output is discarded.
    case null
    /// No device at all.
    case off

    /// `--serial` or `--console`, as `flag` says.
    public init(parsing text: String, flag: String = "--serial") throws(ConfigurationError) {
        let serial = flag == "--serial"
        let options = try OptionList(parsing: text, flag: flag, allowedKeys: serial ? ["file", "socket"] : ["file"])
        switch (options.words, options["file"], options["socket"]) {
        case (["tty"], nil, nil): self = .tty
        case (["pty"], nil, nil): self = .pty
        case (["null"], nil, nil): self = .null
        case (["off"], nil, nil): self = .off
        case ([], let path?, nil) where !path.isEmpty: self = .file(path)
        case ([], nil, let path?) where !path.isEmpty: self = .socket(path)
        default:
            let modes = serial ? "off, null, pty, tty, file=PATH or socket=PATH" : "off, null, pty, tty or file=PATH"
            throw ConfigurationError(flag: flag, "'\(text)' is not a console mode; use \(modes)")
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

extension NetworkConfiguration {
    /// `--net tap=NAME|fd=N[,mac=MAC][,ip=IP,mask=MASK][,id=ID][,num_queues=2][,queue_size=N][,offload_*=on|off]`,
    /// Cloud Hypervisor's spelling; the `index`th card without an id is `net<index>`, without a
    /// mac it gets a random locally administered one.
    public init(parsing text: String, index: Int) throws(ConfigurationError) {
        let keys: Set<String> = ["tap", "fd", "mac", "ip", "mask", "id", "num_queues", "queue_size", "offload_tso", "offload_ufo", "offload_csum"]
        let options = try OptionList(parsing: text, flag: "--net", allowedKeys: keys)
        let usage = "write tap=NAME or fd=N, then [,mac=MAC][,ip=IP,mask=MASK][,id=ID][,queue_size=N]"
        guard options.words.isEmpty, options["tap"] != nil || options["fd"] != nil else {
            throw ConfigurationError(flag: "--net", usage)
        }
        var fd: Int32?
        if let text = options["fd"] {
            // Cloud Hypervisor writes a list (fd=[3] or fd=[3,4] for more queues).
            let list = text.hasPrefix("[") && text.hasSuffix("]") ? String(text.dropFirst().dropLast()) : text
            guard let value = Int32(list), value > 2 else {
                throw ConfigurationError(flag: "--net", "fd=\(text) must be one descriptor above 2 (one queue pair)")
            }
            fd = value
        }
        var mac = MACAddress.random()
        if let text = options["mac"] {
            guard let parsed = MACAddress(text) else {
                throw ConfigurationError(flag: "--net", "mac=\(text) is not a MAC address (six hexadecimal pairs, 52:54:00:12:34:56)")
            }
            mac = parsed
        }
        if let queues = options["num_queues"], queues != "2" {
            throw ConfigurationError(flag: "--net", "num_queues=\(queues): Ferry's virtio-net has one queue pair; use 2 or leave it out")
        }
        var queueSize = NetworkConfiguration.defaultQueueSize
        if let text = options["queue_size"] {
            guard let value = UInt16(text) else {
                throw ConfigurationError(flag: "--net", "queue_size=\(text) is not a power of two from 2 to \(NetworkConfiguration.maximumQueueSize)")
            }
            queueSize = value
        }
        func flag(_ key: String) throws(ConfigurationError) -> Bool {
            switch options[key] {
            case nil, "on", "true": return true
            case "off", "false": return false
            case let other?: throw ConfigurationError(flag: "--net", "\(key)=\(other) must be on or off")
            }
        }
        self.init(id: options["id"] ?? Self.defaultID(index: index), mac: mac, tap: options["tap"], fd: fd,
                  hostAddress: options["ip"], hostNetmask: options["mask"], queueSize: queueSize)
        offloadTSO = try flag("offload_tso")
        offloadUFO = try flag("offload_ufo")
        offloadChecksum = try flag("offload_csum")
        do { try validate() } catch { throw ConfigurationError(flag: "--net", error.message) }
    }
}

/// Why Ferry refuses what Cloud Hypervisor's CPU and memory settings can ask for, by the
/// setting's path (`cpus.topology`, `memory.hugepages`): one text for `--cpus`/`--memory` and
/// for `VmConfig.cpus`/`.memory` in the API.
public enum UnsupportedOption {
    static let reasons: [String: String] = {
        let noHotplug = "Ferry has no memory hotplug"
        return [
            "cpus.topology": "Ferry describes each vCPU as a package of its own (MP table)",
            "cpus.kvm_hyperv": "Ferry offers no Hyper-V enlightenments",
            "cpus.max_phys_bits": "Ferry reports the host's physical address width",
            "cpus.affinity": "Ferry does not pin vCPU threads; pin the process (taskset, cgroups)",
            "cpus.features": "Ferry offers no optional CPU features (amx)",
            "cpus.nested": "Ferry does not offer virtualization extensions to the guest",
            "cpus.core_scheduling": "Ferry does not set up core scheduling",
            "memory.mergeable": "Ferry does not mark guest RAM for KSM",
            "memory.hugepages": "Ferry backs guest RAM with normal pages (and transparent huge pages)",
            "memory.hugepage_size": "Ferry has no hugetlbfs backing",
            "memory.prefault": "Ferry faults guest RAM in as the guest touches it",
            "memory.thp": "Ferry always asks for transparent huge pages",
            "memory.hotplug_method": noHotplug,
            "memory.hotplug_size": noHotplug,
            "memory.hotplugged_size": noHotplug,
            "memory.zones": "Ferry has one memory region and no NUMA",
        ]
    }()

    public static func reason(_ path: String) -> String {
        guard let reason = reasons[path] else { preconditionFailure("no reason is written for \(path)") }
        return reason
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
    /// says (nowhere, for a device the guest does not have), each of its disks is the file
    /// this host names for the disk's id (`diskPaths`), never the path the sender used, and each
    /// network card's host end the tap this host names for its id (`netTaps`). A disk or card
    /// without a place here is refused, naming it.
    public init(arriving machine: MachineConfiguration, serial: SerialMode, console: SerialMode = .null,
                diskPaths: [String: String] = [:], netTaps: [String: String] = [:],
                netDescriptors: [String: Int32] = [:]) throws(VMMError) {
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
        for index in machine.networks.indices {
            let id = machine.networks[index].id
            guard netTaps[id] != nil || netDescriptors[id] != nil else {
                throw VMMError(.invalidRequest, "net \(id): the arriving guest has this network card and the receive request does not place it (net: [{\"id\": \"\(id)\", \"tap\": ...}])")
            }
            // The host end is this host's: its tap (by name or descriptor), configured here;
            // nothing of the sender's.
            machine.networks[index].tap = netTaps[id]
            machine.networks[index].fd = netDescriptors[id]
            machine.networks[index].hostAddress = nil
            machine.networks[index].hostNetmask = nil
        }
        if let extra = Set(netTaps.keys).union(netDescriptors.keys).subtracting(machine.networks.map(\.id)).sorted().first {
            throw VMMError(.invalidRequest, "net \(extra): the receive request places a network card the arriving guest does not have")
        }
        self.init(machine: machine, serial: machine.serialPort ? serial : .off, console: machine.virtioConsole ? console : .off)
    }

    /// This configuration with one more network card (`vm.add-net` before boot), checked whole.
    public func adding(_ network: NetworkConfiguration) throws(VMMError) -> VMConfiguration {
        var machine = self.machine
        machine.networks.append(network)
        do {
            try machine.validate()
        } catch {
            throw VMMError(.invalidRequest, error.message, cause: error)
        }
        return VMConfiguration(machine: machine, serial: serial, console: console)
    }

    /// This configuration with the cards named in `descriptors` on those tap descriptors (a
    /// restore with new taps, as libvirt restores): the snapshot's tap names and host addresses
    /// of those cards are dropped. A descriptor for a card the VM does not have is refused.
    public func withTapDescriptors(_ descriptors: [String: Int32]) throws(VMMError) -> VMConfiguration {
        var machine = self.machine
        for (id, descriptor) in descriptors {
            guard let index = machine.networks.firstIndex(where: { $0.id == id }) else {
                throw VMMError(.invalidRequest, "net_fds: the snapshot's VM has no network card \(id)")
            }
            machine.networks[index].fd = descriptor
            machine.networks[index].tap = nil
            machine.networks[index].hostAddress = nil
            machine.networks[index].hostNetmask = nil
        }
        return VMConfiguration(machine: machine, serial: serial, console: console)
    }

    /// The tap descriptors this configuration's cards hold (inherited with `--net fd=`, or sent
    /// with `vm.add-net` or `vm.restore`): each machine works on a duplicate, so they stay open
    /// for the VM's next boot until the VM is deleted.
    public var tapDescriptors: [Int32] { machine.networks.compactMap(\.fd) }

    private enum CodingKeys: String, CodingKey { case machine, serial, console }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        self.init(machine: try container.decode(MachineConfiguration.self, forKey: .machine),
                  serial: try container.decode(SerialMode.self, forKey: .serial),
                  console: try container.decode(SerialMode.self, forKey: .console))
    }

    /// `--cpus boot=N[,max=N]`. Cloud Hypervisor's other keys are known: at the value that asks
    /// for nothing Ferry lacks they are accepted, otherwise refused naming the key.
    public static func parseCPUs(_ text: String) throws(ConfigurationError) -> Int {
        // The values each key may have: the ones that ask for nothing Ferry lacks.
        let unsupported: [String: Set<String>] = [
            "topology": [], "kvm_hyperv": ["off", "false"], "max_phys_bits": [], "affinity": [], "features": [],
            "nested": ["off", "false"], "core_scheduling": ["off", "Off"],
        ]
        let options = try OptionList(parsing: text, flag: "--cpus", allowedKeys: Set(unsupported.keys).union(["boot", "max"]))
        guard options.words.isEmpty, let boot = options["boot"] else {
            throw ConfigurationError(flag: "--cpus", "write boot=N, e.g. --cpus boot=2")
        }
        guard let count = Int(boot), (1...MachineConfiguration.maximumCPUs).contains(count) else {
            throw ConfigurationError(flag: "--cpus", "boot=\(boot) must be a number from 1 to \(MachineConfiguration.maximumCPUs)")
        }
        if let max = options["max"], Int(max) != count {
            throw ConfigurationError(flag: "--cpus", "max=\(max): Ferry has no CPU hotplug; leave it out or make it boot=\(boot)")
        }
        try refuseUnsupported(options, unsupported, section: "cpus", flag: "--cpus")
        return count
    }

    /// `--memory size=SIZE[,shared=on]`: the guest's RAM, and whether it is a memory file other
    /// processes can map (a local migration needs it). Cloud Hypervisor's other keys are known: at
    /// the value that asks for nothing Ferry lacks they are accepted, otherwise refused naming the key.
    public static func parseMemory(_ text: String) throws(ConfigurationError) -> (size: UInt64, shared: Bool) {
        // The values each key may have: the ones that ask for nothing Ferry lacks.
        let unsupported: [String: Set<String>] = [
            "mergeable": ["off", "false"], "hugepages": ["off", "false"], "hugepage_size": [],
            "prefault": ["off", "false"], "thp": ["on", "true"], "hotplug_method": ["acpi"], "hotplug_size": ["0"],
            "hotplugged_size": ["0"],
        ]
        let options = try OptionList(parsing: text, flag: "--memory", allowedKeys: Set(unsupported.keys).union(["size", "shared"]))
        guard options.words.isEmpty, let size = options["size"] else {
            throw ConfigurationError(flag: "--memory", "write size=SIZE, e.g. --memory size=1G")
        }
        let bytes = try ByteSize.parse(size, flag: "--memory")
        guard bytes >= GuestRAMLayout.minimumSize else {
            throw ConfigurationError(flag: "--memory", "size=\(size) is below the minimum of \(GuestRAMLayout.minimumSize >> 20)M")
        }
        guard bytes % 4096 == 0 else { throw ConfigurationError(flag: "--memory", "size=\(size) is not a multiple of 4K") }
        try refuseUnsupported(options, unsupported, section: "memory", flag: "--memory")
        let shared: Bool
        switch options["shared"] {
        case nil, "off", "false": shared = false
        case "on", "true": shared = true
        case let other?: throw ConfigurationError(flag: "--memory", "shared=\(other): write shared=on or shared=off")
        }
        return (bytes, shared)
    }

    /// Refuses the first key of `options` whose value is not one `accepted` allows for it, with
    /// the reason `UnsupportedOption` gives for `section.key`.
    private static func refuseUnsupported(_ options: OptionList, _ accepted: [String: Set<String>], section: String,
                                          flag: String) throws(ConfigurationError) {
        for key in accepted.keys.sorted() {
            guard let value = options[key], accepted[key]?.contains(value) == false else { continue }
            throw ConfigurationError(flag: flag, "\(key)=\(value) is not supported: \(UnsupportedOption.reason("\(section).\(key)"))")
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
