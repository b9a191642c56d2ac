import CKVM
import Foundation
import HostOS
import Synchronization

/// Serves an inherited listening socket (`--api-socket fd=N`, how libvirt hands Cloud Hypervisor
/// its API socket) by relaying each connection it accepts to the API server's own Unix socket.
/// The HTTP server binds by path only, so this relay is what lets it answer on a descriptor.
/// Descriptors a client sends with a request (SCM_RIGHTS: libvirt's tap descriptors for
/// `vm.add-net` and `vm.restore`) are kept in `PassedDescriptors`, and the request reaches the
/// server with a header that names them.
final class InheritedSocketForwarder: Sendable {
    /// Bytes moved per read.
    static let bufferSize = 64 << 10
    /// How long connecting to the server's own socket may take.
    static let connectTimeout: Duration = .seconds(5)

    let listeningDescriptor: Int32
    let serverPath: String
    /// Relays still moving bytes, so that shutdown can let the last answers reach their clients.
    private let relays = ConditionLock()
    private let relayEnded: ConditionLock.Condition
    private nonisolated(unsafe) var relayCount = 0   // guarded by relays

    init(listeningDescriptor: Int32, serverPath: String) {
        self.listeningDescriptor = listeningDescriptor
        self.serverPath = serverPath
        relayEnded = ConditionLock.Condition(relays)
    }

    /// Checks that the descriptor is a listening stream socket, so a wrong `fd=` fails at start.
    static func validate(_ descriptor: Int32) throws {
        var type: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        var listening: Int32 = 0
        var listeningLength = socklen_t(MemoryLayout<Int32>.size)
        guard getsockopt(descriptor, SOL_SOCKET, SO_TYPE, &type, &length) == 0,
              type == Int32(SOCK_STREAM.rawValue),
              getsockopt(descriptor, SOL_SOCKET, SO_ACCEPTCONN, &listening, &listeningLength) == 0, listening == 1
        else {
            throw APIServerError("fd=\(descriptor) is not a listening stream socket")
        }
    }

    /// Accepts connections on a thread of its own until the descriptor is closed.
    func start() {
        startThread(named: "api-fd-accept") { [self] in acceptLoop() }
    }

    private func acceptLoop() {
        while true {
            let accepted: Int32
            do {
                accepted = try systemCall("accept") { accept(listeningDescriptor, nil, nil) }
            } catch where error.errno == ECONNABORTED {
                continue
            } catch {
                return
            }
            let client = FileDescriptor(accepted)
            guard let server = try? Socket.connect(to: .unix(path: serverPath), timeout: Self.connectTimeout) else { continue }
            relays.withLock { relayCount += 1 }
            startThread(named: "api-fd-relay") { [self] in
                Self.relay(client, server)
                relays.withLock {
                    relayCount -= 1
                    relayEnded.broadcast()
                }
            }
        }
    }

    /// Waits until every relay has delivered its last bytes (the server has closed its side), at
    /// most `timeout`.
    func drain(timeout: Duration) {
        let deadline = ContinuousClock.now + timeout
        relays.withLock {
            while relayCount > 0, relayEnded.wait(until: deadline) {}
        }
    }

    /// Moves bytes both ways until either side closes; both close when the relay ends. What the
    /// client sends is read with its descriptors; descriptors no route took are closed at the end.
    static func relay(_ client: FileDescriptor, _ server: FileDescriptor) {
        var descriptors = [pollfd(fd: client.rawValue, events: Int16(POLLIN), revents: 0),
                           pollfd(fd: server.rawValue, events: Int16(POLLIN), revents: 0)]
        var buffer = [UInt8](repeating: 0, count: bufferSize)
        var request = RequestTagger()
        defer { PassedDescriptors.shared.discard(request.tokens) }
        while true {
            guard (try? systemCall("poll") { poll(&descriptors, 2, -1) }) != nil else { return }
            for (index, descriptor) in descriptors.enumerated() where descriptor.revents != 0 {
                var passed = [Int32](repeating: -1, count: PassedDescriptors.mostPerRequest)
                var passedCount: Int32 = 0
                let count = buffer.withUnsafeMutableBytes { bytes in
                    index == 0
                        ? ckvm_receive_with_descriptors(descriptor.fd, bytes.baseAddress, bytes.count, &passed,
                                                        Int32(passed.count), &passedCount, 0)
                        : read(descriptor.fd, bytes.baseAddress, bytes.count)
                }
                if count < 0, errno == EINTR || errno == EAGAIN { continue }
                guard count > 0 else { return }
                var bytes = Array(buffer[0..<count])
                let destination = index == 0 ? server : client
                if index == 0 {
                    // More descriptors than a request may carry: the request cannot be served whole.
                    guard passedCount >= 0 else { return }
                    bytes = request.tag(bytes, passing: Array(passed.prefix(Int(passedCount))))
                }
                guard (try? destination.writeAll(bytes)) != nil else { return }
            }
        }
    }
}

/// Tags the request that descriptors came with: the descriptors ride on its first bytes, so the
/// header naming them goes right after its request line (once that line is whole).
struct RequestTagger {
    /// Every token this connection was given, for closing what no route took.
    private(set) var tokens: [UInt64] = []
    /// Bytes held back until the request line they belong to is whole.
    private var held: [UInt8] = []
    private var pendingToken: UInt64?

    /// What to pass on of `bytes`, which came with `descriptors`.
    mutating func tag(_ bytes: [UInt8], passing descriptors: [Int32]) -> [UInt8] {
        if !descriptors.isEmpty {
            let token = PassedDescriptors.shared.deposit(descriptors)
            tokens.append(token)
            // A second batch before the request line is whole is kept (and closed at the end),
            // never named.
            if pendingToken == nil { pendingToken = token }
        }
        guard let token = pendingToken else { return bytes }
        held += bytes
        guard let end = held.firstRange(of: [13, 10]) else {
            // No request line within a whole buffer: pass it on untagged.
            if held.count > InheritedSocketForwarder.bufferSize { pendingToken = nil; defer { held = [] }; return held }
            return []
        }
        pendingToken = nil
        defer { held = [] }
        return Array(held[..<end.upperBound]) + Array("\(PassedDescriptors.header): \(token)\r\n".utf8) + Array(held[end.upperBound...])
    }
}

/// Descriptors that came with requests on the inherited API socket, by token, until the route
/// of the request that carried them takes them. The token is random, and the socket only its
/// owner can reach.
final class PassedDescriptors: Sendable {
    static let shared = PassedDescriptors()
    /// The header that carries a request's token to its route.
    static let header = "Ferry-Passed-Descriptors"
    /// The most descriptors one request may carry (libvirt sends one per queue pair).
    static let mostPerRequest = 16

    private let store = Mutex<[UInt64: [Int32]]>([:])

    func deposit(_ descriptors: [Int32]) -> UInt64 {
        store.withLock { store in
            var token = UInt64.random(in: 1...UInt64.max)
            while store[token] != nil { token = UInt64.random(in: 1...UInt64.max) }
            store[token] = descriptors
            return token
        }
    }

    /// The descriptors deposited under `token` (empty if none), which the caller now owns.
    func take(_ token: UInt64) -> [Int32] {
        store.withLock { $0.removeValue(forKey: token) } ?? []
    }

    /// Closes what is still deposited under `tokens`.
    func discard(_ tokens: [UInt64]) {
        for token in tokens {
            for descriptor in take(token) { close(descriptor) }
        }
    }
}

/// The API server could not start.
struct APIServerError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
