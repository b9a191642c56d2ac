#if canImport(Glibc)
import Glibc
#endif
import Machine
import Synchronization

/// A request as the receiver got it, validated against its `MigrationLimits`.
public enum MigrationRequest: Equatable, Sendable {
    case start(MigrationStart)
    /// The VM configuration's bytes (JSON, decoded by the caller).
    case config([UInt8])
    /// A validated range table. Its bytes are still on the connection: the caller must call
    /// `MigrationConnection.receiveMemory(_:into:)` with this table before the next request.
    case memory(MemoryRangeTable)
    /// The machine state's bytes (JSON, decoded by the caller).
    case state([UInt8])
    case complete
    case abandon

    public var command: MigrationCommand {
        switch self {
        case .start: .start
        case .config: .config
        case .memory: .memory
        case .state: .state
        case .complete: .complete
        case .abandon: .abandon
        }
    }
}

/// One connected stream socket speaking the migration protocol, blocking, for one sender or
/// receiver thread. It owns the descriptor and closes it exactly once (`close()` or deinit).
///
/// Every read and write waits at most `ioTimeout` for the peer to make progress. Once a receive
/// has failed the stream is out of step, so later receives fail at once; sending (an error
/// response, typically) still works, and likewise the other way round.
public final class MigrationConnection: Sendable {
    /// The default for `ioTimeout`.
    public static let defaultIOTimeout: Duration = .seconds(30)
    /// Guest memory moves in pieces of at most this many bytes, each with its own `ioTimeout`,
    /// so that a large range on a slow link is not mistaken for a stalled peer.
    static let memoryChunkBytes: UInt64 = 1 << 20

    private struct State: Sendable {
        var closed = false
        var receiveFailure: MigrationError?
        var sendFailure: MigrationError?
        /// The memory table whose bytes `receiveMemory` must read next.
        var pendingMemory: MemoryRangeTable?
    }

    private let fd: Int32
    /// The longest the connection waits for the peer to send or accept the next byte.
    public let ioTimeout: Duration
    private let state = Mutex(State())

    /// Takes ownership of `fd`, a connected stream socket.
    public init(adopting fd: Int32, ioTimeout: Duration = MigrationConnection.defaultIOTimeout) {
        self.fd = fd
        self.ioTimeout = ioTimeout
    }

    deinit { close() }

    /// Who is at the other end: `HOST:PORT` over TCP, `unix:PATH` over a Unix socket.
    public var peer: String { SocketAddress.peerName(fd) }

    /// Closes the socket, once. No other thread may be using the connection; to interrupt one
    /// that is, call `shutdown()` first.
    public func close() {
        let wasOpen = state.withLock { state in
            defer { state.closed = true }
            return !state.closed
        }
        if wasOpen { _ = Glibc.close(fd) }
    }

