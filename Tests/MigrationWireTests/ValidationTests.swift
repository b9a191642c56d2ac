import Foundation
import Machine
import Testing
@testable import MigrationWire

/// A stream the receiver must refuse, how it ends, and the error kind it must produce.
struct MalformedStream: Sendable, CustomTestStringConvertible {
    enum Ending: Sendable {
        /// The sender closes the connection after the bytes.
        case closes
        /// The sender goes silent but keeps the connection open.
        case stalls
    }

    var name: String
    var bytes: [UInt8]
    var ending: Ending = .closes
    var kind: MigrationError.Kind
    var testDescription: String { name }
}

@Suite struct ValidationTests {
    static let mib: UInt64 = 1 << 20
    /// A 5 GiB guest: RAM at 0–3 GiB and 4–5 GiB, the MMIO hole between.
    static let guestRAM = GuestRAMLayout.ranges(size: 5 << 30)
    static let hole = GuestRAMLayout.mmioHoleStart

    static let cases: [MalformedStream] = [
        MalformedStream(name: "bad magic", bytes: Wire.header(command: 5, length: 0, magic: 0xDEAD_BEEF), kind: .badMagic),
        MalformedStream(name: "an HTTP request", bytes: Array("GET / HTTP/1.1\r\n".utf8), kind: .badMagic),
        MalformedStream(name: "command 0", bytes: Wire.header(command: 0, length: 0), kind: .unknownCommand),
        MalformedStream(name: "command 9", bytes: Wire.header(command: 9, length: 0), kind: .unknownCommand),
        MalformedStream(name: "memory-file with no byte", bytes: Wire.header(command: 8, length: 0), kind: .badPayloadLength),
        MalformedStream(name: "reserved field set", bytes: Wire.header(command: 5, length: 0, reserved: 1), kind: .malformedHeader),
        MalformedStream(name: "config over 64 MiB", bytes: Wire.header(.config, length: 64 * mib + 1), kind: .payloadTooLarge),
        MalformedStream(name: "state over 64 MiB", bytes: Wire.header(.state, length: UInt64.max), kind: .payloadTooLarge),
        MalformedStream(name: "memory longer than table plus RAM", bytes: Wire.header(.memory, length: UInt64.max), kind: .payloadTooLarge),
        MalformedStream(name: "memory shorter than its count", bytes: Wire.header(.memory, length: 3), kind: .badPayloadLength),
        MalformedStream(name: "start of 19 bytes", bytes: Wire.header(.start, length: 19), kind: .badPayloadLength),
        MalformedStream(name: "start of 2^64-1 bytes", bytes: Wire.header(.start, length: .max), kind: .badPayloadLength),
        MalformedStream(name: "join of 20 bytes", bytes: Wire.header(.join, length: 20), kind: .badPayloadLength),
        MalformedStream(name: "complete with a payload", bytes: Wire.header(.complete, length: 1), kind: .badPayloadLength),
        MalformedStream(name: "abandon with a payload", bytes: Wire.header(.abandon, length: 8), kind: .badPayloadLength),
        MalformedStream(name: "start with another version", bytes: Wire.start(version: MigrationProtocol.version + 1), kind: .unsupportedVersion),
        MalformedStream(name: "too many ranges", bytes: Wire.header(.memory, length: 64 * mib) + Wire.table([], count: 1 << 17 + 1),
                        kind: .tooManyRanges),
        MalformedStream(name: "table larger than its payload", bytes: Wire.header(.memory, length: 20) + Wire.table([], count: 2),
                        kind: .tableSizeMismatch),
        MalformedStream(name: "unaligned address", bytes: Wire.memory([(0x1800, 0x1000)]), kind: .unalignedRange),
        MalformedStream(name: "unaligned length", bytes: Wire.memory([(0x1000, 0x800)]), kind: .unalignedRange),
        MalformedStream(name: "empty range", bytes: Wire.memory([(0x1000, 0)]), kind: .unalignedRange),
        MalformedStream(name: "overlapping ranges", bytes: Wire.memory([(0x1000, 0x2000), (0x2000, 0x1000)]), kind: .overlappingRanges),
        MalformedStream(name: "descending ranges", bytes: Wire.memory([(0x5000, 0x1000), (0x1000, 0x1000)]), kind: .overlappingRanges),
        MalformedStream(name: "the same range twice", bytes: Wire.memory([(0x1000, 0x1000), (0x1000, 0x1000)]), kind: .overlappingRanges),
        MalformedStream(name: "range above RAM", bytes: Wire.header(.memory, length: 20 + 0x1000) + Wire.table([(5 << 30 + 1 << 32, 0x1000)]),
                        kind: .rangeOutsideRAM),
        MalformedStream(name: "range inside the MMIO hole", bytes: Wire.header(.memory, length: 20 + 0x1000) + Wire.table([(hole, 0x1000)]),
                        kind: .rangeOutsideRAM),
        MalformedStream(name: "range straddling the MMIO hole", bytes: Wire.header(.memory, length: 20 + 0x2000) + Wire.table([(hole - 0x1000, 0x2000)]),
                        kind: .rangeOutsideRAM),
        MalformedStream(name: "range wrapping past 2^64", bytes: Wire.header(.memory, length: 20 + 0x2000) + Wire.table([(0xFFFF_FFFF_FFFF_F000, 0x2000)]),
                        kind: .rangeOutsideRAM),
        MalformedStream(name: "table total below payload", bytes: Wire.header(.memory, length: 20 + 0x2000) + Wire.table([(0x1000, 0x1000)]),
                        kind: .tableSizeMismatch),
        MalformedStream(name: "table total above payload", bytes: Wire.header(.memory, length: 20 + 0x1000) + Wire.table([(0x1000, 0x2000)]),
                        kind: .tableSizeMismatch),
        MalformedStream(name: "EOF before any header", bytes: [], kind: .peerWentAway),
        MalformedStream(name: "EOF mid-header", bytes: Array(Wire.header(.complete, length: 0).prefix(9)), kind: .peerWentAway),
        MalformedStream(name: "EOF mid config payload", bytes: Wire.header(.config, length: 100) + [UInt8](repeating: 0x7B, count: 50),
                        kind: .peerWentAway),
        MalformedStream(name: "EOF mid range table", bytes: Array((Wire.header(.memory, length: 36 + 0x2000) + Wire.table([(0, 0x1000), (0x1000, 0x1000)])).prefix(30)),
                        kind: .peerWentAway),
        MalformedStream(name: "EOF mid memory data", bytes: Array(Wire.memory([(0x2000, 0x3000)]).dropLast(0x1800)), kind: .peerWentAway),
        MalformedStream(name: "EOF after a valid start", bytes: Wire.start(), kind: .peerWentAway),
        MalformedStream(name: "stall mid-header", bytes: Array(Wire.header(.complete, length: 0).prefix(5)), ending: .stalls, kind: .timedOut),
        MalformedStream(name: "stall mid state payload", bytes: Wire.header(.state, length: 10) + [1, 2], ending: .stalls, kind: .timedOut),
        MalformedStream(name: "stall mid memory data", bytes: Array(Wire.memory([(0x2000, 0x3000)]).dropLast(10)), ending: .stalls,
                        kind: .timedOut),
    ]

