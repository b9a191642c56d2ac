#if canImport(Glibc)
import Glibc
#endif
import CKVM
import HostOS

/// A disk as the guest sees it, and where its data lives on this host.
public struct DiskConfiguration: Codable, Equatable, Sendable {
    /// Names the disk in the API, in `get-id` answers and across a migration.
    public var id: String
    /// A raw image file. A migration does not carry it: the destination names its own path.
    public var path: String
    public var readOnly: Bool
    /// Open with O_DIRECT, bypassing the host's page cache.
    public var direct: Bool

    /// The id of the `index`th disk that names none (Cloud Hypervisor's `disk<index>`).
    public static func defaultID(index: Int) -> String { "disk\(index)" }

    public init(id: String, path: String, readOnly: Bool = false, direct: Bool = false) {
        self.id = id
        self.path = path
        self.readOnly = readOnly
        self.direct = direct
    }
}

/// virtio-blk (virtio 1.2 §5.2) on a raw image file: read, write, flush, get-id, discard and
/// write-zeroes, served with pread/pwrite/fdatasync/fallocate on the device's I/O thread,
/// straight between the file and guest memory.
public final class VirtioBlock: VirtioBackend {
    static let sectorSize: UInt64 = 512
    static let queueSize: UInt16 = 256

    // Feature bits (§5.2.3)
    static let featureSegmentMaximum: UInt64 = 1 << 2
    static let featureReadOnly: UInt64 = 1 << 5
    static let featureBlockSize: UInt64 = 1 << 6
    static let featureFlush: UInt64 = 1 << 9
    static let featureDiscard: UInt64 = 1 << 13
    static let featureWriteZeroes: UInt64 = 1 << 14

    // Request types and status (§5.2.6)
    enum RequestType: UInt32 { case read = 0, write = 1, flush = 4, getID = 8, discard = 11, writeZeroes = 13 }
    static let statusOK: UInt8 = 0, statusIOError: UInt8 = 1, statusUnsupported: UInt8 = 2
    static let idLength = 20
    static let headerSize = 16

    public let disk: DiskConfiguration
    public let name: String
    private let file: FileDescriptor
    /// Capacity in 512-byte sectors (the file's size, rounded down).
    let sectors: UInt64

    /// Checks, before anything opens them, that every disk's file exists, is a regular file or a
    /// block device, is writable unless the disk is read-only, and is no other disk's file.
    public static func checkFiles(_ disks: [DiskConfiguration]) throws(MachineError) {
        var files: [String: String] = [:]
        for disk in disks {
            let info = try status(disk)
            if let other = files.updateValue(disk.id, forKey: "\(info.st_dev):\(info.st_ino)") {
                throw MachineError(.invalidConfiguration, "disks: \(disk.id) and \(other) are the same file (\(disk.path))")
            }
        }
    }

    private static func status(_ disk: DiskConfiguration) throws(MachineError) -> stat {
        var info = stat()
        guard stat(disk.path, &info) == 0 else {
            throw MachineError(.invalidConfiguration, "disk \(disk.id): cannot open \(disk.path): \(errnoDescription(errno))")
        }
        guard info.st_mode & S_IFMT == S_IFREG || info.st_mode & S_IFMT == S_IFBLK else {
            throw MachineError(.invalidConfiguration, "disk \(disk.id): \(disk.path) is not a regular file or block device")
        }
        // Root ignores permission bits, so a read-only image would open for writing; say so instead.
        if !disk.readOnly, info.st_mode & (S_IWUSR | S_IWGRP | S_IWOTH) == 0 {
            throw MachineError(.invalidConfiguration, "disk \(disk.id): \(disk.path) is read-only; use readonly=on")
        }
        return info
    }

