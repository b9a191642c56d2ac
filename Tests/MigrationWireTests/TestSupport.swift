import FerryTestSupport
import Foundation
import HostOS
import Machine
@testable import MigrationWire
#if canImport(Glibc)
import Glibc
#endif

/// A connected pair of Unix stream sockets, each end a migration connection (or raw bytes).
struct SocketPair {
    let sender: FileDescriptor
    let receiver: FileDescriptor

    init() throws {
        var fds: [Int32] = [-1, -1]
        try systemCall("socketpair") { socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) }
        sender = FileDescriptor(fds[0])
        receiver = FileDescriptor(fds[1])
    }

    func sendingConnection(ioTimeout: Duration = .seconds(5)) -> MigrationConnection {
        MigrationConnection(SocketTransport(sender), ioTimeout: ioTimeout)
    }

    func receivingConnection(ioTimeout: Duration = .seconds(5)) -> MigrationConnection {
        MigrationConnection(SocketTransport(receiver), ioTimeout: ioTimeout)
    }

    /// Writes `bytes` from the sending end (they must fit in the socket buffer).
    func write(_ bytes: [UInt8]) throws {
        try sender.writeAll(bytes)
    }

    /// Ends the stream: the receiver reads end-of-file after what was written.
    func closeSender() {
        sender.close()
    }
}

/// Request bytes built field by field, for golden and malformed streams.
enum Wire {
    static func header(command: UInt16, length: UInt64, magic: UInt32 = MigrationProtocol.requestMagic,
                       reserved: UInt16 = 0) -> [UInt8] {
        var bytes = LittleEndianBytes()
        bytes.append(magic)
        bytes.append(command)
        bytes.append(reserved)
        bytes.append(length)
        return bytes.bytes
    }

    static func header(_ command: MigrationCommand, length: UInt64) -> [UInt8] {
        header(command: command.rawValue, length: length)
    }

    static func table(_ ranges: [(UInt64, UInt64)], count: UInt32? = nil) -> [UInt8] {
        var bytes = LittleEndianBytes()
        bytes.append(count ?? UInt32(ranges.count))
        for (address, length) in ranges {
            bytes.append(address)
            bytes.append(length)
        }
        return bytes.bytes
    }

    /// A complete memory request whose data bytes are `fill`.
    static func memory(_ ranges: [(UInt64, UInt64)], fill: UInt8 = 0x5A) -> [UInt8] {
        let table = table(ranges)
        let data = ranges.reduce(0) { $0 + Int($1.1) }
        return header(.memory, length: UInt64(table.count + data)) + table + [UInt8](repeating: fill, count: data)
    }

    static func start(version: UInt32 = MigrationProtocol.version) -> [UInt8] {
        header(.start, length: 20) + MigrationStart(version: version, migrationID: UUID()).encoded
    }

    /// A request carrying `document` as JSON.
    /// A config (JSON) or state (CBOR) request with its payload.
    static func document(_ command: MigrationCommand, _ document: some Encodable) throws -> [UInt8] {
        let bytes = command == .state ? try CBOR.encode(document) : Array(try JSONEncoder().encode(document))
        return header(command, length: UInt64(bytes.count)) + bytes
    }
}

/// The machine configuration of a small test VM, for config documents.
let testMachine = MachineConfiguration(cpus: 2, memorySize: 64 << 20, kernel: "/nonexistent/kernel", commandLine: "console=ttyS0")
