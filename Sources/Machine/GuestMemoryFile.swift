#if canImport(Glibc)
import Glibc
#endif
import HostOS

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
    public func saveToFile(_ path: String) throws(MachineError) -> MemoryFileSummary {
        let file = try MemoryFileIO(creating: path)
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
        let recordPages = UInt64(MemoryFileFormat.maximumPagesPerRecord)
        for run in nonZeroPages().runs {
            // Long runs are split so that one write stays bounded.
            var address = run.start
            while address < run.end {
                let count = min((run.end - address) / PageRuns.pageSize, recordPages)
                let bytes = UnsafeRawBufferPointer(try buffer(at: address, count: Int(count * PageRuns.pageSize)))
                var recordHeader = LittleEndianBytes()
                recordHeader.append(address)
                recordHeader.append(count)
                try file.write(recordHeader.bytes)
                try file.write(bytes)
                checksum.add(address)
                checksum.add(count)
                checksum.add(bytes)
                records += 1
                pages += Int(count)
                address += count * PageRuns.pageSize
            }
        }

        var trailer = LittleEndianBytes()
        trailer.append(MemoryFileFormat.endMark)
        trailer.append(UInt64(0))
        trailer.append(UInt64(records))
        trailer.append(UInt64(pages))
        trailer.append(checksum.value)
        try file.write(trailer.bytes)
        try file.sync()
        return MemoryFileSummary(records: records, pages: pages, fileSize: file.offset)
    }

    /// Reads a memory file written by `saveToFile(_:)` into guest RAM, straight into the guest's
    /// mapping; pages the file leaves out become zero. Refuses, with an error saying why, a file that
    /// is not a memory file, has another format version, was saved from a different RAM layout, is
    /// truncated or has trailing bytes, holds a record outside guest RAM or out of order, or fails
    /// its checksum. Nothing is ever written outside guest RAM; after an error guest RAM holds a
    /// mix of old and new pages, and the machine must not run.
    @discardableResult
    public func loadFromFile(_ path: String) throws(MachineError) -> MemoryFileSummary {
        let file = try MemoryFileIO(reading: path)

        let fixed = try file.read(MemoryFileFormat.fixedHeaderSize, what: "header")
        guard Array(fixed[0..<8]) == MemoryFileFormat.magic else {
            throw MachineError(.invalidState, "\(path) is not a Ferry memory file (its first bytes are not \"FERRYMEM\")")
        }
        let version = fixed.littleEndian(UInt32.self, at: 8) ?? 0
        guard version == MemoryFileFormat.version else {
            throw MachineError(.invalidState, "memory file \(path) has format version \(version); this Ferry reads version \(MemoryFileFormat.version)")
        }
        let pageSize = fixed.littleEndian(UInt32.self, at: 12) ?? 0
        guard pageSize == MemoryFileFormat.pageSize else {
            throw MachineError(.invalidState, "memory file \(path) has \(pageSize)-byte pages; Ferry uses \(MemoryFileFormat.pageSize)")
        }
        let ramSize = fixed.littleEndian(UInt64.self, at: 16) ?? 0
        guard ramSize == size else {
            throw MachineError(.invalidState, "memory file \(path) holds \(ramSize >> 20) MiB of guest RAM (\(ramSize) bytes); this machine has \(size >> 20) MiB (\(size) bytes)")
        }
        let rangeCount = Int(fixed.littleEndian(UInt32.self, at: 24) ?? 0)
        guard rangeCount == regions.count else {
            throw MachineError(.invalidState, "memory file \(path) describes \(rangeCount) RAM ranges; this machine has \(regions.count)")
        }
        let rangeBytes = try file.read(rangeCount * MemoryFileFormat.rangeEntrySize, what: "RAM ranges")
        for (index, region) in regions.enumerated() {
            let start = rangeBytes.littleEndian(UInt64.self, at: index * 16) ?? 0
            let length = rangeBytes.littleEndian(UInt64.self, at: index * 16 + 8) ?? 0
            guard start == region.range.start, length == region.range.size else {
                throw MachineError(.invalidState, "memory file \(path) RAM range \(index) is 0x\(String(start, radix: 16))+0x\(String(length, radix: 16)); this machine's is 0x\(String(region.range.start, radix: 16))+0x\(String(region.range.size, radix: 16))")
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
                throw MachineError(.invalidState, "memory file \(path) record \(records) (0x\(String(address, radix: 16)), \(count) pages) is not a page-aligned range of guest RAM above the previous record")
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
            throw MachineError(.invalidState, "memory file \(path) says it holds \(savedRecords) records of \(savedPages) pages, but holds \(records) records of \(pages) pages")
        }
        guard savedChecksum == checksum.value else {
            throw MachineError(.invalidState, "memory file \(path) is corrupt: checksum 0x\(String(checksum.value, radix: 16)) where the file says 0x\(String(savedChecksum, radix: 16))")
        }
        guard try file.atEnd() else {
            throw MachineError(.invalidState, "memory file \(path) has bytes after its trailer")
        }
        try zero(from: nextFree, to: UInt64.max)
        return MemoryFileSummary(records: records, pages: pages, fileSize: file.offset)
    }

    /// Makes the guest RAM in [start, end) read as zero by handing its pages back to the kernel,
    /// which also frees them: `MADV_DONTNEED` on a private anonymous mapping, `MADV_REMOVE` on a
    /// shared memory file (where `MADV_DONTNEED` would leave the file's pages as they were).
    private func zero(from start: UInt64, to end: UInt64) throws(MachineError) {
        let advice = backingFile == nil ? MADV_DONTNEED : MADV_REMOVE
        for region in regions {
            let lower = max(start, region.range.start)
            let upper = min(end, region.range.end)
            guard lower < upper else { continue }
            let host = region.host + Int(lower - region.range.start)
            guard madvise(host, Int(upper - lower), advice) == 0 else {
                throw MachineError(.hostFailure, "cannot clear guest RAM 0x\(String(lower, radix: 16))+0x\(String(upper - lower, radix: 16))",
                                   cause: SystemError("madvise", errno: errno))
            }
        }
    }
}

