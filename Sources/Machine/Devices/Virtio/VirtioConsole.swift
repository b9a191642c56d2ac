import HostOS
import KVM
import Synchronization

/// virtio-console (virtio 1.2 §5.3) with one port and no multiport: queue 0 receives (host to
/// guest), queue 1 transmits (guest to host).
public final class VirtioConsole: VirtioBackend {
    public let name = "virtio-console"
    /// Host input buffered before the guest posts receive buffers; more is dropped.
    static let inputCapacity = 4096
    private let output: @Sendable ([UInt8]) -> Void
    private let input = Mutex<[UInt8]>([])
    public let wakeup: EventFD?

    public init(output: @escaping @Sendable ([UInt8]) -> Void) throws(MachineError) {
        self.output = output
        do { wakeup = try EventFD() } catch { throw MachineError.host("creating the console's event", error) }
    }

    public var deviceType: UInt16 { 3 }
    public var pciClass: UInt32 { 0x07_80_00 }   // communication controller, other
    public var queueSizes: [UInt16] { [64, 64] }
    public var features: UInt64 { 0 }
    public func configuration() -> [UInt8] { [UInt8](repeating: 0, count: 12) }   // cols, rows, max_nr_ports, emerg_wr

    /// Queues host input for the guest.
    public func enqueueInput(_ bytes: [UInt8]) {
        input.withLock { pending in
            pending += bytes.prefix(Self.inputCapacity - min(pending.count, Self.inputCapacity))
        }
        wakeup?.signal()
    }

    public func canServe(queue: Int) -> Bool {
        queue == 1 || input.withLock { !$0.isEmpty }
    }

    public func handle(_ chain: DescriptorChain, queue: Int, memory: GuestMemory) throws(VirtioError) -> UInt32 {
        if queue == 1 {
            let total = chain.readable.reduce(0) { $0 + Int($1.length) }
            output(try ChainIO.gather(chain.readable, count: total, from: memory))
            return 0
        }
        let room = chain.writable.reduce(0) { $0 + Int($1.length) }
        let bytes = input.withLock { pending in
            let taken = Array(pending.prefix(room))
            pending.removeFirst(taken.count)
            return taken
        }
        return UInt32(try ChainIO.scatter(bytes, into: chain.writable, memory: memory))
    }

    public func reset() {
        input.withLock { $0.removeAll() }
    }
}
