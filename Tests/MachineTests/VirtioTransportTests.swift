import FerryTestSupport
import Foundation
import KVM
import Testing
@testable import Machine

/// A driver's view of a virtio-blk device on Ferry's PCI bus, without a guest: configuration
/// space through ports 0xCF8/0xCFC, BAR 0 through the bus's MMIO dispatch, on a real KVM VM.
@Suite(.enabled(if: KVMSystem.isAvailable, kvmMissing))
struct VirtioTransportTests {
    struct Driver {
        let machine: Machine

        func configuration(slot: Int, offset: Int, size: Int = 4) -> UInt32 {
            let address = UInt32(0x8000_0000) | UInt32(slot) << 11 | UInt32(offset & 0xFC)
            machine.bus.write(port: 0xCF8, data: withUnsafeBytes(of: address.littleEndian, Array.init))
            let bytes = machine.bus.read(port: 0xCFC + UInt16(offset & 3), size: size)
            return bytes.enumerated().reduce(0) { $0 | UInt32($1.element) << (8 * $1.offset) }
        }

        func setConfiguration(slot: Int, offset: Int, _ value: UInt32) {
            let address = UInt32(0x8000_0000) | UInt32(slot) << 11 | UInt32(offset & 0xFC)
            machine.bus.write(port: 0xCF8, data: withUnsafeBytes(of: address.littleEndian, Array.init))
            machine.bus.write(port: 0xCFC, data: withUnsafeBytes(of: value.littleEndian, Array.init))
        }

        var bar: UInt64 {
            UInt64(configuration(slot: 1, offset: 0x10) & ~0xF) | UInt64(configuration(slot: 1, offset: 0x14)) << 32
        }

        func read(_ offset: UInt64, size: Int) -> UInt64 {
            var data = [UInt8](repeating: 0, count: size)
            #expect(machine.pciBus.handleMemory(address: bar + offset, isWrite: false, data: &data))
            return data.enumerated().reduce(0) { $0 | UInt64($1.element) << (8 * $1.offset) }
        }

        func write(_ offset: UInt64, _ value: UInt64, size: Int) {
            var data = (0..<size).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }
            #expect(machine.pciBus.handleMemory(address: bar + offset, isWrite: true, data: &data))
        }

