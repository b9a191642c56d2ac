#if canImport(Glibc)
import Glibc
#endif
import HostOS

extension MigrationConnection {
    /// The default for `connect(to:timeout:ioTimeout:)`'s `timeout`.
    public static let defaultConnectTimeout: Duration = .seconds(10)

    /// Connects to a receiver at `url`, trying each address the host resolves to, and gives up on
    /// each after `timeout`. With `tls`, the connection is TLS, its handshake still to do
    /// (`handshake()`), and the receiver's certificate must name `url`'s host.
    public static func connect(to url: MigrationURL, timeout: Duration = defaultConnectTimeout,
                               ioTimeout: Duration = defaultIOTimeout, tls: MigrationTLS? = nil) throws(MigrationError) -> MigrationConnection {
        if case .tcp(_, 0) = url {
            throw MigrationError(.invalidURL, "'\(url)': port 0 can only be listened on; connect to the port the receiver listens on")
        }
        let socket: FileDescriptor
        do {
            socket = try Socket.connect(to: url.endpoint, timeout: timeout)
        } catch {
            let reason = error.errno == ETIMEDOUT ? "connecting to \(url) timed out after \(timeout)" : "cannot connect to \(url): \(error)"
            throw MigrationError(.connectionFailed, reason, cause: error)
        }
        guard let tls else { return MigrationConnection(SocketTransport(socket), ioTimeout: ioTimeout) }
        let host: String? = if case .tcp(let host, _) = url { host } else { nil }
        return MigrationConnection(try TLSTransport(socket, tls: tls, peerHost: host), ioTimeout: ioTimeout)
    }
}

/// A listening socket for a migration receiver. A Unix socket's file is removed when it closes.
public final class MigrationListener: Sendable {
    private let socket: ListeningSocket
    /// Where the listener listens; for `tcp:HOST:0`, with the port the system chose.
    public let url: MigrationURL

    /// Listens on `url`. A Unix socket path that already exists is refused, not replaced.
    public init(listeningOn url: MigrationURL, backlog: Int32 = 4) throws(MigrationError) {
        do {
            socket = try ListeningSocket(on: url.endpoint, backlog: backlog)
        } catch {
            if error.errno == EADDRINUSE, case .unix(let path) = url {
                throw MigrationError(.connectionFailed, "cannot listen on \(url): \(path) already exists; remove it or choose another path", cause: error)
            }
            throw MigrationError(.connectionFailed, "cannot listen on \(url): \(error)", cause: error)
        }
        self.url = switch socket.endpoint {
        case let .tcp(host, port): .tcp(host: host, port: port)
        case let .unix(path): .unix(path: path)
        }
    }

    /// Accepts one sender, waiting at most `timeout` (nil: until one connects or `shutdown()`).
    /// With `tls`, the connection is TLS, its handshake still to do (`handshake()`).
    public func accept(timeout: Duration? = nil, ioTimeout: Duration = MigrationConnection.defaultIOTimeout,
                       tls: MigrationTLS? = nil) throws(MigrationError) -> MigrationConnection {
        let accepted: FileDescriptor?
        do {
            accepted = try socket.accept(until: timeout.map { .now + $0 })
        } catch {
            throw MigrationError(.connectionFailed, "accepting a sender on \(url) failed: \(error)", cause: error)
        }
        guard let accepted else {
            throw MigrationError(.timedOut, "no sender connected to \(url) within \(timeout ?? .zero)")
        }
        guard let tls else { return MigrationConnection(SocketTransport(accepted), ioTimeout: ioTimeout) }
        return MigrationConnection(try TLSTransport(accepted, tls: tls, peerHost: nil), ioTimeout: ioTimeout)
    }

    /// Wakes a thread blocked in `accept`, which then fails. Safe from any thread.
    public func shutdown() {
        socket.shutdown()
    }

    /// Closes the socket, once, and removes a Unix socket's file.
    public func close() {
        socket.close()
    }
}
