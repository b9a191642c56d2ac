/// The first 64 bytes of a type-0 PCI function's configuration space plus the capability area
/// after it (PCI Local Bus Specification 3.0, chapter 6): identification, the command register,
/// the base address registers (BARs) and the interrupt line. Devices own one and hand it every
/// configuration access; the parts a device defines itself (its capabilities) it handles before
/// or after calling `write`.
public struct PCIConfigurationHeader: Codable, Equatable, Sendable {
    public static let size = 256

    /// A memory BAR: its size (a power of two, at least 4 KiB here) and whether it takes two
    /// registers (64-bit addresses).
    public struct BAR: Codable, Equatable, Sendable {
        public var index: Int
        public var size: UInt64
        public var is64Bit: Bool
    }

    enum Offset {
        static let vendor = 0x00, device = 0x02, command = 0x04, status = 0x06, revision = 0x08
        static let classCode = 0x09, headerType = 0x0E, bar0 = 0x10, subsystemVendor = 0x2C
        static let subsystem = 0x2E, capabilities = 0x34, interruptLine = 0x3C, interruptPin = 0x3D
    }

    static let commandMemory: UInt16 = 1 << 1
    static let commandBusMaster: UInt16 = 1 << 2
    static let commandINTxDisable: UInt16 = 1 << 10
    /// Command bits a guest may set: I/O and memory decode, bus master, SERR, INTx disable.
    static let commandWritable: UInt16 = 0x0001 | commandMemory | commandBusMaster | 0x0100 | commandINTxDisable
    static let statusCapabilities: UInt16 = 1 << 4

    public private(set) var bytes: [UInt8]
    public let bars: [BAR]

    public init(vendor: UInt16, device: UInt16, classCode: UInt32, revision: UInt8 = 0, subsystemVendor: UInt16 = 0,
                subsystem: UInt16 = 0, interruptPin: UInt8 = 0, bars: [BAR] = []) {
        bytes = [UInt8](repeating: 0, count: Self.size)
        self.bars = bars
        put(vendor, at: Offset.vendor)
        put(device, at: Offset.device)
        bytes[Offset.revision] = revision
        put(UInt16(truncatingIfNeeded: classCode), at: Offset.classCode)   // programming interface, subclass
        bytes[Offset.classCode + 2] = UInt8(truncatingIfNeeded: classCode >> 16)
        put(subsystemVendor, at: Offset.subsystemVendor)
        put(subsystem, at: Offset.subsystem)
        bytes[Offset.interruptPin] = interruptPin
        bytes[Offset.interruptLine] = 0xFF   // unknown until a guest or firmware writes it
        for bar in bars {
            let register = Offset.bar0 + 4 * bar.index
            put(UInt32(bar.is64Bit ? 0b100 : 0), at: register)
        }
    }

    // MARK: Reading and writing

    /// `size` bytes (1, 2 or 4) at `offset`, little-endian.
    public func read(offset: Int, size: Int) -> UInt32 {
        guard offset >= 0, offset + size <= Self.size else { return 0xFFFF_FFFF }
        var value: UInt32 = 0
        for byte in 0..<size { value |= UInt32(bytes[offset + byte]) << (8 * byte) }
        return value
    }

    /// A guest's write: only the command register, the BARs and the interrupt line change, each
    /// within its writable bits; everything else is read-only.
    public mutating func write(offset: Int, size: Int, value: UInt32) {
        for byte in 0..<size {
            let at = offset + byte
            let new = UInt8(truncatingIfNeeded: value >> (8 * byte))
            switch at {
            case Offset.command, Offset.command + 1:
                let mask = UInt8(truncatingIfNeeded: Self.commandWritable >> (8 * (at - Offset.command)))
                bytes[at] = (bytes[at] & ~mask) | (new & mask)
            case Offset.bar0..<(Offset.bar0 + 24):
                writeBAR(byteOffset: at - Offset.bar0, value: new)
            case Offset.interruptLine:
                bytes[at] = new
            default:
                break
            }
        }
    }

