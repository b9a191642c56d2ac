import HostOS
import Machine
import Synchronization

/// A request as the receiver got it, validated against its `MigrationLimits` and decoded.
public enum MigrationRequest: Equatable, Sendable {
    case start(MigrationStart)
    case config(MigrationConfig)
    /// A validated range table. Its bytes are still on the connection: the caller must call
    /// `MigrationConnection.receiveMemory(_:into:)` with this table before the next request.
    case memory(MemoryRangeTable)
    case state(MigrationState)
    case complete
    case abandon
    case join(MigrationJoin)
    /// A local migration's guest RAM, as a memory file the receiver maps.
    case memoryFile(SharedMemoryFile)

    public var command: MigrationCommand {
        switch self {
        case .start: .start
        case .config: .config
        case .memory: .memory
        case .state: .state
        case .complete: .complete
        case .abandon: .abandon
        case .join: .join
        case .memoryFile: .memoryFile
        }
    }
}

/// A memory file a `memory-file` request passed; equal when it is the same descriptor.
public struct SharedMemoryFile: Equatable, Sendable {
    public let descriptor: FileDescriptor

    public init(_ descriptor: FileDescriptor) {
        self.descriptor = descriptor
    }

    public static func == (lhs: Self, rhs: Self) -> Bool { lhs.descriptor === rhs.descriptor }
}

/// One migration connection speaking the protocol of docs/migration-protocol.md over a
/// `MigrationTransport`, for one sender or receiver thread. It owns the transport and closes it
/// exactly once (`close()` or when it goes away).
///
/// Every read and write gives up once the peer has made no progress for `ioTimeout`. Once a
/// receive has failed the stream is out of step, so later receives fail at once; sending (an error
/// response, typically) still works, and likewise the other way round.
public final class MigrationConnection: Sendable {
    /// The default for `ioTimeout`.
    public static let defaultIOTimeout: Duration = .seconds(30)

    private struct State: Sendable {
        var receiveFailure: MigrationError?
        var sendFailure: MigrationError?
        /// The memory table whose bytes `receiveMemory` must read next.
        var pendingMemory: MemoryRangeTable?
    }

    private let transport: any MigrationTransport
    /// The longest the connection waits for the peer to send or accept the next byte.
    public let ioTimeout: Duration
    private let state = Mutex(State())

    /// Takes ownership of `transport`.
    public init(_ transport: any MigrationTransport, ioTimeout: Duration = MigrationConnection.defaultIOTimeout) {
        self.transport = transport
        self.ioTimeout = ioTimeout
    }

    deinit { transport.close() }

    /// Who is at the other end: `HOST:PORT` over TCP, `unix:PATH` over a Unix socket.
    public var peer: String { transport.peer }

    /// Sets up the transport before the first message: the TLS handshake, for a TLS connection.
    /// Gives up once the peer has made no progress for `ioTimeout`.
    public func handshake() throws(MigrationError) {
        try transport.handshake(progressTimeout: ioTimeout)
    }

    /// Whether the connection is TLS (whether or not its handshake is done yet).
    public var isEncrypted: Bool { transport is TLSTransport }

    /// Protocol and cipher suite after the handshake; nil on a plain socket.
    public var encryption: String? { transport.encryption }

    /// Closes the connection, once. Call it from the thread that uses the connection, after its
    /// I/O; to interrupt I/O from another thread, call `shutdown()`.
    public func close() {
        transport.close()
    }

    /// Makes a read or write under way on this connection, and every later one, fail at once with
    /// `peerWentAway`. Safe from any thread, before or after `close()`.
    public func shutdown() {
        transport.shutdown()
    }

    // MARK: Sending requests

    /// Sends a request with `payload` after its header. For `memory`, use `sendMemory(_:from:)`;
    /// for `config` and `state`, `sendConfig(_:)` and `sendState(_:)`.
    public func sendRequest(_ command: MigrationCommand, payload: [UInt8] = []) throws(MigrationError) {
        try sending { () throws(MigrationError) in
            let header = MigrationRequestHeader(command: command, length: UInt64(payload.count))
            try write(header.encoded + payload, what: "the \(command) request")
        }
    }

