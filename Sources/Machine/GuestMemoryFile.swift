#if canImport(Glibc)
import Glibc
#endif

/// What a memory file holds, as `GuestMemory.saveToFile(_:)` wrote it or `loadFromFile(_:)` read it.
public struct MemoryFileSummary: Equatable, Sendable {
    /// Runs of consecutive non-zero pages.
    public var records: Int
    /// Pages stored (the others are all zero).
    public var pages: Int
    /// Size of the file.
    public var fileSize: UInt64
}

/// The Ferry memory file: guest RAM saved sparsely, pages that are all zero left out.
///
/// All integers are little-endian.
///
///     header    magic "FERRYMEM" (8 bytes), format version u32 (1), page size u32 (4096),
///               RAM size u64, RAM range count u32, reserved u32 (0),
///               then per RAM range: guest-physical start u64, size u64
///     records   guest-physical address u64, page count u64 (≥ 1), then page count × 4096 bytes
///     end mark  address 0xFFFF_FFFF_FFFF_FFFF, page count 0
///     trailer   record count u64, page count u64, checksum u64
///
/// Records are in ascending address order, do not overlap, and each lies inside one RAM range;
/// pages no record covers are zero. The checksum is FNV-1a over the 64-bit little-endian words of
/// every record's address, page count and bytes, in file order. A reader refuses a file whose RAM
/// layout differs from its memory's, and checks every record against the layout before it reads
/// a byte into guest RAM.
enum MemoryFileFormat {
    static let magic: [UInt8] = Array("FERRYMEM".utf8)
    static let version: UInt32 = 1
    static let pageSize = 4096
    static let endMark = UInt64.max
    static let fixedHeaderSize = 32
    static let rangeEntrySize = 16
    static let recordHeaderSize = 16
    static let trailerSize = 24
    /// The largest record a writer makes: long runs are split so that one `write` stays bounded.
    static let maximumPagesPerRecord = 16384
    /// FNV-1a 64-bit offset basis and prime (Fowler–Noll–Vo, "FNV-1a").
    static let checksumBasis: UInt64 = 0xCBF2_9CE4_8422_2325
    static let checksumPrime: UInt64 = 0x0000_0100_0000_01B3
}

/// FNV-1a over 64-bit words.
struct MemoryFileChecksum {
    private(set) var value = MemoryFileFormat.checksumBasis

    mutating func add(_ word: UInt64) {
        value = (value ^ word) &* MemoryFileFormat.checksumPrime
    }

    /// Adds `bytes`, whose count is a multiple of 8, word by word.
    mutating func add(_ bytes: UnsafeRawBufferPointer) {
        guard let base = bytes.baseAddress else { return }
        var hash = value
        for offset in stride(from: 0, to: bytes.count, by: 8) {
            hash = (hash ^ UInt64(littleEndian: base.loadUnaligned(fromByteOffset: offset, as: UInt64.self)))
                &* MemoryFileFormat.checksumPrime
        }
        value = hash
    }
}

