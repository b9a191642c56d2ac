#if canImport(Glibc)
import Glibc
#endif
import CKVM
import HostOS

/// A tap device: the host end of a guest's network card. Frames the guest sends are written to
/// it and appear on the host's interface; frames the host sends there are read from it.
///
/// Ferry opens taps with `IFF_VNET_HDR`, so that each frame carries a virtio-net header and the
/// guest's checksum and segmentation offloads pass through the host unchanged. A tap handed over
/// already open (`fd=`) may lack it; then frames travel bare and no offload is offered.
public final class Tap: Sendable {
    /// The interface name (`tap0`).
    public let name: String
    public let descriptor: FileDescriptor
    /// Frames carry a 12-byte virtio-net header (`struct virtio_net_hdr_v1`).
    public let hasVirtioHeader: Bool
    /// The TUN_F_* offloads this tap accepts (checksum, TSO4/6, ECN, UFO).
    public let supportedOffloads: UInt32

    public static let virtioHeaderSize = 12

    /// Opens the tap `name`, creating it if there is none, and brings it up; with `address` and
    /// `netmask` (dotted quads) the host end gets that address.
    public static func open(name: String, address: String? = nil, netmask: String? = nil, for device: String) throws(MachineError) -> Tap {
        guard !name.isEmpty, name.utf8.count < 16, !name.contains("/"), !name.contains(" ") else {
            throw MachineError(.invalidConfiguration, "\(device): tap '\(name)' is not a valid interface name (1 to 15 bytes)")
        }
        let fd = ckvm_tap_open(name)
        guard fd >= 0 else {
            let code = -fd
            let hint = switch code {
            case EBUSY: " (another process has it open)"
            case EPERM, EACCES: " (opening a tap needs CAP_NET_ADMIN, or a tap made for this user)"
            case EINVAL: " (an interface of that name exists and is not a tap)"
            default: ""
            }
            throw MachineError(.invalidConfiguration, "\(device): cannot open tap \(name): \(errnoDescription(code))\(hint)")
        }
        let tap = try Tap(adopting: FileDescriptor(fd), for: device)
        try tap.configure(address: address, netmask: netmask, for: device)
        return tap
    }

    /// Checks, before anything starts, that the card's tap can be had: its descriptor is a tap,
    /// or the named tap opens (created and at once removed again if it did not exist).
    public static func check(_ network: NetworkConfiguration) throws(MachineError) {
        let device = "net \(network.id)"
        if let fd = network.fd {
            guard fcntl(fd, F_GETFD) >= 0 else {
                throw MachineError(.invalidConfiguration, "\(device): fd \(fd) is not an open descriptor")
            }
            _ = try interface(of: fd, for: device)
            return
        }
        _ = try open(name: network.tap ?? "", for: device)
    }

    /// Works on a duplicate of a tap descriptor another process opened (libvirt's way): it must
    /// be a tap without packet information; the duplicate is non-blocking and close-on-exec. `fd`
    /// stays open, so that the VM can boot again on it.
    public static func adopt(descriptor fd: Int32, for device: String) throws(MachineError) -> Tap {
        guard fcntl(fd, F_GETFD) >= 0 else {
            throw MachineError(.invalidConfiguration, "\(device): fd \(fd) is not an open descriptor")
        }
        let duplicate = fcntl(fd, F_DUPFD_CLOEXEC, 3)
        guard duplicate >= 0 else {
            throw MachineError(.invalidConfiguration, "\(device): cannot take fd \(fd): \(errnoDescription(errno))")
        }
        let owned = FileDescriptor(duplicate)
        _ = fcntl(duplicate, F_SETFL, fcntl(duplicate, F_GETFL) | O_NONBLOCK)
        let tap = try Tap(adopting: owned, for: device)
        try tap.configure(address: nil, netmask: nil, for: device)
        return tap
    }

    private init(adopting descriptor: FileDescriptor, for device: String) throws(MachineError) {
        let flags: Int32
        (name, flags) = try Self.interface(of: descriptor.rawValue, for: device)
        self.descriptor = descriptor
        var virtioHeader = flags & CKVM_IFF_VNET_HDR != 0
        if virtioHeader, ckvm_tap_set_vnet_header_size(descriptor.rawValue, Int32(Self.virtioHeaderSize)) != 0 {
            virtioHeader = false
        }
        hasVirtioHeader = virtioHeader
        // The widest set the kernel takes; the guest's features decide what is switched on.
        var supported: UInt32 = 0
        if virtioHeader {
            let all = CKVM_TUN_F_CSUM | CKVM_TUN_F_TSO4 | CKVM_TUN_F_TSO6 | CKVM_TUN_F_TSO_ECN
            for candidate in [all | CKVM_TUN_F_UFO, all, CKVM_TUN_F_CSUM] where ckvm_tap_set_offload(descriptor.rawValue, candidate) == 0 {
                supported = candidate
                break
            }
            _ = ckvm_tap_set_offload(descriptor.rawValue, 0)
        }
        supportedOffloads = supported
    }

    /// The interface name and IFF_* flags of tap descriptor `fd`; an error unless it is a tap
    /// without packet information (frames with a 4-byte prefix are not Ethernet frames).
    private static func interface(of fd: Int32, for device: String) throws(MachineError) -> (name: String, flags: Int32) {
        var nameBytes = [CChar](repeating: 0, count: 16)
        var flags: Int32 = 0
        let result = ckvm_tap_query(fd, &nameBytes, &flags)
        guard result == 0 else {
            throw MachineError(.invalidConfiguration, "\(device): fd \(fd) is not a tun/tap device: \(errnoDescription(-result))")
        }
        guard flags & CKVM_IFF_TAP != 0 else {
            throw MachineError(.invalidConfiguration, "\(device): fd \(fd) is a tun device, not a tap (Ethernet frames are needed)")
        }
        guard flags & 0x1000 != 0 else {   // IFF_NO_PI
            throw MachineError(.invalidConfiguration, "\(device): the tap must be opened with IFF_NO_PI")
        }
        return (String(decoding: nameBytes.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self), flags)
    }

    private func configure(address: String?, netmask: String?, for device: String) throws(MachineError) {
        func parse(_ text: String?, _ field: String) throws(MachineError) -> UInt32 {
            guard let text else { return 0 }
            var value = in_addr()
            guard inet_pton(AF_INET, text, &value) == 1 else {
                throw MachineError(.invalidConfiguration, "\(device): \(field) '\(text)' is not an IPv4 address")
            }
            return value.s_addr
        }
        let result = ckvm_interface_configure(name, try parse(address, "ip"), try parse(netmask, "mask"))
        guard result == 0 else {
            throw MachineError(.invalidConfiguration, "\(device): cannot configure tap \(name): \(errnoDescription(-result))")
        }
    }

    /// Switches the offloads on that the guest's driver accepted (TUN_F_* bits), within what the tap supports.
    public func setOffloads(_ flags: UInt32) {
        guard hasVirtioHeader else { return }
        _ = ckvm_tap_set_offload(descriptor.rawValue, flags & supportedOffloads)
    }
}
