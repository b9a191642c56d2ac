/// The guest's physical memory map as firmware reports it (BIOS INT 15h E820 types).
public struct E820Entry: Equatable, Sendable {
    public enum Kind: UInt32, Sendable {
        case ram = 1
        case reserved = 2
    }

    public var address: UInt64
    public var size: UInt64
    public var kind: Kind

    public init(address: UInt64, size: UInt64, kind: Kind) {
        self.address = address
        self.size = size
        self.kind = kind
    }
}

public enum E820Map {
    /// The map for guest RAM laid out by `GuestRAMLayout`: conventional memory up to the EBDA, the
    /// EBDA and BIOS area reserved, RAM from 1 MiB to the MMIO hole, and RAM above 4 GiB.
    public static func entries(for ranges: [GuestRAMRange]) -> [E820Entry] {
        var entries: [E820Entry] = []
        for range in ranges {
            if range.start == 0 {
                entries.append(E820Entry(address: 0, size: BootLayout.ebdaStart, kind: .ram))
                entries.append(E820Entry(address: BootLayout.ebdaStart,
                                         size: BootLayout.kernelLoadAddress - BootLayout.ebdaStart, kind: .reserved))
                if range.end > BootLayout.kernelLoadAddress {
                    entries.append(E820Entry(address: BootLayout.kernelLoadAddress,
                                             size: range.end - BootLayout.kernelLoadAddress, kind: .ram))
                }
            } else {
                entries.append(E820Entry(address: range.start, size: range.size, kind: .ram))
            }
        }
        return entries
    }
}
