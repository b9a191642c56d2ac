import FerryTestSupport
import Foundation
import HostOS
import Testing
@testable import Machine

/// virtio-net on a real tap in a network namespace of the test's own, without a VM: the test is
/// the driver (rings in guest memory) and, through a packet socket on the tap, the network.
@Suite(.serialized, .enabled(if: NetworkTools.tapsAvailable, NetworkTools.tapsUnavailable))
struct VirtioNetTests {
    static let ram: UInt64 = 1 << 20
    static let mac = MACAddress("52:54:00:12:34:56")!
    /// A frame type nobody else sends: the test's own traffic is easy to tell apart.
    static let etherType: [UInt8] = [0x88, 0xB5]

    struct Setup {
        let namespace: NetworkNamespace
        let net: VirtioNet
        let wire: UDPSocket
        let memory: GuestMemory
        let receive: DriverQueue
        let transmit: DriverQueue
    }

    /// A 16-entry queue whose three areas lie in the page at `base`.
    static func queue(_ memory: GuestMemory, at base: UInt64) throws -> DriverQueue {
        try DriverQueue(memory: memory, table: base, driverArea: base + 0x400, deviceArea: base + 0x800)
    }

    static func setUp() throws -> Setup {
        let namespace = try NetworkNamespace("net-unit")
        let net = try namespace.inside { try VirtioNet(NetworkConfiguration(id: "n", mac: Self.mac, tap: "ftap0", queueSize: 16)) }
        let wire = try namespace.packetSocket(interface: "ftap0")
        let memory = try GuestMemory(ranges: [GuestRAMRange(start: 0, size: Self.ram)])
        return Setup(namespace: namespace, net: net, wire: wire, memory: memory,
                     receive: try Self.queue(memory, at: 0x1000), transmit: try Self.queue(memory, at: 0x2000))
    }

    /// An Ethernet frame of the test's type from another station to the guest, `length` bytes in all.
    static func frame(length: Int, seed: UInt8) -> [UInt8] {
        Self.mac.bytes + [0x02, 0, 0, 0, 0, 0x01] + Self.etherType + (0..<(length - 14)).map { UInt8(truncatingIfNeeded: Int(seed) &+ $0 &* 7) }
    }

    /// Waits until the tap has a frame for the device to read.
    static func waitForFrame(_ net: VirtioNet) {
        _ = try? Poll.wait(net.tap.descriptor.rawValue, for: Int16(POLLIN), until: .now + .seconds(5))
    }

    @Test func framesTheGuestSendsAppearOnTheTapByteForByte() throws {
        let setup = try Self.setUp()
        let frame = Self.frame(length: 300, seed: 3)
        let header = [UInt8](repeating: 0, count: 12)
        // Header and the first 100 bytes in one buffer, the rest in another.
        try setup.memory.write(header + frame.prefix(100), at: 0x10000)
        try setup.memory.write(Array(frame.dropFirst(100)), at: 0x20000)
        try setup.transmit.descriptor(0, address: 0x10000, length: 112, flags: 1, next: 1)
        try setup.transmit.descriptor(1, address: 0x20000, length: 200, flags: 0)
        try setup.transmit.makeAvailable(0)
        try setup.net.serve(setup.transmit.access(VirtioNet.transmitQueue))
        #expect(setup.transmit.usedIndex == 1)

        var seen: [UInt8]?
        while let candidate = setup.wire.receive(timeout: .seconds(2)) {
            if Array(candidate[12..<14]) == Self.etherType { seen = candidate; break }
        }
        #expect(seen == frame, "the frame on the wire is the guest's")
        #expect(setup.net.counters.txFrames == 1 && setup.net.counters.txBytes == 300 && setup.net.counters.txDropped == 0)
    }

