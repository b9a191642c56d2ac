import MigrationWire

/// A checked `vm.send-migration` request (Cloud Hypervisor's `SendMigrationData`).
public struct SendMigrationOptions: Equatable, Sendable {
    public var destination: MigrationURL
    /// Connections the memory goes over in parallel, the main one included: 1 to
    /// `MigrationProtocol.maximumConnections`.
    public var connections: Int
    public var policy: PrecopyPolicy
    /// The source VMM stays up after the migration finished (its VM is deleted either way).
    public var keepAlive: Bool
    /// Mutual TLS with the sender's credentials from this directory (`tls_dir`); `tcp:` only.
    public var tlsDirectory: String?
    /// A local migration (`local`): the destination, on this host, maps the guest's shared memory
    /// file instead of receiving its pages; `unix:` only, for a guest with shared memory.
    public var local: Bool

    public init(destination: MigrationURL, policy: PrecopyPolicy = PrecopyPolicy(), connections: Int = 1, keepAlive: Bool = false,
                tlsDirectory: String? = nil, local: Bool = false) {
        precondition((1...MigrationProtocol.maximumConnections).contains(connections))
        self.destination = destination
        self.connections = connections
        self.policy = policy
        self.keepAlive = keepAlive
        self.tlsDirectory = tlsDirectory
        self.local = local
    }
}