    /// Feeds `stream` to a receiver that acts on every valid request (reading memory into a small
    /// guest) until it fails; returns the failure.
    static func receive(_ stream: MalformedStream, into memory: GuestMemory) throws -> MigrationError? {
        let pair = try SocketPair()
        try pair.write(stream.bytes)
        if stream.ending == .closes { pair.closeSender() }
        let connection = pair.receivingConnection(ioTimeout: .milliseconds(200))
        let limits = MigrationLimits(guestRAM: guestRAM)
        do {
            while true {
                let request = try connection.receiveRequest(limits: limits)
                switch request {
                case .start(let start): try start.checkVersion()
                case .memory(let table): try connection.receiveMemory(table, into: memory)
                default: break
                }
            }
        } catch {
            return error
        }
    }

    @Test(arguments: cases)
    func receiverRefusesWithATypedError(stream: MalformedStream) throws {
        let memory = try GuestMemory(ranges: [GuestRAMRange(start: 0, size: 16 << 20)])
        let error = try #require(try Self.receive(stream, into: memory))
        #expect(error.kind == stream.kind, "\(error.message)")
        #expect(!error.message.isEmpty && !error.message.contains("\n"))
    }

    @Test func errorMessagesNameWhatWasWrong() throws {
        let memory = try GuestMemory(ranges: [GuestRAMRange(start: 0, size: 16 << 20)])
        let straddle = try #require(Self.cases.first { $0.name == "range straddling the MMIO hole" })
        let error = try #require(try Self.receive(straddle, into: memory))
        #expect(error.message.contains("memory range 0 (0xbffff000+0x2000)"), "\(error.message)")
        let eof = try #require(Self.cases.first { $0.name == "EOF mid-header" })
        #expect(try Self.receive(eof, into: memory)?.message.contains("went away") == true)
    }
}
