import Synchronization

/// A guest mistake that stops a virtio device until the driver resets it: the device sets
/// `DEVICE_NEEDS_RESET` and the message goes to the VMM's log.
public struct VirtioError: Error, Equatable, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// One buffer of a descriptor chain: guest-physical address, length, and whether the device
/// writes it (otherwise it reads it).
public struct VirtioBuffer: Equatable, Sendable {
    public var address: UInt64
    public var length: UInt32
    public var deviceWritable: Bool
}

/// A request the driver made available: the head index to return in the used ring, and its
/// buffers in chain order (indirect tables already followed), each checked to lie in guest RAM.
public struct DescriptorChain: Equatable, Sendable {
    public var head: UInt16
    public var buffers: [VirtioBuffer]

    public var readable: [VirtioBuffer] { buffers.filter { !$0.deviceWritable } }
    public var writable: [VirtioBuffer] { buffers.filter(\.deviceWritable) }
}

/// A split virtqueue (virtio 1.2 §2.7): where the driver put its three areas, and the device's
/// two ring positions. A plain value: the device keeps it under its lock, saves it for snapshots
/// and migration, and runs the ring operations below on it. Every guest-memory access is
/// bounds-checked by `GuestMemory`; every index and length the guest supplies is checked before
/// use, so a hostile driver gets a `VirtioError`, never an access outside guest RAM.
public struct Virtqueue: Codable, Equatable, Sendable {
    /// The largest size the device offers; the driver may choose a smaller power of two.
    public var maximumSize: UInt16
    public var size: UInt16
    public var enabled = false
    public var descriptorTable: UInt64 = 0
    public var driverArea: UInt64 = 0
    public var deviceArea: UInt64 = 0
    public var msixVector: UInt16 = VirtioPCI.noVector
    /// The next available-ring slot the device reads.
    public var nextAvailable: UInt16 = 0
    /// The next used-ring slot the device writes (and the used index it publishes).
    public var nextUsed: UInt16 = 0
    /// The used index when the driver was last notified (for `VIRTIO_F_RING_EVENT_IDX`).
    public var signalledUsed: UInt16 = 0

    static let descriptorSize: UInt64 = 16
    static let flagNext: UInt16 = 1, flagWrite: UInt16 = 2, flagIndirect: UInt16 = 4
    static let availableNoInterrupt: UInt16 = 1

    public init(maximumSize: UInt16) {
        self.maximumSize = maximumSize
        size = maximumSize
    }

    /// Back to the state after a device reset.
    public mutating func reset() {
        self = Virtqueue(maximumSize: maximumSize)
    }

    /// Checks the driver's choices when it enables the queue: a power-of-two size no larger than
    /// offered, and the three areas aligned (§2.7) and inside guest RAM.
    public func validate(in memory: GuestMemory) throws(VirtioError) {
        guard size > 0, size <= maximumSize, size & (size - 1) == 0 else {
            throw VirtioError("queue size \(size) is not a power of two from 1 to \(maximumSize)")
        }
        let count = UInt64(size)
        let areas: [(String, UInt64, UInt64, UInt64)] = [
            ("descriptor table", descriptorTable, 16 * count, 16),
            ("driver area", driverArea, 6 + 2 * count, 2),
            ("device area", deviceArea, 6 + 8 * count, 4),
        ]
        for (name, address, length, alignment) in areas {
            guard address % alignment == 0 else {
                throw VirtioError("the \(name) at 0x\(String(address, radix: 16)) is not \(alignment)-byte aligned")
            }
            guard memory.contains(address, count: Int(length)) else {
                throw VirtioError("the \(name) at 0x\(String(address, radix: 16))+\(length) is not in guest RAM")
            }
        }
    }

    // MARK: Device side of the rings

    /// The available index the driver last published.
    func availableIndex(_ memory: GuestMemory) throws(VirtioError) -> UInt16 {
        try guest { () throws(MachineError) in try memory.read(UInt16.self, at: driverArea + 2) }
    }

    /// Takes the next chain the driver made available, or nil if there is none.
    public mutating func pop(_ memory: GuestMemory) throws(VirtioError) -> DescriptorChain? {
        let available = try availableIndex(memory)
        let pending = available &- nextAvailable
        guard pending != 0 else { return nil }
        guard pending <= size else {
            throw VirtioError("the available index jumped from \(nextAvailable) to \(available), more than the queue's \(size) entries")
        }
        Self.acquire()
        let slot = UInt64(nextAvailable % size)
        let head = try guest { () throws(MachineError) in try memory.read(UInt16.self, at: driverArea + 4 + 2 * slot) }
        guard head < size else { throw VirtioError("the available ring names descriptor \(head) of a \(size)-entry table") }
        let chain = try walk(head: head, memory)
        nextAvailable &+= 1
        return chain
    }

