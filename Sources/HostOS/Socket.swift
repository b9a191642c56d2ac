#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// Where a stream socket connects or listens.
public enum SocketEndpoint: Equatable, Hashable, Sendable, CustomStringConvertible {
    /// A host name or address and a port (0: any free port, when listening).
    case tcp(host: String, port: UInt16)
    /// A Unix socket path.
    case unix(path: String)

    /// `sun_path` holds 108 bytes including the terminating NUL.
    public static let maximumUnixPathBytes = 107

    public var description: String {
        switch self {
        case let .tcp(host, port): host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case let .unix(path): path
        }
    }
}

/// Stream sockets: connecting with a timeout, and who is at the other end.
public enum Socket {
    /// Connects to `endpoint`, trying each address it resolves to, and gives up on each after
    /// `timeout` (`ETIMEDOUT`). The socket is blocking and close-on-exec; TCP sockets have
    /// `TCP_NODELAY`, so headers and small messages go out at once.
    public static func connect(to endpoint: SocketEndpoint, timeout: Duration) throws(SystemError) -> FileDescriptor {
        var lastError = SystemError("connect to \(endpoint)", errno: ECONNREFUSED)
        for address in try ResolvedAddress.resolve(endpoint, passive: false) {
            do {
                return try connect(address, endpoint: endpoint, timeout: timeout)
            } catch {
                lastError = error
            }
        }
        throw lastError
    }

    private static func connect(_ address: ResolvedAddress, endpoint: SocketEndpoint, timeout: Duration) throws(SystemError) -> FileDescriptor {
        let socket = try newSocket(family: address.family, for: endpoint)
        let operation = "connect to \(endpoint)"
        try setNonBlocking(socket.rawValue, true)
        let deadline = ContinuousClock.now + timeout
        var result = address.withSockaddr { Glibc.connect(socket.rawValue, $0, $1) }
        // A Unix socket whose backlog is full answers EAGAIN: try again until the deadline.
        while result != 0 && errno == EAGAIN && address.family == AF_UNIX && ContinuousClock.now < deadline {
            Poll.sleep(for: .milliseconds(10))
            result = address.withSockaddr { Glibc.connect(socket.rawValue, $0, $1) }
        }
        if result != 0 {
            let code = errno
            guard code == EINPROGRESS || code == EINTR else { throw SystemError(operation, errno: code) }
            guard try Poll.wait(socket.rawValue, for: Int16(POLLOUT), until: deadline) else {
                throw SystemError(operation, errno: ETIMEDOUT, detail: "no answer within \(timeout)")
            }
            var error: Int32 = 0
            var length = socklen_t(MemoryLayout<Int32>.size)
            try systemCall("getsockopt(SO_ERROR) after \(operation)") {
                getsockopt(socket.rawValue, SOL_SOCKET, SO_ERROR, &error, &length)
            }
            guard error == 0 else { throw SystemError(operation, errno: error) }
        }
        try setNonBlocking(socket.rawValue, false)
        try setNoDelay(socket.rawValue, family: address.family)
        return socket
    }

    /// A new close-on-exec stream socket of `family`.
    static func newSocket(family: Int32, for endpoint: SocketEndpoint) throws(SystemError) -> FileDescriptor {
        FileDescriptor(try systemCall("socket for \(endpoint)") {
            Glibc.socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        })
    }

