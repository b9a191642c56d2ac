/// The JSON bodies of the REST API (docs/openapi.yaml), as Cloud Hypervisor names them. Plain
/// values, shared by the server (which checks them and turns them into VMM requests) and the
/// client; this module depends on nothing, so a client links neither the server nor KVM.

/// Cloud Hypervisor's `VmConfig`, as much of it as Ferry uses. Fields Ferry does not know are
/// ignored, as Cloud Hypervisor ignores them.
public struct VmConfig: Codable, Equatable, Sendable {
    public struct Cpus: Codable, Equatable, Sendable {
        public var boot_vcpus: Int
        public var max_vcpus: Int?

        public init(boot_vcpus: Int, max_vcpus: Int? = nil) {
            self.boot_vcpus = boot_vcpus
            self.max_vcpus = max_vcpus
        }
    }

    public struct Memory: Codable, Equatable, Sendable {
        /// Bytes. Signed, so that a negative value gets a message naming the field rather than a
        /// decoding failure.
        public var size: Int64
        /// Guest RAM is a memory file other processes can map (Cloud Hypervisor's `shared`), which
        /// a local migration hands over instead of copying.
        public var shared: Bool?

        public init(size: Int64, shared: Bool? = nil) {
            self.size = size
            self.shared = shared
        }
    }

    public struct Payload: Codable, Equatable, Sendable {
        public var kernel: String?
        public var initramfs: String?
        public var cmdline: String?

        public init(kernel: String?, initramfs: String? = nil, cmdline: String? = nil) {
            self.kernel = kernel
            self.initramfs = initramfs
            self.cmdline = cmdline
        }
    }

    /// `serial` and `console`: `mode` is Off, Null, Pty, Tty, File (with `file`) or, for the
    /// serial port, Socket (with `socket`). For Pty, `vm.info` puts the terminal's path in `file`.
    public struct Console: Codable, Equatable, Sendable {
        public var mode: String
        public var file: String?
        public var socket: String?
        /// Cloud Hypervisor's vIOMMU placement; Ferry has no vIOMMU, so only false is accepted.
        public var iommu: Bool?

        public init(mode: String, file: String? = nil, socket: String? = nil) {
            self.mode = mode
            self.file = file
            self.socket = socket
        }
    }

    /// A virtio-blk disk on a raw image file (Cloud Hypervisor's `DiskConfig`, the fields Ferry uses).
    public struct Disk: Codable, Equatable, Sendable {
        public var path: String?
        public var readonly: Bool?
        public var direct: Bool?
        /// Defaults to `disk<index>`.
        public var id: String?

        public init(path: String?, readonly: Bool? = nil, direct: Bool? = nil, id: String? = nil) {
            self.path = path
            self.readonly = readonly
            self.direct = direct
            self.id = id
        }
    }

    /// A virtio-net card on a tap (Cloud Hypervisor's `NetConfig`, the fields Ferry uses; a
    /// request with `vhost_user`, `host_mac`, `mtu` or `fds` is refused naming the field).
    public struct Net: Codable, Equatable, Sendable {
        /// The tap to open, created if it does not exist.
        public var tap: String?
        /// The address and netmask of the tap's host end.
        public var ip: String?
        public var mask: String?
        /// The guest's address; random (locally administered) when absent.
        public var mac: String?
        /// Receive and transmit queues together: 2 (one pair).
        public var num_queues: Int?
        public var queue_size: Int?
        /// Defaults to `net<index>`.
        public var id: String?
        public var offload_tso: Bool?
        public var offload_ufo: Bool?
        public var offload_csum: Bool?
        public var vhost_user: Bool?
        public var host_mac: String?
        public var mtu: Int?
        public var fds: [Int32]?

        public init(tap: String?, ip: String? = nil, mask: String? = nil, mac: String? = nil, num_queues: Int? = nil,
                    queue_size: Int? = nil, id: String? = nil, offload_tso: Bool? = nil, offload_ufo: Bool? = nil,
                    offload_csum: Bool? = nil) {
            self.tap = tap
            self.ip = ip
            self.mask = mask
            self.mac = mac
            self.num_queues = num_queues
            self.queue_size = queue_size
            self.id = id
            self.offload_tso = offload_tso
            self.offload_ufo = offload_ufo
            self.offload_csum = offload_csum
        }
    }

    /// A virtio-rng device reading `src` on the host.
    public struct Rng: Codable, Equatable, Sendable {
        public var src: String

        public init(src: String) {
            self.src = src
        }
    }