    /// One byte of a BAR register: the address bits below the BAR's size stay zero, the type bits
    /// stay as the device set them, so writing all ones and reading back tells the size.
    private mutating func writeBAR(byteOffset: Int, value: UInt8) {
        let register = byteOffset / 4
        let shift = UInt64(8 * (byteOffset % 4))
        for bar in bars {
            let upper = bar.is64Bit && register == bar.index + 1
            guard register == bar.index || upper else { continue }
            let bitShift = shift + (upper ? 32 : 0)
            let mask = ~(bar.size - 1) & ~UInt64(0xF)
            let maskByte = UInt8(truncatingIfNeeded: mask >> bitShift)
            let at = Offset.bar0 + byteOffset
            bytes[at] = (bytes[at] & ~maskByte) | (value & maskByte)
            return
        }
    }

    // MARK: Fields

    public var command: UInt16 { UInt16(truncatingIfNeeded: read(offset: Offset.command, size: 2)) }
    public var decodesMemory: Bool { command & Self.commandMemory != 0 }
    public var interruptLine: UInt8 { bytes[Offset.interruptLine] }

    /// The guest-physical address a BAR is placed at (zero when unplaced).
    public func address(ofBAR index: Int) -> UInt64 {
        guard let bar = bars.first(where: { $0.index == index }) else { return 0 }
        var address = UInt64(read(offset: Offset.bar0 + 4 * index, size: 4) & ~0xF)
        if bar.is64Bit { address |= UInt64(read(offset: Offset.bar0 + 4 * (index + 1), size: 4)) << 32 }
        return address
    }

    /// Places a BAR, as firmware would before the guest runs.
    public mutating func place(bar index: Int, at address: UInt64) {
        let register = Offset.bar0 + 4 * index
        put(UInt32(truncatingIfNeeded: address) | UInt32(bytes[register] & 0xF), at: register)
        if bars.first(where: { $0.index == index })?.is64Bit == true {
            put(UInt32(truncatingIfNeeded: address >> 32), at: register + 4)
        }
    }

    /// Lets the device set its own read-only fields (capabilities) at `offset`.
    public mutating func put<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        for byte in 0..<MemoryLayout<T>.size { bytes[offset + byte] = UInt8(truncatingIfNeeded: value >> (8 * byte)) }
    }

    /// Adds a capability list: each capability's bytes (from its length field on, the id and
    /// next pointer are filled in here) placed one after another from `start`. Returns each
    /// capability's offset.
    public mutating func setCapabilities(_ capabilities: [(id: UInt8, body: [UInt8])], start: Int = 0x40) -> [Int] {
        var offsets: [Int] = []
        var at = start
        for (index, capability) in capabilities.enumerated() {
            offsets.append(at)
            let length = 2 + capability.body.count
            let next = index + 1 < capabilities.count ? (at + length + 3) & ~3 : 0
            bytes[at] = capability.id
            bytes[at + 1] = UInt8(next)
            for (i, byte) in capability.body.enumerated() { bytes[at + 2 + i] = byte }
            at = next
        }
        if !offsets.isEmpty {
            bytes[Offset.capabilities] = UInt8(start)
            put(UInt16(read(offset: Offset.status, size: 2)) | Self.statusCapabilities, at: Offset.status)
        }
        return offsets
    }

    /// Restores the bytes of a saved header, refusing one of another device.
    public mutating func restore(_ saved: PCIConfigurationHeader) throws(MachineError) {
        guard saved.bytes.count == Self.size, saved.bars == bars,
              saved.read(offset: Offset.vendor, size: 4) == read(offset: Offset.vendor, size: 4)
        else {
            throw MachineError(.invalidState, "the saved PCI configuration space is of another device")
        }
        bytes = saved.bytes
    }
}
