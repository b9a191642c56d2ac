/// Who an event is about, the `source` field of events.md section 2.
public enum EventSource: String, Sendable, Codable, CaseIterable {
    /// The VMM process itself (`vmm.starting`, `vmm.events-dropped`, ...).
    case vmm
    /// The virtual machine (`vm.booted`, `vm.migration-started`, ...).
    case vm
    /// Something the guest reported (`guest.panic`).
    case guest
}

/// One event as events.md section 2 defines it.
public struct Event: Sendable, Equatable {
    /// Time since the event monitor started, from a monotonic clock.
    public var timestamp: Duration
    public var source: EventSource
    /// The name within `source`: lower case, words joined by `-`, e.g. `migration-started`.
    public var name: String
    /// All values are strings (events.md section 2); `nil` is written as `null`.
    public var properties: [String: String]?

    public init(timestamp: Duration, source: EventSource, name: String, properties: [String: String]?) {
        self.timestamp = timestamp
        self.source = source
        self.name = name
        self.properties = properties
    }
}
