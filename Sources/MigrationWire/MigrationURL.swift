import HostOS

/// Where a migration connects or listens, in Cloud Hypervisor's spelling: `tcp:HOST:PORT` (an IPv6
/// host in brackets, `tcp:[::1]:6000`) or `unix:PATH`.
public enum MigrationURL: Equatable, Hashable, Sendable, CustomStringConvertible {
    case tcp(host: String, port: UInt16)
    case unix(path: String)

    /// The longest Unix socket path: `sun_path` holds 108 bytes including the terminating NUL.
    public static let maximumUnixPathBytes = SocketEndpoint.maximumUnixPathBytes

    public init(parsing text: String) throws(MigrationError) {
        guard let colon = text.firstIndex(of: ":") else {
            throw MigrationError(.invalidURL, "'\(text)' has no scheme; write tcp:HOST:PORT or unix:PATH")
        }
        let scheme = text[..<colon]
        let rest = String(text[text.index(after: colon)...])
        switch scheme {
        case "unix":
            guard !rest.isEmpty else {
                throw MigrationError(.invalidURL, "'\(text)' has no socket path; write unix:/path/to/socket")
            }
            guard rest.utf8.count <= Self.maximumUnixPathBytes else {
                throw MigrationError(.invalidURL, "'\(text)': the socket path is \(rest.utf8.count) bytes; a Unix socket path has at most \(Self.maximumUnixPathBytes)")
            }
            guard !rest.utf8.contains(0) else {
                throw MigrationError(.invalidURL, "'\(text)': the socket path contains a NUL byte")
            }
            self = .unix(path: rest)
        case "tcp":
            let host: Substring
            let portText: Substring
            if rest.hasPrefix("[") {
                guard let close = rest.firstIndex(of: "]") else {
                    throw MigrationError(.invalidURL, "'\(text)' opens an IPv6 address with '[' but never closes it")
                }
                host = rest[rest.index(after: rest.startIndex)..<close]
                let afterHost = rest[rest.index(after: close)...]
                guard afterHost.hasPrefix(":") else {
                    throw MigrationError(.invalidURL, "'\(text)' has no port; write tcp:HOST:PORT")
                }
                portText = afterHost.dropFirst()
            } else {
                guard let lastColon = rest.lastIndex(of: ":") else {
                    throw MigrationError(.invalidURL, "'\(text)' has no port; write tcp:HOST:PORT")
                }
                host = rest[..<lastColon]
                portText = rest[rest.index(after: lastColon)...]
                guard !host.contains(":") else {
                    throw MigrationError(.invalidURL, "'\(text)': write an IPv6 host in brackets, e.g. tcp:[::1]:6000")
                }
            }
            guard !host.isEmpty else {
                throw MigrationError(.invalidURL, "'\(text)' has no host; write tcp:HOST:PORT, e.g. tcp:192.0.2.1:6000")
            }
            guard !host.hasPrefix("/") else {
                throw MigrationError(.invalidURL, "'\(text)': write tcp:HOST:PORT without '//'")
            }
            guard portText.allSatisfy({ $0.isASCII && $0.isNumber }), let port = UInt16(portText) else {
                throw MigrationError(.invalidURL, "'\(text)': port '\(portText)' is not a number from 0 to 65535")
            }
            self = .tcp(host: String(host), port: port)
        default:
            throw MigrationError(.invalidURL, "'\(text)' has unknown scheme '\(scheme)'; write tcp:HOST:PORT or unix:PATH")
        }
    }

    /// The socket this URL names.
    public var endpoint: SocketEndpoint {
        switch self {
        case let .tcp(host, port): .tcp(host: host, port: port)
        case let .unix(path): .unix(path: path)
        }
    }

    public var description: String {
        switch self {
        case let .tcp(host, port): host.contains(":") ? "tcp:[\(host)]:\(port)" : "tcp:\(host):\(port)"
        case let .unix(path): "unix:\(path)"
        }
    }
}
