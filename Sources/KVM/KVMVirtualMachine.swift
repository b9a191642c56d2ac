import CKVM
import HostOS
#if canImport(Glibc)
import Glibc
#endif

/// A KVM virtual machine file descriptor: memory slots, interrupt controllers, vCPUs.
public final class KVMVirtualMachine: Sendable {
    let descriptor: FileDescriptor
    let vcpuMmapSize: Int

    init(descriptor: FileDescriptor, vcpuMmapSize: Int) {
        self.descriptor = descriptor
        self.vcpuMmapSize = vcpuMmapSize
    }

    private var fd: Int32 { descriptor.rawValue }

    /// Maps `size` bytes of host memory at `hostAddress` into the guest at `guestAddress`
    /// (`KVM_SET_USER_MEMORY_REGION`). `logDirtyPages` turns on KVM's dirty log for the slot.
    public func setMemoryRegion(slot: UInt32, guestAddress: UInt64, size: UInt64,
                                hostAddress: UnsafeMutableRawPointer, logDirtyPages: Bool = false) throws {
        var region = kvm_userspace_memory_region()
        region.slot = slot
        region.flags = logDirtyPages ? UInt32(KVM_MEM_LOG_DIRTY_PAGES) : 0
        region.guest_phys_addr = guestAddress
        region.memory_size = size
        region.userspace_addr = UInt64(UInt(bitPattern: hostAddress))
        try systemCall("KVM_SET_USER_MEMORY_REGION(slot \(slot))") {
            ckvm_ioctl_ptr(fd, CKVM_SET_USER_MEMORY_REGION, &region)
        }
    }

    /// Returns and clears the dirty-page bitmap of a slot (`KVM_GET_DIRTY_LOG`): one bit per 4 KiB
    /// page, least significant bit of word 0 first. The slot must have been set with `logDirtyPages`.
    public func dirtyLog(slot: UInt32, pageCount: Int) throws -> [UInt64] {
        var bitmap = [UInt64](repeating: 0, count: (pageCount + 63) / 64)
        try bitmap.withUnsafeMutableBytes { buffer in
            var log = kvm_dirty_log()
            log.slot = slot
            log.dirty_bitmap = buffer.baseAddress
            try systemCall("KVM_GET_DIRTY_LOG(slot \(slot))") { ckvm_ioctl_ptr(fd, CKVM_GET_DIRTY_LOG, &log) }
        }
        return bitmap
    }

    /// Places the three pages KVM needs for real-mode TSS emulation on Intel hosts (`KVM_SET_TSS_ADDR`).
    public func setTSSAddress(_ address: UInt64) throws {
        try systemCall("KVM_SET_TSS_ADDR") { ckvm_ioctl_value(fd, CKVM_SET_TSS_ADDR, UInt(address)) }
    }

    /// Places the identity-map page KVM needs for real-mode emulation on Intel hosts.
    public func setIdentityMapAddress(_ address: UInt64) throws {
        var value = address
        try systemCall("KVM_SET_IDENTITY_MAP_ADDR") { ckvm_ioctl_ptr(fd, CKVM_SET_IDENTITY_MAP_ADDR, &value) }
    }

    /// Creates the in-kernel PIC pair, IOAPIC and per-vCPU local APICs (`KVM_CREATE_IRQCHIP`).
    public func createInterruptController() throws {
        try systemCall("KVM_CREATE_IRQCHIP") { ckvm_ioctl_value(fd, CKVM_CREATE_IRQCHIP, 0) }
    }

    /// Creates the in-kernel i8254 PIT (`KVM_CREATE_PIT2`).
    public func createPIT() throws {
        var config = kvm_pit_config()
        try systemCall("KVM_CREATE_PIT2") { ckvm_ioctl_ptr(fd, CKVM_CREATE_PIT2, &config) }
    }

    /// Sets the level of an interrupt line of the in-kernel PIC/IOAPIC (`KVM_IRQ_LINE`).
    public func setInterruptLine(_ line: UInt32, high: Bool) throws {
        var level = kvm_irq_level()
        level.irq = line
        level.level = high ? 1 : 0
        try systemCall("KVM_IRQ_LINE(\(line))") { ckvm_ioctl_ptr(fd, CKVM_IRQ_LINE, &level) }
    }

