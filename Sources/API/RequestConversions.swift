import APIModels
import Events
import HostOS
import LiveMigration
import Machine
import MigrationWire
import VMM

/// Turning the API's bodies into the VMM's checked requests, and the VMM's answers into bodies.
/// Every error names the field and says why, and is a 400.

extension VmConfig {
    /// Ferry's defaults where a field is absent: Cloud Hypervisor's (1 vCPU, 512 MiB, serial Null
    /// when the VMM has no terminal to give it).
    static let defaultCPUs = 1
    static let defaultMemory: UInt64 = 512 << 20

    /// The VMM configuration this describes.
    func vmConfiguration() throws(VMMError) -> VMConfiguration {
        let cpuCount = cpus?.boot_vcpus ?? Self.defaultCPUs
        guard (1...MachineConfiguration.maximumCPUs).contains(cpuCount) else {
            throw VMMError(.invalidRequest, "cpus.boot_vcpus: \(cpuCount) is not between 1 and \(MachineConfiguration.maximumCPUs)")
        }
        if let max = cpus?.max_vcpus, max != cpuCount {
            throw VMMError(.invalidRequest, "cpus.max_vcpus: Ferry has no CPU hotplug; omit it or set it to boot_vcpus")
        }
        guard let kernel = payload.kernel, !kernel.isEmpty else {
            throw VMMError(.invalidRequest, "payload.kernel: required (an ELF with a PVH note, or a bzImage)")
        }
        if let field = unsupportedDeviceFields.first {
            throw VMMError(.invalidRequest, "\(field): Ferry has no such devices yet; remove the field")
        }
        let serialMode = try SerialMode(serial, field: "serial", allowed: [.off, .null, .pty, .tty, .file, .socket])
        // Absent: no virtio console (Cloud Hypervisor's default is Tty; see docs/openapi.yaml).
        let consoleMode = console == nil ? .off : try SerialMode(console, field: "console", allowed: [.off, .null, .pty, .tty, .file])
        if serialMode == .tty, consoleMode == .tty {
            throw VMMError(.invalidRequest, "serial.mode and console.mode: only one of them can be Tty")
        }
        var diskConfigurations: [DiskConfiguration] = []
        for (index, disk) in (disks ?? []).enumerated() {
            guard let path = disk.path, !path.isEmpty else {
                throw VMMError(.invalidRequest, "disks[\(index)].path: required (a raw image file)")
            }
            diskConfigurations.append(DiskConfiguration(id: disk.id ?? DiskConfiguration.defaultID(index: index), path: path,
                                                        readOnly: disk.readonly ?? false, direct: disk.direct ?? false))
        }
        var networks: [NetworkConfiguration] = []
        for (index, card) in (net ?? []).enumerated() {
            networks.append(try card.networkConfiguration(index: index))
        }
        let memorySize = memory?.size ?? Int64(Self.defaultMemory)
        guard memorySize > 0 else { throw VMMError(.invalidRequest, "memory.size: \(memorySize) is not a positive number of bytes") }
        let machine = MachineConfiguration(cpus: cpuCount, memorySize: UInt64(memorySize), kernel: kernel,
                                           initramfs: payload.initramfs,
                                           commandLine: payload.cmdline ?? VMConfiguration.defaultCommandLine,
                                           disks: diskConfigurations, networks: networks, entropySource: rng?.src,
                                           sharedMemory: memory?.shared ?? false)
        return VMConfiguration(machine: machine, serial: serialMode, console: consoleMode)
    }

    /// `configuration` as `vm.info` reports it; a `Pty` console's `file` is its terminal's path.
    init(_ configuration: VMConfiguration, serialTerminal: String? = nil, consoleTerminal: String? = nil) {
        let machine = configuration.machine
        self.init(cpus: Cpus(boot_vcpus: machine.cpus, max_vcpus: machine.cpus),
                  memory: Memory(size: Int64(machine.memorySize), shared: machine.sharedMemory ? true : nil),
                  payload: Payload(kernel: machine.kernel, initramfs: machine.initramfs, cmdline: machine.commandLine),
                  serial: Console(configuration.serial, terminal: serialTerminal),
                  console: Console(configuration.console, terminal: consoleTerminal),
                  disks: machine.disks.isEmpty ? nil : machine.disks.map {
                      Disk(path: $0.path, readonly: $0.readOnly, direct: $0.direct, id: $0.id)
                  },
                  net: machine.networks.isEmpty ? nil : machine.networks.map {
                      Net(tap: $0.tap, ip: $0.hostAddress, mask: $0.hostNetmask, mac: $0.mac.description, num_queues: 2,
                          queue_size: Int($0.queueSize), id: $0.id, offload_tso: $0.offloadTSO, offload_ufo: $0.offloadUFO,
                          offload_csum: $0.offloadChecksum)
                  },
                  rng: machine.entropySource.map { Rng(src: $0) })
    }
}

