@testable import Events
import FerryTestSupport
import Foundation
import Testing

@Suite("Event encoding")
struct EventEncodingTests {
    static let iteration = Event(
        timestamp: .seconds(12) + .nanoseconds(345_678_901),
        source: .vm,
        name: "migration-memory-iteration",
        properties: [
            "migration_id": "3f2c0b4e-5d55-4c1e-9d0e-5f7f5f6a0c11",
            "id": "0",
            "bytes": "1073741824",
        ]
    )

    @Test func cloudHypervisorFormatMatchesTheContractExampleByteForByte() {
        let expected = """
            {
              "timestamp": {
                "secs": 12,
                "nanos": 345678901
              },
              "source": "vm",
              "event": "migration-memory-iteration",
              "properties": {
                "bytes": "1073741824",
                "id": "0",
                "migration_id": "3f2c0b4e-5d55-4c1e-9d0e-5f7f5f6a0c11"
              }
            }
            """ + "\n\n"
        #expect(String(decoding: EventEncoding.cloudHypervisor(Self.iteration), as: UTF8.self) == expected)
    }

    @Test func nilPropertiesAreWrittenAsNull() {
        let event = Event(timestamp: .zero, source: .vmm, name: "shutdown", properties: nil)
        let expected = """
            {
              "timestamp": {
                "secs": 0,
                "nanos": 0
              },
              "source": "vmm",
              "event": "shutdown",
              "properties": null
            }
            """ + "\n\n"
        #expect(String(decoding: EventEncoding.cloudHypervisor(event), as: UTF8.self) == expected)
    }

    @Test func emptyPropertiesAreWrittenAsAnEmptyObject() {
        let event = Event(timestamp: .seconds(3) + .nanoseconds(7), source: .guest, name: "panic", properties: [:])
        let expected = """
            {
              "timestamp": {
                "secs": 3,
                "nanos": 7
              },
              "source": "guest",
              "event": "panic",
              "properties": {}
            }
            """ + "\n\n"
        #expect(String(decoding: EventEncoding.cloudHypervisor(event), as: UTF8.self) == expected)
    }

    @Test func timestampsAreWholeSecondsAndNanoseconds() {
        let event = Event(
            timestamp: .seconds(1) + .nanoseconds(999_999_999) + .nanoseconds(1) / 2,
            source: .vmm, name: "x", properties: nil
        )
        let line = String(decoding: EventEncoding.ndjson(event), as: UTF8.self)
        #expect(line.hasPrefix(#"{"timestamp":{"secs":1,"nanos":999999999},"#))
    }

    @Test func ndjsonIsOneCompactLineWithTheSameFieldsInTheSameOrder() {
        let expected = #"{"timestamp":{"secs":12,"nanos":345678901},"source":"vm","event":"migration-memory-iteration","properties":{"bytes":"1073741824","id":"0","migration_id":"3f2c0b4e-5d55-4c1e-9d0e-5f7f5f6a0c11"}}"#
            + "\n"
        #expect(String(decoding: EventEncoding.ndjson(Self.iteration), as: UTF8.self) == expected)
        let empty = Event(timestamp: .zero, source: .vmm, name: "starting", properties: [:])
        #expect(String(decoding: EventEncoding.ndjson(empty), as: UTF8.self)
            == #"{"timestamp":{"secs":0,"nanos":0},"source":"vmm","event":"starting","properties":{}}"# + "\n")
        let null = Event(timestamp: .zero, source: .vm, name: "booted", properties: nil)
        #expect(String(decoding: EventEncoding.ndjson(null), as: UTF8.self)
            == #"{"timestamp":{"secs":0,"nanos":0},"source":"vm","event":"booted","properties":null}"# + "\n")
    }

