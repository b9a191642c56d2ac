import MigrationWire

/// A checked `vm.send-migration` request (Cloud Hypervisor's `SendMigrationData`).
public struct SendMigrationOptions: Equatable, Sendable {
    /// Ferry sends over exactly one connection; `connections` is accepted for Cloud Hypervisor's
    /// API only with this value.
    public static let connections = 1

    public var destination: MigrationURL
    public var policy: PrecopyPolicy
    /// The source VMM stays up after the migration finished (its VM is deleted either way).
    public var keepAlive: Bool
    /// Mutual TLS with the sender's credentials from this directory (`tls_dir`); `tcp:` only.
    public var tlsDirectory: String?

    public init(destination: MigrationURL, policy: PrecopyPolicy = PrecopyPolicy(), keepAlive: Bool = false, tlsDirectory: String? = nil) {
        self.destination = destination
        self.policy = policy
        self.keepAlive = keepAlive
        self.tlsDirectory = tlsDirectory
    }
}