    /// A field of Cloud Hypervisor's `VmConfig` naming a kind of device Ferry does not have: any
    /// value is read, so that the request can be refused naming the field rather than silently
    /// losing the device. `null` and `[]` count as absent.
    public struct UnsupportedDevices: Codable, Equatable, Sendable {
        public var isEmpty: Bool

        public init(from decoder: any Decoder) throws {
            let container = try decoder.singleValueContainer()
            isEmpty = container.decodeNil() || (try? container.decode([UnsupportedDevices].self))?.isEmpty == true
        }

        public func encode(to encoder: any Encoder) throws {
            var container = encoder.singleValueContainer()
            try container.encodeNil()
        }
    }

    public var cpus: Cpus?
    public var memory: Memory?
    public var payload: Payload
    public var serial: Console?
    public var console: Console?
    public var disks: [Disk]?
    public var net: [Net]?
    public var rng: Rng?
    /// Device kinds Ferry does not have yet; a request naming one is refused.
    public var fs, pmem, vsock, devices, user_devices, vdpa, sgx_epc, numa, pci_segments: UnsupportedDevices?

    /// The unsupported device fields a request has, by name.
    public var unsupportedDeviceFields: [String] {
        let fields: [(String, UnsupportedDevices?)] = [
            ("fs", fs), ("pmem", pmem), ("vsock", vsock), ("devices", devices), ("user_devices", user_devices),
            ("vdpa", vdpa), ("sgx_epc", sgx_epc), ("numa", numa), ("pci_segments", pci_segments),
        ]
        return fields.compactMap { name, value in value.map { $0.isEmpty ? nil : name } ?? nil }
    }

    public init(cpus: Cpus?, memory: Memory?, payload: Payload, serial: Console?, console: Console?,
                disks: [Disk]? = nil, net: [Net]? = nil, rng: Rng? = nil) {
        self.cpus = cpus
        self.net = net
        self.memory = memory
        self.payload = payload
        self.serial = serial
        self.console = console
        self.disks = disks
        self.rng = rng
    }

    private enum CodingKeys: String, CodingKey {
        case cpus, memory, payload, serial, console, disks, net, rng
        case fs, pmem, vsock, devices, user_devices, vdpa, sgx_epc, numa, pci_segments
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encodeIfPresent(cpus, forKey: .cpus)
        try container.encodeIfPresent(memory, forKey: .memory)
        try container.encode(payload, forKey: .payload)
        try container.encodeIfPresent(serial, forKey: .serial)
        try container.encodeIfPresent(console, forKey: .console)
        try container.encodeIfPresent(disks, forKey: .disks)
        try container.encodeIfPresent(net, forKey: .net)
        try container.encodeIfPresent(rng, forKey: .rng)
    }
}

/// `GET vm.info`.
public struct VmInfo: Codable, Equatable, Sendable {
    public var config: VmConfig
    public var state: String
    public var memory_actual_size: UInt64

    public init(config: VmConfig, state: String, memory_actual_size: UInt64) {
        self.config = config
        self.state = state
        self.memory_actual_size = memory_actual_size
    }
}

/// `GET vmm.ping`.
public struct VmmPingResponse: Codable, Equatable, Sendable {
    public var build_version: String
    public var version: String
    public var pid: Int32
    public var features: [String]

    public init(build_version: String, version: String, pid: Int32, features: [String]) {
        self.build_version = build_version
        self.version = version
        self.pid = pid
        self.features = features
    }
}

/// `PUT vm.snapshot`.
public struct VmSnapshotConfig: Codable, Equatable, Sendable {
    /// `file:///absolute/directory`.
    public var destination_url: String

    public init(destination_url: String) {
        self.destination_url = destination_url
    }
}

/// `PUT vm.restore`. Cloud Hypervisor's `prefault` is accepted and ignored.
public struct RestoreConfig: Codable, Equatable, Sendable {
    /// `file:///absolute/directory` holding a snapshot.
    public var source_url: String
    /// Run the guest at once; otherwise the restored VM is Paused.
    public var resume: Bool?
    public var prefault: Bool?
    /// New tap descriptors for the snapshot's network cards, by card id: the descriptors travel
    /// with the request (SCM_RIGHTS on an inherited API socket), `num_fds` of them per card, in
    /// this order.
    public var net_fds: [RestoredNetDescriptors]?

    public struct RestoredNetDescriptors: Codable, Equatable, Sendable {
        public var id: String
        public var num_fds: Int

        public init(id: String, num_fds: Int) {
            self.id = id
            self.num_fds = num_fds
        }
    }

