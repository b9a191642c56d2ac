import CKVM

/// The VM-wide state KVM keeps in the kernel: the interrupt controllers, the PIT and the kvmclock
/// time base. Blobs are KVM's structures, byte for byte.
public struct PlatformState: Codable, Equatable, Sendable {
    /// `struct kvm_irqchip` of the master 8259 PIC.
    public var picMaster: [UInt8]
    /// `struct kvm_irqchip` of the slave 8259 PIC.
    public var picSlave: [UInt8]
    /// `struct kvm_irqchip` of the IOAPIC.
    public var ioapic: [UInt8]
    /// `struct kvm_pit_state2` of the i8254.
    public var pit: [UInt8]
    /// The kvmclock time base in nanoseconds (`KVM_GET_CLOCK`).
    public var clock: UInt64

    public init(picMaster: [UInt8], picSlave: [UInt8], ioapic: [UInt8], pit: [UInt8], clock: UInt64) {
        self.picMaster = picMaster
        self.picSlave = picSlave
        self.ioapic = ioapic
        self.pit = pit
        self.clock = clock
    }
}

extension KVMVirtualMachine {
    /// Reads the VM-wide state; every vCPU must be stopped.
    public func saveState() throws -> PlatformState {
        PlatformState(picMaster: try interruptChipState(.picMaster),
                picSlave: try interruptChipState(.picSlave),
                ioapic: try interruptChipState(.ioapic),
                pit: try pitState(),
                clock: try clock())
    }

    /// Puts a saved VM-wide state into this VM, before any vCPU runs and after the vCPUs' own state
    /// (the IOAPIC re-delivers lines that were high into the local APICs, which must hold their
    /// restored state by then). The clock goes last: kvmclock counts on from the value set, so
    /// setting it last keeps the time between restore and resume as small as it can be.
    public func restoreState(_ state: PlatformState) throws {
        try setInterruptChipState(state.picMaster, chip: .picMaster)
        try setInterruptChipState(state.picSlave, chip: .picSlave)
        try setInterruptChipState(state.ioapic, chip: .ioapic)
        try setPITState(state.pit)
        try setClock(state.clock)
    }
}
