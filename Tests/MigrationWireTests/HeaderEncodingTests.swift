import Foundation
import Machine
import Testing
@testable import MigrationWire

@Suite struct HeaderEncodingTests {
    @Test func requestHeaderHasTheDocumentedBytes() throws {
        let header = MigrationRequestHeader(command: .memory, length: 0x0102_0304_0506_0708)
        #expect(header.encoded == [0x46, 0x4D, 0x52, 0x51,   // "FMRQ"
                                   0x03, 0x00,               // memory
                                   0x00, 0x00,               // reserved
                                   0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01])
        #expect(try MigrationRequestHeader(decoding: header.encoded) == header)
    }

    @Test(arguments: MigrationCommand.allCases)
    func everyCommandHasItsNumberAtOffsetFour(command: MigrationCommand) throws {
        let bytes = MigrationRequestHeader(command: command, length: 0).encoded
        #expect(bytes.count == MigrationProtocol.requestHeaderSize)
        #expect(bytes[4] == UInt8(command.rawValue) && bytes[5] == 0)
        #expect(try MigrationRequestHeader(decoding: bytes).command == command)
    }

    @Test func commandNumbersAreFixed() {
        #expect(MigrationCommand.allCases.map(\.rawValue) == [1, 2, 3, 4, 5, 6, 7, 8])
    }

    @Test func responseHeadersHaveTheDocumentedBytes() throws {
        let ok = MigrationResponseHeader(status: .ok, length: 0)
        #expect(ok.encoded == [0x46, 0x4D, 0x52, 0x53, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        let error = MigrationResponseHeader(status: .error, length: 300)
        #expect(error.encoded == [0x46, 0x4D, 0x52, 0x53, 1, 0, 0, 0, 0x2C, 0x01, 0, 0, 0, 0, 0, 0])
        #expect(try MigrationResponseHeader(decoding: error.encoded) == error)
    }

    @Test func startPayloadIsVersionThenUUIDBytes() throws {
        let id = try #require(UUID(uuidString: "00112233-4455-6677-8899-AABBCCDDEEFF"))
        let start = MigrationStart(migrationID: id)
        #expect(start.encoded == [4, 0, 0, 0,
                                  0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77,
                                  0x88, 0x99, 0xAA, 0xBB, 0xCC, 0xDD, 0xEE, 0xFF])
        #expect(try MigrationStart(decoding: start.encoded) == start)
    }

    @Test func joinPayloadIsUUIDBytesThenIndexThenCount() throws {
        let id = try #require(UUID(uuidString: "00112233-4455-6677-8899-AABBCCDDEEFF"))
        let join = MigrationJoin(migrationID: id, index: 3, count: 0x104)
        #expect(join.encoded == [0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77,
                                 0x88, 0x99, 0xAA, 0xBB, 0xCC, 0xDD, 0xEE, 0xFF,
                                 3, 0, 0, 0, 0x04, 0x01, 0, 0])
        #expect(try MigrationJoin(decoding: join.encoded) == join)
        #expect(throws: MigrationError.self) { try MigrationJoin(decoding: Array(join.encoded.prefix(20))) }
    }

    @Test func rangeTableIsCountThenAddressLengthPairs() {
        let table = MemoryRangeTable([MigrationMemoryRange(address: 0x1000, length: 0x2000)])
        #expect(table.encoded == [1, 0, 0, 0,
                                  0x00, 0x10, 0, 0, 0, 0, 0, 0,
                                  0x00, 0x20, 0, 0, 0, 0, 0, 0])
        #expect(table.encodedSize == 20 && table.dataBytes == 0x2000)
    }

    @Test func responseWithBadStatusOrOversizeTextIsRefused() {
        var badStatus = MigrationResponseHeader(status: .ok, length: 0).encoded
        badStatus[4] = 7
        #expect(throws: MigrationError.self) { try MigrationResponseHeader(decoding: badStatus) }
        let huge = MigrationResponseHeader(status: .error, length: 1 << 40).encoded
        #expect((try? MigrationResponseHeader(decoding: huge)) == nil)
    }

    @Test func errorTextIsCutAtACharacterBoundary() {
        let text = String(repeating: "é", count: 3000)   // 2 bytes each
        let cut = MigrationConnection.utf8Prefix(text, maximumBytes: MigrationProtocol.maximumErrorTextBytes)
        #expect(cut.count == MigrationProtocol.maximumErrorTextBytes)
        #expect(String(decoding: cut, as: UTF8.self) == String(repeating: "é", count: 2048))
    }
}
