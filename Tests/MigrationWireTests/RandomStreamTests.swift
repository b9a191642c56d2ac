import FerryTestSupport
import Foundation
import Machine
import Testing
@testable import MigrationWire

/// Thousands of random and mutated streams, replayable from one seed: the receiver must end every
/// one with a typed error or a clean `complete`/`abandon`, promptly, and never write guest memory
/// outside the RAM it was told about.
@Suite struct RandomStreamTests {
    static let seed: UInt64 = 0xF3_4A_11_2026
    static let streams = 2000
    static let page: UInt64 = 4096
    /// The mapping the receiver writes into: 256 KiB, of which only `guestRAM` is RAM; the rest
    /// is a guard filled with `guardByte` that must stay untouched.
    static let mapping = GuestRAMRange(start: 0, size: 0x40000)
    static let guestRAM = [GuestRAMRange(start: 0x10000, size: 0x10000), GuestRAMRange(start: 0x30000, size: 0x8000)]
    static let guardByte: UInt8 = 0xEE
    /// Addresses and lengths a mutation likes to plant: RAM edges, guard pages, extremes.
    static let interesting: [UInt64] = [0, 0x1000, 0xF000, 0x10000, 0x1F000, 0x20000, 0x2F000, 0x30000, 0x37000, 0x38000,
                                        0x40000, 0xFFF, 0x1001, UInt64(UInt32.max), UInt64.max, UInt64.max - 0xFFF, 1 << 63]

    /// The config and state requests of a valid stream.
    static let config = (try? Wire.document(.config, MigrationConfig(machine: testMachine))) ?? []
    static let state = (try? Wire.document(.state, MigrationState(machine: RoundTripTests.machineState(), guestRunning: true))) ?? []

    /// A valid stream: start, config, one to three memory requests, state, then complete or abandon.
    static func validStream(using generator: inout SplitMix64) -> [UInt8] {
        var bytes = Wire.start()
        bytes += config
        for _ in 0..<Int.random(in: 1...3, using: &generator) {
            var ranges: [(UInt64, UInt64)] = []
            for ram in guestRAM where Bool.random(using: &generator) {
                let pages = ram.size / page
                let first = UInt64.random(in: 0..<pages, using: &generator)
                let count = UInt64.random(in: 1...min(4, pages - first), using: &generator)
                ranges.append((ram.start + first * page, count * page))
            }
            bytes += Wire.memory(ranges, fill: UInt8.random(in: 0...0xED, using: &generator))
        }
        bytes += state
        bytes += Wire.header(Bool.random(using: &generator) ? .complete : .abandon, length: 0)
        return bytes
    }

    static func mutate(_ stream: [UInt8], using generator: inout SplitMix64) -> [UInt8] {
        var bytes = stream
        switch Int.random(in: 0..<7, using: &generator) {
        case 0:   // flip a few bytes
            for _ in 0..<Int.random(in: 1...4, using: &generator) {
                bytes[Int.random(in: 0..<bytes.count, using: &generator)] ^= UInt8.random(in: 1...255, using: &generator)
            }
        case 1:   // cut short
            bytes = Array(bytes.prefix(Int.random(in: 0..<bytes.count, using: &generator)))
        case 2, 3:   // plant an interesting 64-bit value at an 8-byte aligned offset (lengths, addresses)
            let offset = Int.random(in: 0..<(bytes.count / 8), using: &generator) * 8
            withUnsafeBytes(of: interesting.randomElement(using: &generator)!.littleEndian) { value in
                for (index, byte) in value.enumerated() where offset + index < bytes.count { bytes[offset + index] = byte }
            }
        case 4:   // insert random bytes
            let at = Int.random(in: 0...bytes.count, using: &generator)
            bytes.insert(contentsOf: (0..<Int.random(in: 1...32, using: &generator)).map { _ in UInt8.random(in: 0...255, using: &generator) }, at: at)
        case 5:   // pure noise, sometimes with a valid magic
            bytes = (0..<Int.random(in: 0...256, using: &generator)).map { _ in UInt8.random(in: 0...255, using: &generator) }
            if Bool.random(using: &generator), bytes.count >= 4 {
                bytes.replaceSubrange(0..<4, with: Wire.header(command: 0, length: 0).prefix(4))
            }
        default:
            break   // unchanged
        }
        return bytes
    }

    @Test func randomAndMutatedStreamsOnlyEverYieldTypedErrorsAndStayInsideRAM() throws {
        let memory = try GuestMemory(ranges: [Self.mapping])
        try memory.fill(Self.guardByte, count: Int(Self.mapping.size), at: 0)
        let limits = MigrationLimits(guestRAM: Self.guestRAM, maximumConfigBytes: 1 << 16, maximumStateBytes: 1 << 16, maximumRanges: 64)
        var generator = SplitMix64(seed: Self.seed)
        var outcomes: [String: Int] = [:]
        var slowest = Duration.zero
        let started = ContinuousClock.now

        for index in 0..<Self.streams {
            let stream = Self.mutate(Self.validStream(using: &generator), using: &generator)
            let pair = try SocketPair()
            try pair.write(stream)
            pair.closeSender()
            let connection = pair.receivingConnection(ioTimeout: .seconds(1))
            let streamStarted = ContinuousClock.now
            let outcome: String
            do {
                receiving: while true {
                    let request = try connection.receiveRequest(limits: limits)
                    switch request {
                    case .memory(let table): try connection.receiveMemory(table, into: memory)
                    case .complete, .abandon: break receiving
                    default: continue
                    }
                }
                outcome = "finished"
            } catch {
                outcome = error.kind.rawValue
            }
            outcomes[outcome, default: 0] += 1
            slowest = max(slowest, ContinuousClock.now - streamStarted)
            if index % 100 == 99 || index == Self.streams - 1 {
                try expectGuardUntouched(memory, after: index)
            }
        }
        // The streams exercised the parser widely: many refusals of different kinds, and some
        // streams that were valid from start to end.
        #expect(outcomes["finished", default: 0] > 50, "\(outcomes)")
        #expect(outcomes.keys.count >= 8, "\(outcomes)")
        print("random streams: \(Self.streams) in \(ContinuousClock.now - started), the slowest \(slowest); outcomes \(outcomes)")
    }

    func expectGuardUntouched(_ memory: GuestMemory, after index: Int) throws {
        var address = Self.mapping.start
        for ram in Self.guestRAM + [GuestRAMRange(start: Self.mapping.end, size: 0)] {
            let guardBytes = try memory.read(count: Int(ram.start - address), at: address)
            if let offset = guardBytes.firstIndex(where: { $0 != Self.guardByte }) {
                Issue.record("after stream \(index) the guard byte at 0x\(String(address + UInt64(offset), radix: 16)) was overwritten")
                return
            }
            address = ram.end
        }
    }
}
