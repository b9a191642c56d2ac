#if canImport(Glibc)
import Glibc
#endif
import CTLS
import HostOS
import Synchronization

/// One side's credentials for a mutually authenticated migration, loaded from a directory laid out
/// as Cloud Hypervisor's `tls_dir`: `ca-cert.pem` on both sides, `client-cert.pem` and
/// `client-key.pem` on the sender, `server-cert.pem` and `server-key.pem` on the receiver. Only
/// TLS 1.3; each side demands a certificate from the other that the CA signed, and the sender also
/// checks that the receiver's certificate names the host it connected to. docs/security.md says why
/// the system's OpenSSL does this.
public final class MigrationTLS: @unchecked Sendable {
    public enum Role: Sendable {
        case sender, receiver

        /// The certificate and key this side presents.
        var files: (certificate: String, key: String) {
            switch self {
            case .sender: ("client-cert.pem", "client-key.pem")
            case .receiver: ("server-cert.pem", "server-key.pem")
            }
        }

        /// The other side, in messages.
        var peer: String {
            switch self {
            case .sender: "the destination"
            case .receiver: "the sender"
            }
        }
    }

    public static let caFile = "ca-cert.pem"

    public let directory: String
    public let role: Role
    /// OpenSSL's `SSL_CTX`: read-only once made, shared by every connection of a migration.
    let context: OpaquePointer

    /// Reads and checks the files `role` needs from `directory`. Fails naming the file that is
    /// missing, unreadable, not PEM, or whose key does not match its certificate.
    public init(directory: String, role: Role) throws(MigrationError) {
        self.directory = directory
        self.role = role
        let (certificate, key) = role.files
        for name in [Self.caFile, certificate, key] {
            let path = Self.path(directory, name)
            let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else {
                throw MigrationError(.tlsSetup, "tls_dir \(directory): \(name) cannot be read: \(errnoDescription(errno))")
            }
            Glibc.close(fd)
        }
        var error = [CChar](repeating: 0, count: 512)
        guard let context = ferry_tls_context_new(role == .receiver ? 1 : 0, Self.path(directory, Self.caFile),
                                                  Self.path(directory, certificate), Self.path(directory, key),
                                                  &error, error.count) else {
            throw MigrationError(.tlsSetup, "tls_dir \(directory): \(text(error))")
        }
        self.context = context
    }

    deinit { ferry_tls_context_free(context) }

    private static func path(_ directory: String, _ name: String) -> String {
        directory.hasSuffix("/") ? directory + name : directory + "/" + name
    }
}

/// A migration over TLS on a stream socket. `handshake(progressTimeout:)` comes first; until it
/// succeeded nothing else is sent or received.
public final class TLSTransport: MigrationTransport, @unchecked Sendable {
    private let descriptor: FileDescriptor
    private let tls: MigrationTLS
    /// OpenSSL's `SSL`, used by the owner's thread only; freed by `close()`.
    private let session: OpaquePointer
    private let closed = Mutex(false)
    private let negotiated = Mutex<String?>(nil)

    /// Takes ownership of a connected stream socket. A sender passes the host it connected to,
    /// which the receiver's certificate must name.
    public init(_ descriptor: FileDescriptor, tls: MigrationTLS, peerHost: String?) throws(MigrationError) {
        let flags = fcntl(descriptor.rawValue, F_GETFL)
        guard flags >= 0, fcntl(descriptor.rawValue, F_SETFL, flags | O_NONBLOCK) == 0 else {
            throw .system(SystemError("fcntl(O_NONBLOCK)", errno: errno))
        }
        var error = [CChar](repeating: 0, count: 512)
        guard let session = ferry_tls_session_new(tls.context, descriptor.rawValue, peerHost, &error, error.count) else {
            throw MigrationError(.tlsSetup, text(error))
        }
        self.descriptor = descriptor
        self.tls = tls
        self.session = session
    }

    /// Protocol and cipher suite once the handshake is done, e.g. `TLSv1.3 TLS_AES_256_GCM_SHA384`.
    public var encryption: String? { negotiated.withLock { $0 } }

    public func handshake(progressTimeout: Duration) throws(MigrationError) {
        var error = [CChar](repeating: 0, count: 512)
        var deadline = ContinuousClock.now + progressTimeout
        while true {
            let code = Int(ferry_tls_handshake(session, &error, error.count))
            switch code {
            case 0:
                let version = String(cString: ferry_tls_version(session))
                let cipher = String(cString: ferry_tls_cipher(session))
                negotiated.withLock { $0 = "\(version) \(cipher)" }
                return
            case FERRY_TLS_WANT_READ, FERRY_TLS_WANT_WRITE:
                let ready: Bool
                do {
                    ready = try waitUntilReady(for: code, until: deadline)
                } catch {
                    throw .system(error)
                }
                guard ready else {
                    throw MigrationError(.timedOut, "the TLS handshake with \(tls.role.peer) made no progress for \(progressTimeout)")
                }
                deadline = .now + progressTimeout
            case FERRY_TLS_CLOSED:
                throw MigrationError(.tlsHandshake, "the TLS handshake failed: \(tls.role.peer) closed the connection during it "
                                     + "(it may not use TLS, or it refused this host's certificate)")
            case FERRY_TLS_SYSCALL:
                let cause = SystemError("TLS handshake", errno: errno)
                if cause.errno == ECONNRESET || cause.errno == EPIPE {
                    throw MigrationError(.tlsHandshake, "the TLS handshake failed: \(tls.role.peer) reset the connection during it "
                                         + "(it may not use TLS, or it refused this host's certificate)", cause: cause)
                }
                throw .system(cause)
            default:
                throw MigrationError(.tlsHandshake, "the TLS handshake failed: \(Self.explain(text(error), peer: tls.role.peer))")
            }
        }
    }

