import Testing
@testable import Machine

/// A driver's side of one split virtqueue, written straight into guest memory, and the device's
/// view of it (`access`) for a backend to serve: the tests are the guest's driver.
final class DriverQueue: @unchecked Sendable {
    let memory: GuestMemory
    var queue = Virtqueue(maximumSize: 16)
    var availableIndex: UInt16 = 0
    /// Whether the device side behaves as with `VIRTIO_F_RING_EVENT_IDX` negotiated.
    var eventIndex = false

    init(memory: GuestMemory, table: UInt64, driverArea: UInt64, deviceArea: UInt64) throws {
        self.memory = memory
        queue.descriptorTable = table
        queue.driverArea = driverArea
        queue.deviceArea = deviceArea
        try queue.validate(in: memory)
        queue.enabled = true
    }

    /// Descriptor `index` of the queue's table, or of the indirect table at `table`.
    func descriptor(_ index: UInt16, in table: UInt64? = nil, address: UInt64, length: UInt32, flags: UInt16,
                    next: UInt16 = 0) throws {
        let at = (table ?? queue.descriptorTable) + 16 * UInt64(index)
        try memory.write(address, at: at)
        try memory.write(length, at: at + 8)
        try memory.write(flags, at: at + 12)
        try memory.write(next, at: at + 14)
    }

    func makeAvailable(_ head: UInt16) throws {
        try memory.write(head, at: queue.driverArea + 4 + 2 * UInt64(availableIndex % queue.size))
        availableIndex &+= 1
        try memory.write(availableIndex, at: queue.driverArea + 2)
    }

    /// The used index the device last published.
    var usedIndex: UInt16 { (try? memory.read(UInt16.self, at: queue.deviceArea + 2)) ?? 0 }

    /// The used-ring element at `slot`.
    func used(_ slot: UInt16) throws -> (id: UInt32, length: UInt32) {
        let at = queue.deviceArea + 4 + 8 * UInt64(slot % queue.size)
        return (try memory.read(UInt32.self, at: at), try memory.read(UInt32.self, at: at + 4))
    }

    /// The queue as a backend serving it as queue `index` sees it.
    func access(_ index: Int) -> QueueAccess {
        QueueAccess(index: index, memory: memory,
                    take: { () throws(VirtioError) -> DescriptorChain? in try self.queue.pop(self.memory) },
                    give: { (chain, written) throws(VirtioError) in try self.queue.push(head: chain.head, written: written, self.memory) },
                    untake: { (count) throws(VirtioError) -> Bool in try self.queue.unpop(count, eventIndex: self.eventIndex, self.memory) },
                    stop: { false })
    }
}
