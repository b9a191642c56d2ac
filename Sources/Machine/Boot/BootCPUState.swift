import HostOS
import KVM

/// The GDT Ferry hands the boot vCPU, and the register state each boot protocol enters with.
public enum BootCPUState {
    /// Selectors into the boot GDT. Linux's 64-bit boot protocol requires `__BOOT_CS` = 0x10 and
    /// `__BOOT_DS` = 0x18.
    public static let code32Selector: UInt16 = 0x08
    public static let code64Selector: UInt16 = 0x10
    public static let dataSelector: UInt16 = 0x18
    public static let tssSelector: UInt16 = 0x20

    /// Flat 4 GiB descriptors: null, 32-bit code, 64-bit code, data, 32-bit busy TSS.
    public static let gdt: [UInt64] = [
        0,
        0x00CF_9B00_0000_FFFF, // code, execute/read, accessed, D=1, G=1
        0x00AF_9B00_0000_FFFF, // code, execute/read, accessed, L=1, G=1
        0x00CF_9300_0000_FFFF, // data, read/write, accessed, D=1, G=1
        0x0000_8B00_0000_0067, // 32-bit TSS, busy, limit 0x67
    ]

    static let cr0ProtectionEnable: UInt64 = 1 << 0
    static let cr0MonitorCoprocessor: UInt64 = 1 << 1
    static let cr0ExtensionType: UInt64 = 1 << 4
    static let cr0NumericError: UInt64 = 1 << 5
    static let cr0WriteProtect: UInt64 = 1 << 16
    static let cr0Paging: UInt64 = 1 << 31
    static let cr4PhysicalAddressExtension: UInt64 = 1 << 5
    static let eferLongModeEnable: UInt64 = 1 << 8
    static let eferLongModeActive: UInt64 = 1 << 10

    /// The boot GDT's bytes, for `BootLayout.gdtAddress`.
    public static var gdtBytes: [UInt8] {
        var bytes = LittleEndianBytes()
        for descriptor in gdt { bytes.append(descriptor) }
        return bytes.bytes
    }

    private static func segments(code: UInt16, into sregs: inout SpecialRegisters) {
        sregs.cs = Segment(descriptor: gdt[Int(code >> 3)], selector: code)
        let data = Segment(descriptor: gdt[Int(dataSelector >> 3)], selector: dataSelector)
        sregs.ds = data; sregs.es = data; sregs.fs = data; sregs.gs = data; sregs.ss = data
        sregs.tr = Segment(descriptor: gdt[Int(tssSelector >> 3)], selector: tssSelector)
        sregs.gdt = DescriptorTable(base: BootLayout.gdtAddress, limit: UInt16(gdt.count * 8 - 1))
        sregs.idt = DescriptorTable(base: BootLayout.idtAddress, limit: 0)
    }

    /// PVH: 32-bit protected mode, paging off, flat segments, EBX = start info (PVH boot ABI).
    public static func pvh(entry: UInt32, startInfo: UInt64, base: SpecialRegisters) -> (Registers, SpecialRegisters) {
        var sregs = base
        segments(code: code32Selector, into: &sregs)
        sregs.cr0 = cr0ProtectionEnable | cr0ExtensionType
        sregs.cr3 = 0
        sregs.cr4 = 0
        sregs.efer = 0
        var regs = Registers()
        regs.rip = UInt64(entry)
        regs.rbx = startInfo
        return (regs, sregs)
    }

    /// Linux 64-bit entry: long mode with the identity map of `PageTables`, RSI = zero page.
    public static func linux64(entry: UInt64, zeroPage: UInt64, base: SpecialRegisters) -> (Registers, SpecialRegisters) {
        var sregs = base
        segments(code: code64Selector, into: &sregs)
        sregs.cr0 = cr0ProtectionEnable | cr0MonitorCoprocessor | cr0ExtensionType | cr0NumericError
            | cr0WriteProtect | cr0Paging
        sregs.cr3 = BootLayout.pml4Address
        sregs.cr4 = cr4PhysicalAddressExtension
        sregs.efer = eferLongModeEnable | eferLongModeActive
        var regs = Registers()
        regs.rip = entry
        regs.rsi = zeroPage
        regs.rsp = BootLayout.bootStackPointer
        regs.rbp = BootLayout.bootStackPointer
        return (regs, sregs)
    }
}

/// Identity-mapping page tables for the Linux 64-bit entry: the first 4 GiB in 2 MiB pages.
public enum PageTables {
    static let present: UInt64 = 1 << 0
    static let writable: UInt64 = 1 << 1
    static let largePage: UInt64 = 1 << 7
    static let gibibytesMapped = 4
    static let entriesPerTable = 512
    static let largePageSize: UInt64 = 2 << 20

    /// (address, bytes) for the PML4, the PDPT and the page directories.
    public static func tables() -> [(address: UInt64, bytes: [UInt8])] {
        var pml4 = LittleEndianBytes()
        pml4.append(BootLayout.pdptAddress | present | writable)
        pml4.appendZeros((entriesPerTable - 1) * 8)
        var pdpt = LittleEndianBytes()
        for gib in 0..<gibibytesMapped {
            pdpt.append((BootLayout.pageDirectoriesAddress + UInt64(gib) * 0x1000) | present | writable)
        }
        pdpt.appendZeros((entriesPerTable - gibibytesMapped) * 8)
        var directories = LittleEndianBytes()
        for index in 0..<(gibibytesMapped * entriesPerTable) {
            directories.append(UInt64(index) * largePageSize | present | writable | largePage)
        }
        return [(BootLayout.pml4Address, pml4.bytes), (BootLayout.pdptAddress, pdpt.bytes),
                (BootLayout.pageDirectoriesAddress, directories.bytes)]
    }
}