    /// Creates vCPU `id` and maps its `kvm_run` page.
    public func createVCPU(id: UInt32) throws -> KVMVCPU {
        let vcpuFD = try systemCall("KVM_CREATE_VCPU(\(id))") { ckvm_ioctl_value(fd, CKVM_CREATE_VCPU, UInt(id)) }
        return try KVMVCPU(id: id, descriptor: FileDescriptor(vcpuFD), mmapSize: vcpuMmapSize)
    }

    // MARK: VM-level state

    /// The in-kernel interrupt controllers that `KVM_GET_IRQCHIP` reads one at a time.
    public enum InterruptChip: UInt32, CaseIterable, Codable, Sendable {
        case picMaster = 0   // KVM_IRQCHIP_PIC_MASTER
        case picSlave = 1    // KVM_IRQCHIP_PIC_SLAVE
        case ioapic = 2      // KVM_IRQCHIP_IOAPIC
    }

    /// The raw state of one in-kernel interrupt controller (`struct kvm_irqchip`).
    public func interruptChipState(_ chip: InterruptChip) throws -> [UInt8] {
        var state = kvm_irqchip()
        state.chip_id = chip.rawValue
        try systemCall("KVM_GET_IRQCHIP(\(chip))") { ckvm_ioctl_ptr(fd, CKVM_GET_IRQCHIP, &state) }
        return rawBytes(of: state)
    }

    /// Sets one in-kernel interrupt controller from `interruptChipState(_:)`'s bytes, refusing bytes
    /// that describe a different controller than `chip`.
    public func setInterruptChipState(_ bytes: [UInt8], chip: InterruptChip) throws {
        var state = try value(kvm_irqchip(), from: bytes, operation: "KVM_SET_IRQCHIP(\(chip))")
        guard state.chip_id == chip.rawValue else {
            throw SystemError("KVM_SET_IRQCHIP(\(chip))", errno: 0,
                           detail: "the state is of interrupt controller \(state.chip_id), not \(chip.rawValue)")
        }
        try systemCall("KVM_SET_IRQCHIP(\(chip))") { ckvm_ioctl_ptr(fd, CKVM_SET_IRQCHIP, &state) }
    }

    /// The raw state of the in-kernel PIT (`struct kvm_pit_state2`).
    public func pitState() throws -> [UInt8] {
        var state = kvm_pit_state2()
        try systemCall("KVM_GET_PIT2") { ckvm_ioctl_ptr(fd, CKVM_GET_PIT2, &state) }
        return rawBytes(of: state)
    }

    public func setPITState(_ bytes: [UInt8]) throws {
        var state = try value(kvm_pit_state2(), from: bytes, operation: "KVM_SET_PIT2")
        try systemCall("KVM_SET_PIT2") { ckvm_ioctl_ptr(fd, CKVM_SET_PIT2, &state) }
    }

    /// The kvmclock time base in nanoseconds (`KVM_GET_CLOCK`).
    public func clock() throws -> UInt64 {
        var data = kvm_clock_data()
        try systemCall("KVM_GET_CLOCK") { ckvm_ioctl_ptr(fd, CKVM_GET_CLOCK, &data) }
        return data.clock
    }

    public func setClock(_ nanoseconds: UInt64) throws {
        var data = kvm_clock_data()
        data.clock = nanoseconds
        try systemCall("KVM_SET_CLOCK") { ckvm_ioctl_ptr(fd, CKVM_SET_CLOCK, &data) }
    }
}

/// The bytes of a plain C value, for state that is saved as an opaque blob.
func rawBytes<T>(of value: T) -> [UInt8] {
    withUnsafeBytes(of: value) { Array($0) }
}

/// Rebuilds a plain C value from bytes produced by `rawBytes(of:)`, refusing a blob of the wrong size.
func value<T>(_ empty: T, from bytes: [UInt8], operation: String) throws -> T {
    guard bytes.count == MemoryLayout<T>.size else {
        throw SystemError(operation, errno: 0,
                       detail: "state blob has \(bytes.count) bytes, expected \(MemoryLayout<T>.size)")
    }
    var result = empty
    bytes.withUnsafeBytes { source in
        withUnsafeMutableBytes(of: &result) { $0.copyMemory(from: source) }
    }
    return result
}