    @Test("Strings are escaped as serde_json escapes them, plus braces", arguments: [
        EscapeCase(#"say "hi""#, #""say \"hi\"""#),
        EscapeCase(#"C:\dir"#, #""C:\\dir""#),
        EscapeCase("line\nbreak", #""line\nbreak""#),
        EscapeCase("tab\there", #""tab\there""#),
        EscapeCase("\u{8}\u{C}\r", #""\b\f\r""#),
        EscapeCase("\u{1}", #""\u0001""#),
        EscapeCase("\u{0}\u{1F}", #""\u0000\u001f""#),
        EscapeCase("{\"a\": 1}", #""\u007b\"a\": 1\u007d""#),
        EscapeCase("/usr/bin", #""/usr/bin""#),
        EscapeCase("\u{7F}", "\"\u{7F}\""),
        EscapeCase("café → ✓ 🚀", #""café → ✓ 🚀""#),
    ])
    func escaping(_ example: EscapeCase) {
        let event = Event(timestamp: .zero, source: .vm, name: "e", properties: ["k": example.input])
        let line = String(decoding: EventEncoding.ndjson(event), as: UTF8.self)
        #expect(line == #"{"timestamp":{"secs":0,"nanos":0},"source":"vm","event":"e","properties":{"k":"# + example.expected + "}}\n")
        let pretty = String(decoding: EventEncoding.cloudHypervisor(event), as: UTF8.self)
        #expect(pretty.contains("\n    \"k\": \(example.expected)\n"))
    }

    @Test func bracesAreEscapedInNamesAndKeysToo() {
        let event = Event(timestamp: .zero, source: .vm, name: "a{b}", properties: ["{k}": "v"])
        let line = String(decoding: EventEncoding.ndjson(event), as: UTF8.self)
        #expect(line.contains(#""event":"a\u007bb\u007d""#))
        #expect(line.contains(#"{"\u007bk\u007d":"v"}"#))
        let pretty = EventEncoding.cloudHypervisor(event)
        #expect(pretty.filter { $0 == UInt8(ascii: "{") }.count == 3)
        #expect(pretty.filter { $0 == UInt8(ascii: "}") }.count == 3)
    }

    @Test func propertyKeysAreSortedByTheirBytes() {
        let event = Event(timestamp: .zero, source: .vm, name: "e", properties: ["b": "2", "B": "1", "a_ms": "3", "a": "4", "é": "5"])
        let line = String(decoding: EventEncoding.ndjson(event), as: UTF8.self)
        #expect(line.contains(#""properties":{"B":"1","a":"4","a_ms":"3","b":"2","é":"5"}"#))
    }

    @Test("A long property value is truncated so that the event fits 4096 bytes", arguments: [
        LongValue("x", repeated: 10_240),
        LongValue("é", repeated: 5_120),
        LongValue("{}", repeated: 5_120),
        LongValue("🚀\n", repeated: 2_560),
        LongValue("\u{1}ab", repeated: 3_414),
    ])
    func truncation(_ long: LongValue) throws {
        let event = Event(timestamp: .seconds(1), source: .vm, name: "migration-failed",
                          properties: ["error": long.value, "phase": "memory"])
        let encoded = EventEncoding.cloudHypervisor(event)
        #expect(encoded.count <= EventEncoding.maximumEventSize)
        // Cut by the excess, not more: at most one escape sequence short of the limit.
        #expect(encoded.count > EventEncoding.maximumEventSize - 6)
        #expect(encoded.suffix(2) == [0x0A, 0x0A])
        let parsed = try EventReader.event(json: Array(encoded.dropLast(2)))
        let truncated = try #require(parsed.properties?["error"])
        #expect(truncated.hasSuffix("…"))
        #expect(long.value.unicodeScalars.starts(with: truncated.unicodeScalars.dropLast()))
        #expect(parsed.properties?["phase"] == "memory")
    }

    @Test func truncationCutsTheLongestValueFirst() throws {
        let long = String(repeating: "a", count: 3_000)
        let shorter = String(repeating: "b", count: 2_000)
        let event = Event(timestamp: .zero, source: .vm, name: "e", properties: ["long": long, "shorter": shorter])
        let encoded = EventEncoding.cloudHypervisor(event)
        #expect(encoded.count <= EventEncoding.maximumEventSize)
        let parsed = try EventReader.event(json: Array(encoded.dropLast(2)))
        #expect(parsed.properties?["shorter"] == shorter)
        #expect(parsed.properties?["long"]?.hasSuffix("…") == true)
    }

    @Test func manyLongValuesAreAllCutUntilTheEventFits() throws {
        let properties = Dictionary(uniqueKeysWithValues: (0..<8).map { ("key\($0)", String(repeating: "v", count: 1_000)) })
        let event = Event(timestamp: .zero, source: .vm, name: "e", properties: properties)
        let encoded = EventEncoding.cloudHypervisor(event)
        #expect(encoded.count <= EventEncoding.maximumEventSize)
        let parsed = try EventReader.event(json: Array(encoded.dropLast(2)))
        #expect(parsed.properties?.count == 8)
    }

    @Test func anEventThatFitsIsNotTruncated() throws {
        let value = String(repeating: "x", count: 3_500)
        let encoded = EventEncoding.cloudHypervisor(Event(timestamp: .zero, source: .vm, name: "e", properties: ["k": value]))
        let parsed = try EventReader.event(json: Array(encoded.dropLast(2)))
        #expect(parsed.properties?["k"] == value)
    }
}

/// A string and its JSON encoding, shown with Swift escapes in test output.
struct EscapeCase: Sendable, CustomTestStringConvertible {
    var input: String
    var expected: String
    init(_ input: String, _ expected: String) {
        self.input = input
        self.expected = expected
    }
    var testDescription: String { input.debugDescription }
}

/// A long property value, shown by how it was made rather than in full.
struct LongValue: Sendable, CustomTestStringConvertible {
    var value: String
    var testDescription: String
    init(_ unit: String, repeated count: Int) {
        value = String(repeating: unit, count: count)
        testDescription = "\(count) × \(unit.debugDescription) (\(value.utf8.count) bytes)"
    }
}
