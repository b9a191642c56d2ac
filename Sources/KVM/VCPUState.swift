import CKVM
import HostOS

/// A vCPU's x87/SSE (and, where the guest has them, AVX and later) registers, in the form this
/// host's KVM hands them out.
public enum FloatingPointState: Codable, Equatable, Sendable {
    /// `struct kvm_xsave`: the 4 KiB XSAVE area. Where the guest's CPUID has no XSAVE, KVM still
    /// fills its legacy FXSAVE region and the XSAVE header.
    case xsave([UInt8])
    /// `struct kvm_fpu`, where KVM lacks `KVM_CAP_XSAVE` or refuses `KVM_GET_XSAVE`.
    case fpu([UInt8])
}

/// Everything KVM holds for one vCPU, as a plain value: what `KVMVCPU.saveState(_:)` reads from a
/// stopped vCPU and `KVMVCPU.restoreState(_:support:)` puts into a vCPU that has not run yet.
/// KVM's own structures stay opaque byte blobs of exactly their C size.
public struct VCPUState: Codable, Equatable, Sendable {
    /// The vCPU's id (also its APIC id).
    public var id: UInt32
    /// The CPUID table set on the vCPU (`KVM_GET_CPUID2`).
    public var cpuid: [CPUIDEntry]
    /// `KVM_MP_STATE_*`: runnable, halted, waiting for INIT/SIPI.
    public var mpState: UInt32
    public var registers: Registers
    public var specialRegisters: SpecialRegisters
    public var floatingPoint: FloatingPointState
    /// `struct kvm_xcrs`, where KVM offers `KVM_CAP_XCRS`.
    public var extendedControlRegisters: [UInt8]?
    /// `struct kvm_debugregs`.
    public var debugRegisters: [UInt8]
    /// `struct kvm_lapic_state`: the local APIC's register page.
    public var localAPIC: [UInt8]
    /// Every MSR of `VCPUStateSupport.msrIndices` that KVM could read on this vCPU (TSC, kvmclock,
    /// SYSCALL, PAT, MTRRs, …), in that order.
    public var msrs: [MSREntry]
    /// `struct kvm_vcpu_events`: pending and injected exceptions, interrupts, NMIs, SIPI vector.
    public var events: [UInt8]
    /// The guest's TSC frequency, where KVM reports it (`KVM_CAP_GET_TSC_KHZ`).
    public var tscKHz: UInt32?

    public init(id: UInt32, cpuid: [CPUIDEntry], mpState: UInt32, registers: Registers,
                specialRegisters: SpecialRegisters, floatingPoint: FloatingPointState,
                extendedControlRegisters: [UInt8]?, debugRegisters: [UInt8], localAPIC: [UInt8],
                msrs: [MSREntry], events: [UInt8], tscKHz: UInt32?) {
        self.id = id
        self.cpuid = cpuid
        self.mpState = mpState
        self.registers = registers
        self.specialRegisters = specialRegisters
        self.floatingPoint = floatingPoint
        self.extendedControlRegisters = extendedControlRegisters
        self.debugRegisters = debugRegisters
        self.localAPIC = localAPIC
        self.msrs = msrs
        self.events = events
        self.tscKHz = tscKHz
    }
}

/// What this host's KVM can save and restore of a vCPU; found once, from `KVMSystem`.
public struct VCPUStateSupport: Equatable, Sendable {
    /// The MSRs to save: `KVM_GET_MSR_INDEX_LIST` and the MTRRs.
    public var msrIndices: [UInt32]
    /// `KVM_CAP_XSAVE`: `KVM_GET_XSAVE`/`KVM_SET_XSAVE` exist.
    public var xsave: Bool
    /// `KVM_CAP_XCRS`: `KVM_GET_XCRS`/`KVM_SET_XCRS` exist.
    public var xcrs: Bool
    /// `KVM_CAP_GET_TSC_KHZ`: the guest TSC frequency can be read.
    public var tscFrequency: Bool
    /// `KVM_CAP_TSC_CONTROL`: the guest TSC can be scaled to another frequency.
    public var tscScaling: Bool