    @Test func aMalformedTransmitIsDroppedAndCountedAndTheQueueGoesOn() throws {
        let setup = try Self.setUp()
        // A header announcing TCP segmentation with no TCP in the frame: the tap refuses it.
        var header = [UInt8](repeating: 0, count: 12)
        header[1] = 1            // VIRTIO_NET_HDR_GSO_TCPV4
        header[4] = 100          // gso_size
        try setup.memory.write(header + Self.frame(length: 200, seed: 1), at: 0x10000)
        try setup.transmit.descriptor(0, address: 0x10000, length: 212, flags: 0)
        try setup.transmit.makeAvailable(0)
        // Too short to be a frame.
        try setup.transmit.descriptor(1, address: 0x10000, length: 20, flags: 0)
        try setup.transmit.makeAvailable(1)
        // And a good one after them.
        try setup.memory.write([UInt8](repeating: 0, count: 12) + Self.frame(length: 64, seed: 9), at: 0x30000)
        try setup.transmit.descriptor(2, address: 0x30000, length: 76, flags: 0)
        try setup.transmit.makeAvailable(2)
        try setup.net.serve(setup.transmit.access(VirtioNet.transmitQueue))
        #expect(setup.transmit.usedIndex == 3, "every chain is returned")
        #expect(setup.net.counters.txDropped == 2 && setup.net.counters.txFrames == 1)
    }

    @Test func aFrameFillsSeveralMergeableBuffersAndSaysHowMany() throws {
        let setup = try Self.setUp()
        setup.net.driverReady(features: VirtioNet.featureMergeable)
        for index in UInt16(0)..<3 {
            try setup.receive.descriptor(index, address: 0x40000 + 0x1000 * UInt64(index), length: 512, flags: 2)
            try setup.receive.makeAvailable(index)
        }
        let frame = Self.frame(length: 1000, seed: 5)
        #expect(setup.wire.send(frame: frame))
        Self.waitForFrame(setup.net)
        try setup.net.serve(setup.receive.access(VirtioNet.receiveQueue))

        #expect(setup.receive.usedIndex == 2, "1012 bytes fill two 512-byte buffers")
        let first = try setup.receive.used(0), second = try setup.receive.used(1)
        #expect(first.id == 0 && first.length == 512 && second.id == 1 && second.length == 500)
        let header = try setup.memory.read(count: 12, at: 0x40000)
        #expect(header[10] == 2 && header[11] == 0, "num_buffers is 2")
        let received = try setup.memory.read(count: 500, at: 0x40000 + 12) + setup.memory.read(count: 500, at: 0x41000)
        #expect(received == frame)
        #expect(setup.net.counters.rxFrames == 1 && setup.net.counters.rxBytes == 1000)
    }

    @Test func aFrameThatDoesNotFitOneBufferIsDroppedAndTheBufferKept() throws {
        let setup = try Self.setUp()
        setup.net.driverReady(features: 0)       // no mergeable buffers: one buffer per frame
        try setup.receive.descriptor(0, address: 0x40000, length: 256, flags: 2)
        try setup.receive.makeAvailable(0)
        #expect(setup.wire.send(frame: Self.frame(length: 1000, seed: 1)))
        Self.waitForFrame(setup.net)
        try setup.net.serve(setup.receive.access(VirtioNet.receiveQueue))
        #expect(setup.receive.usedIndex == 0, "the buffer stays with the device")
        #expect(setup.net.counters.rxDropped == 1)

        // A frame that fits goes into that same buffer.
        let small = Self.frame(length: 200, seed: 2)
        #expect(setup.wire.send(frame: small))
        Self.waitForFrame(setup.net)
        try setup.net.serve(setup.receive.access(VirtioNet.receiveQueue))
        #expect(setup.receive.usedIndex == 1)
        #expect(try setup.memory.read(count: 200, at: 0x40000 + 12) == small)
    }

