#if canImport(Glibc)
import Glibc
#endif
import CKVM
import HostOS
import Synchronization

/// A contiguous range of guest-physical RAM.
public struct GuestRAMRange: Equatable, Sendable, Codable {
    public var start: UInt64
    public var size: UInt64
    public var end: UInt64 { start + size }

    public init(start: UInt64, size: UInt64) {
        self.start = start
        self.size = size
    }
}

/// Where guest RAM goes in the guest-physical address space: below the 32-bit MMIO hole, and the
/// rest above 4 GiB (the layout Firecracker and Cloud Hypervisor use).
public enum GuestRAMLayout {
    /// Start of the 32-bit MMIO hole (LAPIC, IOAPIC and device windows live in 3–4 GiB).
    public static let mmioHoleStart: UInt64 = 0xC000_0000
    /// RAM that does not fit below the hole continues at 4 GiB.
    public static let highMemoryStart: UInt64 = 0x1_0000_0000
    /// The smallest guest Ferry boots: enough for the kernel, initramfs and boot structures.
    public static let minimumSize: UInt64 = 64 << 20

    /// Whether the `count` bytes at `address` lie inside one of `ranges`.
    public static func contains(_ ranges: [GuestRAMRange], _ address: UInt64, count: UInt64) -> Bool {
        let (end, overflow) = address.addingReportingOverflow(count)
        return !overflow && ranges.contains { address >= $0.start && end <= $0.end }
    }

    /// The RAM ranges for a guest with `size` bytes of memory.
    public static func ranges(size: UInt64) -> [GuestRAMRange] {
        let low = min(size, mmioHoleStart)
        var ranges = [GuestRAMRange(start: 0, size: low)]
        if size > low {
            ranges.append(GuestRAMRange(start: highMemoryStart, size: size - low))
        }
        return ranges
    }
}

/// Guest RAM: anonymous host mappings, one per `GuestRAMRange`, shared with KVM.
///
/// Every access from the VMM is bounds-checked here; raw pointers never leave this type except to
/// register the mappings with KVM.
public final class GuestMemory: @unchecked Sendable {
    /// One mapped range: guest-physical placement and host mapping.
    struct Region {
        let range: GuestRAMRange
        let host: UnsafeMutableRawPointer
        /// Where the range starts in `backingFile`, if there is one.
        let fileOffset: UInt64
    }

    let regions: [Region]
    /// Pages the VMM's devices wrote while tracking is on: KVM's dirty log sees only the guest's
    /// own stores, so without this a migration would leave the destination with stale copies of
    /// what a device wrote (a read request's data, a used ring). One bitmap per region.
    private let deviceWrites: Mutex<[[UInt64]]?> = Mutex(nil)

    /// The debug switch that turns device-write tracking off, to show what it prevents:
    /// `FERRY_DEBUG_UNTRACKED_DEVICE_WRITES=1` in the environment. Never for real use.
    static let deviceWriteTrackingDisabled = getenv("FERRY_DEBUG_UNTRACKED_DEVICE_WRITES").map { String(cString: $0) == "1" } ?? false

    public var ranges: [GuestRAMRange] { regions.map(\.range) }
    public var size: UInt64 { regions.reduce(0) { $0 + $1.range.size } }

    /// The file that backs guest RAM when it is shared (`MachineConfiguration.sharedMemory`):
    /// every range of RAM in turn from offset 0, mapped `MAP_SHARED`. Another process that maps
    /// it sees the same pages: a local migration hands it over instead of copying RAM.
    public let backingFile: FileDescriptor?

    /// Maps fresh, zero guest RAM for `ranges`: private anonymous memory, or with `shared` a new
    /// memfd of their total size.
    public convenience init(ranges: [GuestRAMRange], shared: Bool = false) throws(MachineError) {
        guard shared else {
            try self.init(ranges: ranges, file: nil)
            return
        }
        let descriptor = ckvm_memfd("ferry-guest-ram")
        guard descriptor >= 0 else {
            throw MachineError(.hostFailure, "cannot create the memory file for shared guest RAM", cause: SystemError("memfd_create", errno: errno))
        }
        let file = FileDescriptor(descriptor)
        let total = ranges.reduce(0) { $0 + $1.size }
        guard ftruncate(descriptor, off_t(total)) == 0 else {
            throw MachineError(.hostFailure, "cannot size the memory file for \(total >> 20) MiB of shared guest RAM",
                               cause: SystemError("ftruncate", errno: errno))
        }
        guard ckvm_seal_size(descriptor) == 0 else {
            throw MachineError(.hostFailure, "cannot seal the size of the memory file for shared guest RAM",
                               cause: SystemError("fcntl(F_ADD_SEALS)", errno: errno))
        }
        try self.init(ranges: ranges, file: file)
    }

    /// Maps guest RAM for `ranges` from `file`, a memory file another Ferry shared (a local
    /// migration's), which must be a memfd whose size is sealed (so that no page can vanish under
    /// the mapping) and hold at least their total size; the pages are the file's, with whatever
    /// they hold.
    public convenience init(ranges: [GuestRAMRange], sharedFile file: FileDescriptor) throws(MachineError) {
        let total = ranges.reduce(0) { $0 + $1.size }
        var status = stat()
        guard fstat(file.rawValue, &status) == 0 else {
            throw MachineError(.hostFailure, "cannot inspect the shared memory file", cause: SystemError("fstat", errno: errno))
        }
        // Shared memory (tmpfs) only: a hugetlbfs memfd mapped without a reservation would end
        // this process with SIGBUS once the huge-page pool runs out.
        guard status.st_mode & S_IFMT == S_IFREG, ckvm_is_sealed_shared_memory(file.rawValue) == 1 else {
            throw MachineError(.invalidConfiguration, "the shared memory file is not a memfd of shared memory whose size is sealed")
        }
        guard UInt64(status.st_size) >= total else {
            throw MachineError(.invalidConfiguration,
                               "the shared memory file holds \(status.st_size) bytes, fewer than the guest's \(total) bytes of RAM")
        }
        try self.init(ranges: ranges, file: file)
    }

