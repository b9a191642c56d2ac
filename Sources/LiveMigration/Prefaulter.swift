import Foundation
import HostOS
import Machine
import MigrationWire
import Synchronization

/// Faults guest RAM in ahead of the bytes that will fill it, on a thread of its own: a memory
/// request's range table arrives before its bytes, so while a receiving thread reads one range
/// from its socket this thread makes the next ones' pages present (`MADV_POPULATE_WRITE`), and the
/// receiving thread's copies do not stop at first-touch faults.
final class Prefaulter: Sendable {
    /// Linux's `MADV_POPULATE_WRITE` (5.14), which the Swift importer's headers may lack.
    static let populateWrite: Int32 = 23
    /// How much one `madvise` populates, so that `close()` takes effect soon.
    static let step = 2 << 20

    private let memory: GuestMemory
    private let queue = Mutex<(ranges: [MigrationMemoryRange], closed: Bool)>(([], false))
    private let posted = DispatchSemaphore(value: 0)

    init(memory: GuestMemory) {
        self.memory = memory
        startThread(named: "mig-prefault") { [self] in run() }
    }

    /// Queues `table`'s ranges, whose bytes are about to be read.
    func post(_ table: MemoryRangeTable) {
        queue.withLock { $0.ranges += table.ranges }
        posted.signal()
    }

    /// Ends the thread soon; call once, when no more memory will arrive.
    func close() {
        queue.withLock { $0.closed = true }
        posted.signal()
    }

    private func run() {
        while true {
            posted.wait()
            let (batch, closed) = queue.withLock { queue in
                defer { queue.ranges.removeAll() }
                return (queue.ranges, queue.closed)
            }
            if closed { return }
            for range in batch where !populate(range) { break }
        }
    }

    /// Populates `range` a step at a time; false once closed.
    private func populate(_ range: MigrationMemoryRange) -> Bool {
        guard let count = Int(exactly: range.length), let bytes = try? memory.buffer(at: range.address, count: count),
              let base = bytes.baseAddress else { return true }
        var done = 0
        while done < count {
            if queue.withLock({ $0.closed }) { return false }
            let length = min(Self.step, count - done)
            _ = madvise(base + done, length, Self.populateWrite)
            done += length
        }
        return true
    }
}