extension VmConfig.Net {
    /// The card this describes, the `index`th of the VM's cards (`field` names it in errors). A
    /// card that came with a descriptor (`vm.add-net` on an inherited API socket, as libvirt
    /// sends it) uses that tap instead of opening one by name.
    func networkConfiguration(index: Int, field: String? = nil, passedDescriptor: Int32? = nil) throws(VMMError) -> NetworkConfiguration {
        let field = field ?? "net[\(index)]"
        if vhost_user == true { throw VMMError(.invalidRequest, "\(field).vhost_user: Ferry has no vhost-user backend; use a tap") }
        if host_mac != nil { throw VMMError(.invalidRequest, "\(field).host_mac: not supported; set the tap's address on the host") }
        if mtu != nil { throw VMMError(.invalidRequest, "\(field).mtu: not supported; the card offers the tap's default MTU") }
        if let fds, !fds.isEmpty {
            throw VMMError(.invalidRequest, "\(field).fds: descriptor numbers in a JSON body mean nothing to this process; send the descriptors with the request on an inherited API socket (--api-socket fd=N), name a tap, or pass fd= to ferry --net")
        }
        if passedDescriptor == nil, tap?.isEmpty ?? true {
            throw VMMError(.invalidRequest, "\(field).tap: required (the tap to open or create) unless a tap descriptor comes with the request")
        }
        var address = MACAddress.random()
        if let mac {
            guard let parsed = MACAddress(mac) else { throw VMMError(.invalidRequest, "\(field).mac: '\(mac)' is not a MAC address") }
            address = parsed
        }
        if let queues = num_queues, queues != 2 {
            throw VMMError(.invalidRequest, "\(field).num_queues: \(queues) is not available; Ferry's virtio-net has one queue pair (2)")
        }
        let size = queue_size ?? Int(NetworkConfiguration.defaultQueueSize)
        guard let queueSize = UInt16(exactly: size) else {
            throw VMMError(.invalidRequest, "\(field).queue_size: \(size) is not a power of two from 2 to \(NetworkConfiguration.maximumQueueSize)")
        }
        var network = NetworkConfiguration(id: id ?? NetworkConfiguration.defaultID(index: index), mac: address,
                                           tap: passedDescriptor == nil ? tap : nil, fd: passedDescriptor,
                                           hostAddress: ip, hostNetmask: mask, queueSize: queueSize)
        network.offloadTSO = offload_tso ?? true
        network.offloadUFO = offload_ufo ?? true
        network.offloadChecksum = offload_csum ?? true
        do { try network.validate() } catch {
            throw VMMError(.invalidRequest, "\(field): \(error.message)")
        }
        return network
    }
}

extension VmConfig.Console {
    init(_ mode: SerialMode, terminal: String? = nil) {
        switch mode {
        case .off: self.init(mode: "Off")
        case .null: self.init(mode: "Null")
        case .tty: self.init(mode: "Tty")
        case .pty: self.init(mode: "Pty", file: terminal)
        case let .file(path): self.init(mode: "File", file: path)
        case let .socket(path): self.init(mode: "Socket", socket: path)
        }
    }
}

extension SerialMode {
    /// The kinds of mode, to say which a field allows.
    enum Kind: String {
        case off = "Off", null = "Null", pty = "Pty", tty = "Tty", file = "File", socket = "Socket"
    }

    /// The mode a `VmConfig`-shaped console object asks for (`Null` when absent).
    init(_ console: VmConfig.Console?, field: String, allowed: [Kind]) throws(VMMError) {
        let mode = console?.mode ?? "Null"
        guard let kind = Kind(rawValue: mode), allowed.contains(kind) else {
            let choices = allowed.map(\.rawValue).joined(separator: ", ")
            throw VMMError(.invalidRequest, "\(field).mode: \(mode) is not supported; use \(choices)")
        }
        if console?.iommu == true {
            throw VMMError(.invalidRequest, "\(field).iommu: Ferry has no virtual IOMMU; omit it or set it to false")
        }
        switch kind {
        case .off: self = .off
        case .null: self = .null
        case .pty: self = .pty
        case .tty: self = .tty
        case .socket:
            guard let path = console?.socket, !path.isEmpty else {
                throw VMMError(.invalidRequest, "\(field).socket: required when \(field).mode is Socket")
            }
            self = .socket(path)
        case .file:
            guard let path = console?.file, !path.isEmpty else {
                throw VMMError(.invalidRequest, "\(field).file: required when \(field).mode is File")
            }
            self = .file(path)
        }
    }
}