    public init(msrIndices: [UInt32], xsave: Bool, xcrs: Bool, tscFrequency: Bool, tscScaling: Bool) {
        self.msrIndices = msrIndices
        self.xsave = xsave
        self.xcrs = xcrs
        self.tscFrequency = tscFrequency
        self.tscScaling = tscScaling
    }
}

/// MSRs that KVM emulates and a guest sets up at boot, but that `KVM_GET_MSR_INDEX_LIST` leaves out;
/// QEMU saves them by name as well.
enum UnlistedMSRs {
    /// IA32_MTRR_DEF_TYPE (Intel SDM Vol. 3A, 12.11.2.1).
    static let mtrrDefaultType: UInt32 = 0x2FF
    /// IA32_MTRR_FIX64K_00000, FIX16K_80000, FIX16K_A0000, then FIX4K_C0000 to FIX4K_F8000.
    static let mtrrFixed: [UInt32] = [0x250, 0x258, 0x259] + Array(0x268...0x26F)
    /// IA32_MTRR_PHYSBASE0/PHYSMASK0 to PHYSBASE7/PHYSMASK7: the 8 variable ranges KVM offers
    /// (`KVM_NR_VAR_MTRR`).
    static let mtrrVariable: [UInt32] = Array(0x200...0x20F)

    static let all = [mtrrDefaultType] + mtrrFixed + mtrrVariable
}

extension KVMSystem {
    /// What KVM on this host can save and restore of a vCPU. The MSRs are those of
    /// `KVM_GET_MSR_INDEX_LIST` and the MTRRs, which that list leaves out.
    public func vcpuStateSupport() throws -> VCPUStateSupport {
        let listed = try msrIndexList()
        return VCPUStateSupport(msrIndices: listed + UnlistedMSRs.all.filter { !listed.contains($0) },
                         xsave: checkExtension(CKVM_CAP_XSAVE) > 0,
                         xcrs: checkExtension(CKVM_CAP_XCRS) > 0,
                         tscFrequency: checkExtension(CKVM_CAP_GET_TSC_KHZ) > 0,
                         tscScaling: checkExtension(CKVM_CAP_TSC_CONTROL) > 0)
    }
}

/// MSR indices whose restore order matters.
enum OrderedMSRs {
    /// IA32_TSC_DEADLINE: KVM arms the deadline timer against the current TSC when this is written,
    /// so it must follow IA32_TSC (and the LAPIC, which must already be in TSC-deadline mode), as
    /// Firecracker's restore does.
    static let tscDeadline: UInt32 = 0x6E0
}

/// A TSC frequency within this fraction of another counts as the same (host calibration varies by
/// a few ppm between boots; QEMU and Firecracker use 250 ppm).
let tscFrequencyTolerance = 250.0 / 1_000_000

extension KVMVCPU {
    /// Reads the whole state of this vCPU. The vCPU must not be running, and its last exit must have
    /// been completed (`completePendingExit()`); other vCPUs of the VM must be stopped too
    /// (`KVM_GET_VCPU_EVENTS` is not safe against running siblings).
    ///
    /// Order (as Firecracker's and Cloud Hypervisor's `save_state`): MP state first, because
    /// `KVM_GET_MP_STATE` makes the local APIC accept pending INIT/SIPI and so changes vCPU and
    /// LAPIC state; `KVM_GET_LAPIC` after the registers, because it may update the LAPIC; the vCPU
    /// events last, because the other `KVM_GET_*` calls may still move pending events.
    public func saveState(_ support: VCPUStateSupport) throws -> VCPUState {
        let mpState = try mpState()
        let registers = try registers()
        let specialRegisters = try specialRegisters()
        let floatingPoint: FloatingPointState
        if support.xsave, let area = try? xsave() {
            floatingPoint = .xsave(area)
        } else {
            floatingPoint = .fpu(try fpu())
        }
        let extendedControlRegisters = support.xcrs ? try xcrs() : nil
        let debugRegisters = try debugRegisters()
        let localAPIC = try localAPIC()
        let tscKHz = support.tscFrequency ? try? tscKHz() : nil
        let cpuid = try cpuid()
        let msrs = try msrs(support.msrIndices)
        let events = try eventsForRestore()
        return VCPUState(id: id, cpuid: cpuid, mpState: mpState, registers: registers,
                         specialRegisters: specialRegisters, floatingPoint: floatingPoint,
                         extendedControlRegisters: extendedControlRegisters, debugRegisters: debugRegisters,
                         localAPIC: localAPIC, msrs: msrs, events: events, tscKHz: tscKHz)
    }

