import HostOS
import KVM

/// Model-specific registers set on every vCPU before it first runs.
enum BootMSRs {
    static let sysenterCS: UInt32 = 0x174     // IA32_SYSENTER_CS
    static let sysenterESP: UInt32 = 0x175    // IA32_SYSENTER_ESP
    static let sysenterEIP: UInt32 = 0x176    // IA32_SYSENTER_EIP
    static let star: UInt32 = 0xC000_0081     // STAR
    static let lstar: UInt32 = 0xC000_0082    // LSTAR
    static let cstar: UInt32 = 0xC000_0083    // CSTAR
    static let syscallMask: UInt32 = 0xC000_0084 // FMASK
    static let kernelGSBase: UInt32 = 0xC000_0102 // KERNEL_GS_BASE
    static let tsc: UInt32 = 0x10             // IA32_TIME_STAMP_COUNTER
    static let miscEnable: UInt32 = 0x1A0     // IA32_MISC_ENABLE
    static let miscEnableFastStrings: UInt64 = 1 // bit 0: fast string operations
    static let mtrrDefaultType: UInt32 = 0x2FF // IA32_MTRR_DEF_TYPE
    static let mtrrEnableWriteBack: UInt64 = (1 << 11) | 6 // MTRRs on, default type write-back

    static let entries: [MSREntry] = [
        MSREntry(index: sysenterCS, data: 0),
        MSREntry(index: sysenterESP, data: 0),
        MSREntry(index: sysenterEIP, data: 0),
        MSREntry(index: star, data: 0),
        MSREntry(index: cstar, data: 0),
        MSREntry(index: kernelGSBase, data: 0),
        MSREntry(index: syscallMask, data: 0),
        MSREntry(index: lstar, data: 0),
        MSREntry(index: tsc, data: 0),
        MSREntry(index: miscEnable, data: miscEnableFastStrings),
        MSREntry(index: mtrrDefaultType, data: mtrrEnableWriteBack),
    ]
}

/// Local APIC set-up every VMM does for a PC: LINT0 takes the 8259's ExtINT, LINT1 takes NMI.
enum LocalAPICSetup {
    static let lvtLINT0Offset = 0x350          // local vector table, LINT0 register
    static let lvtLINT1Offset = 0x360
    static let deliveryModeMask: UInt32 = 0x700
    static let deliveryModeExtINT: UInt32 = 0x700
    static let deliveryModeNMI: UInt32 = 0x400

    static func configure(_ apic: [UInt8]) -> [UInt8] {
        var page = LittleEndianBytes(apic)
        for (offset, mode) in [(lvtLINT0Offset, deliveryModeExtINT), (lvtLINT1Offset, deliveryModeNMI)] {
            guard let value = apic.littleEndian(UInt32.self, at: offset) else { continue }
            page.set((value & ~deliveryModeMask) | mode, at: offset)
        }
        return page.bytes
    }
}
