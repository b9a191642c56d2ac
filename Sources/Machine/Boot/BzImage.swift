import HostOS

/// A Linux bzImage, booted through the 64-bit entry of the Linux x86 boot protocol
/// (Documentation/arch/x86/boot.rst).
public struct BzImage: Equatable, Sendable {
    /// The setup header, copied into the zero page at the same offset.
    public var setupHeader: [UInt8]
    /// File offset of the protected-mode kernel (after the real-mode setup sectors).
    public var kernelOffset: Int
    /// Highest address the initrd may end at, minus one (`initrd_addr_max`).
    public var initrdAddressMax: UInt32
    /// Memory the kernel needs from its load address while it decompresses itself (`init_size`).
    public var initSize: UInt32

    static let bootFlagOffset = 0x1FE          // boot_flag: 0xAA55
    static let bootFlag: UInt16 = 0xAA55
    static let headerMagicOffset = 0x202       // header: "HdrS"
    static let headerMagic: UInt32 = 0x5372_6448
    static let jumpDisplacementOffset = 0x201  // the second byte of the jump at 0x200: the header's length past 0x202
    static let setupHeaderStart = 0x1F1        // first byte of struct setup_header
    static let setupSectorsOffset = 0x1F1      // setup_sects
    static let defaultSetupSectors = 4         // setup_sects of 0 means 4
    static let versionOffset = 0x206           // version
    static let minimumVersion: UInt16 = 0x020C // 2.12: xloadflags and the 64-bit entry
    static let xloadflagsOffset = 0x236
    static let xloadflagsKernel64: UInt16 = 1 << 0 // XLF_KERNEL_64: has the 64-bit entry at +0x200
    static let initrdAddressMaxOffset = 0x22C
    static let defaultInitrdAddressMax: UInt32 = 0x37FF_FFFF // boot protocols before 2.03
    static let initSizeOffset = 0x260
    static let sectorSize = 512
    /// Offset of the 64-bit entry point from the protected-mode kernel's load address.
    public static let entry64Offset: UInt64 = 0x200

    public static func isBzImage(_ image: [UInt8]) -> Bool {
        image.littleEndian(UInt16.self, at: bootFlagOffset) == bootFlag
            && image.littleEndian(UInt32.self, at: headerMagicOffset) == headerMagic
    }

    public init(parsing image: [UInt8]) throws(MachineError) {
        guard Self.isBzImage(image) else { throw Self.invalid("has no boot flag and HdrS magic") }
        guard let version = image.littleEndian(UInt16.self, at: Self.versionOffset), version >= Self.minimumVersion else {
            throw Self.invalid("speaks a boot protocol older than 2.12; Ferry needs its 64-bit entry point")
        }
        guard let xloadflags = image.littleEndian(UInt16.self, at: Self.xloadflagsOffset),
              xloadflags & Self.xloadflagsKernel64 != 0
        else { throw Self.invalid("has no 64-bit entry point (XLF_KERNEL_64 is not set)") }
        // isBzImage read the magic at 0x202, so the byte at 0x201 exists.
        let headerEnd = Self.headerMagicOffset + Int(image[Self.jumpDisplacementOffset])
        var setupSectors = Int(image[Self.setupSectorsOffset])
        if setupSectors == 0 { setupSectors = Self.defaultSetupSectors }
        let kernelOffset = (setupSectors + 1) * Self.sectorSize
        guard headerEnd <= image.count, kernelOffset < image.count else {
            throw Self.invalid("is truncated: its setup header or kernel lies past the end of the \(image.count)-byte file")
        }
        setupHeader = Array(image[Self.setupHeaderStart..<headerEnd])
        self.kernelOffset = kernelOffset
        initrdAddressMax = image.littleEndian(UInt32.self, at: Self.initrdAddressMaxOffset) ?? Self.defaultInitrdAddressMax
        initSize = image.littleEndian(UInt32.self, at: Self.initSizeOffset) ?? 0
    }

    static func invalid(_ problem: String) -> MachineError {
        MachineError(.invalidImage, "kernel bzImage \(problem)")
    }
}
