import KVM
import Testing
@testable import Machine

/// Reads a little-endian integer from test bytes.
func le<T: FixedWidthInteger>(_ bytes: [UInt8], _ offset: Int, as _: T.Type = T.self) -> T {
    bytes.littleEndian(T.self, at: offset)!
}

@Suite struct E820AndLayoutTests {
    @Test func smallGuestHasOneRangeBelowTheHole() {
        #expect(GuestRAMLayout.ranges(size: 1 << 30) == [GuestRAMRange(start: 0, size: 1 << 30)])
    }

    @Test func memoryBeyondThreeGiBContinuesAboveFourGiB() {
        let ranges = GuestRAMLayout.ranges(size: 8 << 30)
        #expect(ranges == [GuestRAMRange(start: 0, size: 3 << 30), GuestRAMRange(start: 4 << 30, size: 5 << 30)])
        #expect(ranges.reduce(0) { $0 + $1.size } == 8 << 30)
    }

    @Test func e820ReservesTheEBDAAndBIOSAreaAndSkipsTheHole() {
        let map = E820Map.entries(for: GuestRAMLayout.ranges(size: 5 << 30))
        #expect(map == [
            E820Entry(address: 0, size: 0x9FC00, kind: .ram),
            E820Entry(address: 0x9FC00, size: 0x100000 - 0x9FC00, kind: .reserved),
            E820Entry(address: 0x100000, size: (3 << 30) - 0x100000, kind: .ram),
            E820Entry(address: 4 << 30, size: 2 << 30, kind: .ram),
        ])
        let ram = map.filter { $0.kind == .ram }.reduce(0) { $0 + $1.size }
        #expect(ram == (5 << 30) - (0x100000 - 0x9FC00))
    }
}

@Suite struct MPTableTests {
    @Test(arguments: [1, 2, 8, 254])
    func checksumsAndOneProcessorEntryPerCPU(cpus: Int) {
        let address: UInt64 = 0xF0000
        let bytes = MPTable.bytes(cpuCount: cpus, at: address)
        #expect(Array(bytes[0..<4]) == Array("_MP_".utf8))
        #expect(bytes[0..<16].reduce(UInt8(0), &+) == 0, "floating pointer checksum")
        #expect(le(bytes, 4, as: UInt32.self) == UInt32(address) + 16)
        let table = Array(bytes[16...])
        #expect(Array(table[0..<4]) == Array("PCMP".utf8))
        let length = Int(le(table, 4, as: UInt16.self))
        #expect(length == table.count)
        #expect(table.reduce(UInt8(0), &+) == 0, "configuration table checksum")
        #expect(le(table, 36, as: UInt32.self) == 0xFEE0_0000)
        // Walk the entries: processor entries are 20 bytes, all others 8.
        var offset = 44
        var processors: [(id: UInt8, flags: UInt8)] = []
        var entries = 0
        while offset < table.count {
            if table[offset] == 0 {
                processors.append((table[offset + 1], table[offset + 3]))
                offset += 20
            } else {
                offset += 8
            }
            entries += 1
        }
        #expect(entries == Int(le(table, 34, as: UInt16.self)))
        #expect(processors.map(\.id) == (0..<cpus).map(UInt8.init))
        #expect(processors.first?.flags == 3, "vCPU 0 is the enabled boot processor")
        #expect(processors.dropFirst().allSatisfy { $0.flags == 1 })
    }

    @Test func pciSlotsGetABusAndLevelTriggeredINTARoutes() {
        let table = Array(MPTable.bytes(cpuCount: 1, pciSlots: [1, 2, 9], at: 0xF0000)[16...])
        var offset = 44
        var buses: [(id: UInt8, type: String)] = []
        var pciRoutes: [(flags: UInt16, sourceIRQ: UInt8, pin: UInt8)] = []
        while offset < table.count {
            switch table[offset] {
            case 0: offset += 20; continue
            case 1: buses.append((table[offset + 1], String(decoding: table[(offset + 2)..<(offset + 8)], as: UTF8.self)))
            case 3 where table[offset + 4] == 1:
                pciRoutes.append((le(table, offset + 2, as: UInt16.self), table[offset + 5], table[offset + 7]))
            default: break
            }
            offset += 8
        }
        #expect(buses.map(\.id) == [0, 1] && buses[1].type == "PCI   ")
        #expect(pciRoutes.map(\.sourceIRQ) == [1 << 2, 2 << 2, 9 << 2], "device number in bits 2–6, INTA#")
        #expect(pciRoutes.map(\.pin) == [16, 17, 16])
        #expect(pciRoutes.allSatisfy { $0.flags == 0b1101 }, "level-triggered, active high")
        #expect(table.reduce(UInt8(0), &+) == 0)
    }
}

