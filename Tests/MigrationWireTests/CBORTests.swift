import FerryTestSupport
import Foundation
import Machine
import Testing
@testable import MigrationWire

/// The state payload's CBOR: what it writes is RFC 8949's encoding (its Appendix A examples, byte
/// for byte), a machine state comes back equal, and hostile bytes get an error, never a crash.
@Suite struct CBORTests {
    static func hex(_ bytes: [UInt8]) -> String { bytes.map { String(format: "%02x", $0) }.joined() }

    struct AB: Codable, Equatable {
        var a: Int
        var b: [Int]
    }

    @Test func writesTheRFCsExamplesByteForByte() throws {
        #expect(Self.hex(try CBOR.encode(0)) == "00")
        #expect(Self.hex(try CBOR.encode(23)) == "17")
        #expect(Self.hex(try CBOR.encode(24)) == "1818")
        #expect(Self.hex(try CBOR.encode(100)) == "1864")
        #expect(Self.hex(try CBOR.encode(1000)) == "1903e8")
        #expect(Self.hex(try CBOR.encode(1_000_000)) == "1a000f4240")
        #expect(Self.hex(try CBOR.encode(1_000_000_000_000)) == "1b000000e8d4a51000")
        #expect(Self.hex(try CBOR.encode(UInt64.max)) == "1bffffffffffffffff")
        #expect(Self.hex(try CBOR.encode(-1)) == "20")
        #expect(Self.hex(try CBOR.encode(-10)) == "29")
        #expect(Self.hex(try CBOR.encode(-100)) == "3863")
        #expect(Self.hex(try CBOR.encode(-1000)) == "3903e7")
        #expect(Self.hex(try CBOR.encode(Int64.min)) == "3b7fffffffffffffff")
        #expect(Self.hex(try CBOR.encode(1.1)) == "fb3ff199999999999a")
        #expect(Self.hex(try CBOR.encode(false)) == "f4")
        #expect(Self.hex(try CBOR.encode(true)) == "f5")
        #expect(Self.hex(try CBOR.encode(Int?.none)) == "f6")
        #expect(Self.hex(try CBOR.encode("")) == "60")
        #expect(Self.hex(try CBOR.encode("IETF")) == "6449455446")
        #expect(Self.hex(try CBOR.encode("\u{00fc}")) == "62c3bc")
        #expect(Self.hex(try CBOR.encode([UInt8]([1, 2, 3, 4]))) == "4401020304")
        #expect(Self.hex(try CBOR.encode([Int]())) == "80")
        #expect(Self.hex(try CBOR.encode([1, 2, 3])) == "83010203")
        #expect(Self.hex(try CBOR.encode(AB(a: 1, b: [2, 3]))) == "a26161016162820203")
    }

    @Test func readsWhatItWritesAndWhatTheRFCWrites() throws {
        #expect(try CBOR.decode(AB.self, from: [0xA2, 0x61, 0x62, 0x82, 0x02, 0x03, 0x61, 0x61, 0x01]) == AB(a: 1, b: [2, 3]),
                "keys in any order")
        #expect(try CBOR.decode(Int64.self, from: [0x3B, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]) == Int64.min)
        #expect(try CBOR.decode(UInt64.self, from: [0x1B, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]) == UInt64.max)
        #expect(try CBOR.decode(Int?.self, from: [0xF6]) == nil)
        #expect(try CBOR.decode([String: UInt8].self, from: CBOR.encode(["x": 1, "yz": 255])) == ["x": 1, "yz": 255])
        let state = MigrationState(machine: RoundTripTests.machineState(), guestRunning: false)
        let bytes = try CBOR.encode(state)
        #expect(try CBOR.decode(MigrationState.self, from: bytes) == state)
        let json = try JSONEncoder().encode(state)
        print("cbor: a one-vCPU machine state is \(bytes.count) bytes in CBOR, \(json.count) in JSON")
        // The rehearsal coded before a switch-over codes like a real state (its errors are not reported).
        let rehearsal = MigrationState(machine: .rehearsal(of: testMachine), guestRunning: true)
        #expect(try CBOR.decode(MigrationState.self, from: CBOR.encode(rehearsal)) == rehearsal)
        let localAPIC: [UInt8] = [0x59, 0x04, 0x00] + [UInt8](repeating: 7, count: 1024)
        #expect(bytes.firstRange(of: localAPIC) != nil, "the local APIC's 1024 bytes are one byte string, not an array of numbers")
    }

    @Test(arguments: [
        ("the value ends early", [UInt8]([0x19, 0x01])),
        ("a length beyond the bytes", [0x5B, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00]),
        ("an array count beyond the bytes", [0x9A, 0xFF, 0xFF, 0xFF, 0xFF]),
        ("an indefinite-length array", [0x9F, 0x01, 0xFF]),
        ("a tag", [0xC0, 0x60]),
        ("a duplicate key", [0xA2, 0x61, 0x61, 0x01, 0x61, 0x61, 0x02]),
        ("a key that is not text", [0xA1, 0x01, 0x02]),
        ("text that is not UTF-8", [0x62, 0xC3, 0x28]),
        ("bytes after the value", [0x01, 0x02]),
        ("a half float", [0xF9, 0x3C, 0x00]),
        ("nesting too deep", [UInt8](repeating: 0x81, count: CBOR.maximumDepth + 1) + [0x01]),
        ("an integer too big for its field", [0xA2, 0x61, 0x61, 0x1B, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x61, 0x62, 0x80]),
        ("a negative integer for an unsigned one", [0x38, 0x63]),
        ("text where a number belongs", [0xA2, 0x61, 0x61, 0x61, 0x31, 0x61, 0x62, 0x80]),
        ("a missing key", [0xA1, 0x61, 0x61, 0x01]),
        ("more values than a state has", [0x9A, 0x00, 0x04, 0x93, 0xE0] + [UInt8](repeating: 0, count: 300_000)),
    ])
    func refusesMalformedBytes(what: String, bytes: [UInt8]) {
        #expect(throws: DecodingError.self, "\(what)") {
            switch what {
            case "a negative integer for an unsigned one": _ = try CBOR.decode(UInt64.self, from: bytes)
            case "bytes after the value", "the value ends early": _ = try CBOR.decode(Int.self, from: bytes)
            default: _ = try CBOR.decode(AB.self, from: bytes)
            }
        }
    }

    /// Seeded random mutations of a real state's bytes: each decodes or throws, and none crashes.
    @Test func mutatedStatesDecodeOrThrowNeverCrash() throws {
        let valid = try CBOR.encode(MigrationState(machine: RoundTripTests.machineState(), guestRunning: true))
        var generator = SplitMix64(seed: 0xCB0_2026)
        var refused = 0
        for _ in 0..<3000 {
            var bytes = valid
            for _ in 0..<Int.random(in: 1...4, using: &generator) {
                let at = Int.random(in: 0..<bytes.count, using: &generator)
                switch Int.random(in: 0..<4, using: &generator) {
                case 0: bytes[at] = UInt8.random(in: 0...255, using: &generator)
                case 1: bytes[at] ^= 1 << UInt8.random(in: 0..<8, using: &generator)
                case 2: bytes.removeSubrange(at...)
                default: bytes.insert(UInt8.random(in: 0...255, using: &generator), at: at)
                }
                if bytes.isEmpty { bytes = [0xFF] }
            }
            if (try? CBOR.decode(MigrationState.self, from: bytes)) == nil { refused += 1 }
        }
        #expect(refused > 1000, "most mutations break the state: \(refused) of 3000 refused")
    }
}
