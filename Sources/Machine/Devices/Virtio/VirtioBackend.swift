import HostOS
import KVM

/// What a virtio device type adds to the PCI transport: its identity, queues, features and
/// configuration, and how it serves one request. Runs on the device's I/O thread, never on a vCPU.
public protocol VirtioBackend: AnyObject, Sendable {
    /// The virtio device id (§5): 2 block, 3 console, 4 entropy.
    var deviceType: UInt16 { get }
    /// For messages: e.g. `virtio-blk disk0`.
    var name: String { get }
    /// PCI class code (base class, subclass, programming interface).
    var pciClass: UInt32 { get }
    /// The largest size of each queue; their count is the device's queue count.
    var queueSizes: [UInt16] { get }
    /// The device-specific feature bits the device offers (the transport adds its own).
    var features: UInt64 { get }
    /// The device-specific configuration structure (§5.x.4) as the driver reads it.
    func configuration() -> [UInt8]
    /// Serves one request from `queue`; returns the bytes written into its device-writable
    /// buffers. A malformed request throws and the device then needs a reset.
    func handle(_ chain: DescriptorChain, queue: Int, memory: GuestMemory) throws(VirtioError) -> UInt32
    /// Serves what the driver made available on a queue. The default takes one request at a
    /// time to `handle`; a device whose unit of work spans several requests (a received frame
    /// in mergeable buffers) takes the queue itself.
    func serve(_ queue: QueueAccess) throws(VirtioError)
    /// Descriptors whose readability should wake the device's I/O thread now, each with the
    /// queue to serve then (a tap with frames for the receive queue), besides the doorbells and
    /// `wakeup`. Asked before each wait.
    var pollDescriptors: [(descriptor: Int32, queue: Int)] { get }
    /// The driver set DRIVER_OK with these features (or a restored device had).
    func driverReady(features: UInt64)
    /// Whether requests on `queue` can be served now (a console's receive queue waits for input).
    func canServe(queue: Int) -> Bool
    /// Signalled when `canServe` may have become true (host input arrived); nil if never needed.
    var wakeup: EventFD? { get }
    /// Back to the state after a device reset.
    func reset()
}

extension VirtioBackend {
    public func canServe(queue: Int) -> Bool { true }
    public var wakeup: EventFD? { nil }
    public func reset() {}
    public var pollDescriptors: [(descriptor: Int32, queue: Int)] { [] }
    public func driverReady(features: UInt64) {}

    public func serve(_ queue: QueueAccess) throws(VirtioError) {
        while !queue.stopRequested, canServe(queue: queue.index), let chain = try queue.next() {
            try queue.complete(chain, written: try handle(chain, queue: queue.index, memory: queue.memory))
        }
    }
}

/// One queue as a device's backend serves it on the I/O thread: take the chains the driver made
/// available, return them used, or give back ones taken but not used. Each call takes the
/// device's lock briefly; none is held while the backend works.
public struct QueueAccess {
    public let index: Int
    public let memory: GuestMemory
    let take: () throws(VirtioError) -> DescriptorChain?
    let give: (DescriptorChain, UInt32) throws(VirtioError) -> Void
    let untake: (UInt16) throws(VirtioError) -> Bool
    let stop: () -> Bool

    /// The machine is pausing or the device stopping: finish the request in hand and return.
    public var stopRequested: Bool { stop() }

    /// The next chain the driver made available, or nil (then the driver is asked to notify the
    /// device when it adds one).
    public func next() throws(VirtioError) -> DescriptorChain? { try take() }

    /// Returns `chain` to the driver with the number of bytes written into it.
    public func complete(_ chain: DescriptorChain, written: UInt32) throws(VirtioError) { try give(chain, written) }

    /// Gives back the last `count` chains taken and not completed, as if never taken, and asks
    /// the driver to notify when it adds another. True if it already has (look again).
    public func giveBack(_ count: UInt16) throws(VirtioError) -> Bool { try untake(count) }
}

/// Copies between host bytes and a chain's guest buffers, recording every device write so a
/// migration sends those pages again.
enum ChainIO {
    /// Reads up to `count` bytes from the chain's device-readable buffers, in order.
    static func gather(_ buffers: [VirtioBuffer], count: Int, from memory: GuestMemory) throws(VirtioError) -> [UInt8] {
        var bytes: [UInt8] = []
        for buffer in buffers where bytes.count < count {
            let take = min(Int(buffer.length), count - bytes.count)
            do { bytes += try memory.read(count: take, at: buffer.address) } catch { throw VirtioError(error.message) }
        }
        return bytes
    }

    /// Writes `bytes` into device-writable buffers in order; returns how many fit.
    @discardableResult
    static func scatter(_ bytes: [UInt8], into buffers: [VirtioBuffer], memory: GuestMemory) throws(VirtioError) -> Int {
        var done = 0
        for buffer in buffers where done < bytes.count {
            let take = min(Int(buffer.length), bytes.count - done)
            do { try memory.write(bytes[done..<(done + take)], at: buffer.address) } catch { throw VirtioError(error.message) }
            memory.recordDeviceWrite(at: buffer.address, count: take)
            done += take
        }
        return done
    }
}