    /// Opens the image; the error says what is wrong with it in words that name the disk.
    public init(_ disk: DiskConfiguration) throws(MachineError) {
        self.disk = disk
        name = "virtio-blk \(disk.id)"
        var flags = Int32(O_CLOEXEC) | (disk.readOnly ? O_RDONLY : O_RDWR)
        if disk.direct { flags |= ckvm_open_direct_flag() }
        _ = try Self.status(disk)
        let fd = open(disk.path, flags)
        guard fd >= 0 else {
            let code = errno
            let hint = code == EROFS || code == EACCES ? "; use readonly=on" : ""
            throw MachineError(.invalidConfiguration, "disk \(disk.id): cannot open \(disk.path): \(errnoDescription(code))\(hint)")
        }
        file = FileDescriptor(fd)
        let size = lseek(fd, 0, SEEK_END)
        guard size >= 0 else {
            throw MachineError(.invalidConfiguration, "disk \(disk.id): cannot size \(disk.path): \(errnoDescription(errno))")
        }
        sectors = UInt64(size) / Self.sectorSize
    }

    public var deviceType: UInt16 { 2 }
    public var pciClass: UInt32 { 0x01_80_00 }   // mass storage, other
    public var queueSizes: [UInt16] { [Self.queueSize] }

    public var features: UInt64 {
        var features = Self.featureSegmentMaximum | Self.featureBlockSize | Self.featureFlush
        if disk.readOnly { features |= Self.featureReadOnly } else { features |= Self.featureDiscard | Self.featureWriteZeroes }
        return features
    }

    /// `struct virtio_blk_config` up to `write_zeroes_may_unmap` (§5.2.4).
    public func configuration() -> [UInt8] {
        var bytes = LittleEndianBytes()
        bytes.append(sectors)                          // capacity
        bytes.append(UInt32(0))                        // size_max (no VIRTIO_BLK_F_SIZE_MAX)
        bytes.append(UInt32(Self.queueSize - 2))       // seg_max: a chain also holds header and status
        bytes.appendZeros(4)                           // geometry
        bytes.append(UInt32(Self.sectorSize))          // blk_size
        bytes.appendZeros(8)                           // topology
        bytes.append(UInt8(0))                         // writeback
        bytes.append(UInt8(0))
        bytes.append(UInt16(1))                        // num_queues
        bytes.append(UInt32(UInt32.max / 512))         // max_discard_sectors
        bytes.append(UInt32(1))                        // max_discard_seg
        bytes.append(UInt32(1))                        // discard_sector_alignment
        bytes.append(UInt32(UInt32.max / 512))         // max_write_zeroes_sectors
        bytes.append(UInt32(1))                        // max_write_zeroes_seg
        bytes.append(UInt8(1))                         // write_zeroes_may_unmap
        bytes.appendZeros(3)
        return bytes.bytes
    }

    public func handle(_ chain: DescriptorChain, queue: Int, memory: GuestMemory) throws(VirtioError) -> UInt32 {
        // Layout (§5.2.6): a 16-byte header the device reads, data, a status byte it writes.
        let readable = chain.readable, writable = chain.writable
        guard let statusBuffer = writable.last, statusBuffer.length >= 1,
              chain.buffers.last == statusBuffer else {
            throw VirtioError("a block request (descriptor \(chain.head)) has no device-writable status byte at its end")
        }
        let header = try ChainIO.gather(readable, count: Self.headerSize, from: memory)
        guard header.count == Self.headerSize else {
            throw VirtioError("a block request header (descriptor \(chain.head)) has \(header.count) bytes, not \(Self.headerSize)")
        }
        let type = header.littleEndian(UInt32.self, at: 0) ?? 0
        let sector = header.littleEndian(UInt64.self, at: 8) ?? 0
        // Data buffers: after the header among the readable ones, before the status among the writable.
        let dataIn = Array(writable.dropLast()).withStatusTrimmed(statusBuffer)
        let dataOut = readable.droppingPrefix(bytes: Self.headerSize)
        var written: UInt32 = 0
        let status: UInt8
        switch RequestType(rawValue: type) {
        case .read:
            (status, written) = transfer(dataIn, sector: sector, write: false, memory: memory)
        case .write:
            (status, _) = disk.readOnly ? (Self.statusIOError, 0) : transfer(dataOut, sector: sector, write: true, memory: memory)
        case .flush:
            status = fdatasync(file.rawValue) == 0 ? Self.statusOK : Self.statusIOError
        case .getID:
            var id = Array(disk.id.utf8.prefix(Self.idLength))
            id += [UInt8](repeating: 0, count: Self.idLength - id.count)
            written = UInt32(try ChainIO.scatter(id, into: dataIn, memory: memory))
            status = Self.statusOK
        case .discard, .writeZeroes:
            status = disk.readOnly ? Self.statusIOError
                : try zeroRanges(dataOut, discard: type == RequestType.discard.rawValue, memory: memory)
        case nil:
            status = Self.statusUnsupported
        }
        let statusAddress = statusBuffer.address + UInt64(statusBuffer.length) - 1
        do { try memory.write(status, at: statusAddress) } catch { throw VirtioError(error.message) }
        memory.recordDeviceWrite(at: statusAddress, count: 1)
        return written + 1
    }

