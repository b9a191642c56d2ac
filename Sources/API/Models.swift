import Foundation
import Machine
import Migration
import VMM

/// Cloud Hypervisor's `VmConfig`, as much of it as Ferry uses. Fields Ferry does not know are
/// ignored, as Cloud Hypervisor ignores them.
public struct VmConfig: Codable, Equatable, Sendable {
    public struct Cpus: Codable, Equatable, Sendable {
        public var boot_vcpus: Int
        public var max_vcpus: Int?
    }

    public struct Memory: Codable, Equatable, Sendable {
        /// Bytes. Signed, so that a negative value gets a message naming the field rather than a
        /// decoding failure.
        public var size: Int64
    }

    public struct Payload: Codable, Equatable, Sendable {
        public var kernel: String?
        public var initramfs: String?
        public var cmdline: String?
    }

    /// `serial` and `console`: `mode` is Off, Null, Tty or File (with `file`).
    public struct Console: Codable, Equatable, Sendable {
        public var mode: String
        public var file: String?
    }

    public var cpus: Cpus?
    public var memory: Memory?
    public var payload: Payload
    public var serial: Console?
    public var console: Console?

    public init(cpus: Cpus?, memory: Memory?, payload: Payload, serial: Console?, console: Console?) {
        self.cpus = cpus
        self.memory = memory
        self.payload = payload
        self.serial = serial
        self.console = console
    }

    /// Ferry's defaults where a field is absent: Cloud Hypervisor's (1 vCPU, 512 MiB, serial Null
    /// when the VMM has no terminal to give it).
    static let defaultCPUs = 1
    static let defaultMemory: UInt64 = 512 << 20

    /// The VMM configuration this describes; the error names the field and why.
    public func vmConfiguration() throws(VMMError) -> VMConfiguration {
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
        let serialMode: SerialMode
        switch (serial?.mode ?? "Null", serial?.file) {
        case ("Off", _): serialMode = .off
        case ("Null", _): serialMode = .null
        case ("Tty", _): serialMode = .tty
        case let ("File", path?) where !path.isEmpty: serialMode = .file(path)
        case ("File", _): throw VMMError(.invalidRequest, "serial.file: required when serial.mode is File")
        case let (mode, _): throw VMMError(.invalidRequest, "serial.mode: \(mode) is not supported; use Off, Null, Tty or File")
        }
        if let mode = console?.mode, mode != "Off", mode != "Null" {
            throw VMMError(.invalidRequest, "console.mode: \(mode) is not available: Ferry has no virtio console; use Off")
        }
        let memorySize = memory?.size ?? Int64(Self.defaultMemory)
        guard memorySize > 0 else { throw VMMError(.invalidRequest, "memory.size: \(memorySize) is not a positive number of bytes") }
        let machine = MachineConfiguration(cpus: cpuCount, memorySize: UInt64(memorySize),
                                           kernel: kernel, initramfs: payload.initramfs,
                                           commandLine: payload.cmdline ?? VMConfiguration.defaultCommandLine)
        return VMConfiguration(machine: machine, serial: serialMode)
    }

    public init(_ configuration: VMConfiguration) {
        let machine = configuration.machine
        cpus = Cpus(boot_vcpus: machine.cpus, max_vcpus: machine.cpus)
        memory = Memory(size: Int64(machine.memorySize))
        payload = Payload(kernel: machine.kernel, initramfs: machine.initramfs, cmdline: machine.commandLine)
        serial = switch configuration.serial {
        case .off: Console(mode: "Off")
        case .null: Console(mode: "Null")
        case .tty: Console(mode: "Tty")
        case let .file(path): Console(mode: "File", file: path)
        }
        console = Console(mode: "Off")
    }
}

/// `GET vm.info`.
public struct VmInfo: Codable, Equatable, Sendable {
    public var config: VmConfig
    public var state: String
    public var memory_actual_size: UInt64
}

/// `GET vmm.ping`.
public struct VmmPingResponse: Codable, Equatable, Sendable {
    public var build_version: String
    public var version: String
    public var pid: Int32
    public var features: [String]
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

    public init(source_url: String, resume: Bool?, prefault: Bool? = nil) {
        self.source_url = source_url
        self.resume = resume
        self.prefault = prefault
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
    /// Parallel connections; Ferry sends over one.
    public var connections: Int64?
    /// Migration to a VMM on the same host by handing over guest memory; not available.
    public var local: Bool?
    /// Keep the source VMM running after the migration finished.
    public var keep_alive: Bool?

    public init(destination_url: String, downtime_ms: Int64? = nil, timeout_s: Int64? = nil,
                timeout_strategy: String? = nil, connections: Int64? = nil, local: Bool? = nil, keep_alive: Bool? = nil) {
        self.destination_url = destination_url
        self.downtime_ms = downtime_ms
        self.timeout_s = timeout_s
        self.timeout_strategy = timeout_strategy
        self.connections = connections
        self.local = local
        self.keep_alive = keep_alive
    }

    /// The checked request; the error names the field and why.
    public func options() throws(VMMError) -> SendMigrationOptions {
        let destination: MigrationURL
        do {
            destination = try MigrationURL(parsing: destination_url)
        } catch {
            throw VMMError(.invalidRequest, "destination_url: \(error.message)")
        }
        let downtime = downtime_ms ?? Int64(PrecopyPolicy.defaultDowntimeLimit / .milliseconds(1))
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
        if let connections, connections != Int64(SendMigrationOptions.connections) {
            throw VMMError(.invalidRequest, "connections: \(connections) is not available; Ferry migrates over 1 connection")
        }
        if local == true {
            throw VMMError(.invalidRequest, "local: local migration (handing guest memory over on one host) is not available; omit it or set it to false")
        }
        return SendMigrationOptions(
            destination: destination,
            policy: PrecopyPolicy(downtimeLimit: .milliseconds(downtime), timeout: .seconds(timeout), timeoutStrategy: strategy),
            keepAlive: keep_alive ?? false)
    }
}

/// `PUT vm.receive-migration`: Cloud Hypervisor's `ReceiveMigrationData`.
public struct ReceiveMigrationData: Codable, Equatable, Sendable {
    /// `tcp:HOST:PORT` (port 0: any free port, which `vm.migration-receive-ready` names) or `unix:PATH`.
    public var receiver_url: String

    public init(receiver_url: String) {
        self.receiver_url = receiver_url
    }

    public func url() throws(VMMError) -> MigrationURL {
        do {
            return try MigrationURL(parsing: receiver_url)
        } catch {
            throw VMMError(.invalidRequest, "receiver_url: \(error.message)")
        }
    }
}
