import Synchronization

/// A PCI function on bus 0: its configuration space and the memory BARs it decodes. Called from
/// vCPU threads; devices guard their own state.
public protocol PCIDevice: AnyObject, Sendable {
    /// A read of `size` bytes (1, 2 or 4) of configuration space at `offset` (0–4095).
    func configurationRead(offset: Int, size: Int) -> UInt32
    func configurationWrite(offset: Int, size: Int, value: UInt32)
    /// The BARs that currently decode memory: (BAR index, guest-physical range).
    func decodedBARs() -> [(index: Int, start: UInt64, size: UInt64)]
    func barRead(index: Int, offset: UInt64, size: Int) -> [UInt8]
    func barWrite(index: Int, offset: UInt64, data: [UInt8])
}

/// PCI bus 0 behind a host bridge: configuration mechanism #1 (an address register at port
/// 0xCF8 and a data window at 0xCFC–0xCFF) and the enhanced configuration access mechanism
/// (ECAM, one 4 KiB page of memory per function), and the BARs of its devices on the memory bus.
/// Slot 0 is the host bridge; devices take slots 1 and up, function 0.
public final class PCIBus: PortIODevice, Sendable {
    /// Configuration mechanism #1.
    public static let ports: ClosedRange<UInt16> = 0xCF8...0xCFF
    /// ECAM for bus 0: 32 devices × 8 functions × 4 KiB.
    public static let ecamBase: UInt64 = 0xE000_0000
    public static let ecamSize: UInt64 = 1 << 20
    /// Where the VMM places 32-bit BARs: from the start of the MMIO hole up to the ECAM window.
    public static let barWindow: Range<UInt64> = 0xC000_0000..<0xE000_0000
    public static let slotCount = 32

    /// The IOAPIC pin of a slot's INTA#: pins 16–23, past the ISA IRQs, in turn (slots 1 and 9
    /// share pin 16). The MP table says so, and the interrupt line register holds it.
    public static func interruptPin(slot: Int) -> UInt32 {
        16 + UInt32((slot - 1) % 8)
    }

    private let devices: [any PCIDevice]
    private let address = Mutex<UInt32>(0)

    /// The slot of the `index`th device: the host bridge takes slot 0.
    public static func slot(ofDevice index: Int) -> Int { index + 1 }

    /// `devices[0]` goes in slot 1, and so on; the host bridge takes slot 0.
    public init(devices: [any PCIDevice]) {
        precondition(devices.count < Self.slotCount)
        self.devices = [PCIHostBridge()] + devices
    }

    private func device(slot: Int, function: Int) -> (any PCIDevice)? {
        function == 0 && slot < devices.count ? devices[slot] : nil
    }

    // MARK: Configuration mechanism #1

    public func read(offset: UInt16, size: Int) -> [UInt8] {
        let value: UInt32
        if offset < 4 {
            value = address.withLock { $0 } >> (8 * UInt32(offset))
        } else {
            let target = address.withLock { $0 }
            value = configurationRead(target: target, byte: Int(offset - 4), size: size)
        }
        return (0..<size).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }
    }

    public func write(offset: UInt16, data: [UInt8]) {
        var value: UInt32 = 0
        for (i, byte) in data.enumerated() { value |= UInt32(byte) << (8 * i) }
        if offset < 4 {
            // Only whole-register writes change the address (a byte write to 0xCFB is legacy
            // mechanism #2's, which this bus does not have).
            if offset == 0, data.count == 4 { address.withLock { $0 = value } }
            return
        }
        let target = address.withLock { $0 }
        guard target & 0x8000_0000 != 0, (target >> 16) & 0xFF == 0 else { return }
        let slot = Int(target >> 11) & 0x1F, function = Int(target >> 8) & 0x7
        device(slot: slot, function: function)?.configurationWrite(offset: Int(target & 0xFC) + Int(offset - 4),
                                                                   size: data.count, value: value)
    }

    private func configurationRead(target: UInt32, byte: Int, size: Int) -> UInt32 {
        guard target & 0x8000_0000 != 0, (target >> 16) & 0xFF == 0,
              let device = device(slot: Int(target >> 11) & 0x1F, function: Int(target >> 8) & 0x7)
        else { return 0xFFFF_FFFF }
        return device.configurationRead(offset: Int(target & 0xFC) + byte, size: size)
    }

    // MARK: Memory: ECAM and BARs

    /// Handles an MMIO access if it falls in ECAM or a device's BAR; returns false otherwise. For
    /// a read, `data` is replaced by the bytes read.
    public func handleMemory(address: UInt64, isWrite: Bool, data: inout [UInt8]) -> Bool {
        if address >= Self.ecamBase, address < Self.ecamBase + Self.ecamSize {
            let offset = address - Self.ecamBase
            let slot = Int(offset >> 15), function = Int(offset >> 12) & 0x7, register = Int(offset & 0xFFF)
            let device = device(slot: slot, function: function)
            if isWrite {
                var value: UInt32 = 0
                for (i, byte) in data.prefix(4).enumerated() { value |= UInt32(byte) << (8 * i) }
                device?.configurationWrite(offset: register, size: min(data.count, 4), value: value)
            } else {
                let value = device?.configurationRead(offset: register, size: min(data.count, 4)) ?? 0xFFFF_FFFF
                data = (0..<data.count).map { UInt8(truncatingIfNeeded: value >> (8 * min($0, 3))) }
            }
            return true
        }
        for device in devices {
            for bar in device.decodedBARs() where address >= bar.start && address - bar.start < bar.size {
                if isWrite {
                    device.barWrite(index: bar.index, offset: address - bar.start, data: data)
                } else {
                    data = device.barRead(index: bar.index, offset: address - bar.start, size: data.count)
                }
                return true
            }
        }
        return false
    }
}

/// Slot 0: a host bridge with no BARs, so that bus scans find a bus.
final class PCIHostBridge: PCIDevice {
    private let header = PCIConfigurationHeader(vendor: 0x8086, device: 0x0D57, classCode: 0x06_00_00)

    func configurationRead(offset: Int, size: Int) -> UInt32 {
        offset < PCIConfigurationHeader.size ? header.read(offset: offset, size: size) : 0
    }

    func configurationWrite(offset: Int, size: Int, value: UInt32) {}
    func decodedBARs() -> [(index: Int, start: UInt64, size: UInt64)] { [] }
    func barRead(index: Int, offset: UInt64, size: Int) -> [UInt8] { [UInt8](repeating: 0xFF, count: size) }
    func barWrite(index: Int, offset: UInt64, data: [UInt8]) {}
}

/// Hands out guest-physical addresses for BARs, each aligned to its size: small ones in the
/// 32-bit window, large ones (over 256 MiB) above the end of RAM.
public struct BARAllocator: Sendable {
    private var next32: UInt64 = PCIBus.barWindow.lowerBound
    private var next64: UInt64

    public init(endOfRAM: UInt64) {
        next64 = max(endOfRAM, GuestRAMLayout.highMemoryStart)
    }

    public mutating func allocate(size: UInt64) throws(MachineError) -> UInt64 {
        func aligned(_ address: UInt64) -> UInt64 { (address + size - 1) & ~(size - 1) }
        if size <= 256 << 20 {
            let start = aligned(next32)
            if start + size <= PCIBus.barWindow.upperBound {
                next32 = start + size
                return start
            }
        }
        let start = aligned(next64)
        next64 = start + size
        return start
    }
}