    /// Moves the data of a read or write between the file at `sector` and the guest's buffers.
    private func transfer(_ buffers: [VirtioBuffer], sector: UInt64, write: Bool, memory: GuestMemory) -> (UInt8, UInt32) {
        let total = buffers.reduce(UInt64(0)) { $0 + UInt64($1.length) }
        let (start, overflow) = sector.multipliedReportingOverflow(by: Self.sectorSize)
        guard !overflow, total % Self.sectorSize == 0, start <= sectors * Self.sectorSize,
              total <= sectors * Self.sectorSize - start else {
            return (Self.statusIOError, 0)
        }
        var offset = start
        var moved: UInt32 = 0
        for buffer in buffers {
            guard let host = try? memory.buffer(at: buffer.address, count: Int(buffer.length)) else { return (Self.statusIOError, moved) }
            var done = 0
            while done < host.count {
                let result = write
                    ? pwrite(file.rawValue, host.baseAddress! + done, host.count - done, off_t(offset))
                    : pread(file.rawValue, host.baseAddress! + done, host.count - done, off_t(offset))
                if result < 0, errno == EINTR { continue }
                guard result > 0 else {
                    if !write { memory.recordDeviceWrite(at: buffer.address, count: done) }
                    return (Self.statusIOError, moved + UInt32(done))
                }
                done += result
                offset += UInt64(result)
            }
            if !write { memory.recordDeviceWrite(at: buffer.address, count: done) }
            moved += UInt32(done)
        }
        return (Self.statusOK, write ? 0 : moved)
    }

    /// Discard or write-zeroes: one segment {sector, sector count, flags} (§5.2.6.2).
    private func zeroRanges(_ buffers: [VirtioBuffer], discard: Bool, memory: GuestMemory) throws(VirtioError) -> UInt8 {
        let segment = try ChainIO.gather(buffers, count: 16, from: memory)
        guard segment.count == 16 else { return Self.statusIOError }
        let sector = segment.littleEndian(UInt64.self, at: 0) ?? 0
        let count = UInt64(segment.littleEndian(UInt32.self, at: 8) ?? 0)
        guard sector <= sectors, count <= sectors - sector else { return Self.statusIOError }
        let result = ckvm_fallocate(file.rawValue, discard ? 1 : 0, Int64(sector * Self.sectorSize), Int64(count * Self.sectorSize))
        // Discard is a hint: a file system that cannot punch holes has still done no harm.
        return result == 0 || discard ? Self.statusOK : Self.statusIOError
    }
}

private extension Array where Element == VirtioBuffer {
    /// The writable data buffers, with the status buffer's bytes before its last one counted as
    /// data too (a driver may put data and status in one buffer).
    func withStatusTrimmed(_ status: VirtioBuffer) -> [VirtioBuffer] {
        guard status.length > 1 else { return self }
        return self + [VirtioBuffer(address: status.address, length: status.length - 1, deviceWritable: true)]
    }

    /// These buffers without their first `bytes` bytes.
    func droppingPrefix(bytes: Int) -> [VirtioBuffer] {
        var skip = UInt32(bytes)
        var result: [VirtioBuffer] = []
        for var buffer in self {
            if skip >= buffer.length { skip -= buffer.length; continue }
            buffer.address += UInt64(skip)
            buffer.length -= skip
            skip = 0
            result.append(buffer)
        }
        return result
    }
}
