import KVM

/// Everything of a paused machine except its RAM: what it was built from, every vCPU, the VM-wide
/// KVM state and every device. `Machine.saveState()` makes it; `Machine.restore(_:)` applies it to
/// a machine made by `Machine.forRestore(configuration:serialOutput:onStop:)`. The same value
/// serves snapshot/restore and migration.
public struct MachineState: Codable, Equatable, Sendable {
    /// The format this Ferry writes and reads. Any change to this type or to a type inside it that
    /// an older Ferry could not read raises it; a state of another version is refused.
    public static let currentFormatVersion = 3

    public var formatVersion: Int
    public var configuration: MachineConfiguration
    /// One per vCPU, in vCPU id order.
    public var vcpus: [VCPUState]
    /// The in-kernel interrupt controllers, PIT and clock.
    public var platform: PlatformState
    /// One per stateful device, in the machine's registration order.
    public var devices: [DeviceState]

    public init(formatVersion: Int = MachineState.currentFormatVersion, configuration: MachineConfiguration,
                vcpus: [VCPUState], platform: PlatformState, devices: [DeviceState]) {
        self.formatVersion = formatVersion
        self.configuration = configuration
        self.vcpus = vcpus
        self.platform = platform
        self.devices = devices
    }

    private enum CodingKeys: String, CodingKey {
        case formatVersion, configuration, vcpus, platform, devices
    }

    /// Decodes the version first and refuses another version before reading anything else, so the
    /// error names the version instead of whichever field changed.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        formatVersion = try container.decode(Int.self, forKey: .formatVersion)
        try Self.checkVersion(formatVersion)
        configuration = try container.decode(MachineConfiguration.self, forKey: .configuration)
        vcpus = try container.decode([VCPUState].self, forKey: .vcpus)
        platform = try container.decode(PlatformState.self, forKey: .platform)
        devices = try container.decode([DeviceState].self, forKey: .devices)
    }

    static func checkVersion(_ version: Int) throws(MachineError) {
        guard version == currentFormatVersion else {
            throw MachineError(.invalidState, "the saved machine state has format version \(version); this Ferry reads version \(currentFormatVersion)")
        }
    }
}

extension MachineState {
    /// A state shaped like a real one of a machine built from `configuration` — every kind of
    /// vCPU, platform and device value, with placeholder contents — that is never restored: coding
    /// it once before a switch-over makes the runtime set up, while the guest still runs, the type
    /// metadata and conformances that coding the real state would otherwise set up while it is
    /// stopped (on this host, about 1 ms each for encoding and decoding in a fresh process).
    public static func rehearsal(of configuration: MachineConfiguration) -> MachineState {
        let vcpu = { (floatingPoint: FloatingPointState) in
            VCPUState(id: 0, cpuid: [CPUIDEntry(function: 1)], mpState: 0, registers: Registers(), specialRegisters: SpecialRegisters(),
                      floatingPoint: floatingPoint, extendedControlRegisters: [0], debugRegisters: [0], localAPIC: [0],
                      msrs: [MSREntry(index: 0x10, data: 0)], events: [0], tscKHz: 1)
        }
        return MachineState(configuration: configuration, vcpus: [vcpu(.xsave([0])), vcpu(.fpu([0]))],
                            platform: PlatformState(picMaster: [0], picSlave: [0], ioapic: [0], pit: [0], clock: 0),
                            devices: [DeviceState(id: "rehearsal", json: "{}")])
    }
}

extension Machine {
    /// Codes each device's state to JSON and back without applying it, for the same reason as
    /// `MachineState.rehearsal(of:)`; only on a machine whose devices do not run yet (one awaiting
    /// its state).
    public func rehearseDeviceStateCoding() {
        guard phase == .awaitingState else { return }
        for (id, device) in statefulDevices { device.rehearseStateCoding(id: id) }
    }
}
