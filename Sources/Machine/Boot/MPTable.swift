import HostOS
/// An Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns its CPUs,
/// IOAPIC and interrupt routing. Layout from the MP spec, chapter 4.
public enum MPTable {
    static let floatingPointerSignature = "_MP_"
    static let configurationSignature = "PCMP"
    static let specRevision: UInt8 = 4            // MP spec 1.4
    static let localAPICVersion: UInt8 = 0x14      // integrated APIC, as KVM's LAPIC reports
    static let ioAPICVersion: UInt8 = 0x11         // 82093AA, as KVM's IOAPIC reports
    static let cpuSignature: UInt32 = 0x600        // family 6; informational only
    static let cpuFeatureFlags: UInt32 = 0x201     // FPU and APIC present (CPUID.1:EDX bits 0 and 9)
    static let isaInterruptCount: UInt8 = 16       // legacy IRQs 0–15 routed to IOAPIC pins 0–15
    static let pciBusID: UInt8 = 1                 // bus 0 of PCI, as the MP table numbers buses

    enum EntryType: UInt8 { case processor = 0, bus = 1, ioAPIC = 2, ioInterrupt = 3, localInterrupt = 4 }
    enum InterruptType: UInt8 { case int = 0, nmi = 1, extINT = 3 }
    enum ProcessorFlags: UInt8 { case enabled = 1, bootProcessor = 3 }

    /// PCI's INTx lines are level-triggered; with KVM's IOAPIC a raised line is an asserted one.
    static let levelActiveHigh: UInt16 = 0b1101    // trigger level (11), polarity active high (01)

    /// The floating pointer structure followed by the configuration table, to be placed at `address`.
    /// `pciSlots` are the slots of PCI bus 0 whose INTA# the table routes (`PCIBus.interruptPin`).
    public static func bytes(cpuCount: Int, pciSlots: [Int] = [], at address: UInt64) -> [UInt8] {
        let ioAPICID = UInt8(cpuCount)   // IDs must differ from every LAPIC's
        var entries = LittleEndianBytes()
        var entryCount: UInt16 = 0
        for cpu in 0..<cpuCount {
            entries.append(EntryType.processor.rawValue)
            entries.append(UInt8(cpu))                           // local APIC id = vCPU index
            entries.append(localAPICVersion)
            entries.append((cpu == 0 ? ProcessorFlags.bootProcessor : .enabled).rawValue)
            entries.append(cpuSignature)
            entries.append(cpuFeatureFlags)
            entries.appendZeros(8)
            entryCount += 1
        }
        entries.append(EntryType.bus.rawValue)
        entries.append(UInt8(0))                                 // bus id
        entries.appendPadded("ISA", width: 6)
        entryCount += 1
        entries.append(EntryType.bus.rawValue)
        entries.append(pciBusID)
        entries.appendPadded("PCI", width: 6)
        entryCount += 1
        entries.append(EntryType.ioAPIC.rawValue)
        entries.append(ioAPICID)
        entries.append(ioAPICVersion)
        entries.append(UInt8(1))                                 // enabled
        entries.append(BootLayout.ioAPICAddress)
        entryCount += 1
        // IRQ 0 also reaches pin 0 as ExtINT (the 8259 in virtual-wire mode), then every ISA IRQ
        // reaches the IOAPIC pin of the same number, which is how KVM's default routing wires them.
        func ioInterrupt(_ type: InterruptType, irq: UInt8) {
            entries.append(EntryType.ioInterrupt.rawValue)
            entries.append(type.rawValue)
            entries.append(UInt16(0))                            // polarity and trigger: as the bus says
            entries.append(UInt8(0))                             // source bus: ISA
            entries.append(irq)
            entries.append(ioAPICID)
            entries.append(irq)                                  // destination IOAPIC pin
            entryCount += 1
        }
        ioInterrupt(.extINT, irq: 0)
        for irq in 0..<isaInterruptCount { ioInterrupt(.int, irq: irq) }
        for slot in pciSlots {
            entries.append(EntryType.ioInterrupt.rawValue)
            entries.append(InterruptType.int.rawValue)
            entries.append(levelActiveHigh)
            entries.append(pciBusID)
            entries.append(UInt8(slot << 2))                     // device number, INTA#
            entries.append(ioAPICID)
            entries.append(UInt8(PCIBus.interruptPin(slot: slot)))
            entryCount += 1
        }
        func localInterrupt(_ type: InterruptType, pin: UInt8) {
            entries.append(EntryType.localInterrupt.rawValue)
            entries.append(type.rawValue)
            entries.append(UInt16(0))
            entries.append(UInt8(0))                             // source bus
            entries.append(UInt8(0))                             // source IRQ
            entries.append(UInt8(0xFF))                          // every local APIC
            entries.append(pin)                                  // LINT0 or LINT1
            entryCount += 1
        }
        localInterrupt(.extINT, pin: 0)
        localInterrupt(.nmi, pin: 1)

        let floatingPointerSize = 16
        let configurationHeaderSize = 44
        var table = LittleEndianBytes()
        table.appendPadded(configurationSignature, width: 4)
        table.append(UInt16(configurationHeaderSize + entries.count)) // base table length
        table.append(specRevision)
        table.append(UInt8(0))                                   // checksum, set below
        table.appendPadded("FERRY", width: 8)                    // OEM id
        table.appendPadded("KVM", width: 12)                     // product id
        table.append(UInt32(0))                                  // OEM table pointer
        table.append(UInt16(0))                                  // OEM table size
        table.append(entryCount)
        table.append(BootLayout.localAPICAddress)
        table.append(UInt16(0))                                  // extended table length
        table.append(UInt8(0))                                   // extended table checksum
        table.append(UInt8(0))                                   // reserved
        table.append(entries.bytes)
        table.set(table.bytes.checksumComplement, at: 7)

        var pointer = LittleEndianBytes()
        pointer.appendPadded(floatingPointerSignature, width: 4)
        pointer.append(UInt32(address) + UInt32(floatingPointerSize)) // configuration table address
        pointer.append(UInt8(1))                                 // length in 16-byte units
        pointer.append(specRevision)
        pointer.append(UInt8(0))                                 // checksum, set below
        pointer.appendZeros(5)                                   // feature bytes: table present, no default config
        pointer.set(pointer.bytes.checksumComplement, at: 10)
        return pointer.bytes + table.bytes
    }
}