@Suite struct PageTableTests {
    @Test func identityMapsFourGiBWithLargePages() {
        let tables = PageTables.tables()
        let pml4 = tables[0].bytes, pdpt = tables[1].bytes, directories = tables[2].bytes
        #expect(le(pml4, 0, as: UInt64.self) == BootLayout.pdptAddress | 0x3)
        #expect(le(pml4, 8, as: UInt64.self) == 0)
        for gib in 0..<4 {
            #expect(le(pdpt, gib * 8, as: UInt64.self) == (BootLayout.pageDirectoriesAddress + UInt64(gib) * 0x1000) | 0x3)
        }
        #expect(directories.count == 4 * 4096)
        for index in [0, 1, 511, 512, 2047] {
            #expect(le(directories, index * 8, as: UInt64.self) == UInt64(index) << 21 | 0x83)
        }
        // The tables must fit below the command line.
        #expect(BootLayout.pageDirectoriesAddress + UInt64(directories.count) <= BootLayout.commandLineAddress)
    }

    @Test func bootGDTDecodesToFlatSegments() {
        let code64 = Segment(descriptor: BootCPUState.gdt[2], selector: BootCPUState.code64Selector)
        #expect(code64.long && !code64.defaultSize32 && code64.present && code64.limit == 0xFFFF_FFFF && code64.base == 0)
        let code32 = Segment(descriptor: BootCPUState.gdt[1], selector: BootCPUState.code32Selector)
        #expect(!code32.long && code32.defaultSize32 && code32.type == 0xB)
        let data = Segment(descriptor: BootCPUState.gdt[3], selector: BootCPUState.dataSelector)
        #expect(data.type == 0x3 && data.codeOrData && data.limit == 0xFFFF_FFFF)
        let tss = Segment(descriptor: BootCPUState.gdt[4], selector: BootCPUState.tssSelector)
        #expect(tss.type == 0xB && !tss.codeOrData && tss.limit == 0x67)
    }

    @Test func pvhEntryStateFollowsThePVHABI() {
        let (regs, sregs) = BootCPUState.pvh(entry: 0x100_0000, startInfo: 0x6000, base: SpecialRegisters())
        #expect(regs.rip == 0x100_0000 && regs.rbx == 0x6000)
        #expect(sregs.cr0 & 1 == 1 && sregs.cr0 & (1 << 31) == 0, "protected mode, paging off")
        #expect(sregs.efer == 0 && sregs.cs.defaultSize32 && !sregs.cs.long)
        #expect(regs.rflags & (1 << 9) == 0, "interrupts off")
    }

    @Test func linuxEntryStateIsLongModeWithTheZeroPageInRSI() {
        let (regs, sregs) = BootCPUState.linux64(entry: 0x100200, zeroPage: 0x7000, base: SpecialRegisters())
        #expect(regs.rip == 0x100200 && regs.rsi == 0x7000)
        #expect(sregs.cs.selector == 0x10 && sregs.ds.selector == 0x18 && sregs.cs.long)
        #expect(sregs.efer & 0x500 == 0x500 && sregs.cr0 & (1 << 31) != 0 && sregs.cr3 == BootLayout.pml4Address)
    }
}

@Suite struct StartInfoAndZeroPageTests {
    @Test func startInfoCarriesMagicCommandLineModulesAndMemoryMap() {
        let map = E820Map.entries(for: GuestRAMLayout.ranges(size: 1 << 30))
        let bytes = StartInfo.bytes(at: 0x6000, commandLineAddress: 0x20000,
                                    modules: [(address: 0x3000_0000, size: 12345)], memoryMap: map)
        #expect(le(bytes, 0, as: UInt32.self) == 0x336E_C578)
        #expect(le(bytes, 4, as: UInt32.self) == 1)
        #expect(le(bytes, 12, as: UInt32.self) == 1)
        #expect(le(bytes, 16, as: UInt64.self) == 0x6000 + 56)
        #expect(le(bytes, 24, as: UInt64.self) == 0x20000)
        let memmap = le(bytes, 40, as: UInt64.self)
        #expect(memmap == 0x6000 + 56 + 32)
        #expect(Int(le(bytes, 48, as: UInt32.self)) == map.count)
        #expect(le(bytes, 56, as: UInt64.self) == 0x3000_0000 && le(bytes, 64, as: UInt64.self) == 12345)
        let first = Int(memmap - 0x6000)
        for (index, entry) in map.enumerated() {
            #expect(le(bytes, first + index * 24, as: UInt64.self) == entry.address)
            #expect(le(bytes, first + index * 24 + 8, as: UInt64.self) == entry.size)
            #expect(le(bytes, first + index * 24 + 16, as: UInt32.self) == entry.kind.rawValue)
        }
        #expect(bytes.count == 56 + 32 + 24 * map.count)
    }

    @Test func zeroPageHasHeaderCommandLineInitrdAndE820() throws {
        let image = try BzImage(parsing: syntheticBzImage())
        let map = E820Map.entries(for: GuestRAMLayout.ranges(size: 256 << 20))
        let page = try ZeroPage.bytes(kernel: image, commandLineAddress: 0x20000,
                                      initrd: (address: 0x0800_0000, size: 4096), memoryMap: map)
        #expect(page.count == 4096)
        #expect(le(page, 0x202, as: UInt32.self) == 0x5372_6448, "setup header copied")
        #expect(page[0x210] == 0xFF)
        #expect(page[0x211] & 0x81 == 0x81)
        #expect(le(page, 0x228, as: UInt32.self) == 0x20000)
        #expect(le(page, 0x218, as: UInt32.self) == 0x0800_0000 && le(page, 0x21C, as: UInt32.self) == 4096)
        #expect(Int(page[0x1E8]) == map.count)
        #expect(le(page, 0x2D0 + 20 * 2, as: UInt64.self) == 0x100000)
        #expect(le(page, 0x2D0 + 20 * 2 + 16, as: UInt32.self) == 1)
    }
}

