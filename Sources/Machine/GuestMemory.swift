#if canImport(Glibc)
import Glibc
#endif

/// An error in the machine layer: what went wrong, in words a user can act on.
public struct MachineError: Error, CustomStringConvertible, Equatable, Sendable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

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
    }

    let regions: [Region]
    public var ranges: [GuestRAMRange] { regions.map(\.range) }
    public var size: UInt64 { regions.reduce(0) { $0 + $1.range.size } }

    public init(ranges: [GuestRAMRange]) throws {
        var mapped: [Region] = []
        for range in ranges {
            guard let host = mmap(nil, Int(range.size), PROT_READ | PROT_WRITE,
                                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
                  host != MAP_FAILED
            else {
                let code = errno
                for region in mapped { munmap(region.host, Int(region.range.size)) }
                throw MachineError("cannot map \(range.size >> 20) MiB of guest memory: \(String(cString: strerror(code)))")
            }
            // Transparent huge pages make first touch and KVM's mappings cheaper, as QEMU does.
            madvise(host, Int(range.size), MADV_HUGEPAGE)
            mapped.append(Region(range: range, host: host))
        }
        regions = mapped
    }

    deinit {
        for region in regions {
            munmap(region.host, Int(region.range.size))
        }
    }

    /// The host view of `count` bytes at guest-physical `address`; they must lie in one region.
    func buffer(at address: UInt64, count: Int) throws -> UnsafeMutableRawBufferPointer {
        for region in regions where address >= region.range.start && address < region.range.end {
            let offset = address - region.range.start
            guard UInt64(count) <= region.range.size - offset else { break }
            return UnsafeMutableRawBufferPointer(start: region.host + Int(offset), count: count)
        }
        throw MachineError("guest-physical range 0x\(String(address, radix: 16))+\(count) is not in guest RAM")
    }

    public func contains(_ address: UInt64, count: Int) -> Bool {
        (try? buffer(at: address, count: count)) != nil
    }

    public func write(_ bytes: some Collection<UInt8>, at address: UInt64) throws {
        let destination = try buffer(at: address, count: bytes.count)
        let copied = bytes.withContiguousStorageIfAvailable { source in
            destination.copyMemory(from: UnsafeRawBufferPointer(source))
        }
        if copied == nil { destination.copyBytes(from: bytes) }
    }

    /// Sets `count` bytes at `address` to `byte`.
    public func fill(_ byte: UInt8, count: Int, at address: UInt64) throws {
        let destination = try buffer(at: address, count: count)
        destination.initializeMemory(as: UInt8.self, repeating: byte)
    }

    public func read(count: Int, at address: UInt64) throws -> [UInt8] {
        Array(try buffer(at: address, count: count))
    }

    /// Writes an integer in little-endian byte order.
    public func write<T: FixedWidthInteger>(_ value: T, at address: UInt64) throws {
        try withUnsafeBytes(of: value.littleEndian) { try write($0, at: address) }
    }

    public func read<T: FixedWidthInteger>(_: T.Type, at address: UInt64) throws -> T {
        let buffer = try buffer(at: address, count: MemoryLayout<T>.size)
        return T(littleEndian: buffer.loadUnaligned(as: T.self))
    }
}

extension GuestMemory {
    /// Why `send(to:address:count:deadline:)` or `receive(from:address:count:deadline:)` stopped
    /// before moving every byte.
    public enum TransferError: Error, Equatable, Sendable, CustomStringConvertible {
        /// The range is not inside one guest RAM range; nothing was transferred.
        case outsideRAM(address: UInt64, count: Int)
        /// The deadline passed while the socket was not ready.
        case timedOut(transferred: Int)
        /// The peer closed or reset the connection (end of stream, `EPIPE`, `ECONNRESET`).
        case peerClosed(transferred: Int)
        /// A system call failed otherwise.
        case failed(operation: String, errno: Int32)