    @Test func framesWaitInTheHostUntilTheGuestPostsBuffers() throws {
        let setup = try Self.setUp()
        setup.net.driverReady(features: VirtioNet.featureMergeable)
        setup.receive.eventIndex = true
        let frames = (0..<3).map { Self.frame(length: 100 + $0, seed: UInt8($0)) }
        for frame in frames { #expect(setup.wire.send(frame: frame)) }
        Self.waitForFrame(setup.net)
        try setup.net.serve(setup.receive.access(VirtioNet.receiveQueue))
        #expect(setup.net.pollDescriptors.isEmpty, "with a frame staged and no buffers, the tap is not polled")
        #expect(try setup.memory.read(UInt16.self, at: setup.receive.queue.deviceArea + 4 + 8 * 16) == 0,
                "avail_event asks for a doorbell at the next buffer")

        for index in UInt16(0)..<3 {
            try setup.receive.descriptor(index, address: 0x40000 + 0x1000 * UInt64(index), length: 2048, flags: 2)
            try setup.receive.makeAvailable(index)
        }
        try setup.net.serve(setup.receive.access(VirtioNet.receiveQueue))
        #expect(setup.receive.usedIndex == 3)
        for (index, frame) in frames.enumerated() {
            #expect(try setup.memory.read(count: frame.count, at: 0x40000 + 0x1000 * UInt64(index) + 12) == frame, "frame \(index) in order")
        }
        #expect(setup.net.pollDescriptors.map(\.descriptor) == [setup.net.tap.descriptor.rawValue])
        #expect(setup.net.counters.rxDropped == 0)
    }

    @Test func aReceiveBufferTooSmallForTheHeaderNeedsAReset() throws {
        let setup = try Self.setUp()
        setup.net.driverReady(features: VirtioNet.featureMergeable)
        try setup.receive.descriptor(0, address: 0x40000, length: 4, flags: 2)
        try setup.receive.makeAvailable(0)
        #expect(setup.wire.send(frame: Self.frame(length: 100, seed: 0)))
        Self.waitForFrame(setup.net)
        #expect(throws: VirtioError.self) { try setup.net.serve(setup.receive.access(VirtioNet.receiveQueue)) }
    }

    @Test func theAnnouncementIsARARPFromTheGuestsAddress() throws {
        let setup = try Self.setUp()
        setup.net.announce()
        var seen: [UInt8]?
        while let frame = setup.wire.receive(timeout: .seconds(2)) {
            if Array(frame[12..<14]) == [0x80, 0x35] { seen = frame; break }
        }
        let frame = try #require(seen, "a RARP frame reached the tap's network")
        #expect(Array(frame[0..<6]) == [UInt8](repeating: 0xFF, count: 6) && Array(frame[6..<12]) == Self.mac.bytes)
        #expect(Array(frame[20..<22]) == [0, 3], "reverse request")
        #expect(Array(frame[22..<28]) == Self.mac.bytes && Array(frame[32..<38]) == Self.mac.bytes)
    }

    /// Hostile rings on both queues, with frames waiting: the device refuses or serves, never
    /// touches memory outside guest RAM, and never crashes.
    @Test(arguments: [UInt64(11), 12, 13])
    func corruptedRingsNeverReachOutsideGuestRAM(seed: UInt64) throws {
        var random = SplitMix64(seed: seed)
        let setup = try Self.setUp()
        var refused = 0, served = 0
        for round in 0..<300 {
            let queue = try Self.queue(setup.memory, at: round % 2 == 0 ? 0x1000 : 0x2000)
            setup.net.driverReady(features: random.next() % 2 == 0 ? VirtioNet.featureMergeable : 0)
            setup.net.reset()
            setup.net.driverReady(features: random.next() % 2 == 0 ? VirtioNet.featureMergeable : 0)
            func address() -> UInt64 {
                switch random.next() % 4 {
                case 0: random.next()
                case 1: Self.ram - random.next() % 64
                default: 0x40000 + random.next() % 0x10000
                }
            }
            for index in 0..<UInt16(16) {
                let length = random.next() % 3 == 0 ? UInt32(truncatingIfNeeded: random.next()) : UInt32(random.next() % 2048)
                try queue.descriptor(index, address: address(), length: length, flags: UInt16(random.next() % 8),
                                     next: UInt16(random.next() % 20))
            }
            for _ in 0..<(1 + random.next() % 4) { try queue.makeAvailable(UInt16(random.next() % 20)) }
            if round % 2 == 0 { setup.wire.send(frame: Self.frame(length: 60 + Int(random.next() % 1400), seed: UInt8(round % 256))) }
            do {
                try setup.net.serve(queue.access(round % 2 == 0 ? VirtioNet.receiveQueue : VirtioNet.transmitQueue))
                served += 1
            } catch {
                refused += 1
            }
        }
        #expect(refused > 0 && served > 0, "the cases exercise both outcomes: \(refused) refused, \(served) served")
    }
}
