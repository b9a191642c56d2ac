#if canImport(Glibc)
import Glibc
#endif
import HostOS
import KVM

/// A set of guest pages as runs of consecutive 4 KiB pages: the pages KVM's dirty log reports
/// written, or the pages of RAM that hold anything but zeros.
public struct PageRuns: Equatable, Sendable {
    public static let pageSize: UInt64 = 4096

    /// Guest-physical runs, in address order.
    public var runs: [GuestRAMRange]

    public init(runs: [GuestRAMRange]) {
        self.runs = runs
    }

    public var pageCount: Int { runs.reduce(0) { $0 + Int($1.size / Self.pageSize) } }
    public var byteCount: UInt64 { runs.reduce(0) { $0 + $1.size } }

    /// The pages in either set, as coalesced runs in address order.
    public func union(_ other: PageRuns) -> PageRuns {
        var merged: [GuestRAMRange] = []
        for run in (runs + other.runs).sorted(by: { $0.start < $1.start }) {
            if let last = merged.last, run.start <= last.end {
                merged[merged.count - 1].size = max(last.end, run.end) - last.start
            } else {
                merged.append(run)
            }
        }
        return PageRuns(runs: merged)
    }

    /// The runs of pages `0..<pageCount` from `start` for which `selected(page)` holds.
    static func runs(start: UInt64, pageCount: Int, where selected: (Int) -> Bool) -> [GuestRAMRange] {
        var runs: [GuestRAMRange] = []
        var runStart: Int?
        for page in 0...pageCount {
            let isSelected = page < pageCount && selected(page)
            if isSelected, runStart == nil {
                runStart = page
            } else if !isSelected, let first = runStart {
                runs.append(GuestRAMRange(start: start + UInt64(first) * pageSize, size: UInt64(page - first) * pageSize))
                runStart = nil
            }
        }
        return runs
    }

    /// Turns one slot's KVM dirty bitmap (bit n = page n of the slot, least significant bit of
    /// word 0 first) into runs of guest-physical pages.
    /// Words with no bit set are skipped whole, so a large, quiet slot costs a pass over its
    /// bitmap's words, not over its pages.
    static func runs(bitmap: [UInt64], slotStart: UInt64, pageCount: Int) -> [GuestRAMRange] {
        var runs: [GuestRAMRange] = []
        var runStart: Int?
        func close(at page: Int) {
            guard let first = runStart else { return }
            runs.append(GuestRAMRange(start: slotStart + UInt64(first) * pageSize, size: UInt64(page - first) * pageSize))
            runStart = nil
        }
        for (index, word) in bitmap.enumerated() where index * 64 < pageCount {
            let base = index * 64
            if word == 0 { close(at: base); continue }
            if word == .max, base + 64 <= pageCount {
                if runStart == nil { runStart = base }
                continue
            }
            for bit in 0..<min(64, pageCount - base) {
                if word & (1 << UInt64(bit)) != 0 {
                    if runStart == nil { runStart = base + bit }
                } else {
                    close(at: base + bit)
                }
            }
        }
        close(at: pageCount)
        return runs
    }
}

extension GuestMemory {
    /// A page of zeros to compare guest pages with.
    nonisolated(unsafe) private static let zeroPage: UnsafeRawPointer = {
        let page = UnsafeMutableRawPointer.allocate(byteCount: Int(PageRuns.pageSize), alignment: Int(PageRuns.pageSize))
        page.initializeMemory(as: UInt8.self, repeating: 0, count: Int(PageRuns.pageSize))
        return UnsafeRawPointer(page)
    }()

    /// Every page of guest RAM that holds a byte other than zero, as runs in address order: what
    /// a first pass over memory must send to a destination whose RAM starts zeroed. Pages the host
    /// never backed (`PageMap`: neither in RAM nor in swap) are skipped unread, so the scan costs
    /// what the guest uses, not its size.
    public func nonZeroPages() -> PageRuns {
        PageRuns(runs: ranges.flatMap { nonZeroPages(in: $0).runs })
    }

