#if canImport(Glibc)
import Glibc
#endif
import Synchronization

extension MigrationConnection {
    /// The default for `connect(to:timeout:ioTimeout:)`'s `timeout`.
    public static let defaultConnectTimeout: Duration = .seconds(10)

    /// Connects to a receiver at `url`, trying each address the host resolves to, and gives up on
    /// each after `timeout`. TCP connections have TCP_NODELAY.
    public static func connect(to url: MigrationURL, timeout: Duration = defaultConnectTimeout,
                               ioTimeout: Duration = defaultIOTimeout) throws(MigrationError) -> MigrationConnection {
        if case .tcp(_, 0) = url {
            throw MigrationError(.invalidURL, "'\(url)': port 0 can only be listened on; connect to the port the receiver listens on")
        }
        var lastError = MigrationError(.connectionFailed, "cannot connect to \(url)")
        for address in try SocketAddress.resolve(url, passive: false) {
            do {
                let fd = try connect(address, url: url, timeout: timeout)
                return MigrationConnection(adopting: fd, ioTimeout: ioTimeout)
            } catch {
                lastError = error
            }
        }
        throw lastError
    }

    private static func connect(_ address: SocketAddress.Resolved, url: MigrationURL, timeout: Duration) throws(MigrationError) -> Int32 {
        let fd = try SocketAddress.socket(family: address.family, url: url)
        do throws(MigrationError) {
            try SocketAddress.setNonBlocking(fd, true)
            let deadline = ContinuousClock.now + timeout
            var result = SocketAddress.withSockaddr(address) { Glibc.connect(fd, $0, $1) }
            // A Unix socket whose backlog is full answers EAGAIN: retry until the deadline.
            while result != 0 && errno == EAGAIN && address.family == AF_UNIX && ContinuousClock.now < deadline {
                var pause = timespec(tv_sec: 0, tv_nsec: 10_000_000)
                nanosleep(&pause, nil)
                result = SocketAddress.withSockaddr(address) { Glibc.connect(fd, $0, $1) }
            }
            if result != 0 {
                let code = errno
                guard code == EINPROGRESS || code == EINTR else {
                    throw MigrationError.system("connect to \(url)", errno: code, kind: .connectionFailed)
                }
                try SocketIO.wait(fd, events: Int16(POLLOUT), until: deadline,
                                  timedOut: "connecting to \(url) timed out after \(timeout)")
                var error: Int32 = 0
                var length = socklen_t(MemoryLayout<Int32>.size)
                guard getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) == 0 else {
                    throw MigrationError.system("getsockopt SO_ERROR for \(url)", errno: errno, kind: .connectionFailed)
                }
                guard error == 0 else { throw MigrationError.system("connect to \(url)", errno: error, kind: .connectionFailed) }
            }
            try SocketAddress.setNonBlocking(fd, false)
            try SocketAddress.setNoDelay(fd, family: address.family)
            return fd
        } catch {
            Glibc.close(fd)
            throw error
        }
    }
}

/// A listening socket for a migration receiver. It owns the descriptor and closes it once; a Unix
/// socket's file is removed when the listener closes.
public final class MigrationListener: Sendable {
    private let fd: Int32
    private let family: Int32
    private let closed = Mutex(false)
    /// Where the listener listens; for `tcp:HOST:0`, with the port the system chose.
    public let url: MigrationURL

    /// Listens on `url`. A Unix socket path that already exists is refused, not replaced.
    public init(listeningOn url: MigrationURL, backlog: Int32 = 4) throws(MigrationError) {
        let address = try SocketAddress.resolve(url, passive: true)[0]
        let fd = try SocketAddress.socket(family: address.family, url: url)
        do throws(MigrationError) {
            if address.family != AF_UNIX {
                var on: Int32 = 1
                guard setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, socklen_t(MemoryLayout<Int32>.size)) == 0 else {
                    throw MigrationError.system("setsockopt SO_REUSEADDR", errno: errno, kind: .connectionFailed)
                }
            }
            guard SocketAddress.withSockaddr(address, { Glibc.bind(fd, $0, $1) }) == 0 else {
                let code = errno
                if code == EADDRINUSE, case .unix(let path) = url {
                    throw MigrationError(.connectionFailed, "cannot listen on \(url): \(path) already exists; remove it or choose another path")
                }
                throw MigrationError.system("bind to \(url)", errno: code, kind: .connectionFailed)
            }
            guard Glibc.listen(fd, backlog) == 0 else {
                throw MigrationError.system("listen on \(url)", errno: errno, kind: .connectionFailed)
            }
            if case let .tcp(host, 0) = url {
                var storage = sockaddr_storage()
                var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
                let result = withUnsafeMutablePointer(to: &storage) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
                }
                guard result == 0 else { throw MigrationError.system("getsockname for \(url)", errno: errno, kind: .connectionFailed) }
                let port = withUnsafeBytes(of: storage) { bytes in
                    // sin_port and sin6_port are both at offset 2, in network byte order.
                    UInt16(bigEndian: bytes.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
                }
                self.url = .tcp(host: host, port: port)
            } else {
                self.url = url
            }
        } catch {
            Glibc.close(fd)
            throw error
        }
        self.fd = fd
        self.family = address.family
    }

    deinit { close() }

    /// Accepts one sender, waiting at most `timeout` (nil: until one connects or `shutdown()`).
    public func accept(timeout: Duration? = nil,
                       ioTimeout: Duration = MigrationConnection.defaultIOTimeout) throws(MigrationError) -> MigrationConnection {
        guard !closed.withLock({ $0 }) else {
            throw MigrationError(.protocolViolation, "the listener on \(url) is closed")
        }
        while true {
            if let timeout {
                try SocketIO.wait(fd, events: Int16(POLLIN), until: .now + timeout,
                                  timedOut: "no sender connected to \(url) within \(timeout)")
            } else {
                var descriptor = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                if poll(&descriptor, 1, -1) < 0 && errno != EINTR {
                    throw MigrationError.system("poll on \(url)", errno: errno, kind: .connectionFailed)
                }
            }
            let connection = Glibc.accept(fd, nil, nil)
            if connection >= 0 {
                do throws(MigrationError) {
                    guard fcntl(connection, F_SETFD, FD_CLOEXEC) == 0 else {
                        throw MigrationError.system("fcntl FD_CLOEXEC", errno: errno, kind: .connectionFailed)
                    }
                    try SocketAddress.setNoDelay(connection, family: family)
                } catch {
                    Glibc.close(connection)
                    throw error
                }
                return MigrationConnection(adopting: connection, ioTimeout: ioTimeout)
            }
            let code = errno
            switch code {
            case EINTR, EAGAIN, EWOULDBLOCK, ECONNABORTED: continue
            default: throw MigrationError.system("accept on \(url)", errno: code, kind: .connectionFailed)
            }
        }
    }

    /// Wakes a thread blocked in `accept`, which then fails. Safe from any thread.
    public func shutdown() {
        if !closed.withLock({ $0 }) { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
    }

    /// Closes the socket, once, and removes a Unix socket's file.
    public func close() {
        let wasOpen = closed.withLock { closed in
            defer { closed = true }
            return !closed
        }
        guard wasOpen else { return }
        Glibc.close(fd)
        if case .unix(let path) = url { unlink(path) }
    }
}