    /// Shuts the socket down in both directions without closing it: a thread blocked in a read
    /// or write on this connection returns at once with `peerWentAway`. Safe from any thread.
    public func shutdown() {
        let open = state.withLock { !$0.closed }
        if open { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
    }

    // MARK: Sending requests

    /// Sends a request with `payload` after its header. For `memory`, use `sendMemory(_:from:)`.
    public func sendRequest(_ command: MigrationCommand, payload: [UInt8] = []) throws(MigrationError) {
        try sending {  () throws(MigrationError) in
            let header = MigrationRequestHeader(command: command, length: UInt64(payload.count))
            try SocketIO.write(fd, header.encoded, timeout: ioTimeout, what: "the \(command) request header")
            try SocketIO.write(fd, payload, timeout: ioTimeout, what: "the \(command) payload")
        }
    }

    public func sendStart(_ start: MigrationStart) throws(MigrationError) {
        try sendRequest(.start, payload: start.encoded)
    }

    /// Sends a memory request: its header, `table`, then each range's bytes straight from
    /// `memory`'s mapping.
    public func sendMemory(_ table: MemoryRangeTable, from memory: GuestMemory) throws(MigrationError) {
        try sending { () throws(MigrationError) in
            guard table.ranges.count <= Int(UInt32.max) else {
                throw MigrationError(.tooManyRanges, "a memory request holds at most \(UInt32.max) ranges, not \(table.ranges.count)")
            }
            let header = MigrationRequestHeader(command: .memory, length: UInt64(table.encodedSize) &+ table.dataBytes)
            try SocketIO.write(fd, header.encoded + table.encoded, timeout: ioTimeout, what: "the memory request header and range table")
            for (index, range) in table.ranges.enumerated() {
                try transfer(range, index: index) { (address, count, deadline) throws(GuestMemory.TransferError) in
                    try memory.send(to: fd, address: address, count: count, deadline: deadline)
                }
            }
        }
    }

    // MARK: Receiving requests

    /// Reads the next request and validates it against `limits` before acting on anything in it:
    /// header magic, command and reserved field, the payload length for that command, the start
    /// payload's version, and a memory range table (count bounded, every range page-aligned,
    /// ascending without overlap, inside guest RAM, and the table's total equal to the rest of the
    /// payload). For `memory`, only the table is read; call `receiveMemory(_:into:)` next.
    public func receiveRequest(limits: MigrationLimits) throws(MigrationError) -> MigrationRequest {
        try receiving { () throws(MigrationError) in
            if let pending = state.withLock({ $0.pendingMemory }) {
                throw MigrationError(.protocolViolation, "a request was read while the \(pending.dataBytes) bytes of the previous memory request were still unread")
            }
            let header = try MigrationRequestHeader(decoding: read(MigrationProtocol.requestHeaderSize, what: "a request header", atMessageStart: true))
            try header.check(limits)
            switch header.command {
            case .start:
                return .start(try MigrationStart(decoding: read(MigrationProtocol.startPayloadSize, what: "the start payload")))
            case .config:
                return .config(try read(Int(header.length), what: "the config payload"))
            case .state:
                return .state(try read(Int(header.length), what: "the state payload"))
            case .complete:
                return .complete
            case .abandon:
                return .abandon
            case .memory:
                let table = try receiveRangeTable(payloadLength: header.length, limits: limits)
                state.withLock { $0.pendingMemory = table }
                return .memory(table)
            }
        }
    }

    private func receiveRangeTable(payloadLength: UInt64, limits: MigrationLimits) throws(MigrationError) -> MemoryRangeTable {
        let count = try read(MigrationProtocol.rangeTableCountSize, what: "the memory range count").littleEndian(UInt32.self, at: 0)
        guard count <= limits.maximumRanges else {
            throw MigrationError(.tooManyRanges, "memory request has \(count) ranges; the limit is \(limits.maximumRanges)")
        }
        let entryBytes = Int(count) * MigrationProtocol.rangeEntrySize
        let tableSize = UInt64(MigrationProtocol.rangeTableCountSize + entryBytes)
        guard tableSize <= payloadLength else {
            throw MigrationError(.tableSizeMismatch, "memory request announces \(count) ranges (a \(tableSize)-byte table) in a \(payloadLength)-byte payload")
        }
        let table = MemoryRangeTable(decodingEntries: try read(entryBytes, what: "the memory range table"))
        try table.validate(against: limits.guestRAM)
        guard table.dataBytes == payloadLength - tableSize else {
            throw MigrationError(.tableSizeMismatch, "memory range table covers \(table.dataBytes) bytes, but \(payloadLength - tableSize) bytes follow it in the payload")
        }
        return table
    }

    /// Reads the bytes of the memory request `table` (as `receiveRequest` returned it) straight
    /// into `memory`'s mapping. Nothing outside the table's validated ranges is written; after an
    /// error those ranges hold a mix of old and new bytes.
    public func receiveMemory(_ table: MemoryRangeTable, into memory: GuestMemory) throws(MigrationError) {
        try receiving { () throws(MigrationError) in
            guard state.withLock({ $0.pendingMemory }) == table else {
                throw MigrationError(.protocolViolation, "receiveMemory was called with a table that is not the last memory request's")
            }
            for (index, range) in table.ranges.enumerated() {
                try transfer(range, index: index) { (address, count, deadline) throws(GuestMemory.TransferError) in
                    try memory.receive(from: fd, address: address, count: count, deadline: deadline)
                }
            }
            state.withLock { $0.pendingMemory = nil }
        }
    }

    // MARK: Responses

    /// Answers the last request. An error text longer than `MigrationProtocol.maximumErrorTextBytes`
    /// is cut to fit (at a character boundary).
    public func sendResponse(_ response: MigrationResponse) throws(MigrationError) {
        try sending { () throws(MigrationError) in
            let text: [UInt8]
            switch response {
            case .ok: text = []
            case .error(let message): text = Self.utf8Prefix(message, maximumBytes: MigrationProtocol.maximumErrorTextBytes)
            }
            let header = MigrationResponseHeader(status: response == .ok ? .ok : .error, length: UInt64(text.count))
            try SocketIO.write(fd, header.encoded + text, timeout: ioTimeout, what: "the response")
        }
    }

    public func receiveResponse() throws(MigrationError) -> MigrationResponse {
        try receiving { () throws(MigrationError) in
            let header = try MigrationResponseHeader(decoding: read(MigrationProtocol.responseHeaderSize, what: "a response header", atMessageStart: true))
            switch header.status {
            case .ok: return .ok
            case .error: return .error(String(decoding: try read(Int(header.length), what: "the error text"), as: UTF8.self))
            }
        }
    }

    /// Reads a response and throws `refusedByPeer` with the peer's text if it is an error.
    public func expectOK(after command: MigrationCommand) throws(MigrationError) {
        if case .error(let text) = try receiveResponse() {
            throw MigrationError(.refusedByPeer, "the receiver refused the \(command) request: \(text)")
        }
    }

    // MARK: Plumbing

    private func read(_ count: Int, what: String, atMessageStart: Bool = false) throws(MigrationError) -> [UInt8] {
        try SocketIO.read(fd, count: count, timeout: ioTimeout, what: what, atMessageStart: atMessageStart)
    }

    /// Moves one memory range in chunks, each with a fresh deadline, and turns the guest memory's
    /// transfer errors into migration errors naming the range.
    private func transfer(_ range: MigrationMemoryRange, index: Int,
                          _ move: (UInt64, Int, ContinuousClock.Instant) throws(GuestMemory.TransferError) -> Void) throws(MigrationError) {
        var offset: UInt64 = 0
        while offset < range.length {
            let count = min(Self.memoryChunkBytes, range.length - offset)
            do {
                try move(range.address + offset, Int(count), .now + ioTimeout)
            } catch {
                let name = "memory range \(index) (0x\(hex(range.address))+0x\(hex(range.length)))"
                let done = offset
                switch error {
                case .outsideRAM:
                    throw MigrationError(.rangeOutsideRAM, "\(name) is not inside this machine's guest RAM")
                case .timedOut(let moved):
                    throw MigrationError(.timedOut, "the peer made no progress for \(ioTimeout) in \(name) (after \(done + UInt64(moved)) bytes)")
                case .peerClosed(let moved):
                    throw MigrationError(.peerWentAway, "the peer went away in the middle of \(name) (after \(done + UInt64(moved)) bytes)")
                case .failed(let operation, let code):
                    throw .system("\(operation) (\(name))", errno: code)
                }
            }
            offset += count
        }
    }

    private func receiving<T>(_ body: () throws(MigrationError) -> T) throws(MigrationError) -> T {
        let earlier = state.withLock { state -> MigrationError? in
            state.closed ? MigrationError(.protocolViolation, "the connection is closed") : state.receiveFailure
        }
        if let earlier {
            throw MigrationError(.protocolViolation, "the connection cannot receive after an earlier failure: \(earlier.message)")
        }
        do {
            return try body()
        } catch {
            state.withLock { $0.receiveFailure = $0.receiveFailure ?? error }
            throw error
        }
    }

    private func sending<T>(_ body: () throws(MigrationError) -> T) throws(MigrationError) -> T {
        let earlier = state.withLock { state -> MigrationError? in
            state.closed ? MigrationError(.protocolViolation, "the connection is closed") : state.sendFailure
        }
        if let earlier {
            throw MigrationError(.protocolViolation, "the connection cannot send after an earlier failure: \(earlier.message)")
        }
        do {
            return try body()
        } catch {
            state.withLock { $0.sendFailure = $0.sendFailure ?? error }
            throw error
        }
    }

    /// The longest prefix of `text`'s UTF-8 that has at most `maximumBytes` and ends on a character.
    static func utf8Prefix(_ text: String, maximumBytes: Int) -> [UInt8] {
        var bytes: [UInt8] = []
        for character in text {
            let encoded = Array(character.utf8)
            guard bytes.count + encoded.count <= maximumBytes else { break }
            bytes += encoded
        }
        return bytes
    }
}
