/// Who an event is about, the `source` field of docs/events.md §2.
public enum EventSource: String, Sendable, Codable, CaseIterable {
    /// The VMM process itself (`vmm.starting`, `vmm.events-dropped`, ...).
    case vmm
    /// The virtual machine (`vm.booted`, `vm.migration-started`, ...).
    case vm
    /// Something the guest reported (`guest.panic`).
    case guest
}

/// One event as docs/events.md §2 defines it.
public struct Event: Sendable, Equatable {
    /// Time since the event monitor started, from a monotonic clock.
    public var timestamp: Duration
    public var source: EventSource
    /// The name within `source`: lower case, words joined by `-`, e.g. `migration-started`.
    public var name: String
    /// All values are strings (docs/events.md §2); `nil` is written as `null`.
    public var properties: [String: String]?

    public init(timestamp: Duration, source: EventSource, name: String, properties: [String: String]?) {
        self.timestamp = timestamp
        self.source = source
        self.name = name
        self.properties = properties
    }
}

extension Event {
    /// `source.name`, e.g. `vm.migration-started`.
    public var qualifiedName: String { "\(source.rawValue).\(name)" }

    /// Whether this is an event of kind `type`.
    public func `is`<P: EventPayload>(_ type: P.Type) -> Bool {
        source == P.source && name == P.name
    }

    /// The event as a `type` payload; nil if it is another kind of event. Throws if it is of that
    /// kind but its properties do not fit it.
    public func decode<P: EventPayload>(_ type: P.Type) throws(EventsError) -> P? {
        guard `is`(type) else { return nil }
        return try P(properties: properties)
    }
}
