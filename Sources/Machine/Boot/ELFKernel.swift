import HostOS

/// An x86-64 ELF kernel with a PVH entry point: the Xen `PHYS32_ENTRY` note, as Linux's `vmlinux`
/// (CONFIG_PVH) and Ferry's test guest carry it.
///
/// Every offset, size and address in the file is untrusted: each is checked against the file
/// and the address space with arithmetic that cannot overflow, and a malformed image is refused
/// with an `invalidImage` error naming the field.
public struct ELFKernel: Equatable, Sendable {
    /// One `PT_LOAD` segment: file bytes to copy to a guest-physical address, then zeros up to
    /// `memorySize`. `fileRange` lies inside the file and `physicalAddress + memorySize` does not
    /// overflow.
    public struct Segment: Equatable, Sendable {
        public var physicalAddress: UInt64
        public var fileRange: Range<Int>
        public var memorySize: UInt64

        public var end: UInt64 { physicalAddress + memorySize }
    }

    public var segments: [Segment]
    /// The 32-bit physical entry point from the PVH note.
    public var pvhEntry: UInt32

    /// The first byte past the highest segment.
    public var end: UInt64 { segments.map(\.end).max() ?? 0 }

    static let magic: [UInt8] = [0x7F, 0x45, 0x4C, 0x46] // "\x7fELF"
    static let class64: UInt8 = 2                          // ELFCLASS64
    static let littleEndian: UInt8 = 1                     // ELFDATA2LSB
    static let machineX86_64: UInt16 = 62                  // EM_X86_64
    static let programHeaderLoad: UInt32 = 1               // PT_LOAD
    static let programHeaderNote: UInt32 = 4               // PT_NOTE
    static let fileHeaderSize = 64                         // sizeof(Elf64_Ehdr)
    static let programHeaderSize = 56                      // sizeof(Elf64_Phdr)
    static let xenNoteName: [UInt8] = Array("Xen\0".utf8)  // owner of Xen ELF notes
    static let xenNotePhys32Entry: UInt32 = 18             // XEN_ELFNOTE_PHYS32_ENTRY (xen/include/public/elfnote.h)
    static let noteHeaderSize = 12                         // namesz, descsz, type

    public static func isELF(_ image: [UInt8]) -> Bool {
        image.starts(with: magic)
    }

    /// Parses an ELF64 x86-64 image.
    public init(parsing image: [UInt8]) throws(MachineError) {
        guard Self.isELF(image), image.count >= Self.fileHeaderSize else { throw Self.invalid("is not an ELF file") }
        guard image[4] == Self.class64, image[5] == Self.littleEndian else {
            throw Self.invalid("is not 64-bit little-endian; Ferry boots x86-64 ELF kernels")
        }
        guard image.littleEndian(UInt16.self, at: 18) == Self.machineX86_64 else { throw Self.invalid("is not for x86-64") }
        guard let headerOffset = image.littleEndian(UInt64.self, at: 32),
              let headerSize = image.littleEndian(UInt16.self, at: 54),
              let headerCount = image.littleEndian(UInt16.self, at: 56)
        else { throw Self.invalid("has a truncated file header") }
        guard Int(headerSize) >= Self.programHeaderSize else {
            throw Self.invalid("has program headers of \(headerSize) bytes (e_phentsize); they are at least \(Self.programHeaderSize)")
        }

        var segments: [Segment] = []
        var entry: UInt32?
        for index in 0..<Int(headerCount) {
            let (offsetInTable, overflow) = UInt64(index).multipliedReportingOverflow(by: UInt64(headerSize))
            let (base, overflow2) = headerOffset.addingReportingOverflow(offsetInTable)
            guard !overflow, !overflow2, let headerRange = Self.slice(image, at: base, count: UInt64(Self.programHeaderSize)) else {
                throw Self.invalid("program header \(index) (at file offset e_phoff 0x\(String(headerOffset, radix: 16)) + \(index) × \(headerSize)) lies outside the file")
            }
            // The header lies inside the image, so these reads cannot fail.
            let header = image[headerRange]
            let type = header.littleEndian(UInt32.self, at: 0) ?? 0
            let offset = header.littleEndian(UInt64.self, at: 8) ?? 0
            let physical = header.littleEndian(UInt64.self, at: 24) ?? 0
            let fileSize = header.littleEndian(UInt64.self, at: 32) ?? 0
            let memorySize = header.littleEndian(UInt64.self, at: 40) ?? 0
            guard type == Self.programHeaderLoad || type == Self.programHeaderNote else { continue }
            guard let fileBytes = Self.slice(image, at: offset, count: fileSize) else {
                throw Self.invalid("segment \(index) (file offset 0x\(String(offset, radix: 16)), \(fileSize) bytes) lies outside the \(image.count)-byte file")
            }
            if type == Self.programHeaderNote {
                entry = entry ?? Self.pvhEntry(inNotes: image[fileBytes])
                continue
            }
            guard fileSize <= memorySize else {
                throw Self.invalid("segment \(index) has more bytes in the file (\(fileSize)) than in memory (\(memorySize))")
            }
            guard !physical.addingReportingOverflow(memorySize).overflow else {
                throw Self.invalid("segment \(index) at 0x\(String(physical, radix: 16)) with \(memorySize) bytes runs past the end of the address space")
            }
            segments.append(Segment(physicalAddress: physical, fileRange: fileBytes, memorySize: memorySize))
        }
        guard let entry else {
            throw Self.invalid("has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build Linux with CONFIG_PVH=y")
        }
        guard !segments.isEmpty else { throw Self.invalid("has no loadable segment") }
        self.segments = segments
        self.pvhEntry = entry
    }

    /// The range of `count` bytes at `offset` of `image`, if they lie inside it.
    static func slice(_ image: [UInt8], at offset: UInt64, count: UInt64) -> Range<Int>? {
        let (end, overflow) = offset.addingReportingOverflow(count)
        guard !overflow, end <= UInt64(image.count) else { return nil }
        return Int(offset)..<Int(end)
    }

    /// Walks a note segment for the Xen PHYS32_ENTRY note; nil if it has none or is malformed.
    static func pvhEntry(inNotes notes: ArraySlice<UInt8>) -> UInt32? {
        let bytes = Array(notes)
        func aligned(_ value: UInt32) -> Int { (Int(value) + 3) & ~3 }
        var cursor = 0
        while cursor + noteHeaderSize <= bytes.count {
            guard let nameSize = bytes.littleEndian(UInt32.self, at: cursor),
                  let descriptionSize = bytes.littleEndian(UInt32.self, at: cursor + 4),
                  let type = bytes.littleEndian(UInt32.self, at: cursor + 8)
            else { return nil }
            // Sizes are 32-bit, so these sums stay far below Int.max.
            let nameStart = cursor + noteHeaderSize
            let descriptionStart = nameStart + aligned(nameSize)
            let next = descriptionStart + aligned(descriptionSize)
            guard next <= bytes.count else { return nil }
            if type == xenNotePhys32Entry, bytes[nameStart..<nameStart + Int(nameSize)].elementsEqual(xenNoteName),
               descriptionSize >= 4 {
                return bytes.littleEndian(UInt32.self, at: descriptionStart)
            }
            cursor = next
        }
        return nil
    }

    static func invalid(_ problem: String) -> MachineError {
        MachineError(.invalidImage, "kernel ELF \(problem)")
    }
}