/// A memory file's descriptor, with whole reads and writes whose errors name the file.
private final class MemoryFileIO {
    let descriptor: FileDescriptor
    let path: String
    private(set) var offset: UInt64 = 0

    init(creating path: String) throws(MachineError) {
        self.path = path
        do {
            descriptor = FileDescriptor(try systemCall("open") { open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600) })
        } catch {
            throw MachineError(.hostFailure, "cannot create memory file \(path): \(errnoDescription(error.errno))", cause: error)
        }
    }

    init(reading path: String) throws(MachineError) {
        self.path = path
        do {
            descriptor = FileDescriptor(try systemCall("open") { open(path, O_RDONLY | O_CLOEXEC) })
        } catch {
            throw MachineError(.invalidState, "cannot open memory file \(path): \(errnoDescription(error.errno))", cause: error)
        }
    }

    func write(_ bytes: [UInt8]) throws(MachineError) {
        let result = bytes.withUnsafeBytes { buffer in Result { () throws(MachineError) in try write(buffer) } }
        try result.get()
    }

    func write(_ bytes: UnsafeRawBufferPointer) throws(MachineError) {
        do {
            try descriptor.writeAll(bytes)
        } catch {
            throw MachineError(.hostFailure, "cannot write memory file \(path): \(errnoDescription(error.errno))", cause: error)
        }
        offset += UInt64(bytes.count)
    }

    /// Writes what the kernel still buffers to the disk (a file system that cannot, e.g. a pipe, is fine).
    func sync() throws(MachineError) {
        guard fsync(descriptor.rawValue) == 0 || errno == EINVAL else {
            throw MachineError(.hostFailure, "cannot write memory file \(path): \(errnoDescription(errno))",
                               cause: SystemError("fsync", errno: errno))
        }
    }

    func read(_ count: Int, what: String) throws(MachineError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        let result = bytes.withUnsafeMutableBytes { buffer in
            Result { () throws(MachineError) in try read(into: buffer, what: what) }
        }
        try result.get()
        return bytes
    }

    /// Fills `buffer` from the file, or fails saying the file ends inside `what`.
    func read(into buffer: UnsafeMutableRawBufferPointer, what: String) throws(MachineError) {
        let got: Int
        do {
            got = try descriptor.read(into: buffer)
        } catch {
            throw MachineError(.invalidState, "cannot read memory file \(path): \(errnoDescription(error.errno))", cause: error)
        }
        guard got == buffer.count else {
            throw MachineError(.invalidState, "memory file \(path) is truncated: it ends inside the \(what) at byte \(offset + UInt64(got))")
        }
        offset += UInt64(buffer.count)
    }

    func atEnd() throws(MachineError) -> Bool {
        var byte: UInt8 = 0
        let got = withUnsafeMutableBytes(of: &byte) { buffer in Result { () throws(SystemError) in try descriptor.read(into: buffer) } }
        do {
            return try got.get() == 0
        } catch {
            throw MachineError(.invalidState, "cannot read memory file \(path): \(errnoDescription(error.errno))", cause: error)
        }
    }
}