    /// `KVM_GET_VCPU_EVENTS`, marked so that `KVM_SET_VCPU_EVENTS` also restores the pending NMI
    /// and the SIPI vector (KVM ignores both unless their flags say they are valid; QEMU sets them too).
    private func eventsForRestore() throws -> [UInt8] {
        var events = try value(kvm_vcpu_events(), from: try events(), operation: "KVM_GET_VCPU_EVENTS(vCPU \(id))")
        events.flags |= UInt32(KVM_VCPUEVENT_VALID_NMI_PENDING) | UInt32(KVM_VCPUEVENT_VALID_SIPI_VECTOR)
        return rawBytes(of: events)
    }

    /// Puts a saved state into this vCPU, which must not have run yet (KVM refuses a different CPUID
    /// after the first `KVM_RUN`). Other vCPUs of the VM must not be running.
    ///
    /// Order (KVM's constraints, as Firecracker's and Cloud Hypervisor's `restore_state` honour them):
    /// CPUID first, because what KVM accepts in the other calls (MSRs, XSAVE features, the BSP's MP
    /// state) depends on it; the TSC frequency before any TSC value is written; the MP state early;
    /// general registers before the vCPU events, because `KVM_SET_REGS` clears a pending exception
    /// that `KVM_SET_VCPU_EVENTS` then restores; special registers before the LAPIC, because they
    /// carry the APIC base MSR; the LAPIC before the MSRs, because the TSC-deadline MSR only takes
    /// when the LAPIC is already in that mode; TSC before TSC deadline; the events last.
    public func restoreState(_ state: VCPUState, support: VCPUStateSupport) throws {
        guard state.id == id else {
            throw SystemError("restoring vCPU \(id)", errno: 0, detail: "the state is vCPU \(state.id)'s")
        }
        if !state.cpuid.isEmpty { try setCPUID(state.cpuid) }
        if let saved = state.tscKHz, support.tscFrequency, let current = try? tscKHz(),
           abs(Double(current) - Double(saved)) > Double(saved) * tscFrequencyTolerance {
            guard support.tscScaling else {
                throw SystemError("restoring vCPU \(id)", errno: 0,
                               detail: "the guest's TSC ran at \(saved) kHz, this host's at \(current) kHz, and KVM cannot scale it (no KVM_CAP_TSC_CONTROL)")
            }
            try setTSCKHz(saved)
        }
        try setMPState(state.mpState)
        try setRegisters(state.registers)
        try setSpecialRegisters(state.specialRegisters)
        switch state.floatingPoint {
        case let .xsave(area):
            guard support.xsave else {
                throw SystemError("restoring vCPU \(id)", errno: 0,
                               detail: "the state holds an XSAVE area but this host's KVM lacks KVM_CAP_XSAVE")
            }
            try setXSave(area)
        case let .fpu(area):
            try setFPU(area)
        }
        if let xcrs = state.extendedControlRegisters {
            guard support.xcrs else {
                throw SystemError("restoring vCPU \(id)", errno: 0,
                               detail: "the state holds XCRs but this host's KVM lacks KVM_CAP_XCRS")
            }
            try setXCRs(xcrs)
        }
        try setDebugRegisters(state.debugRegisters)
        try setLocalAPIC(state.localAPIC)
        let deferred = state.msrs.filter { $0.index == OrderedMSRs.tscDeadline }
        try setMSRs(state.msrs.filter { $0.index != OrderedMSRs.tscDeadline })
        try setMSRs(deferred)
        try setEvents(state.events)
    }
}
