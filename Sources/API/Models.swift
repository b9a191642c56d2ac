import Foundation
import Machine
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