        public var description: String {
            switch self {
            case let .outsideRAM(address, count):
                "guest-physical range 0x\(String(address, radix: 16))+\(count) is not in guest RAM"
            case let .timedOut(transferred):
                "timed out after \(transferred) bytes"
            case let .peerClosed(transferred):
                "the peer closed the connection after \(transferred) bytes"
            case let .failed(operation, code):
                "\(operation) failed: \(String(cString: strerror(code)))"
            }
        }
    }

    /// Writes the `count` bytes of guest RAM at `address` to the stream socket `fd`, straight from
    /// the guest's mapping (no intermediate copy). Short writes are continued and `EINTR` retried;
    /// when the socket is full it waits with poll(2), and gives up once `deadline` has passed.
    /// Never raises `SIGPIPE`. The range must lie in one guest RAM range.
    public func send(to fd: Int32, address: UInt64, count: Int, deadline: ContinuousClock.Instant) throws(TransferError) {
        guard count >= 0, let source = try? buffer(at: address, count: count) else {
            throw .outsideRAM(address: address, count: count)
        }
        guard let base = source.baseAddress else { return }
        var done = 0
        while done < count {
            let sent = Glibc.send(fd, base + done, count - done, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
            if sent > 0 {
                done += sent
                continue
            }
            let code = errno
            switch code {
            case EINTR: continue
            case EAGAIN, EWOULDBLOCK: try Self.waitForSocket(fd, events: Int16(POLLOUT), until: deadline, transferred: done)
            case EPIPE, ECONNRESET: throw .peerClosed(transferred: done)
            default: throw .failed(operation: "send", errno: code)
            }
        }
    }

    /// Reads exactly `count` bytes from the stream socket `fd` into guest RAM at `address`, straight
    /// into the guest's mapping (no intermediate copy). Short reads are continued and `EINTR`
    /// retried; while no data is available it waits with poll(2), and gives up once `deadline` has
    /// passed. End of stream before `count` bytes is `peerClosed`. The range must lie in one guest
    /// RAM range; it is checked before the first byte is read. After an error the range holds a
    /// mix of old and new bytes.
    public func receive(from fd: Int32, address: UInt64, count: Int, deadline: ContinuousClock.Instant) throws(TransferError) {
        guard count >= 0, let destination = try? buffer(at: address, count: count) else {
            throw .outsideRAM(address: address, count: count)
        }
        guard let base = destination.baseAddress else { return }
        var done = 0
        while done < count {
            let got = Glibc.recv(fd, base + done, count - done, Int32(MSG_DONTWAIT))
            if got > 0 {
                done += got
                continue
            }
            if got == 0 { throw .peerClosed(transferred: done) }
            let code = errno
            switch code {
            case EINTR: continue
            case EAGAIN, EWOULDBLOCK: try Self.waitForSocket(fd, events: Int16(POLLIN), until: deadline, transferred: done)
            case ECONNRESET: throw .peerClosed(transferred: done)
            default: throw .failed(operation: "recv", errno: code)
            }
        }
    }

    /// Waits until `fd` is ready for `events` (or reports an error or hang-up, which the next call
    /// on it surfaces), or throws `timedOut` once `deadline` has passed.
    private static func waitForSocket(_ fd: Int32, events: Int16, until deadline: ContinuousClock.Instant,
                                      transferred: Int) throws(TransferError) {
        while true {
            let remaining = deadline - .now
            guard remaining > .zero else { throw .timedOut(transferred: transferred) }
            let (seconds, attoseconds) = remaining.components
            // Round up so that a wait never ends just before the deadline and spins.
            let milliseconds = min(seconds * 1000 + (attoseconds + 999_999_999_999_999) / 1_000_000_000_000_000,
                                   Int64(Int32.max))
            var descriptor = pollfd(fd: fd, events: events, revents: 0)
            let ready = poll(&descriptor, 1, Int32(milliseconds))
            if ready > 0 { return }
            if ready < 0 {
                let code = errno
                if code == EINTR { continue }
                throw .failed(operation: "poll", errno: code)
            }
        }
    }
}
