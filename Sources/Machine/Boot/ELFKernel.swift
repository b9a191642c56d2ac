/// An x86-64 ELF kernel with a PVH entry point: the Xen `PHYS32_ENTRY` note, as Linux's `vmlinux`
/// (CONFIG_PVH) and Ferry's test guest carry it.
public struct ELFKernel: Equatable, Sendable {
    /// One `PT_LOAD` segment: file bytes to copy to a guest-physical address, then zeros up to `memorySize`.
    public struct Segment: Equatable, Sendable {
        public var physicalAddress: UInt64
        public var fileOffset: Int
        public var fileSize: Int
        public var memorySize: UInt64
    }

    public var segments: [Segment]
    /// The 32-bit physical entry point from the PVH note.
    public var pvhEntry: UInt32

    /// The first byte past the highest segment.
    public var end: UInt64 { segments.map { $0.physicalAddress + $0.memorySize }.max() ?? 0 }

    static let magic: [UInt8] = [0x7F, 0x45, 0x4C, 0x46] // "\x7fELF"
    static let class64: UInt8 = 2                          // ELFCLASS64
    static let littleEndian: UInt8 = 1                     // ELFDATA2LSB
    static let machineX86_64: UInt16 = 62                  // EM_X86_64
    static let programHeaderLoad: UInt32 = 1               // PT_LOAD
    static let programHeaderNote: UInt32 = 4               // PT_NOTE
    static let programHeaderSize = 56                      // sizeof(Elf64_Phdr)
    static let xenNoteName: [UInt8] = Array("Xen\0".utf8)  // owner of Xen ELF notes
    static let xenNotePhys32Entry: UInt32 = 18             // XEN_ELFNOTE_PHYS32_ENTRY (xen/include/public/elfnote.h)

    public static func isELF(_ image: [UInt8]) -> Bool {
        image.starts(with: magic)
    }

    /// Parses an ELF64 x86-64 image; every offset and size is checked against the image.
    public init(parsing image: [UInt8]) throws {
        guard Self.isELF(image), image.count >= 64 else { throw MachineError("kernel is not an ELF file") }
        guard image[4] == Self.class64, image[5] == Self.littleEndian else {
            throw MachineError("kernel ELF is not 64-bit little-endian; Ferry boots x86-64 ELF kernels")
        }
        guard image.littleEndian(UInt16.self, at: 18) == Self.machineX86_64 else {
            throw MachineError("kernel ELF is not for x86-64")
        }
        guard let headerOffset = image.littleEndian(UInt64.self, at: 32),
              let headerSize = image.littleEndian(UInt16.self, at: 54),
              let headerCount = image.littleEndian(UInt16.self, at: 56),
              Int(headerSize) >= Self.programHeaderSize
        else { throw MachineError("kernel ELF has a malformed header") }

        var segments: [Segment] = []
        var entry: UInt32?
        for index in 0..<Int(headerCount) {
            let base = Int(clamping: headerOffset) + index * Int(headerSize)
            guard let type = image.littleEndian(UInt32.self, at: base),
                  let offset = image.littleEndian(UInt64.self, at: base + 8),
                  let physical = image.littleEndian(UInt64.self, at: base + 24),
                  let fileSize = image.littleEndian(UInt64.self, at: base + 32),
                  let memorySize = image.littleEndian(UInt64.self, at: base + 40)
            else { throw MachineError("kernel ELF program header \(index) lies outside the file") }
            guard offset <= UInt64(image.count), fileSize <= UInt64(image.count) - offset, fileSize <= memorySize else {
                throw MachineError("kernel ELF segment \(index) lies outside the file")
            }
            switch type {
            case Self.programHeaderLoad:
                segments.append(Segment(physicalAddress: physical, fileOffset: Int(offset),
                                        fileSize: Int(fileSize), memorySize: memorySize))
            case Self.programHeaderNote:
                entry = entry ?? Self.pvhEntry(inNotes: image[Int(offset)..<Int(offset + fileSize)])
            default:
                continue
            }
        }
        guard let entry else {
            throw MachineError("kernel ELF has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build Linux with CONFIG_PVH=y")
        }
        guard !segments.isEmpty else { throw MachineError("kernel ELF has no loadable segment") }
        self.segments = segments
        self.pvhEntry = entry
    }

    /// Walks a note segment for the Xen PHYS32_ENTRY note.
    static func pvhEntry(inNotes notes: ArraySlice<UInt8>) -> UInt32? {
        let bytes = Array(notes)
        var cursor = 0
        func aligned(_ value: Int) -> Int { (value + 3) & ~3 }
        while cursor + 12 <= bytes.count {
            guard let nameSize = bytes.littleEndian(UInt32.self, at: cursor),
                  let descriptionSize = bytes.littleEndian(UInt32.self, at: cursor + 4),
                  let type = bytes.littleEndian(UInt32.self, at: cursor + 8)
            else { return nil }
            let nameStart = cursor + 12
            let descriptionStart = nameStart + aligned(Int(nameSize))
            let next = descriptionStart + aligned(Int(descriptionSize))
            guard next <= bytes.count, next > cursor else { return nil }
            if type == xenNotePhys32Entry, Array(bytes[nameStart..<nameStart + Int(nameSize)]) == xenNoteName,
               descriptionSize >= 4 {
                return bytes.littleEndian(UInt32.self, at: descriptionStart)
            }
            cursor = next
        }
        return nil
    }
}
