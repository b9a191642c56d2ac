import Foundation
import Machine
import Testing
@testable import Migration

@Suite struct RoundTripTests {
    static let ramSize: UInt64 = 64 << 20
    static let limits = MigrationLimits(guestRAM: GuestRAMLayout.ranges(size: ramSize))

    @Test func everyCommandCrossesARealSocketUnchanged() throws {
        let pair = try SocketPair()
        let sending = MigrationConnection(adopting: pair.takeSender(), ioTimeout: .seconds(5))
        let receiving = MigrationConnection(adopting: pair.takeReceiver(), ioTimeout: .seconds(5))
        let start = MigrationStart(migrationID: UUID())
        let config = Array(#"{"machine":{"cpus":2}}"#.utf8)
        let state = [UInt8]((0..<70_000).map { UInt8(truncatingIfNeeded: $0 &* 31) })
        let source = try GuestMemory(ranges: GuestRAMLayout.ranges(size: Self.ramSize))
        let table = MemoryRangeTable([MigrationMemoryRange(address: 0x1000, length: 0x1000)])

        let sender = BackgroundThread { () throws -> [MigrationResponse] in
            var responses: [MigrationResponse] = []
            try sending.sendStart(start)
            responses.append(try sending.receiveResponse())
            try sending.sendRequest(.config, payload: config)
            responses.append(try sending.receiveResponse())
            try sending.sendMemory(table, from: source)
            responses.append(try sending.receiveResponse())
            try sending.sendRequest(.state, payload: state)
            responses.append(try sending.receiveResponse())
            try sending.sendRequest(.complete)
            responses.append(try sending.receiveResponse())
            try sending.sendRequest(.abandon)
            responses.append(try sending.receiveResponse())
            return responses
        }
        let destination = try GuestMemory(ranges: GuestRAMLayout.ranges(size: Self.ramSize))
        var received: [MigrationRequest] = []
        for _ in 0..<6 {
            let request = try receiving.receiveRequest(limits: Self.limits)
            if case .memory(let table) = request { try receiving.receiveMemory(table, into: destination) }
            received.append(request)
            try receiving.sendResponse(request == .abandon ? .error("abandoned by \"test\" ✓") : .ok)
        }
        #expect(received == [.start(start), .config(config), .memory(table), .state(state), .complete, .abandon])
        #expect(try sender.join() == [.ok, .ok, .ok, .ok, .ok, .error("abandoned by \"test\" ✓")])
    }

    @Test func memoryMovesBetweenTwoGuestMemoriesByteForByte() throws {
        let layout = GuestRAMLayout.ranges(size: Self.ramSize)
        let source = try GuestMemory(ranges: layout)
        var generator = SplitMix64(seed: 7)
        var ranges: [MigrationMemoryRange] = []
        // Sparse runs of random bytes, including one larger than a transfer chunk and the last page.
        for (address, pages) in [(0x0000_0000 as UInt64, 1), (0x0000_3000, 2), (0x0010_0000, 300), (0x0200_0000, 17),
                                 (Self.ramSize - 0x1000, 1)] {
            let bytes = (0..<pages * 4096).map { _ in UInt8.random(in: 0...255, using: &generator) }
            try source.write(bytes, at: address)
            ranges.append(MigrationMemoryRange(address: address, length: UInt64(pages * 4096)))
        }
        let table = MemoryRangeTable(ranges)
        let pair = try SocketPair()
        let sending = MigrationConnection(adopting: pair.takeSender(), ioTimeout: .seconds(5))
        let receiving = MigrationConnection(adopting: pair.takeReceiver(), ioTimeout: .seconds(5))
        let sender = BackgroundThread { try sending.sendMemory(table, from: source) }

        let destination = try GuestMemory(ranges: layout)
        let request = try receiving.receiveRequest(limits: MigrationLimits(guestRAM: layout))
        #expect(request == .memory(table))
        try receiving.receiveMemory(table, into: destination)
        try sender.join()
        for range in ranges {
            #expect(try destination.read(count: Int(range.length), at: range.address)
                == source.read(count: Int(range.length), at: range.address))
        }
        // Between the runs the destination stays zero, as the source is.
        #expect(try destination.read(count: 0x1000, at: 0x1000) == [UInt8](repeating: 0, count: 0x1000))
        #expect(try destination.read(count: 0x1000, at: 0x0010_0000 + 300 * 4096) == [UInt8](repeating: 0, count: 0x1000))
    }

    @Test func guestMemoryRefusesARangeOutsideRAMBeforeMovingAByte() throws {
        let memory = try GuestMemory(ranges: [GuestRAMRange(start: 0, size: 0x10000)])
        let pair = try SocketPair()
        #expect(throws: GuestMemory.TransferError.outsideRAM(address: 0xF000, count: 0x2000)) {
            try memory.send(to: pair.sender, address: 0xF000, count: 0x2000, deadline: .now + .seconds(1))
        }
        #expect(throws: GuestMemory.TransferError.outsideRAM(address: 0x10000, count: 1)) {
            try memory.receive(from: pair.receiver, address: 0x10000, count: 1, deadline: .now + .seconds(1))
        }
    }

    @Test func aReceiveAfterAFailureIsRefusedButAnErrorResponseStillGoesOut() throws {
        let pair = try SocketPair()
        let receiving = MigrationConnection(adopting: pair.takeReceiver(), ioTimeout: .seconds(2))
        try pair.write(Wire.header(command: 99, length: 0))
        #expect(throws: MigrationError.self) { try receiving.receiveRequest(limits: Self.limits) }
        do {
            _ = try receiving.receiveRequest(limits: Self.limits)
            Issue.record("a second receive succeeded")
        } catch {
            #expect(error.kind == .protocolViolation)
        }
        try receiving.sendResponse(.error("unknown command"))
        let reader = MigrationConnection(adopting: pair.takeSender(), ioTimeout: .seconds(2))
        #expect(try reader.receiveResponse() == .error("unknown command"))
    }

    @Test func aRequestBeforeThePreviousMemoryBytesIsAProtocolViolation() throws {
        let pair = try SocketPair()
        let receiving = MigrationConnection(adopting: pair.takeReceiver(), ioTimeout: .seconds(2))
        try pair.write(Wire.memory([(0x1000, 0x1000)]))
        _ = try receiving.receiveRequest(limits: Self.limits)
        do {
            _ = try receiving.receiveRequest(limits: Self.limits)
            Issue.record("read a request while memory bytes were pending")
        } catch {
            #expect(error.kind == .protocolViolation)
        }
    }
}
