#if canImport(Glibc)
import Glibc
#endif
import CKVM
import HostOS

/// A connected byte stream between a migration's sender and receiver. The framing
/// (`MigrationConnection`) works over any transport: a plain socket, or TLS on one (`TLSTransport`).
///
/// One thread does the I/O; `shutdown()` may come from any thread and makes that I/O return at
/// once. `close()` is for the owner, after its I/O.
public protocol MigrationTransport: Sendable {
    /// Sends every byte, failing once the peer has accepted nothing for `progressTimeout`.
    func send(_ bytes: UnsafeRawBufferPointer, progressTimeout: Duration) throws(StreamTransferError)
    /// Fills `buffer`, failing once the peer has sent nothing for `progressTimeout`.
    func receive(into buffer: UnsafeMutableRawBufferPointer, progressTimeout: Duration) throws(StreamTransferError)
    /// Interrupts the I/O under way and every later one; safe from any thread.
    func shutdown()
    /// Releases the connection, once.
    func close()
    /// Who is at the other end, for people.
    var peer: String { get }
    /// Sets up the channel before anything else moves on it (the TLS handshake); nothing to do
    /// on a plain socket.
    func handshake(progressTimeout: Duration) throws(MigrationError)
    /// What protects the bytes once `handshake` is done (protocol and cipher), nil for none.
    var encryption: String? { get }
    /// Sends one byte (0) carrying `file` (SCM_RIGHTS); only a Unix socket can.
    func send(_ file: FileDescriptor, progressTimeout: Duration) throws(StreamTransferError)
    /// Receives the one byte that `send(_:progressTimeout:)` sent and the descriptor it carried;
    /// nil if it carried none.
    func receiveDescriptor(progressTimeout: Duration) throws(StreamTransferError) -> FileDescriptor?
}

extension MigrationTransport {
    public func handshake(progressTimeout: Duration) throws(MigrationError) {}
    public var encryption: String? { nil }
    public func send(_ file: FileDescriptor, progressTimeout: Duration) throws(StreamTransferError) {
        throw .channelFailed("descriptors pass only over a plain Unix socket")
    }
    public func receiveDescriptor(progressTimeout: Duration) throws(StreamTransferError) -> FileDescriptor? {
        throw .channelFailed("descriptors pass only over a plain Unix socket")
    }
}

/// A migration over a plain stream socket (`tcp:` or `unix:`).
public final class SocketTransport: MigrationTransport {
    private let descriptor: FileDescriptor

    /// Takes ownership of a connected stream socket.
    public init(_ descriptor: FileDescriptor) {
        self.descriptor = descriptor
    }

    public func send(_ bytes: UnsafeRawBufferPointer, progressTimeout: Duration) throws(StreamTransferError) {
        try requireOpen("send")
        try StreamIO.send(descriptor.rawValue, bytes, progressTimeout: progressTimeout)
    }

    public func receive(into buffer: UnsafeMutableRawBufferPointer, progressTimeout: Duration) throws(StreamTransferError) {
        try requireOpen("recv")
        try StreamIO.receive(descriptor.rawValue, into: buffer, progressTimeout: progressTimeout)
    }

    public func send(_ file: FileDescriptor, progressTimeout: Duration) throws(StreamTransferError) {
        try requireOpen("sendmsg")
        let socket = descriptor.rawValue
        var byte: UInt8 = 0
        try StreamIO.transfer(socket, count: 1, waitingFor: Int16(POLLOUT), progressTimeout: progressTimeout, name: "sendmsg") { _ in
            ckvm_send_with_descriptor(socket, &byte, 1, file.rawValue)
        }
    }

    public func receiveDescriptor(progressTimeout: Duration) throws(StreamTransferError) -> FileDescriptor? {
        try requireOpen("recvmsg")
        let socket = descriptor.rawValue
        var byte: UInt8 = 0
        var passed: Int32 = -1
        var count: Int32 = 0
        try StreamIO.transfer(socket, count: 1, waitingFor: Int16(POLLIN), progressTimeout: progressTimeout, name: "recvmsg") { _ in
            ckvm_receive_with_descriptors(socket, &byte, 1, &passed, 1, &count, 1)
        }
        return count == 1 ? FileDescriptor(passed) : nil
    }

    public func shutdown() {
        descriptor.shutdown()
    }

    public func close() {
        descriptor.close()
    }

    public var peer: String { Socket.peerName(descriptor.rawValue) }

    /// I/O comes from the owner's thread, which also closes: after its close, the descriptor
    /// number may already be someone else's.
    private func requireOpen(_ operation: String) throws(StreamTransferError) {
        guard descriptor.isOpen else { throw .failed(SystemError(operation, errno: EBADF, detail: "the connection is closed")) }
    }
}
