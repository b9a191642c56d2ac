#if canImport(Glibc)
import Glibc
#endif

/// Resolved socket addresses for a `MigrationURL`, and the socket calls shared by connecting and
/// listening.
enum SocketAddress {
    /// One resolved address: family and the `sockaddr` bytes.
    struct Resolved {
        var family: Int32
        var storage: sockaddr_storage
        var length: socklen_t
    }

    static func resolve(_ url: MigrationURL, passive: Bool) throws(MigrationError) -> [Resolved] {
        switch url {
        case let .unix(path):
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
            return [Resolved(family: AF_UNIX, storage: storage, length: length)]
        case let .tcp(host, port):
            var hints = addrinfo()
            hints.ai_family = AF_UNSPEC
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            hints.ai_flags = passive ? AI_PASSIVE : 0
            var list: UnsafeMutablePointer<addrinfo>?
            let result = getaddrinfo(host, String(port), &hints, &list)
            guard result == 0 else {
                throw MigrationError(.connectionFailed, "cannot resolve host '\(host)' of \(url): \(String(cString: gai_strerror(result)))")
            }
            defer { freeaddrinfo(list) }
            var resolved: [Resolved] = []
            var entry = list
            while let info = entry?.pointee {
                if let address = info.ai_addr, info.ai_addrlen <= socklen_t(MemoryLayout<sockaddr_storage>.size) {
                    var storage = sockaddr_storage()
                    withUnsafeMutableBytes(of: &storage) { target in
                        target.copyMemory(from: UnsafeRawBufferPointer(start: address, count: Int(info.ai_addrlen)))
                    }
                    resolved.append(Resolved(family: info.ai_family, storage: storage, length: info.ai_addrlen))
                }
                entry = info.ai_next
            }
            guard !resolved.isEmpty else {
                throw MigrationError(.connectionFailed, "host '\(host)' of \(url) has no address")
            }
            return resolved
        }
    }

    /// A new close-on-exec stream socket of `family`.
    static func socket(family: Int32, url: MigrationURL) throws(MigrationError) -> Int32 {
        let fd = Glibc.socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .system("socket for \(url)", errno: errno, kind: .connectionFailed) }
        return fd
    }

    /// Turns on TCP_NODELAY on a TCP socket: headers and small requests go out at once.
    static func setNoDelay(_ fd: Int32, family: Int32) throws(MigrationError) {
        guard family == AF_INET || family == AF_INET6 else { return }
        var on: Int32 = 1
        guard setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &on, socklen_t(MemoryLayout<Int32>.size)) == 0 else {
            throw .system("setsockopt TCP_NODELAY", errno: errno, kind: .connectionFailed)
        }
    }

    static func setNonBlocking(_ fd: Int32, _ nonBlocking: Bool) throws(MigrationError) {
        let flags = fcntl(fd, F_GETFL)
        guard flags >= 0, fcntl(fd, F_SETFL, nonBlocking ? flags | O_NONBLOCK : flags & ~O_NONBLOCK) == 0 else {
            throw .system("fcntl O_NONBLOCK", errno: errno, kind: .connectionFailed)
        }
    }

    static func withSockaddr<T>(_ resolved: Resolved, _ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
        withUnsafePointer(to: resolved.storage) { storage in
            storage.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, resolved.length) }
        }
    }

    /// The connected peer of `fd`, for people: `HOST:PORT` (`[HOST]:PORT` for IPv6) over TCP,
    /// `unix:PATH` over a Unix socket (`unix:` alone when the peer's socket is unnamed, as a
    /// connecting client's is).
    static func peerName(_ fd: Int32) -> String {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let result = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &length) }
        }
        guard result == 0 else { return "unknown" }
        var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        var service = [CChar](repeating: 0, count: Int(NI_MAXSERV))
        switch Int32(storage.ss_family) {
        case AF_UNIX:
            let path = withUnsafeBytes(of: storage) { bytes -> String in
                let pathBytes = bytes[MemoryLayout<sa_family_t>.size..<Int(length)].prefix { $0 != 0 }
                return String(decoding: pathBytes, as: UTF8.self)
            }
            return "unix:\(path)"
        case let family:
            let found = withUnsafePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    getnameinfo($0, length, &host, socklen_t(host.count), &service, socklen_t(service.count),
                                NI_NUMERICHOST | NI_NUMERICSERV)
                }
            }
            guard found == 0 else { return "unknown" }
            let hostText = String(decoding: host.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            let serviceText = String(decoding: service.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            return family == AF_INET6 ? "[\(hostText)]:\(serviceText)" : "\(hostText):\(serviceText)"
        }
    }
}