        var status: UInt8 { UInt8(read(0x14, size: 1)) }
    }

    /// The IOAPIC's interrupt request register: one bit per pin whose line is high
    /// (`struct kvm_irqchip`: chip id and padding, then `kvm_ioapic_state`, whose `irr` is at 16).
    static func ioapicIRR(_ machine: Machine) throws -> UInt32 {
        let bytes = try machine.vm.interruptChipState(.ioapic)
        return (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[24 + $1]) << (8 * $1) }
    }

    static func machine(_ directory: TemporaryDirectory) throws -> Machine {
        let image = directory.path("disk.img")
        #expect(FileManager.default.createFile(atPath: image, contents: Data(count: 1 << 20)))
        let configuration = MachineConfiguration(cpus: 1, memorySize: 64 << 20, kernel: "/nonexistent",
                                                 disks: [DiskConfiguration(id: "d", path: image)])
        return try Machine.forRestore(configuration: configuration, serialOutput: { _ in }, onStop: { _, _ in })
    }

    @Test func configurationSpaceDescribesAModernVirtioBlockDevice() throws {
        let directory = try TemporaryDirectory()
        let driver = Driver(machine: try Self.machine(directory))
        #expect(driver.configuration(slot: 0, offset: 0x08) >> 8 == 0x06_00_00, "slot 0 is a host bridge")
        #expect(driver.configuration(slot: 1, offset: 0) == 0x1042_1AF4, "virtio-blk, modern device id")
        #expect(driver.configuration(slot: 2, offset: 0) == 0xFFFF_FFFF, "an empty slot reads all ones")
        #expect(driver.bar == PCIBus.barWindow.lowerBound, "BAR 0 placed at the start of the 32-bit window")

        // BAR sizing: all ones in, the size mask and the 64-bit type out; the address comes back.
        driver.setConfiguration(slot: 1, offset: 0x10, 0xFFFF_FFFF)
        #expect(driver.configuration(slot: 1, offset: 0x10) == ~UInt32(VirtioPCI.barSize - 1) | 0b100)
        driver.setConfiguration(slot: 1, offset: 0x10, UInt32(PCIBus.barWindow.lowerBound))

        // The capability list: MSI-X, then the virtio structures common, ISR, device, notify, PCI cfg.
        var types: [UInt32] = []
        var next = Int(driver.configuration(slot: 1, offset: 0x34) & 0xFF)
        while next != 0 {
            let header = driver.configuration(slot: 1, offset: next)
            types.append(header & 0xFF == 0x09 ? header >> 24 : 0x100 | header & 0xFF)
            next = Int(header >> 8 & 0xFF)
        }
        #expect(types == [0x111, 1, 3, 4, 2, 5])

        // The MSI-X table, written a dword at a time as drivers do, reads back as written; the
        // vector control keeps only its mask bit.
        driver.setConfiguration(slot: 1, offset: 0x04, 0x6)
        let table = UInt64(VirtioPCI.msixTableOffset) + 16   // entry 1
        #expect(driver.read(table + 12, size: 4) == 1, "entries start masked")
        for (offset, value) in [(UInt64(0), UInt64(0xFEE0_1000)), (4, 0), (8, 0x4041), (12, 0xFFFF_FFFE)] {
            driver.write(table + offset, value, size: 4)
        }
        #expect(driver.read(table, size: 8) == 0xFEE0_1000 && driver.read(table + 8, size: 4) == 0x4041)
        #expect(driver.read(table + 12, size: 4) == 0, "unmasked")
        #expect(driver.machine.virtioDevices[0].saveState().msix.entries[1]
                == .init(bytes: [0x00, 0x10, 0xE0, 0xFE, 0, 0, 0, 0, 0x41, 0x40, 0, 0, 0, 0, 0, 0]))

        // The VIRTIO_PCI_CAP_PCI_CFG window reaches BAR 0 through configuration space: num_queues.
        var window = Int(driver.configuration(slot: 1, offset: 0x34) & 0xFF)
        while driver.configuration(slot: 1, offset: window) >> 24 != 5 { window = Int(driver.configuration(slot: 1, offset: window) >> 8 & 0xFF) }
        driver.setConfiguration(slot: 1, offset: window + 4, 0)        // bar 0
        driver.setConfiguration(slot: 1, offset: window + 8, 0x12)     // offset of num_queues
        driver.setConfiguration(slot: 1, offset: window + 12, 2)       // length
        #expect(driver.configuration(slot: 1, offset: window + 16) & 0xFFFF == 1, "one queue, read through the window")
    }

    @Test func negotiationRefusesWhatWasNotOfferedAndABrokenQueueNeedsAReset() throws {
        let directory = try TemporaryDirectory()
        let driver = Driver(machine: try Self.machine(directory))
        driver.setConfiguration(slot: 1, offset: 0x04, 0x6)                  // memory decode, bus master
        driver.write(0x14, 1 | 2, size: 1)                                    // ACKNOWLEDGE, DRIVER
        driver.write(0x00, 1, size: 4)
        #expect(driver.read(0x04, size: 4) & 1 == 1, "VIRTIO_F_VERSION_1 offered")
        // Without VERSION_1, FEATURES_OK does not stick.
        driver.write(0x14, 1 | 2 | 8, size: 1)
        #expect(driver.status & 8 == 0)
        driver.write(0x08, 1, size: 4)
        driver.write(0x0C, 1, size: 4)
        driver.write(0x14, 1 | 2 | 8, size: 1)
        #expect(driver.status & 8 == 8, "FEATURES_OK accepted with VERSION_1")

        // A queue whose descriptor table lies outside guest RAM: the device needs a reset.
        driver.write(0x16, 0, size: 2)
        driver.write(0x18, 8, size: 2)
        driver.write(0x20, 0x10_0000_0000, size: 8)
        driver.write(0x28, 0x1000, size: 8)
        driver.write(0x30, 0x2000, size: 8)
        driver.write(0x1C, 1, size: 2)
        #expect(driver.read(0x1C, size: 2) == 0, "the queue did not enable")
        #expect(driver.status & 0x40 != 0, "DEVICE_NEEDS_RESET")
        // MSI-X is off, so the configuration change went out on INTx: IOAPIC pin 16 is high
        // until the driver reads the ISR.
        #expect(driver.configuration(slot: 1, offset: 0x3C) & 0xFFFF == 0x0110, "INTA#, line 16")
        #expect(try Self.ioapicIRR(driver.machine) & (1 << 16) != 0, "INTx raised")
        #expect(driver.read(0x1000, size: 1) == 2, "ISR: a configuration change")
        #expect(try Self.ioapicIRR(driver.machine) & (1 << 16) == 0, "reading the ISR lowered INTx")

        driver.write(0x14, 0, size: 1)
        #expect(driver.status == 0 && driver.read(0x20, size: 8) == 0, "a reset clears status and queues")

        // The saved state round-trips into a machine built for restoring.
        let saved = try driver.machine.virtioDevices[0].saveDeviceState(id: "virtio-blk:d")
        let other = try Self.machine(directory)
        try other.virtioDevices[0].restoreDeviceState(saved)
        #expect(other.virtioDevices[0].saveState() == driver.machine.virtioDevices[0].saveState())
    }
}