    /// Turns on `TCP_NODELAY` on a TCP socket; does nothing for other families.
    static func setNoDelay(_ fd: Int32, family: Int32) throws(SystemError) {
        guard family == AF_INET || family == AF_INET6 else { return }
        var on: Int32 = 1
        try systemCall("setsockopt(TCP_NODELAY)") {
            setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &on, socklen_t(MemoryLayout<Int32>.size))
        }
    }

    static func setNonBlocking(_ fd: Int32, _ nonBlocking: Bool) throws(SystemError) {
        let flags = try systemCall("fcntl(F_GETFL)") { fcntl(fd, F_GETFL) }
        try systemCall("fcntl(F_SETFL)") { fcntl(fd, F_SETFL, nonBlocking ? flags | O_NONBLOCK : flags & ~O_NONBLOCK) }
    }

    /// The connected peer of `fd`, for people: `HOST:PORT` (`[HOST]:PORT` for IPv6) over TCP,
    /// `unix:PATH` over a Unix socket (`unix:` alone for an unnamed peer, as a connecting client is).
    public static func peerName(_ fd: Int32) -> String {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let result = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &length) }
        }
        guard result == 0 else { return "unknown" }
        if Int32(storage.ss_family) == AF_UNIX {
            let path = withUnsafeBytes(of: storage) { bytes -> String in
                let pathBytes = bytes[MemoryLayout<sa_family_t>.size..<Int(length)].prefix { $0 != 0 }
                return String(decoding: pathBytes, as: UTF8.self)
            }
            return "unix:\(path)"
        }
        var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        var service = [CChar](repeating: 0, count: Int(NI_MAXSERV))
        let found = withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                getnameinfo($0, length, &host, socklen_t(host.count), &service, socklen_t(service.count),
                            NI_NUMERICHOST | NI_NUMERICSERV)
            }
        }
        guard found == 0 else { return "unknown" }
        let hostText = String(decoding: host.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let serviceText = String(decoding: service.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return Int32(storage.ss_family) == AF_INET6 ? "[\(hostText)]:\(serviceText)" : "\(hostText):\(serviceText)"
    }
}

/// A listening stream socket. It owns its descriptor and closes it once; a Unix socket's file is
/// removed when the listener closes.
public final class ListeningSocket: Sendable {
    private let descriptor: FileDescriptor
    private let family: Int32
    /// Where it listens; for `tcp` with port 0, with the port the system chose.
    public let endpoint: SocketEndpoint
    private let removedFile = Mutex(false)

    /// Listens on `endpoint`. A Unix socket path that already exists is refused (`EADDRINUSE`),
    /// not replaced. TCP listeners reuse addresses (`SO_REUSEADDR`).
    public init(on endpoint: SocketEndpoint, backlog: Int32 = 4) throws(SystemError) {
        let address = try ResolvedAddress.resolve(endpoint, passive: true)[0]
        let socket = try Socket.newSocket(family: address.family, for: endpoint)
        if address.family != AF_UNIX {
            var on: Int32 = 1
            try systemCall("setsockopt(SO_REUSEADDR)") {
                setsockopt(socket.rawValue, SOL_SOCKET, SO_REUSEADDR, &on, socklen_t(MemoryLayout<Int32>.size))
            }
        }
        try systemCall("bind to \(endpoint)") { address.withSockaddr { Glibc.bind(socket.rawValue, $0, $1) } }
        try systemCall("listen on \(endpoint)") { Glibc.listen(socket.rawValue, backlog) }
        if case let .tcp(host, 0) = endpoint {
            var storage = sockaddr_storage()
            var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
            try systemCall("getsockname for \(endpoint)") {
                withUnsafeMutablePointer(to: &storage) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(socket.rawValue, $0, &length) }
                }
            }
            let port = withUnsafeBytes(of: storage) { bytes in
                // sin_port and sin6_port are both at offset 2, in network byte order.
                UInt16(bigEndian: bytes.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
            }
            self.endpoint = .tcp(host: host, port: port)
        } else {
            self.endpoint = endpoint
        }
        descriptor = socket
        family = address.family
    }

    deinit { close() }

    /// The listening descriptor, for a poll(2) that waits on it beside others.
    public var rawDescriptor: Int32 { descriptor.rawValue }

    /// Accepts one connection, waiting until `deadline` (nil: until one comes or `shutdown()`);
    /// nil when the deadline passed. The connection is blocking and close-on-exec, with
    /// `TCP_NODELAY` over TCP.
    public func accept(until deadline: ContinuousClock.Instant? = nil) throws(SystemError) -> FileDescriptor? {
        let operation = "accept on \(endpoint)"
        while true {
            guard descriptor.isOpen else { throw SystemError(operation, errno: EBADF, detail: "the listener is closed") }
            guard try Poll.wait(descriptor.rawValue, for: Int16(POLLIN), until: deadline) else { return nil }
            let connection = Glibc.accept(descriptor.rawValue, nil, nil)
            if connection >= 0 {
                let accepted = FileDescriptor(connection)
                try systemCall("fcntl(FD_CLOEXEC)") { fcntl(connection, F_SETFD, FD_CLOEXEC) }
                try Socket.setNoDelay(connection, family: family)
                return accepted
            }
            let code = errno
            switch code {
            case EINTR, EAGAIN, EWOULDBLOCK, ECONNABORTED: continue
            default: throw SystemError(operation, errno: code)
            }
        }
    }

    /// Wakes a thread blocked in `accept`, which then fails. Safe from any thread.
    public func shutdown() {
        descriptor.shutdown()
    }

    /// Closes the socket, once, and removes a Unix socket's file.
    public func close() {
        descriptor.close()
        let remove = removedFile.withLock { removed in
            defer { removed = true }
            return !removed
        }
        if remove, case .unix(let path) = endpoint { unlink(path) }
    }
}

