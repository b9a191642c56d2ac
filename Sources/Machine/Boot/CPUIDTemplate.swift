import Glibc
import KVM

/// Turns KVM's supported CPUID into what one vCPU of an N-vCPU guest sees: its APIC id, the CPU
/// count and topology, and the hypervisor bit; on a host whose KVM emulates guest kernel code, it
/// also hides the features that KVM's emulator cannot execute. Everything else is passed through
/// as KVM offers it.
public enum CPUIDTemplate {
    static let leafFeatures: UInt32 = 0x1
    static let leafCacheParameters: UInt32 = 0x4
    static let leafTopology: UInt32 = 0xB
    static let leafTopologyV2: UInt32 = 0x1F
    static let leafAMDTopology: UInt32 = 0x8000_001E
    static let leafAMDSizes: UInt32 = 0x8000_0008
    static let hypervisorBit: UInt32 = 1 << 31          // CPUID.1:ECX[31]
    static let hyperThreadingBit: UInt32 = 1 << 28      // CPUID.1:EDX[28]: logical count field valid
    static let topologyLevelThread: UInt32 = 1          // CPUID.B: level type SMT
    static let topologyLevelCore: UInt32 = 2            // CPUID.B: level type core
    /// CPUID.1:ECX features whose instructions KVM's instruction emulator cannot run
    /// (`cmpxchg16b`; `xsave`/`xrstor`, and AVX, which needs XSAVE).
    static let unemulatedFeatures: UInt32 = (1 << 13) | (1 << 26) | (1 << 27) | (1 << 28)

    /// Whether this host's KVM runs guest kernel code through its instruction emulator rather
    /// than natively: true for the `kvm_pvm` module (pagetable-based virtual machines, used for
    /// nested KVM without hardware support). Guests there must not be told about instructions the
    /// emulator cannot execute, or they fail with an emulation error the first time they use them.
    public static var hostEmulatesGuestKernel: Bool {
        access("/sys/module/kvm_pvm", F_OK) == 0
    }

    /// The CPUID table for vCPU `index` (also its APIC id) of `count`.
    public static func entries(supported: [CPUIDEntry], vcpu index: Int, count: Int,
                               hostEmulatesGuestKernel: Bool = false) -> [CPUIDEntry] {
        let apicID = UInt32(index)
        let cpus = UInt32(count)
        // Bits of the APIC id that number cores within the package.
        let coreBits = UInt32(count <= 1 ? 0 : (Int.bitWidth - (count - 1).leadingZeroBitCount))
        return supported.map { original in
            var entry = original
            switch entry.function {
            case leafFeatures:
                entry.ebx = (entry.ebx & 0x0000_FFFF) | (min(cpus, 255) << 16) | (apicID << 24)
                entry.ecx |= hypervisorBit
                if hostEmulatesGuestKernel { entry.ecx &= ~unemulatedFeatures }
                if count > 1 { entry.edx |= hyperThreadingBit } else { entry.edx &= ~hyperThreadingBit }
            case leafCacheParameters:
                entry.eax = (entry.eax & 0x03FF_FFFF) | ((cpus - 1) << 26)
            case leafTopology, leafTopologyV2:
                switch entry.index {
                case 0:
                    entry.eax = 0
                    entry.ebx = 1
                    entry.ecx = (topologyLevelThread << 8) | entry.index
                case 1:
                    entry.eax = coreBits
                    entry.ebx = cpus
                    entry.ecx = (topologyLevelCore << 8) | entry.index
                default:
                    entry.eax = 0
                    entry.ebx = 0
                    entry.ecx = entry.index
                }
                entry.edx = apicID
            case leafAMDTopology:
                entry.eax = apicID
                entry.ebx &= ~0xFF00                    // one thread per core
            case leafAMDSizes:
                entry.ecx = (entry.ecx & ~0xFF) | (cpus - 1)
            default:
                break
            }
            return entry
        }
    }
}