    private init(ranges: [GuestRAMRange], file: FileDescriptor?) throws(MachineError) {
        var mapped: [Region] = []
        var offset: UInt64 = 0
        for range in ranges {
            let flags = file == nil ? MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE : MAP_SHARED | MAP_NORESERVE
            guard let host = mmap(nil, Int(range.size), PROT_READ | PROT_WRITE, flags, file?.rawValue ?? -1, off_t(offset)),
                  host != MAP_FAILED
            else {
                let code = errno
                for region in mapped { munmap(region.host, Int(region.range.size)) }
                throw MachineError(.hostFailure, "cannot map \(range.size >> 20) MiB of guest memory",
                                   cause: SystemError("mmap", errno: code))
            }
            // Transparent huge pages make first touch and KVM's mappings cheaper, as QEMU does
            // (shared memory gets them where the host's shmem_enabled allows).
            madvise(host, Int(range.size), MADV_HUGEPAGE)
            mapped.append(Region(range: range, host: host, fileOffset: offset))
            offset += range.size
        }
        regions = mapped
        backingFile = file
    }

    deinit {
        for region in regions {
            munmap(region.host, Int(region.range.size))
        }
    }

    /// The host view of the `count` bytes at guest-physical `address`, which must lie in one range
    /// of guest RAM; the check is made here, so no access through the buffer leaves guest RAM. The
    /// buffer is valid while this `GuestMemory` lives: for zero-copy I/O (migration, memory files)
    /// by code that holds the memory meanwhile.
    public func buffer(at address: UInt64, count: Int) throws(MachineError) -> UnsafeMutableRawBufferPointer {
        if count >= 0 {
            for region in regions where address >= region.range.start && address < region.range.end {
                let offset = address - region.range.start
                guard UInt64(count) <= region.range.size - offset else { break }
                return UnsafeMutableRawBufferPointer(start: region.host + Int(offset), count: count)
            }
        }
        throw MachineError(.outsideRAM, "guest-physical range 0x\(String(address, radix: 16))+\(count) is not in guest RAM")
    }

    public func contains(_ address: UInt64, count: Int) -> Bool {
        (try? buffer(at: address, count: count)) != nil
    }

    public func write(_ bytes: some Collection<UInt8>, at address: UInt64) throws(MachineError) {
        let destination = try buffer(at: address, count: bytes.count)
        let copied = bytes.withContiguousStorageIfAvailable { source in
            destination.copyMemory(from: UnsafeRawBufferPointer(source))
        }
        if copied == nil { destination.copyBytes(from: bytes) }
    }

    /// Sets `count` bytes at `address` to `byte`.
    public func fill(_ byte: UInt8, count: Int, at address: UInt64) throws(MachineError) {
        let destination = try buffer(at: address, count: count)
        destination.initializeMemory(as: UInt8.self, repeating: byte)
    }

    public func read(count: Int, at address: UInt64) throws(MachineError) -> [UInt8] {
        Array(try buffer(at: address, count: count))
    }

    /// Writes an integer in little-endian byte order.
    public func write<T: FixedWidthInteger>(_ value: T, at address: UInt64) throws(MachineError) {
        let destination = try buffer(at: address, count: MemoryLayout<T>.size)
        destination.storeBytes(of: value.littleEndian, as: T.self)
    }

    // MARK: Device writes

    /// Starts (clearing what was recorded) or stops recording the pages devices write.
    public func trackDeviceWrites(_ on: Bool) {
        let bitmaps = on && !Self.deviceWriteTrackingDisabled
            ? regions.map { [UInt64](repeating: 0, count: Int(($0.range.size / PageRuns.pageSize + 63) / 64)) } : nil
        deviceWrites.withLock { $0 = bitmaps }
    }

    /// Notes that a device wrote the `count` bytes at `address` (in guest RAM).
    public func recordDeviceWrite(at address: UInt64, count: Int) {
        guard count > 0 else { return }
        deviceWrites.withLock { bitmaps in
            guard bitmaps != nil else { return }
            for (index, region) in regions.enumerated() where address >= region.range.start && address < region.range.end {
                let first = (address - region.range.start) / PageRuns.pageSize
                let last = min(address + UInt64(count) - 1, region.range.end - 1)
                for page in first...((last - region.range.start) / PageRuns.pageSize) {
                    bitmaps![index][Int(page / 64)] |= 1 << (page % 64)
                }
            }
        }
    }

    /// The pages devices wrote since tracking started or since the last call, one bitmap per
    /// region (in the layout of KVM's dirty log), and clears them; nil when not tracking.
    func takeDeviceWrites() -> [[UInt64]]? {
        deviceWrites.withLock { bitmaps in
            guard let taken = bitmaps else { return nil }
            bitmaps = taken.map { [UInt64](repeating: 0, count: $0.count) }
            return taken
        }
    }

    public func read<T: FixedWidthInteger>(_: T.Type, at address: UInt64) throws(MachineError) -> T {
        let buffer = try buffer(at: address, count: MemoryLayout<T>.size)
        return T(littleEndian: buffer.loadUnaligned(as: T.self))
    }
}