/// A bzImage header with just the fields Ferry reads: 2 setup sectors, protocol 2.15, 64-bit entry.
func syntheticBzImage(version: UInt16 = 0x020F, xloadflags: UInt16 = 1) -> [UInt8] {
    var image = [UInt8](repeating: 0, count: 3 * 512 + 1024)
    func put<T: FixedWidthInteger>(_ value: T, _ offset: Int) {
        withUnsafeBytes(of: value.littleEndian) { for (i, b) in $0.enumerated() { image[offset + i] = b } }
    }
    image[0x1F1] = 2
    put(UInt16(0xAA55), 0x1FE)
    image[0x201] = 0x6A                       // header runs to 0x26C
    put(UInt32(0x5372_6448), 0x202)
    put(version, 0x206)
    put(UInt32(0x37FF_FFFF), 0x22C)
    put(xloadflags, 0x236)
    put(UInt32(0x0100_0000), 0x260)
    for index in (3 * 512)..<image.count { image[index] = 0xCC }
    return image
}

@Suite struct KernelImageTests {
    @Test func bzImageHeaderIsParsed() throws {
        let image = try BzImage(parsing: syntheticBzImage())
        #expect(image.kernelOffset == 3 * 512)
        #expect(image.setupHeader.count == 0x26C - 0x1F1)
        #expect(image.initrdAddressMax == 0x37FF_FFFF && image.initSize == 0x0100_0000)
    }

    @Test func bzImageWithoutA64BitEntryIsRefused() {
        #expect(throws: MachineError.self) { try BzImage(parsing: syntheticBzImage(xloadflags: 0)) }
        #expect(throws: MachineError.self) { try BzImage(parsing: syntheticBzImage(version: 0x0208)) }
        #expect(!BzImage.isBzImage([UInt8](repeating: 0, count: 1024)))
    }

    @Test func elfWithPVHNoteYieldsSegmentsAndEntry() throws {
        let elf = try ELFKernel(parsing: syntheticELF(withNote: true))
        #expect(elf.pvhEntry == 0x0010_0040)
        #expect(elf.segments == [ELFKernel.Segment(physicalAddress: 0x10_0000, fileRange: 0x100..<0x140, memorySize: 0x2000)])
        #expect(elf.end == 0x10_2000)
    }

    @Test func elfWithoutPVHNoteIsRefusedWithAReason() {
        #expect(throws: MachineError.self) { try ELFKernel(parsing: syntheticELF(withNote: false)) }
    }

    @Test func truncatedELFIsRefusedNotTrapped() {
        let full = syntheticELF(withNote: true)
        for length in [0, 20, 63, 64, 100, 0x100, 0x120] {
            #expect(throws: MachineError.self) { try ELFKernel(parsing: Array(full.prefix(length))) }
        }
    }
}

/// A minimal ELF64: one PT_LOAD of 0x40 bytes at 1 MiB (memsz 0x2000) and optionally a PT_NOTE with
/// the Xen PHYS32_ENTRY note.
func syntheticELF(withNote: Bool) -> [UInt8] {
    var image = [UInt8](repeating: 0, count: 0x180)
    func put<T: FixedWidthInteger>(_ value: T, _ offset: Int) {
        withUnsafeBytes(of: value.littleEndian) { for (i, b) in $0.enumerated() { image[offset + i] = b } }
    }
    image[0..<4] = [0x7F, 0x45, 0x4C, 0x46]
    image[4] = 2; image[5] = 1; image[6] = 1
    put(UInt16(2), 16); put(UInt16(62), 18); put(UInt32(1), 20)
    put(UInt64(0x40), 32)                  // e_phoff
    put(UInt16(64), 52); put(UInt16(56), 54); put(UInt16(withNote ? 2 : 1), 56)
    // PT_LOAD
    put(UInt32(1), 0x40); put(UInt64(0x100), 0x48); put(UInt64(0x10_0000), 0x50); put(UInt64(0x10_0000), 0x58)
    put(UInt64(0x40), 0x60); put(UInt64(0x2000), 0x68)
    if withNote {
        put(UInt32(4), 0x78); put(UInt64(0x140), 0x80); put(UInt64(20), 0x98); put(UInt64(20), 0xA0)
        put(UInt32(4), 0x140); put(UInt32(4), 0x144); put(UInt32(18), 0x148)
        image[0x14C..<0x150] = [0x58, 0x65, 0x6E, 0x00]  // "Xen\0"
        put(UInt32(0x0010_0040), 0x150)
    }
    return image
}