    public func sendStart(_ start: MigrationStart) throws(MigrationError) {
        try sendRequest(.start, payload: start.encoded)
    }

    public func sendJoin(_ join: MigrationJoin) throws(MigrationError) {
        try sendRequest(.join, payload: join.encoded)
    }

    /// Sends a `memory-file` request: its header, then one byte that carries `file`'s descriptor.
    public func sendMemoryFile(_ file: FileDescriptor) throws(MigrationError) {
        try sending { () throws(MigrationError) in
            try write(MigrationRequestHeader(command: .memoryFile, length: 1).encoded, what: "the memory-file request header")
            try move(what: "the memory file") { () throws(StreamTransferError) in
                try transport.send(file, progressTimeout: ioTimeout)
            }
        }
    }

    public func sendConfig(_ config: MigrationConfig) throws(MigrationError) {
        try sendRequest(.config, payload: try MigrationDocument.encode(config))
    }

    public func sendState(_ state: MigrationState) throws(MigrationError) {
        try sendRequest(.state, payload: try MigrationDocument.encodeBinary(state))
    }

    /// Sends a memory request: its header, `table`, then each range's bytes straight from
    /// `memory`'s mapping.
    public func sendMemory(_ table: MemoryRangeTable, from memory: GuestMemory) throws(MigrationError) {
        try sending { () throws(MigrationError) in
            guard table.ranges.count <= Int(UInt32.max) else {
                throw MigrationError(.tooManyRanges, "a memory request holds at most \(UInt32.max) ranges, not \(table.ranges.count)")
            }
            let header = MigrationRequestHeader(command: .memory, length: UInt64(table.encodedSize) &+ table.dataBytes)
            try write(header.encoded + table.encoded, what: "the memory request header and range table")
            for (index, range) in table.ranges.enumerated() {
                let bytes = try Self.guestBytes(of: range, index: index, in: memory)
                try move(what: Self.name(of: range, index: index)) { () throws(StreamTransferError) in
                    try transport.send(UnsafeRawBufferPointer(bytes), progressTimeout: ioTimeout)
                }
            }
        }
    }

    // MARK: Receiving requests

