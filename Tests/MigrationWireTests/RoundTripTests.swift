import FerryTestSupport
import Foundation
import HostOS
import KVM
import Machine
import Testing
@testable import MigrationWire

@Suite struct RoundTripTests {
    static let ramSize: UInt64 = 64 << 20
    static let limits = MigrationLimits(guestRAM: GuestRAMLayout.ranges(size: ramSize))

    @Test func everyCommandCrossesARealSocketUnchanged() throws {
        let pair = try SocketPair()
        let sending = pair.sendingConnection()
        let receiving = pair.receivingConnection()
        let start = MigrationStart(migrationID: UUID())
        let config = MigrationConfig(machine: testMachine)
        let state = MigrationState(machine: Self.machineState(), guestRunning: true)
        let source = try GuestMemory(ranges: GuestRAMLayout.ranges(size: Self.ramSize))
        let table = MemoryRangeTable([MigrationMemoryRange(address: 0x1000, length: 0x1000)])

        let sender = BackgroundThread { () throws -> [MigrationResponse] in
            var responses: [MigrationResponse] = []
            try sending.sendStart(start)
            responses.append(try sending.receiveResponse())
            try sending.sendConfig(config)
            responses.append(try sending.receiveResponse())
            try sending.sendMemory(table, from: source)
            responses.append(try sending.receiveResponse())
            try sending.sendState(state)
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

    /// A local migration's memory file crosses a Unix socket as a descriptor of the same file; a
    /// memory-file request whose byte carries none is a protocol violation.
    @Test func aMemoryFileCrossesAsTheSameFileAndABareByteIsRefused() throws {
        let memory = try GuestMemory(ranges: GuestRAMLayout.ranges(size: Self.ramSize), shared: true)
        let file = try #require(memory.backingFile)
        let pair = try SocketPair()
        let sending = pair.sendingConnection()
        let receiving = pair.receivingConnection(ioTimeout: .seconds(2))
        try sending.sendMemoryFile(file)
        guard case .memoryFile(let received) = try receiving.receiveRequest(limits: Self.limits) else {
            Issue.record("not a memory-file request")
            return
        }
        var ours = stat(), theirs = stat()
        #expect(fstat(file.rawValue, &ours) == 0 && fstat(received.descriptor.rawValue, &theirs) == 0)
        #expect(ours.st_ino == theirs.st_ino && ours.st_dev == theirs.st_dev, "the same file")
        #expect(received.descriptor.rawValue != file.rawValue, "a descriptor of the receiver's own")

        try pair.write(Wire.header(.memoryFile, length: 1) + [0])
        do {
            _ = try receiving.receiveRequest(limits: Self.limits)
            Issue.record("a memory-file request without a descriptor was accepted")
        } catch {
            #expect(error.kind == .protocolViolation && error.message.contains("without a descriptor"), "\(error)")
        }
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
        let sending = pair.sendingConnection()
        let receiving = pair.receivingConnection()
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

    @Test func aRangeOutsideRAMIsRefusedBeforeAByteOfItMoves() throws {
        let memory = try GuestMemory(ranges: [GuestRAMRange(start: 0, size: 0x10000)])
        let pair = try SocketPair()
        let sending = pair.sendingConnection(ioTimeout: .seconds(1))
        do {
            try sending.sendMemory(MemoryRangeTable([MigrationMemoryRange(address: 0xF000, length: 0x2000)]), from: memory)
            Issue.record("a range past the end of guest RAM was sent")
        } catch {
            #expect(error.kind == .rangeOutsideRAM, "\(error)")
        }
        #expect(throws: MachineError.self) { _ = try memory.buffer(at: 0x10000, count: 1) }
        #expect(throws: MachineError.self) { _ = try memory.buffer(at: 0xF000, count: -1) }
    }

    @Test func aReceiveAfterAFailureIsRefusedButAnErrorResponseStillGoesOut() throws {
        let pair = try SocketPair()
        let receiving = pair.receivingConnection(ioTimeout: .seconds(2))
        try pair.write(Wire.header(command: 99, length: 0))
        #expect(throws: MigrationError.self) { try receiving.receiveRequest(limits: Self.limits) }
        do {
            _ = try receiving.receiveRequest(limits: Self.limits)
            Issue.record("a second receive succeeded")
        } catch {
            #expect(error.kind == .protocolViolation)
        }
        try receiving.sendResponse(.error("unknown command"))
        let reader = pair.sendingConnection(ioTimeout: .seconds(2))
        #expect(try reader.receiveResponse() == .error("unknown command"))
    }

    @Test func aRequestBeforeThePreviousMemoryBytesIsAProtocolViolation() throws {
        let pair = try SocketPair()
        let receiving = pair.receivingConnection(ioTimeout: .seconds(2))
        try pair.write(Wire.memory([(0x1000, 0x1000)]))
        _ = try receiving.receiveRequest(limits: Self.limits)
        do {
            _ = try receiving.receiveRequest(limits: Self.limits)
            Issue.record("read a request while memory bytes were pending")
        } catch {
            #expect(error.kind == .protocolViolation)
        }
    }

    @Test func documentsThatDoNotDecodeAreRefusedAsMalformedPayloads() throws {
        let pair = try SocketPair()
        let receiving = pair.receivingConnection(ioTimeout: .seconds(2))
        let garbage = Array(#"{"machine": "a lot"}"#.utf8)
        try pair.write(Wire.header(.config, length: UInt64(garbage.count)) + garbage)
        do {
            _ = try receiving.receiveRequest(limits: Self.limits)
            Issue.record("a config that is not a configuration was accepted")
        } catch {
            #expect(error.kind == .malformedPayload && error.message.contains("config"), "\(error)")
        }
    }

    @Test func aConfigWithExtraFieldsDecodesToWhatTheGuestSeesOnly() throws {
        let pair = try SocketPair()
        let receiving = pair.receivingConnection(ioTimeout: .seconds(2))
        // A sender may add what it likes; the receiver reads the guest's configuration and nothing else.
        let document = Array(#"{"machine":{"cpus":2,"memorySize":67108864,"kernel":"/k","commandLine":"","serialPort":true},"serial":{"file":{"_0":"/etc/evil"}}}"#.utf8)
        try pair.write(Wire.header(.config, length: UInt64(document.count)) + document)
        let request = try receiving.receiveRequest(limits: Self.limits)
        #expect(request == .config(MigrationConfig(machine: MachineConfiguration(cpus: 2, memorySize: 64 << 20, kernel: "/k", serialPort: true))))
    }

    /// A machine state as a paused machine saves it: blobs of KVM's sizes, no KVM needed.
    static func machineState() -> MachineState {
        let vcpu = VCPUState(id: 0, cpuid: [CPUIDEntry(function: 1, eax: 0x600)], mpState: 0, registers: Registers(),
                             specialRegisters: SpecialRegisters(), floatingPoint: .fpu([UInt8](repeating: 3, count: 416)),
                             extendedControlRegisters: nil, debugRegisters: [UInt8](repeating: 0, count: 128),
                             localAPIC: [UInt8](repeating: 7, count: 1024), msrs: [MSREntry(index: 0x10, data: 1 << 40)],
                             events: [UInt8](repeating: 0, count: 64), tscKHz: 2_000_000)
        let platform = PlatformState(picMaster: [1], picSlave: [2], ioapic: [3], pit: [4], clock: 123_456_789)
        return MachineState(configuration: testMachine, vcpus: [vcpu], platform: platform,
                            devices: [DeviceState(id: "serial0", json: "{}")])
    }
}

/// `vm.cancel-migration` shuts a migration's connection down from another thread while the
/// migration's own thread may be closing it (`ShutdownRace`): the shutdown never reaches a socket
/// that took the closed connection's descriptor number.
@Suite struct ConnectionShutdownTests {
    @Test func aCancelRacingTheCloseNeverShutsDownTheNextSocket() throws {
        let outcome = try ShutdownRace.run(rounds: 2000, own: { MigrationConnection(SocketTransport($0)) },
                                           close: { $0.close() }, shutdown: { $0.shutdown() })
        print("shutdown race (MigrationConnection): \(outcome)")
        #expect(outcome.reusedNumbers > outcome.rounds / 2, "the freed number was taken by the next socket")
        #expect(outcome.hits == 0, "a shutdown of a closed connection reached a socket opened after it, \(outcome.hits) times")
    }
}