extension VMMError {
    /// A migration asked for TLS, which Ferry does not have yet: refused rather than run in
    /// plaintext.
    /// `tls_dir` checked against the migration's URL: TLS is for `tcp:` only, as in Cloud Hypervisor.
    static func tlsDirectory(_ directory: String?, for url: MigrationURL) throws(VMMError) -> String? {
        guard let directory else { return nil }
        guard case .tcp = url else {
            throw VMMError(.invalidRequest, "tls_dir: TLS is for tcp: migrations; a unix: socket never leaves this host")
        }
        guard !directory.isEmpty else { throw VMMError(.invalidRequest, "tls_dir: empty; name the directory with the certificates") }
        return directory
    }
}

extension RestoreConfig {
    /// The tap descriptor of each card `net_fds` names, from the descriptors that came with the
    /// request, in order: one per card (one queue pair), and exactly as many as were sent.
    func tapDescriptors(_ passed: [Int32]) throws(VMMError) -> [String: Int32] {
        try Self.tapDescriptors(net_fds ?? [], passed)
    }

    static func tapDescriptors(_ entries: [RestoredNetDescriptors], _ passed: [Int32]) throws(VMMError) -> [String: Int32] {
        var descriptors: [String: Int32] = [:]
        for (index, entry) in entries.enumerated() {
            guard entry.num_fds == 1 else {
                throw VMMError(.invalidRequest, "net_fds[\(index)].num_fds: \(entry.num_fds); Ferry's virtio-net has one queue pair, so 1")
            }
            guard descriptors[entry.id] == nil else { throw VMMError(.invalidRequest, "net_fds[\(index)].id: \(entry.id) is named twice") }
            guard index < passed.count else { break }
            descriptors[entry.id] = passed[index]
        }
        guard passed.count == entries.count else {
            throw VMMError(.invalidRequest, "net_fds names \(entries.count) descriptors and \(passed.count) came with the request")
        }
        return descriptors
    }
}

extension SendMigrationData {
    /// The checked request.
    func options() throws(VMMError) -> SendMigrationOptions {
        let destination = try MigrationURL(destination_url, field: "destination_url")
        let downtime = downtime_ms ?? PrecopyPolicy.defaultDowntimeLimit.wholeMilliseconds
        guard downtime > 0 else { throw VMMError(.invalidRequest, "downtime_ms: \(downtime) must be at least 1") }
        let timeout = timeout_s ?? PrecopyPolicy.defaultTimeout.components.seconds
        guard timeout > 0 else { throw VMMError(.invalidRequest, "timeout_s: \(timeout) must be at least 1") }
        let strategy: TimeoutStrategy
        switch timeout_strategy {
        case nil: strategy = .cancel
        case let text?:
            guard let parsed = TimeoutStrategy(rawValue: text) else {
                throw VMMError(.invalidRequest, "timeout_strategy: '\(text)' is not a strategy; use Cancel or Ignore")
            }
            strategy = parsed
        }
        let connectionCount = connections ?? 1
        guard (1...Int64(MigrationProtocol.maximumConnections)).contains(connectionCount) else {
            throw VMMError(.invalidRequest, "connections: \(connectionCount) must be 1 to \(MigrationProtocol.maximumConnections)")
        }
        let tlsDirectory = try VMMError.tlsDirectory(tls_dir, for: destination)
        if local == true {
            guard case .unix = destination else {
                throw VMMError(.invalidRequest, "local: a local migration hands guest memory over a unix: socket to a VMM on this host, not over \(destination)")
            }
            guard connectionCount == 1 else {
                throw VMMError(.invalidRequest, "connections: a local migration copies no memory and uses one connection; leave connections at 1")
            }
        }
        return SendMigrationOptions(
            destination: destination,
            policy: PrecopyPolicy(downtimeLimit: .milliseconds(downtime), timeout: .seconds(timeout), timeoutStrategy: strategy,
                                  autoConverge: auto_converge ?? true),
            connections: Int(connectionCount), keepAlive: keep_alive ?? false, tlsDirectory: tlsDirectory, local: local ?? false)
    }
}