    /// The pages of `range` (page-aligned, inside one range of guest RAM) that hold a byte other
    /// than zero; none if `range` is not in guest RAM.
    public func nonZeroPages(in range: GuestRAMRange) -> PageRuns {
        let page = Int(PageRuns.pageSize)
        guard let base = try? buffer(at: range.start, count: Int(range.size)).baseAddress else { return PageRuns(runs: []) }
        let pageCount = Int(range.size) / page
        let backed = backedPages(in: range, at: base, pageCount: pageCount)
        return PageRuns(runs: PageRuns.runs(start: range.start, pageCount: pageCount) { index in
            (backed?[index] ?? true) && memcmp(base + index * page, Self.zeroPage, page) != 0
        })
    }

    /// Which pages of `range` can hold anything but zero, or nil if that cannot be told (every
    /// page may). Private memory: the pages the host's page tables back. Shared memory: the
    /// memory file's data (`SEEK_DATA`/`SEEK_HOLE`), since a page of the file can hold data
    /// without being mapped in this process (another process wrote it, or it was swapped out).
    private func backedPages(in range: GuestRAMRange, at base: UnsafeMutableRawPointer, pageCount: Int) -> [Bool]? {
        guard let file = backingFile else {
            return PageMap.entries(at: base, count: pageCount).map { entries in entries.map(PageMap.isBacked) }
        }
        guard let region = regions.first(where: { $0.range.start <= range.start && range.end <= $0.range.end }) else { return nil }
        let page = Int(PageRuns.pageSize)
        let start = Int(region.fileOffset + (range.start - region.range.start))
        let end = start + Int(range.size)
        let seekData: Int32 = 3, seekHole: Int32 = 4
        var backed = [Bool](repeating: false, count: pageCount)
        var position = start
        while position < end {
            let data = Int(lseek(file.rawValue, off_t(position), seekData))
            if data < 0 { return errno == ENXIO ? backed : nil }  // ENXIO: no data after `position`
            guard data < end else { break }
            let hole = Int(lseek(file.rawValue, off_t(data), seekHole))
            guard hole > data else { return nil }
            let first = (data - start) / page
            let last = (min(hole, end) - start + page - 1) / page
            for index in first..<last { backed[index] = true }
            position = hole
        }
        return backed
    }
}

extension Machine {
    /// Turns KVM's dirty-page logging on or off for every guest RAM slot. Turning it on starts
    /// with a clean log: only writes from now on are reported. Safe while the vCPUs run.
    public func setDirtyLogging(_ on: Bool) throws(MachineError) {
        do {
            for (slot, region) in memory.regions.enumerated() {
                try vm.setMemoryRegion(slot: UInt32(slot), guestAddress: region.range.start, size: region.range.size,
                                       hostAddress: region.host, logDirtyPages: on)
            }
        } catch {
            throw MachineError.host("turning dirty logging \(on ? "on" : "off")", error)
        }
        memory.trackDeviceWrites(on)
    }

    /// The pages written since logging started or since the last call — by the guest (KVM's
    /// log) or by a device (`GuestMemory.recordDeviceWrite`) — and clears both logs. Dirty
    /// logging must be on.
    public func collectDirtyPages() throws(MachineError) -> PageRuns {
        var runs: [GuestRAMRange] = []
        let deviceWrites = memory.takeDeviceWrites()
        for (slot, region) in memory.regions.enumerated() {
            let pages = Int(region.range.size / PageRuns.pageSize)
            var bitmap: [UInt64]
            do {
                bitmap = try vm.dirtyLog(slot: UInt32(slot), pageCount: pages)
            } catch {
                throw MachineError.host("collecting the dirty log", error)
            }
            if let written = deviceWrites?[slot] {
                for word in bitmap.indices { bitmap[word] |= written[word] }
            }
            runs += PageRuns.runs(bitmap: bitmap, slotStart: region.range.start, pageCount: pages)
        }
        return PageRuns(runs: runs)
    }
}