extension GuestMemory {
    /// Writes guest RAM to a new file at `path` (replacing any file there) in the memory file format
    /// above, straight from the guest's mapping. The guest must not run meanwhile.
    @discardableResult
    public func saveToFile(_ path: String) throws -> MemoryFileSummary {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw MachineError("cannot create memory file \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let file = MemoryFileIO(fd: fd, path: path)

        var header = LittleEndianBytes()
        header.append(MemoryFileFormat.magic)
        header.append(MemoryFileFormat.version)
        header.append(UInt32(MemoryFileFormat.pageSize))
        header.append(size)
        header.append(UInt32(regions.count))
        header.append(UInt32(0))
        for region in regions {
            header.append(region.range.start)
            header.append(region.range.size)
        }
        try file.write(header.bytes)

        var checksum = MemoryFileChecksum()
        var records = 0
        var pages = 0
        let pageSize = MemoryFileFormat.pageSize
        let zeroPage = UnsafeMutableRawPointer.allocate(byteCount: pageSize, alignment: pageSize)
        defer { zeroPage.deallocate() }
        zeroPage.initializeMemory(as: UInt8.self, repeating: 0, count: pageSize)

        for region in regions {
            let pageCount = Int(region.range.size) / pageSize
            var page = 0
            while page < pageCount {
                if memcmp(region.host + page * pageSize, zeroPage, pageSize) == 0 {
                    page += 1
                    continue
                }
                var end = page + 1
                while end < pageCount, end - page < MemoryFileFormat.maximumPagesPerRecord,
                      memcmp(region.host + end * pageSize, zeroPage, pageSize) != 0 {
                    end += 1
                }
                let address = region.range.start + UInt64(page * pageSize)
                let count = UInt64(end - page)
                var recordHeader = LittleEndianBytes()
                recordHeader.append(address)
                recordHeader.append(count)
                try file.write(recordHeader.bytes)
                let bytes = UnsafeRawBufferPointer(start: region.host + page * pageSize, count: (end - page) * pageSize)
                try file.write(bytes)
                checksum.add(address)
                checksum.add(count)
                checksum.add(bytes)
                records += 1
                pages += end - page
                page = end
            }
        }

        var trailer = LittleEndianBytes()
        trailer.append(MemoryFileFormat.endMark)
        trailer.append(UInt64(0))
        trailer.append(UInt64(records))
        trailer.append(UInt64(pages))
        trailer.append(checksum.value)
        try file.write(trailer.bytes)
        guard fsync(fd) == 0 || errno == EINVAL else {
            throw MachineError("cannot write memory file \(path): \(String(cString: strerror(errno)))")
        }
        return MemoryFileSummary(records: records, pages: pages, fileSize: file.offset)
    }

    /// Reads a memory file written by `saveToFile(_:)` into guest RAM, straight into the guest's
    /// mapping; pages the file leaves out become zero. Refuses, with an error saying why, a file that
    /// is not a memory file, has another format version, was saved from a different RAM layout, is
    /// truncated or has trailing bytes, holds a record outside guest RAM or out of order, or fails
    /// its checksum. Nothing is ever written outside guest RAM; after an error guest RAM holds a
    /// mix of old and new pages, and the machine must not run.
    @discardableResult
    public func loadFromFile(_ path: String) throws -> MemoryFileSummary {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw MachineError("cannot open memory file \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let file = MemoryFileIO(fd: fd, path: path)

        let fixed = try file.read(MemoryFileFormat.fixedHeaderSize, what: "header")
        guard Array(fixed[0..<8]) == MemoryFileFormat.magic else {
            throw MachineError("\(path) is not a Ferry memory file (its first bytes are not \"FERRYMEM\")")
        }
        let version = fixed.littleEndian(UInt32.self, at: 8) ?? 0
        guard version == MemoryFileFormat.version else {
            throw MachineError("memory file \(path) has format version \(version); this Ferry reads version \(MemoryFileFormat.version)")
        }
        let pageSize = fixed.littleEndian(UInt32.self, at: 12) ?? 0
        guard pageSize == MemoryFileFormat.pageSize else {
            throw MachineError("memory file \(path) has \(pageSize)-byte pages; Ferry uses \(MemoryFileFormat.pageSize)")
        }
        let ramSize = fixed.littleEndian(UInt64.self, at: 16) ?? 0
        guard ramSize == size else {
            throw MachineError("memory file \(path) holds \(ramSize >> 20) MiB of guest RAM (\(ramSize) bytes); this machine has \(size >> 20) MiB (\(size) bytes)")
        }
        let rangeCount = Int(fixed.littleEndian(UInt32.self, at: 24) ?? 0)
        guard rangeCount == regions.count else {
            throw MachineError("memory file \(path) describes \(rangeCount) RAM ranges; this machine has \(regions.count)")
        }
        let rangeBytes = try file.read(rangeCount * MemoryFileFormat.rangeEntrySize, what: "RAM ranges")
        for (index, region) in regions.enumerated() {
            let start = rangeBytes.littleEndian(UInt64.self, at: index * 16) ?? 0
            let length = rangeBytes.littleEndian(UInt64.self, at: index * 16 + 8) ?? 0
            guard start == region.range.start, length == region.range.size else {
                throw MachineError("memory file \(path) RAM range \(index) is 0x\(String(start, radix: 16))+0x\(String(length, radix: 16)); this machine's is 0x\(String(region.range.start, radix: 16))+0x\(String(region.range.size, radix: 16))")
            }
        }

        var checksum = MemoryFileChecksum()
        var records = 0
        var pages = 0
        var nextFree: UInt64 = 0   // every guest-physical address below this is filled or zeroed
        while true {
            let recordHeader = try file.read(MemoryFileFormat.recordHeaderSize, what: "record \(records)")
            let address = recordHeader.littleEndian(UInt64.self, at: 0) ?? 0
            let count = recordHeader.littleEndian(UInt64.self, at: 8) ?? 0
            if address == MemoryFileFormat.endMark && count == 0 { break }
            let maximumPages = size / UInt64(MemoryFileFormat.pageSize)
            guard address % UInt64(MemoryFileFormat.pageSize) == 0, count >= 1, count <= maximumPages,
                  address >= nextFree,
                  let host = try? buffer(at: address, count: Int(count) * MemoryFileFormat.pageSize)
            else {
                throw MachineError("memory file \(path) record \(records) (0x\(String(address, radix: 16)), \(count) pages) is not a page-aligned range of guest RAM above the previous record")
            }
            try zero(from: nextFree, to: address)
            try file.read(into: host, what: "record \(records)'s \(count) pages")
            checksum.add(address)
            checksum.add(count)
            checksum.add(UnsafeRawBufferPointer(host))
            records += 1
            pages += Int(count)
            nextFree = address + UInt64(host.count)
        }
        let trailer = try file.read(MemoryFileFormat.trailerSize, what: "trailer")
        let savedRecords = trailer.littleEndian(UInt64.self, at: 0) ?? 0
        let savedPages = trailer.littleEndian(UInt64.self, at: 8) ?? 0
        let savedChecksum = trailer.littleEndian(UInt64.self, at: 16) ?? 0
        guard savedRecords == records, savedPages == pages else {
            throw MachineError("memory file \(path) says it holds \(savedRecords) records of \(savedPages) pages, but holds \(records) records of \(pages) pages")
        }
        guard savedChecksum == checksum.value else {
            throw MachineError("memory file \(path) is corrupt: checksum 0x\(String(checksum.value, radix: 16)) where the file says 0x\(String(savedChecksum, radix: 16))")
        }
        guard try file.atEnd() else {
            throw MachineError("memory file \(path) has bytes after its trailer")
        }
        try zero(from: nextFree, to: UInt64.max)
        return MemoryFileSummary(records: records, pages: pages, fileSize: file.offset)
    }

    /// Makes the guest RAM in [start, end) read as zero by handing its pages back to the kernel
    /// (`MADV_DONTNEED` on a private anonymous mapping), which also frees them.
    private func zero(from start: UInt64, to end: UInt64) throws {
        for region in regions {
            let lower = max(start, region.range.start)
            let upper = min(end, region.range.end)
            guard lower < upper else { continue }
            let host = region.host + Int(lower - region.range.start)
            guard madvise(host, Int(upper - lower), MADV_DONTNEED) == 0 else {
                throw MachineError("cannot clear guest RAM 0x\(String(lower, radix: 16))+0x\(String(upper - lower, radix: 16)): \(String(cString: strerror(errno)))")
            }
        }
    }
}

/// Whole reads and writes on a memory file's descriptor, retrying short transfers and `EINTR`.
private final class MemoryFileIO {
    let fd: Int32
    let path: String
    private(set) var offset: UInt64 = 0

    init(fd: Int32, path: String) {
        self.fd = fd
        self.path = path
    }

    func write(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try write($0) }
    }

    func write(_ bytes: UnsafeRawBufferPointer) throws {
        guard let base = bytes.baseAddress else { return }
        var done = 0
        while done < bytes.count {
            let written = Glibc.write(fd, base + done, bytes.count - done)
            if written < 0 {
                if errno == EINTR { continue }
                throw MachineError("cannot write memory file \(path): \(String(cString: strerror(errno)))")
            }
            done += written
        }
        offset += UInt64(bytes.count)
    }

    func read(_ count: Int, what: String) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { try read(into: $0, what: what) }
        return bytes
    }

    /// Fills `buffer` from the file, or fails saying the file ends inside `what`.
    func read(into buffer: UnsafeMutableRawBufferPointer, what: String) throws {
        guard let base = buffer.baseAddress else { return }
        var done = 0
        while done < buffer.count {
            let got = Glibc.read(fd, base + done, buffer.count - done)
            if got < 0 {
                if errno == EINTR { continue }
                throw MachineError("cannot read memory file \(path): \(String(cString: strerror(errno)))")
            }
            if got == 0 {
                throw MachineError("memory file \(path) is truncated: it ends inside the \(what) at byte \(offset + UInt64(done))")
            }
            done += got
        }
        offset += UInt64(buffer.count)
    }

    func atEnd() throws -> Bool {
        var byte: UInt8 = 0
        while true {
            let got = Glibc.read(fd, &byte, 1)
            if got < 0, errno == EINTR { continue }
            if got < 0 { throw MachineError("cannot read memory file \(path): \(String(cString: strerror(errno)))") }
            return got == 0
        }
    }
}
