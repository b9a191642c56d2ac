import Foundation

/// Serves an inherited listening socket (`--api-socket fd=N`, how libvirt hands Cloud Hypervisor
/// its API socket) by relaying each connection it accepts to the API server's own Unix socket.
/// The HTTP server binds by path only, so this relay is what lets it answer on a descriptor.
final class InheritedSocketForwarder: Sendable {
    /// Bytes moved per read.
    static let bufferSize = 64 << 10

    let listeningDescriptor: Int32
    let serverPath: String
    /// Relays still moving bytes, so that shutdown can let the last answers reach their clients.
    private let activeRelays = NSCondition()
    private nonisolated(unsafe) var relayCount = 0   // guarded by activeRelays

    init(listeningDescriptor: Int32, serverPath: String) {
        self.listeningDescriptor = listeningDescriptor
        self.serverPath = serverPath
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
            let client = accept(listeningDescriptor, nil, nil)
            if client < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                return
            }
            let server = Self.connect(to: serverPath)
            guard server >= 0 else {
                close(client)
                continue
            }
            activeRelays.lock()
            relayCount += 1
            activeRelays.unlock()
            let relay = Thread { [self] in
                Self.relay(client, server)
                activeRelays.lock()
                relayCount -= 1
                activeRelays.broadcast()
                activeRelays.unlock()
            }
            relay.name = "api-fd-relay"
            relay.start()
        }
    }

    /// Waits until every relay has delivered its last bytes (the server has closed its side), at
    /// most `timeout` seconds.
    func drain(timeout: TimeInterval) {
        let deadline = Date().addingTimeInterval(timeout)
        activeRelays.lock()
        defer { activeRelays.unlock() }
        while relayCount > 0, activeRelays.wait(until: deadline) {}
    }

    static func connect(to path: String) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return -1 }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let fits = withUnsafeMutableBytes(of: &address.sun_path) { buffer -> Bool in
            let bytes = Array(path.utf8)
            guard bytes.count < buffer.count else { return false }
            buffer.copyBytes(from: bytes)
            return true
        }
        let connected = fits && withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0
            }
        }
        if !connected {
            close(fd)
            return -1
        }
        return fd
    }

    /// Moves bytes both ways until either side closes, then closes both.
    static func relay(_ first: Int32, _ second: Int32) {
        defer {
            close(first)
            close(second)
        }
        var descriptors = [pollfd(fd: first, events: Int16(POLLIN), revents: 0),
                           pollfd(fd: second, events: Int16(POLLIN), revents: 0)]
        var buffer = [UInt8](repeating: 0, count: bufferSize)
        while true {
            guard poll(&descriptors, 2, -1) > 0 else {
                if errno == EINTR { continue }
                return
            }
            for (index, descriptor) in descriptors.enumerated() where descriptor.revents != 0 {
                let source = descriptor.fd
                let destination = index == 0 ? second : first
                let count = buffer.withUnsafeMutableBytes { read(source, $0.baseAddress, $0.count) }
                guard count > 0 else { return }
                var offset = 0
                while offset < count {
                    let written = buffer[offset..<count].withUnsafeBytes { write(destination, $0.baseAddress, $0.count) }
                    guard written > 0 else { return }
                    offset += written
                }
            }
        }
    }
}

/// The API server could not start.
struct APIServerError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