    /// Reads the next request and validates it against `limits` before acting on anything in it:
    /// header magic, command and reserved field, the payload length for that command, a config or
    /// state document that decodes, and a memory range table (count bounded, every range
    /// page-aligned, ascending without overlap, inside guest RAM, and the table's total equal to
    /// the rest of the payload). For `memory`, only the table is read; call
    /// `receiveMemory(_:into:)` next. The start payload's version is left for the caller to check,
    /// so that it can name the migration it refuses.
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
                let bytes = try read(Int(header.length), what: "the config payload")
                return .config(try MigrationDocument.decode(MigrationConfig.self, from: bytes, command: .config))
            case .state:
                let bytes = try read(Int(header.length), what: "the state payload")
                return .state(try MigrationDocument.decodeBinary(MigrationState.self, from: bytes, command: .state))
            case .join:
                return .join(try MigrationJoin(decoding: read(MigrationProtocol.joinPayloadSize, what: "the join payload")))
            case .complete:
                return .complete
            case .abandon:
                return .abandon
            case .memoryFile:
                var file: FileDescriptor?
                try move(what: "the memory file") { () throws(StreamTransferError) in
                    file = try transport.receiveDescriptor(progressTimeout: ioTimeout)
                }
                guard let file else {
                    throw MigrationError(.protocolViolation, "the memory-file request's byte came without a descriptor")
                }
                return .memoryFile(SharedMemoryFile(file))
            case .memory:
                let table = try receiveRangeTable(payloadLength: header.length, limits: limits)
                state.withLock { $0.pendingMemory = table }
                return .memory(table)
            }
        }
    }

    private func receiveRangeTable(payloadLength: UInt64, limits: MigrationLimits) throws(MigrationError) -> MemoryRangeTable {
        let count = try read(MigrationProtocol.rangeTableCountSize, what: "the memory range count").littleEndian(UInt32.self, at: 0) ?? 0
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
                let bytes = try Self.guestBytes(of: range, index: index, in: memory)
                try move(what: Self.name(of: range, index: index)) { () throws(StreamTransferError) in
                    try transport.receive(into: bytes, progressTimeout: ioTimeout)
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
            try write(header.encoded + text, what: "the response")
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

    private func write(_ bytes: [UInt8], what: String) throws(MigrationError) {
        let result = bytes.withUnsafeBytes { buffer in
            Result { () throws(MigrationError) in
                try move(what: what) { () throws(StreamTransferError) in
                    try transport.send(buffer, progressTimeout: ioTimeout)
                }
            }
        }
        try result.get()
    }

    private func read(_ count: Int, what: String, atMessageStart: Bool = false) throws(MigrationError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        let result = bytes.withUnsafeMutableBytes { buffer in
            Result { () throws(MigrationError) in
                try move(what: what, atMessageStart: atMessageStart) { () throws(StreamTransferError) in
                    try transport.receive(into: buffer, progressTimeout: ioTimeout)
                }
            }
        }
        try result.get()
        return bytes
    }

    /// Runs one transfer of `what` and turns its failure into a migration error that names it.
    private func move(what: String, atMessageStart: Bool = false,
                      _ transfer: () throws(StreamTransferError) -> Void) throws(MigrationError) {
        do {
            try transfer()
        } catch {
            switch error {
            case .peerClosed(0) where atMessageStart:
                throw MigrationError(.peerWentAway, "the peer went away: the connection closed before the next message")
            case .peerClosed(let done):
                throw MigrationError(.peerWentAway, "the peer went away in the middle of \(what) (after \(done) bytes)")
            case .timedOut(let done):
                throw MigrationError(.timedOut, "the peer made no progress for \(ioTimeout) in \(what) (after \(done) bytes)")
            case .failed(let cause):
                throw .system(cause)
            case .channelFailed(let reason):
                throw MigrationError(.tlsHandshake, "the encrypted channel failed in \(what): \(reason)")
            }
        }
    }

    /// The guest memory of one range, or `rangeOutsideRAM`.
    private static func guestBytes(of range: MigrationMemoryRange, index: Int,
                                   in memory: GuestMemory) throws(MigrationError) -> UnsafeMutableRawBufferPointer {
        guard let count = Int(exactly: range.length), let bytes = try? memory.buffer(at: range.address, count: count) else {
            throw MigrationError(.rangeOutsideRAM, "\(name(of: range, index: index)) is not inside this machine's guest RAM")
        }
        return bytes
    }

    private static func name(of range: MigrationMemoryRange, index: Int) -> String {
        "memory range \(index) (0x\(hex(range.address))+0x\(hex(range.length)))"
    }

    private func receiving<T>(_ body: () throws(MigrationError) -> T) throws(MigrationError) -> T {
        try guarded(\.receiveFailure, "receive", body)
    }

    private func sending<T>(_ body: () throws(MigrationError) -> T) throws(MigrationError) -> T {
        try guarded(\.sendFailure, "send", body)
    }

    /// Runs one direction's operation unless that direction already failed, and remembers its
    /// first failure.
    private func guarded<T>(_ failure: WritableKeyPath<State, MigrationError?> & Sendable, _ direction: String,
                            _ body: () throws(MigrationError) -> T) throws(MigrationError) -> T {
        if let earlier = state.withLock({ $0[keyPath: failure] }) {
            throw MigrationError(.protocolViolation, "the connection cannot \(direction) after an earlier failure: \(earlier.message)")
        }
        do {
            return try body()
        } catch {
            state.withLock { $0[keyPath: failure] = $0[keyPath: failure] ?? error }
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
