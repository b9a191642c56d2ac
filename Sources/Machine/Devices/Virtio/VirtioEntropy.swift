#if canImport(Glibc)
import Glibc
#endif
import HostOS

/// virtio-rng (virtio 1.2 §5.4): fills each buffer the guest posts from a host entropy source.
public final class VirtioEntropy: VirtioBackend {
    public let name = "virtio-rng"
    public let source: String
    private let file: FileDescriptor

    public init(source: String) throws(MachineError) {
        self.source = source
        let fd = open(source, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw MachineError(.invalidConfiguration, "rng: cannot open \(source): \(errnoDescription(errno))")
        }
        file = FileDescriptor(fd)
    }

    public var deviceType: UInt16 { 4 }
    public var pciClass: UInt32 { 0xFF_00_00 }
    public var queueSizes: [UInt16] { [256] }
    public var features: UInt64 { 0 }
    public func configuration() -> [UInt8] { [] }

    public func handle(_ chain: DescriptorChain, queue: Int, memory: GuestMemory) throws(VirtioError) -> UInt32 {
        var written: UInt32 = 0
        for buffer in chain.writable {
            // At most a page per buffer: a guest asking for more gets less, as the spec allows.
            let count = min(Int(buffer.length), 4096)
            var bytes = [UInt8](repeating: 0, count: count)
            let result = bytes.withUnsafeMutableBytes { read(file.rawValue, $0.baseAddress, count) }
            guard result > 0 else { break }
            written += UInt32(try ChainIO.scatter(Array(bytes.prefix(result)), into: [buffer], memory: memory))
        }
        return written
    }
}
