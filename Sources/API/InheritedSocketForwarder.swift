import Foundation
import HostOS

/// Serves an inherited listening socket (`--api-socket fd=N`, how libvirt hands Cloud Hypervisor
/// its API socket) by relaying each connection it accepts to the API server's own Unix socket.
/// The HTTP server binds by path only, so this relay is what lets it answer on a descriptor.
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
        let thread = Thread { [self] in acceptLoop() }
        thread.name = "api-fd-accept"
        thread.start()
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
            let relay = Thread { [self] in
                Self.relay(client, server)
                relays.withLock {
                    relayCount -= 1
                    relayEnded.broadcast()
                }
            }
            relay.name = "api-fd-relay"
            relay.start()
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

    /// Moves bytes both ways until either side closes; both close when the relay ends.
    static func relay(_ first: FileDescriptor, _ second: FileDescriptor) {
        var descriptors = [pollfd(fd: first.rawValue, events: Int16(POLLIN), revents: 0),
                           pollfd(fd: second.rawValue, events: Int16(POLLIN), revents: 0)]
        var buffer = [UInt8](repeating: 0, count: bufferSize)
        while true {
            guard (try? systemCall("poll") { poll(&descriptors, 2, -1) }) != nil else { return }
            for (index, descriptor) in descriptors.enumerated() where descriptor.revents != 0 {
                let destination = index == 0 ? second : first
                let count = buffer.withUnsafeMutableBytes { bytes in
                    (try? systemCall("read") { read(descriptor.fd, bytes.baseAddress, bytes.count) }) ?? 0
                }
                guard count > 0 else { return }
                let written = buffer.withUnsafeBytes { bytes in
                    Result { () throws(SystemError) in try destination.writeAll(UnsafeRawBufferPointer(rebasing: bytes[0..<count])) }
                }
                guard case .success = written else { return }
            }
        }
    }
}

/// The API server could not start.
struct APIServerError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
