import HostOS
import FerryTestSupport
import Foundation
import Testing
@testable import Machine

extension GuestMemory {
    /// Whether every byte of guest RAM equals `other`'s (compared in place, region by region).
    func hasSameContents(as other: GuestMemory) -> Bool {
        guard ranges == other.ranges else { return false }
        return zip(regions, other.regions).allSatisfy { memcmp($0.host, $1.host, Int($0.range.size)) == 0 }
    }
}

@Suite struct MemoryFileTests {
    static let size: UInt64 = 64 << 20
    static let page = MemoryFileFormat.pageSize

    /// 64 MiB of RAM with a few written pages: two adjacent ones, one lone one, and the last page.
    func mostlyZeroMemory(size: UInt64 = MemoryFileTests.size) throws -> GuestMemory {
        let memory = try GuestMemory(ranges: GuestRAMLayout.ranges(size: size))
        try memory.write(Array("first page".utf8), at: 0x1000)
        try memory.fill(0xA5, count: Self.page, at: 0x2000)
        try memory.write(UInt64(0x0123_4567_89AB_CDEF), at: 0x20_0008)
        try memory.write(UInt8(1), at: size - 1)
        return memory
    }

    func savedFile(in directory: TemporaryDirectory) throws -> String {
        let path = directory.path("memory")
        try mostlyZeroMemory().saveToFile(path)
        return path
    }

    func patch(_ path: String, at offset: UInt64, with bytes: [UInt8]) throws {
        let handle = try #require(FileHandle(forUpdatingAtPath: path))
        defer { try? handle.close() }
        try handle.seek(toOffset: offset)
        handle.write(Data(bytes))
    }

    @Test func zeroPagesAreLeftOutSoAMostlyEmptyMemoryMakesASmallFile() throws {
        let directory = try TemporaryDirectory()
        let summary = try mostlyZeroMemory().saveToFile(directory.path("memory"))
        #expect(summary.pages == 4)
        #expect(summary.records == 3, "adjacent pages share a record")
        let fileSize = try FileManager.default.attributesOfItem(atPath: directory.path("memory"))[.size] as? UInt64
        #expect(fileSize == summary.fileSize)
        #expect(summary.fileSize < 5 * UInt64(Self.page), "4 pages of 16384 in a 64 MiB memory")
    }

    @Test func memoryReadBackEqualsTheMemorySaved() throws {
        let directory = try TemporaryDirectory()
        let original = try mostlyZeroMemory()
        let saved = try original.saveToFile(directory.path("memory"))
        let copy = try GuestMemory(ranges: GuestRAMLayout.ranges(size: Self.size))
        let loaded = try copy.loadFromFile(directory.path("memory"))
        #expect(loaded == saved)
        #expect(copy.hasSameContents(as: original))
    }

    /// Also in shared memory (a memory file), where giving pages back takes MADV_REMOVE.
    @Test(arguments: [false, true])
    func pagesTheFileLeavesOutBecomeZero(shared: Bool) throws {
        let directory = try TemporaryDirectory()
        let path = try savedFile(in: directory)
        let copy = try GuestMemory(ranges: GuestRAMLayout.ranges(size: Self.size), shared: shared)
        #expect((copy.backingFile != nil) == shared)
        try copy.fill(0xEE, count: 3 * Self.page, at: 0x10_0000)
        try copy.write(UInt8(7), at: 0)
        try copy.loadFromFile(path)
        #expect(copy.hasSameContents(as: try mostlyZeroMemory()))
    }