    /// Follows a chain from `head`: at most one indirect table (§2.7.5.3), no loops (a chain
    /// never has more descriptors than its table), every buffer inside guest RAM.
    private func walk(head: UInt16, _ memory: GuestMemory) throws(VirtioError) -> DescriptorChain {
        var table = descriptorTable
        var tableSize = UInt32(size)
        var index = UInt32(head)
        var indirect = false
        var buffers: [VirtioBuffer] = []
        var visited: UInt32 = 0
        while true {
            let at = table + Self.descriptorSize * UInt64(index)
            let (address, length, flags, next) = try guest { () throws(MachineError) in
                (try memory.read(UInt64.self, at: at), try memory.read(UInt32.self, at: at + 8),
                 try memory.read(UInt16.self, at: at + 12), try memory.read(UInt16.self, at: at + 14))
            }
            visited += 1
            if flags & Self.flagIndirect != 0 {
                guard !indirect else { throw VirtioError("descriptor \(index) of an indirect table is itself indirect") }
                guard buffers.isEmpty, flags & Self.flagNext == 0 else {
                    throw VirtioError("indirect descriptor \(index) is not alone in its chain")
                }
                guard length > 0, length % UInt32(Self.descriptorSize) == 0, length / 16 <= 65536 else {
                    throw VirtioError("indirect descriptor \(index) has a table length of \(length) bytes")
                }
                guard memory.contains(address, count: Int(length)) else {
                    throw VirtioError("the indirect table at 0x\(String(address, radix: 16))+\(length) is not in guest RAM")
                }
                table = address
                tableSize = length / UInt32(Self.descriptorSize)
                index = 0
                indirect = true
                visited = 0
                continue
            }
            guard memory.contains(address, count: Int(length)) else {
                throw VirtioError("descriptor \(index) points to 0x\(String(address, radix: 16))+\(length), outside guest RAM")
            }
            buffers.append(VirtioBuffer(address: address, length: length, deviceWritable: flags & Self.flagWrite != 0))
            guard flags & Self.flagNext != 0 else { break }
            guard UInt32(next) < tableSize else {
                throw VirtioError("descriptor \(index) links to descriptor \(next) of a \(tableSize)-entry table")
            }
            guard visited < tableSize else {
                throw VirtioError("the chain from descriptor \(head) is longer than its \(tableSize)-entry table (a loop)")
            }
            index = UInt32(next)
        }
        return DescriptorChain(head: head, buffers: buffers)
    }

    /// Gives back the last `count` chains `pop` took (not yet pushed), and with
    /// `VIRTIO_F_RING_EVENT_IDX` asks the driver to notify once it makes another available.
    /// Returns whether it already has (the caller should look again).
    public mutating func unpop(_ count: UInt16, eventIndex: Bool, _ memory: GuestMemory) throws(VirtioError) -> Bool {
        nextAvailable &-= count
        guard eventIndex else { return false }
        let available = try availableIndex(memory)
        let at = deviceArea + 4 + 8 * UInt64(size)
        try guest { () throws(MachineError) in
            try memory.write(available, at: at)
            memory.recordDeviceWrite(at: at, count: 2)
        }
        Self.full()
        return try availableIndex(memory) != available
    }

    /// Returns a chain to the driver with the number of bytes the device wrote into it.
    public mutating func push(head: UInt16, written: UInt32, _ memory: GuestMemory) throws(VirtioError) {
        let slot = UInt64(nextUsed % size)
        let element = deviceArea + 4 + 8 * slot
        try guest { () throws(MachineError) in
            try memory.write(UInt32(head), at: element)
            try memory.write(written, at: element + 4)
            Self.release()
            nextUsed &+= 1
            try memory.write(nextUsed, at: deviceArea + 2)
            memory.recordDeviceWrite(at: element, count: 8)
            memory.recordDeviceWrite(at: deviceArea + 2, count: 2)
        }
    }

    /// With `VIRTIO_F_RING_EVENT_IDX`: asks the driver to notify once it makes the entry after
    /// `nextAvailable` available (the `avail_event` field, §2.7.10).
    public func requestNotification(_ memory: GuestMemory) throws(VirtioError) {
        let at = deviceArea + 4 + 8 * UInt64(size)
        try guest { () throws(MachineError) in
            try memory.write(nextAvailable, at: at)
            memory.recordDeviceWrite(at: at, count: 2)
        }
        Self.full()
    }

    /// Whether the driver wants an interrupt for the entries used since the last one, and if so
    /// records that it got one.
    public mutating func shouldInterrupt(eventIndex: Bool, _ memory: GuestMemory) throws(VirtioError) -> Bool {
        Self.full()
        if eventIndex {
            let usedEvent = try guest { () throws(MachineError) in try memory.read(UInt16.self, at: driverArea + 4 + 2 * UInt64(size)) }
            let old = signalledUsed
            signalledUsed = nextUsed
            // vring_need_event: the driver's used_event lies in (old, nextUsed].
            return nextUsed &- usedEvent &- 1 < nextUsed &- old
        }
        let flags = try guest { () throws(MachineError) in try memory.read(UInt16.self, at: driverArea) }
        return flags & Self.availableNoInterrupt == 0
    }

    private func guest<T>(_ body: () throws(MachineError) -> T) throws(VirtioError) -> T {
        do { return try body() } catch { throw VirtioError(error.message) }
    }

    // x86 keeps loads and stores in order except a store followed by a load; these fences keep the
    // compiler from reordering ring accesses and order the one pair the CPU may reorder.
    static func acquire() { atomicMemoryFence(ordering: .acquiring) }
    static func release() { atomicMemoryFence(ordering: .releasing) }
    static func full() { atomicMemoryFence(ordering: .sequentiallyConsistent) }
}
