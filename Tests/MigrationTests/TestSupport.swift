import Foundation
import Machine
@testable import Migration
#if canImport(Glibc)
import Glibc
#endif

/// A connected pair of Unix stream sockets. Each end is closed when the value goes away unless it
/// was taken (by a `MigrationConnection`, which then owns it).
final class SocketPair {
    let sender: Int32
    let receiver: Int32
    private var ownsSender = true
    private var ownsReceiver = true

    init() throws {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            throw MigrationError.system("socketpair", errno: errno)
        }
        sender = fds[0]
        receiver = fds[1]
    }

    /// Writes `bytes` from the sending end (they must fit in the socket buffer).
    func write(_ bytes: [UInt8]) throws {
        try SocketIO.write(sender, bytes, timeout: .seconds(5), what: "test bytes")
    }

    /// Ends the stream: the receiver reads end-of-file after what was written.
    func closeSender() {
        if ownsSender { close(sender) }
        ownsSender = false
    }

    func takeSender() -> Int32 {
        ownsSender = false
        return sender
    }

    func takeReceiver() -> Int32 {
        ownsReceiver = false
        return receiver
    }

    deinit {
        if ownsSender { close(sender) }
        if ownsReceiver { close(receiver) }
    }
}

/// Runs `body` on a new OS thread (blocking socket I/O stays off the Swift concurrency pool) and
/// returns a way to wait for its result.
final class BackgroundThread<T: Sendable>: @unchecked Sendable {
    private let done = DispatchSemaphore(value: 0)
    private var result: Result<T, any Error>?

    init(_ body: @escaping @Sendable () throws -> T) {
        let thread = Thread { [self] in
            result = Result { try body() }
            done.signal()
        }
        thread.start()
    }

    func join() throws -> T {
        done.wait()
        guard let result else { fatalError("thread finished without a result") }
        return try result.get()
    }
}

/// Request bytes built field by field, for golden and malformed streams.
enum Wire {
    static func header(command: UInt16, length: UInt64, magic: UInt32 = MigrationProtocol.requestMagic,
                       reserved: UInt16 = 0) -> [UInt8] {
        var bytes = WireBytes()
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
        var bytes = WireBytes()
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
}

/// SplitMix64: a small deterministic generator, so a failing random stream can be replayed.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