/// One resolved socket address: family and `sockaddr` bytes.
struct ResolvedAddress {
    var family: Int32
    var storage: sockaddr_storage
    var length: socklen_t

    static func resolve(_ endpoint: SocketEndpoint, passive: Bool) throws(SystemError) -> [ResolvedAddress] {
        switch endpoint {
        case let .unix(path):
            guard path.utf8.count <= SocketEndpoint.maximumUnixPathBytes, !path.utf8.contains(0) else {
                throw SystemError("unix socket \(path)", errno: ENAMETOOLONG)
            }
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &address.sun_path) { buffer in
                for (index, byte) in path.utf8.enumerated() { buffer[index] = byte }
            }
            var storage = sockaddr_storage()
            withUnsafeMutableBytes(of: &storage) { target in
                withUnsafeBytes(of: address) { target.copyMemory(from: $0) }
            }
            let length = socklen_t(MemoryLayout<sa_family_t>.size + path.utf8.count + 1)
            return [ResolvedAddress(family: AF_UNIX, storage: storage, length: length)]
        case let .tcp(host, port):
            var hints = addrinfo()
            hints.ai_family = AF_UNSPEC
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            hints.ai_flags = passive ? AI_PASSIVE : 0
            var list: UnsafeMutablePointer<addrinfo>?
            let result = getaddrinfo(host, String(port), &hints, &list)
            guard result == 0 else {
                throw SystemError("resolving host '\(host)'", errno: 0, detail: String(cString: gai_strerror(result)))
            }
            defer { freeaddrinfo(list) }
            var resolved: [ResolvedAddress] = []
            var entry = list
            while let info = entry?.pointee {
                if let address = info.ai_addr, info.ai_addrlen <= socklen_t(MemoryLayout<sockaddr_storage>.size) {
                    var storage = sockaddr_storage()
                    withUnsafeMutableBytes(of: &storage) { target in
                        target.copyMemory(from: UnsafeRawBufferPointer(start: address, count: Int(info.ai_addrlen)))
                    }
                    resolved.append(ResolvedAddress(family: info.ai_family, storage: storage, length: info.ai_addrlen))
                }
                entry = info.ai_next
            }
            guard !resolved.isEmpty else { throw SystemError("resolving host '\(host)'", errno: 0, detail: "it has no address") }
            return resolved
        }
    }

    func withSockaddr<T>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
        withUnsafePointer(to: storage) { storage in
            storage.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, length) }
        }
    }
}