    /// Shared memory spanning the hole is one memory file: a second mapping of it (what a local
    /// migration's destination makes) sees the same bytes at the same guest addresses.
    @Test func sharedMemoryMapsTheSameFileTwice() throws {
        let size: UInt64 = GuestRAMLayout.mmioHoleStart + (8 << 20)
        let original = try GuestMemory(ranges: GuestRAMLayout.ranges(size: size), shared: true)
        try original.fill(0x3C, count: Self.page, at: GuestRAMLayout.mmioHoleStart - UInt64(Self.page))
        try original.fill(0xC3, count: Self.page, at: GuestRAMLayout.highMemoryStart + 0x1000)
        let file = try #require(original.backingFile)
        let second = try GuestMemory(ranges: GuestRAMLayout.ranges(size: size), sharedFile: file)
        #expect(try second.read(count: 1, at: GuestRAMLayout.mmioHoleStart - 1) == [0x3C])
        #expect(try second.read(count: 1, at: GuestRAMLayout.highMemoryStart + 0x1000) == [0xC3])
        // A page written through the other mapping is not in this one's page tables, but it is data:
        // a migration or snapshot of `original` must not skip it as zero.
        try second.write(UInt8(0x5A), at: 0x8000)
        #expect(original.nonZeroPages().runs.contains { $0.start <= 0x8000 && 0x8000 < $0.end }, "\(original.nonZeroPages().runs)")
        #expect(try original.read(count: 1, at: 0x8000) == [0x5A], "a write through one mapping shows through the other")
        #expect(original.nonZeroPages().pageCount == 3, "the three pages written, and no other")
        #expect { _ = try GuestMemory(ranges: GuestRAMLayout.ranges(size: size + (64 << 20)), sharedFile: file) } throws: {
            "\($0)".contains("fewer than")
        }
        // A file whose size its owner could still shrink (which would fault the mapping) is refused.
        let directory = try TemporaryDirectory()
        let path = directory.path("ram")
        #expect(FileManager.default.createFile(atPath: path, contents: nil) && truncate(path, off_t(size)) == 0)
        let plain = FileDescriptor(open(path, O_RDWR | O_CLOEXEC))
        #expect { _ = try GuestMemory(ranges: GuestRAMLayout.ranges(size: size), sharedFile: plain) } throws: {
            "\($0)".contains("sealed")
        }
    }

    @Test func memorySpanningTheMMIOHoleRoundTrips() throws {
        let size: UInt64 = GuestRAMLayout.mmioHoleStart + (8 << 20)
        let directory = try TemporaryDirectory()
        let original = try GuestMemory(ranges: GuestRAMLayout.ranges(size: size))
        try original.fill(0x3C, count: 2 * Self.page, at: GuestRAMLayout.mmioHoleStart - UInt64(2 * Self.page))
        try original.fill(0xC3, count: Self.page, at: GuestRAMLayout.highMemoryStart + 0x1000)
        let summary = try original.saveToFile(directory.path("memory"))
        #expect(summary.records == 2 && summary.pages == 3)
        let copy = try GuestMemory(ranges: GuestRAMLayout.ranges(size: size))
        try copy.loadFromFile(directory.path("memory"))
        #expect(copy.hasSameContents(as: original))
    }

    @Test(arguments: [1, 17, 24, 4096])
    func truncatedFileIsRefused(cut: Int) throws {
        let directory = try TemporaryDirectory()
        let path = try savedFile(in: directory)
        let size = try #require(FileManager.default.attributesOfItem(atPath: path)[.size] as? Int)
        #expect(truncate(path, off_t(size - cut)) == 0)
        let copy = try GuestMemory(ranges: GuestRAMLayout.ranges(size: Self.size))
        #expect { try copy.loadFromFile(path) } throws: { "\($0)".contains("truncated") }
    }

    @Test func emptyFileIsRefusedAsTruncated() throws {
        let directory = try TemporaryDirectory()
        #expect(FileManager.default.createFile(atPath: directory.path("empty"), contents: Data()))
        let memory = try GuestMemory(ranges: GuestRAMLayout.ranges(size: Self.size))
        #expect { try memory.loadFromFile(directory.path("empty")) } throws: { "\($0)".contains("truncated") }
    }

    @Test func trailingBytesAreRefused() throws {
        let directory = try TemporaryDirectory()
        let path = try savedFile(in: directory)
        let handle = try #require(FileHandle(forWritingAtPath: path))
        handle.seekToEndOfFile()
        handle.write(Data([0]))
        try handle.close()
        let copy = try GuestMemory(ranges: GuestRAMLayout.ranges(size: Self.size))
        #expect { try copy.loadFromFile(path) } throws: { "\($0)".contains("bytes after its trailer") }
    }

    /// Header fields, each corrupted, and what the refusal must say.
    @Test(arguments: [
        (0, [UInt8(ascii: "X")], "not a Ferry memory file"),
        (8, [2, 0, 0, 0], "format version 2"),
        (12, [0, 0x20, 0, 0], "8192-byte pages"),
        (16, [0, 0, 0, 8], "holds 128 MiB"),
        (24, [2, 0, 0, 0], "describes 2 RAM ranges"),
        (32, [0, 0x10, 0, 0], "RAM range 0 is 0x1000"),
    ] as [(UInt64, [UInt8], String)])
    func corruptedHeaderIsRefusedSayingWhichField(offset: UInt64, bytes: [UInt8], message: String) throws {
        let directory = try TemporaryDirectory()
        let path = try savedFile(in: directory)
        try patch(path, at: offset, with: bytes)
        let copy = try GuestMemory(ranges: GuestRAMLayout.ranges(size: Self.size))
        #expect { try copy.loadFromFile(path) } throws: { error in
            "\(error)".contains(message)
        }
    }

    @Test func fileOfAnotherMemorySizeIsRefused() throws {
        let directory = try TemporaryDirectory()
        let path = try savedFile(in: directory)
        let bigger = try GuestMemory(ranges: GuestRAMLayout.ranges(size: 2 * Self.size))
        #expect { try bigger.loadFromFile(path) } throws: { "\($0)".contains("this machine has 128 MiB") }
    }

    @Test func corruptedPageIsCaughtByTheChecksum() throws {
        let directory = try TemporaryDirectory()
        let path = try savedFile(in: directory)
        let firstPageData = UInt64(MemoryFileFormat.fixedHeaderSize + MemoryFileFormat.rangeEntrySize + MemoryFileFormat.recordHeaderSize)
        try patch(path, at: firstPageData + 100, with: [0xFF])
        let copy = try GuestMemory(ranges: GuestRAMLayout.ranges(size: Self.size))
        #expect { try copy.loadFromFile(path) } throws: { "\($0)".contains("checksum") }
    }

    /// A file written by hand: the right header for 64 MiB, then one record.
    func handMadeFile(in directory: TemporaryDirectory, address: UInt64, pages: UInt64, dataPages: Int = 1) throws -> String {
        var bytes = LittleEndianBytes()
        bytes.append(MemoryFileFormat.magic)
        bytes.append(MemoryFileFormat.version)
        bytes.append(UInt32(Self.page))
        bytes.append(Self.size)
        bytes.append(UInt32(1))
        bytes.append(UInt32(0))
        bytes.append(UInt64(0))
        bytes.append(Self.size)
        bytes.append(address)
        bytes.append(pages)
        bytes.append([UInt8](repeating: 0x77, count: dataPages * Self.page))
        let path = directory.path("handmade")
        #expect(FileManager.default.createFile(atPath: path, contents: Data(bytes.bytes)))
        return path
    }

    @Test(arguments: [
        (MemoryFileTests.size, 1),                  // just past the end of RAM
        (MemoryFileTests.size - 4096, 2),           // starts inside, ends outside
        (0xFFFF_F000, 1),                           // in the MMIO hole
        (0x1000, UInt64.max / 4096 + 1),            // page count whose byte count overflows
        (0x1800, 1),                                // not page-aligned
        (0x1000, 0),                                // empty record
    ] as [(UInt64, UInt64)])
    func recordOutsideGuestRAMIsRefusedBeforeAnyByteIsWritten(address: UInt64, pages: UInt64) throws {
        let directory = try TemporaryDirectory()
        let path = try handMadeFile(in: directory, address: address, pages: pages)
        let memory = try GuestMemory(ranges: GuestRAMLayout.ranges(size: Self.size))
        try memory.write(UInt64(0x5555), at: Self.size - 8)
        #expect { try memory.loadFromFile(path) } throws: { error in
            "\(error)".contains("record 0") && "\(error)".contains("not a page-aligned range of guest RAM")
        }
        #expect(try memory.read(UInt64.self, at: Self.size - 8) == 0x5555, "nothing was read into RAM")
    }

    @Test func recordsOutOfOrderAreRefused() throws {
        let directory = try TemporaryDirectory()
        let original = try GuestMemory(ranges: GuestRAMLayout.ranges(size: Self.size))
        try original.fill(1, count: Self.page, at: 0x1000)
        try original.fill(2, count: Self.page, at: 0x5000)
        let path = directory.path("memory")
        try original.saveToFile(path)
        // The second record's address moves below the first's.
        let secondRecord = UInt64(MemoryFileFormat.fixedHeaderSize + MemoryFileFormat.rangeEntrySize
                                  + MemoryFileFormat.recordHeaderSize + Self.page)
        try patch(path, at: secondRecord, with: [0, 0, 0, 0, 0, 0, 0, 0])
        let copy = try GuestMemory(ranges: GuestRAMLayout.ranges(size: Self.size))
        #expect { try copy.loadFromFile(path) } throws: { "\($0)".contains("record 1") }
    }

    @Test func missingFileIsRefusedNamingIt() throws {
        let memory = try GuestMemory(ranges: GuestRAMLayout.ranges(size: Self.size))
        #expect { try memory.loadFromFile("/nonexistent/ferry-memory") } throws: { "\($0)".contains("/nonexistent/ferry-memory") }
    }
}