    public func send(_ bytes: UnsafeRawBufferPointer, progressTimeout: Duration) throws(StreamTransferError) {
        guard let base = bytes.baseAddress else { return }
        try transfer(count: bytes.count, progressTimeout: progressTimeout) { done, error in
            ferry_tls_write(session, base + done, min(bytes.count - done, Self.maximumStep), &error, error.count)
        }
    }

    public func receive(into buffer: UnsafeMutableRawBufferPointer, progressTimeout: Duration) throws(StreamTransferError) {
        guard let base = buffer.baseAddress else { return }
        try transfer(count: buffer.count, progressTimeout: progressTimeout) { done, error in
            ferry_tls_read(session, base + done, min(buffer.count - done, Self.maximumStep), &error, error.count)
        }
    }

    /// The most one write hands OpenSSL: 64 records of 16 KiB.
    static let maximumStep = 1 << 20

    /// `step(done, error)` moves the next bytes and returns what `ferry_tls_read`/`_write` returned.
    private func transfer(count: Int, progressTimeout: Duration, _ step: (Int, inout [CChar]) -> Int) throws(StreamTransferError) {
        guard !closed.withLock({ $0 }) else {
            throw .failed(SystemError("TLS", errno: EBADF, detail: "the connection is closed"))
        }
        var error = [CChar](repeating: 0, count: 512)
        var done = 0
        var deadline = ContinuousClock.now + progressTimeout
        while done < count {
            let moved = step(done, &error)
            if moved > 0 {
                done += moved
                deadline = .now + progressTimeout
                continue
            }
            switch moved {
            case FERRY_TLS_WANT_READ, FERRY_TLS_WANT_WRITE:
                let ready: Bool
                do {
                    ready = try waitUntilReady(for: moved, until: deadline)
                } catch {
                    throw .failed(error)
                }
                if !ready { throw .timedOut(transferred: done) }
            case FERRY_TLS_CLOSED:
                throw .peerClosed(transferred: done)
            case FERRY_TLS_SYSCALL:
                let code = errno
                if code == EPIPE || code == ECONNRESET { throw .peerClosed(transferred: done) }
                throw .failed(SystemError("TLS", errno: code))
            default:
                throw .channelFailed(Self.explain(text(error), peer: tls.role.peer))
            }
        }
    }

    /// Waits until the socket is ready for what `code` (want read, want write) asks; false once
    /// `deadline` passed.
    private func waitUntilReady(for code: Int, until deadline: ContinuousClock.Instant) throws(SystemError) -> Bool {
        try Poll.wait(descriptor.rawValue, for: Int16(code == FERRY_TLS_WANT_READ ? POLLIN : POLLOUT), until: deadline)
    }

    public func shutdown() {
        descriptor.shutdown()
    }

    /// Sends close_notify (so the peer sees an orderly end, not a truncation) and frees the session.
    public func close() {
        let first = closed.withLock { closed in
            defer { closed = true }
            return !closed
        }
        guard first else { return }
        ferry_tls_close_notify(session)
        ferry_tls_session_free(session)
        descriptor.close()
    }

    deinit { close() }

    public var peer: String { Socket.peerName(descriptor.rawValue) }

    /// OpenSSL's reason, said as what happened between the two sides.
    static func explain(_ reason: String, peer: String) -> String {
        if reason.hasPrefix("certificate verify failed") {
            return "\(peer)'s certificate was refused (\(reason))"
        }
        if reason.contains("alert") {
            return "\(peer) refused this host's certificate or TLS settings (TLS alert: \(reason))"
        }
        let notTLS = ["wrong version number", "packet length too long", "record layer failure", "http request", "unknown protocol",
                      "record too long"]
        if notTLS.contains(where: reason.contains) {
            return "\(peer) does not speak TLS: is it set up without tls_dir? (\(reason))"
        }
        if reason.contains("peer did not return a certificate") {
            return "\(peer) presented no certificate (\(reason))"
        }
        return reason
    }
}

/// The text in a NUL-terminated buffer the shim filled.
private func text(_ buffer: [CChar]) -> String {
    String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
