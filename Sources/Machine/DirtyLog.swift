#if canImport(Glibc)
import Glibc
#endif
import KVM

/// Guest pages written since the last collection, as runs of consecutive 4 KiB pages.
public struct DirtyPages: Equatable, Sendable {
    public static let pageSize: UInt64 = 4096

    /// Guest-physical runs, in address order.
    public var runs: [GuestRAMRange]

    public init(runs: [GuestRAMRange]) {
        self.runs = runs
    }

    public var pageCount: Int { runs.reduce(0) { $0 + Int($1.size / Self.pageSize) } }
    public var byteCount: UInt64 { runs.reduce(0) { $0 + $1.size } }

    /// The pages in either set, as coalesced runs in address order.
    public func union(_ other: DirtyPages) -> DirtyPages {
        var merged: [GuestRAMRange] = []
        for run in (runs + other.runs).sorted(by: { $0.start < $1.start }) {
            if let last = merged.last, run.start <= last.end {
                merged[merged.count - 1].size = max(last.end, run.end) - last.start
            } else {
                merged.append(run)
            }
        }
        return DirtyPages(runs: merged)
    }

    /// Turns one slot's KVM dirty bitmap (bit n = page n of the slot, least significant bit of
    /// word 0 first) into runs of guest-physical pages.
    static func runs(bitmap: [UInt64], slotStart: UInt64, pageCount: Int) -> [GuestRAMRange] {
        var runs: [GuestRAMRange] = []
        var runStart: Int?
        for page in 0...pageCount {
            let dirty = page < pageCount && bitmap[page / 64] & (1 << UInt64(page % 64)) != 0
            if dirty, runStart == nil {
                runStart = page
            } else if !dirty, let start = runStart {
                runs.append(GuestRAMRange(start: slotStart + UInt64(start) * pageSize,
                                          size: UInt64(page - start) * pageSize))
                runStart = nil
            }
        }
        return runs
    }
}

extension GuestMemory {
    /// Every page of guest RAM that holds a byte other than zero, as runs in address order: what
    /// a first pass over memory must send to a destination whose RAM starts zeroed. Pages never
    /// touched read as the kernel's shared zero page, so scanning them costs no memory.
    public func nonZeroPages() -> DirtyPages {
        DirtyPages(runs: ranges.flatMap { nonZeroPages(in: $0).runs })
    }

    /// The pages of `range` (page-aligned, inside one range of guest RAM) that hold a byte other
    /// than zero; none if `range` is not in guest RAM.
    public func nonZeroPages(in range: GuestRAMRange) -> DirtyPages {
        let page = Int(DirtyPages.pageSize)
        guard let base = try? buffer(at: range.start, count: Int(range.size)).baseAddress else { return DirtyPages(runs: []) }
        let zero = [UInt8](repeating: 0, count: page)
        var runs: [GuestRAMRange] = []
        zero.withUnsafeBytes { zero in
            let pages = Int(range.size) / page
            var runStart: Int?
            for index in 0...pages {
                let nonZero = index < pages && memcmp(base + index * page, zero.baseAddress!, page) != 0
                if nonZero, runStart == nil {
                    runStart = index
                } else if !nonZero, let start = runStart {
                    runs.append(GuestRAMRange(start: range.start + UInt64(start * page), size: UInt64((index - start) * page)))
                    runStart = nil
                }
            }
        }
        return DirtyPages(runs: runs)
    }
}

extension Machine {
    /// Turns KVM's dirty-page logging on or off for every guest RAM slot. Turning it on starts
    /// with a clean log: only writes from now on are reported. Safe while the vCPUs run.
    public func setDirtyLogging(_ on: Bool) throws {
        for (slot, region) in memory.regions.enumerated() {
            try vm.setMemoryRegion(slot: UInt32(slot), guestAddress: region.range.start, size: region.range.size,
                                   hostAddress: region.host, logDirtyPages: on)
        }
    }

    /// The pages written since logging started or since the last call, and clears the log.
    /// Dirty logging must be on.
    public func collectDirtyPages() throws -> DirtyPages {
        var runs: [GuestRAMRange] = []
        for (slot, region) in memory.regions.enumerated() {
            let pages = Int(region.range.size / DirtyPages.pageSize)
            let bitmap = try vm.dirtyLog(slot: UInt32(slot), pageCount: pages)
            runs += DirtyPages.runs(bitmap: bitmap, slotStart: region.range.start, pageCount: pages)
        }
        return DirtyPages(runs: runs)
    }
}