extension ReceiveMigrationData {
    /// The checked request: the URL, and the console, disks and taps this host gives the
    /// arriving guest (`passed`: the tap descriptors that came with the request).
    func options(passed: [Int32] = []) throws(VMMError) -> ReceiveMigrationOptions {
        let url = try MigrationURL(receiver_url, field: "receiver_url")
        let tlsDirectory = try VMMError.tlsDirectory(tls_dir, for: url)
        // Off would take the UART from a guest that has one: to discard its output, use Null.
        let serialMode = try SerialMode(serial, field: "serial", allowed: [.null, .pty, .tty, .file, .socket])
        let consoleMode = try SerialMode(console, field: "console", allowed: [.null, .pty, .tty, .file])
        let paths = try Self.placements(disks ?? [], field: "disks", what: "disk") { ($0.id, $0.path, "path") }
        let taps = try Self.placements(net ?? [], field: "net", what: "network card") { ($0.id, $0.tap, "tap") }
        let descriptors = try RestoreConfig.tapDescriptors(net_fds ?? [], passed)
        if let twice = Set(taps.keys).intersection(descriptors.keys).sorted().first {
            throw VMMError(.invalidRequest, "net and net_fds: network card \(twice) is placed twice")
        }
        return ReceiveMigrationOptions(url: url, serial: serialMode, console: consoleMode, diskPaths: paths, netTaps: taps,
                                       netDescriptors: descriptors, tlsDirectory: tlsDirectory)
    }

    /// Where each arriving device goes on this host, by id: every entry has both an id and a
    /// place (`key` names the place's field), and no id is placed twice.
    private static func placements<Entry>(_ entries: [Entry], field: String, what: String,
                                          _ parts: (Entry) -> (id: String, place: String, key: String))
        throws(VMMError) -> [String: String] {
        var places: [String: String] = [:]
        for (index, entry) in entries.enumerated() {
            let (id, place, key) = parts(entry)
            guard !id.isEmpty, !place.isEmpty else {
                throw VMMError(.invalidRequest, "\(field)[\(index)]: both id and \(key) are required")
            }
            guard places.updateValue(place, forKey: id) == nil else {
                throw VMMError(.invalidRequest, "\(field)[\(index)].id: \(what) \(id) is placed twice")
            }
        }
        return places
    }
}

extension MigrationURL {
    /// The URL in a request's `field`; the error names the field.
    init(_ text: String, field: String) throws(VMMError) {
        do {
            try self.init(parsing: text)
        } catch {
            throw VMMError(.invalidRequest, "\(field): \(error.message)", cause: error)
        }
    }
}

extension MigrationProgressReport {
    /// `progress` as the API reports it, stamped now.
    init(_ progress: MigrationProgress) {
        let memory = progress.memory
        let state: State = switch progress.state {
        case .ongoing(let phase): .ongoing(phase: Phase(phase), vcpuThrottlePercent: progress.vcpuThrottlePercent)
        case .finished: .finished
        case .failed(let message): .failed(errorMessage: message)
        case .cancelled: .cancelled
        }
        self.init(
            migration_id: progress.migrationID,
            direction: progress.direction == .outgoing ? .outgoing : .incoming,
            timestamp_begin_ms: progress.beganAtMilliseconds,
            timestamp_snapshot_ms: MigrationProgress.wallClockMilliseconds(),
            downtime_configured_ms: progress.downtimeLimit.map { UInt64($0.wholeMilliseconds) } ?? 0,
            downtime_estimated_ms: progress.estimatedDowntime.map { UInt64($0.wholeMilliseconds) } ?? 0,
            transportation_mode: progress.transport == "Local" ? .local
                : progress.transport == "Unix" ? .unix(connections: progress.connections)
                : .tcp(connections: progress.connections, tls: progress.tls),
            state: state,
            memory_transmission_info: MemoryTransmissionInfo(
                memory_iteration: memory.pass, memory_transmission_bps: memory.bytesPerSecond,
                memory_bytes_total: memory.totalBytes, memory_bytes_transmitted: memory.transmittedBytes,
                memory_bytes_remaining_iteration: memory.remainingInPassBytes,
                memory_pages_4k_transmitted: memory.transmittedPages,
                memory_pages_4k_remaining_iteration: memory.remainingInPassPages,
                memory_pages_constant_count: memory.zeroPages, memory_dirty_rate_pps: memory.dirtyPagesPerSecond),
            downtime_ms: progress.downtime.map { UInt64($0.wholeMilliseconds) },
            total_ms: progress.total.map { UInt64($0.wholeMilliseconds) })
    }
}

extension MigrationProgressReport.Phase {
    init(_ phase: MigrationPhase) {
        self = switch phase {
        case .starting: .starting
        case .memoryPrecopy: .memoryPrecopy
        case .completing: .completing
        }
    }
}