    public init(source_url: String, resume: Bool?, prefault: Bool? = nil, net_fds: [RestoredNetDescriptors]? = nil) {
        self.source_url = source_url
        self.resume = resume
        self.prefault = prefault
        self.net_fds = net_fds
    }
}

/// `PUT vm.send-migration`: Cloud Hypervisor's `SendMigrationData`.
public struct SendMigrationData: Codable, Equatable, Sendable {
    /// `tcp:HOST:PORT` or `unix:PATH`, where the destination's `vm.receive-migration` listens.
    public var destination_url: String
    /// The longest the guest may be paused for the switch-over, in milliseconds (default 300).
    public var downtime_ms: Int64?
    /// How long pre-copy may take before `timeout_strategy` applies, in seconds (default 3600).
    public var timeout_s: Int64?
    /// `Cancel` (the default) or `Ignore`.
    public var timeout_strategy: String?
    /// Parallel connections the memory goes over, the main one included: 1 (the default) to 128.
    public var connections: Int64?
    /// Ferry's: slow the guest's vCPUs down while it dirties memory faster than the link carries
    /// it (default true).
    public var auto_converge: Bool?
    /// Migration to a VMM on the same host by handing over guest memory; not available.
    public var local: Bool?
    /// Keep the source VMM running after the migration finished.
    public var keep_alive: Bool?
    /// Mutual TLS (`tcp:` only): a directory with `ca-cert.pem`, `client-cert.pem` and
    /// `client-key.pem`. The migration never runs in plaintext when it is given.
    public var tls_dir: String?

    public init(destination_url: String, downtime_ms: Int64? = nil, timeout_s: Int64? = nil,
                timeout_strategy: String? = nil, connections: Int64? = nil, local: Bool? = nil, keep_alive: Bool? = nil,
                tls_dir: String? = nil, auto_converge: Bool? = nil) {
        self.tls_dir = tls_dir
        self.auto_converge = auto_converge
        self.destination_url = destination_url
        self.downtime_ms = downtime_ms
        self.timeout_s = timeout_s
        self.timeout_strategy = timeout_strategy
        self.connections = connections
        self.local = local
        self.keep_alive = keep_alive
    }
}

/// `PUT vm.receive-migration`: Cloud Hypervisor's `ReceiveMigrationData`, and where this host
/// puts the arriving guest's console (in `VmConfig`'s shape; `Null` when absent). A migration
/// never decides that: the sender's console settings stay on the sender.
public struct ReceiveMigrationData: Codable, Equatable, Sendable {
    /// `tcp:HOST:PORT` (port 0: any free port, which `vm.migration-receive-ready` names) or `unix:PATH`.
    public var receiver_url: String
    /// `Null` (the default), `Tty` or `File` with `file`.
    public var serial: VmConfig.Console?
    /// Where the guest's virtio console goes, if it has one: as `serial`.
    public var console: VmConfig.Console?
    /// Where each of the arriving guest's disks is on this host, by the disk's id (shared storage:
    /// the file the source used, under this host's path). Every disk must be placed.
    public var disks: [DiskPlacement]?
    /// The tap each of the arriving guest's network cards uses on this host, by the card's id
    /// (opened, or created, as `VmConfig.net[].tap`). Every card must be placed, here or in
    /// `net_fds`.
    public var net: [NetPlacement]?
    /// Cards placed on tap descriptors that travel with the request (SCM_RIGHTS on an inherited
    /// API socket, libvirt's way), `num_fds` of them per card, in this order.
    public var net_fds: [RestoreConfig.RestoredNetDescriptors]?
    /// Mutual TLS (`tcp:` only): a directory with `ca-cert.pem`, `server-cert.pem` and
    /// `server-key.pem`. Only a sender with a certificate the CA signed is let in.
    public var tls_dir: String?

    public struct DiskPlacement: Codable, Equatable, Sendable {
        public var id: String
        public var path: String

        public init(id: String, path: String) {
            self.id = id
            self.path = path
        }
    }

    public struct NetPlacement: Codable, Equatable, Sendable {
        public var id: String
        public var tap: String

        public init(id: String, tap: String) {
            self.id = id
            self.tap = tap
        }
    }

    public init(receiver_url: String, serial: VmConfig.Console? = nil, console: VmConfig.Console? = nil,
                disks: [DiskPlacement]? = nil, net: [NetPlacement]? = nil, net_fds: [RestoreConfig.RestoredNetDescriptors]? = nil,
                tls_dir: String? = nil) {
        self.tls_dir = tls_dir
        self.receiver_url = receiver_url
        self.serial = serial
        self.console = console
        self.disks = disks
        self.net = net
        self.net_fds = net_fds
    }
}
