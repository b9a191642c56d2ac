#if canImport(Glibc)
import Glibc
#endif

/// Which pages of this process's memory hold anything: `/proc/self/pagemap`, one 64-bit entry
/// per 4 KiB page of virtual memory, bit 63 set when the page is in RAM and bit 62 when it is in
/// swap. A page with neither was never touched (or was discarded) and reads as zeros: a scan of
/// guest RAM can skip it without reading it, which keeps the scan of a large, mostly untouched
/// guest short and does not fault its pages in.
public enum PageMap {
    static let entrySize = 8
    static let present: UInt64 = 1 << 63, swapped: UInt64 = 1 << 62

    private static let file: FileDescriptor? = {
        let fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        return fd >= 0 ? FileDescriptor(fd) : nil
    }()

    /// Whether a pagemap entry's page may hold data (it is in RAM or in swap).
    @inline(__always)
    public static func isBacked(_ entry: UInt64) -> Bool { entry & (present | swapped) != 0 }

    /// The pagemap entries of the `count` pages from `address` (page-aligned); nil if the pagemap
    /// cannot be read, and then every page may hold data.
    public static func entries(at address: UnsafeRawPointer, count: Int) -> [UInt64]? {
        guard let file, count > 0 else { return nil }
        var entries = [UInt64](repeating: 0, count: count)
        let offset = off_t(UInt(bitPattern: address) / 4096) * off_t(entrySize)
        let wanted = count * entrySize
        var done = 0
        let complete = entries.withUnsafeMutableBytes { buffer -> Bool in
            while done < wanted {
                let result = pread(file.rawValue, buffer.baseAddress! + done, wanted - done, offset + off_t(done))
                if result < 0, errno == EINTR { continue }
                guard result > 0 else { return false }
                done += result
            }
            return true
        }
        return complete ? entries : nil
    }
}
