#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Reads events back from either layout docs/events.md defines: Cloud Hypervisor's pretty-printed
/// events separated by blank lines (§2), or one compact object per line (§6). The one parser of
/// the event format that ferry-remote, the tests and anything else reading a stream use.
public enum EventReader {
    /// One event's JSON object, in either layout.
    public static func event(json: some Collection<UInt8>) throws(EventsError) -> Event {
        let wire: WireEvent
        do {
            wire = try JSONDecoder().decode(WireEvent.self, from: Data(json))
        } catch {
            throw EventsError(.malformedEvent, "not an event: \(String(decoding: json.prefix(200), as: UTF8.self))")
        }
        guard let source = EventSource(rawValue: wire.source) else {
            throw EventsError(.malformedEvent, "event source '\(wire.source)' is none of vmm, vm, guest")
        }
        guard wire.timestamp.nanos < 1_000_000_000 else {
            throw EventsError(.malformedEvent, "timestamp nanos \(wire.timestamp.nanos) is not below 10⁹")
        }
        return Event(timestamp: .seconds(wire.timestamp.secs) + .nanoseconds(wire.timestamp.nanos), source: source,
                     name: wire.event, properties: wire.properties)
    }

    /// The whole events at the start of a Cloud Hypervisor-format stream, and the bytes after the
    /// last of them: an event still being written, or nothing.
    public static func events(cloudHypervisorStream bytes: [UInt8]) throws(EventsError) -> (events: [Event], rest: ArraySlice<UInt8>) {
        var events: [Event] = []
        var start = 0
        var index = 0
        while index + 1 < bytes.count {
            if bytes[index] == 0x0A && bytes[index + 1] == 0x0A {
                events.append(try event(json: bytes[start..<index]))
                index += 2
                start = index
            } else {
                index += 1
            }
        }
        return (events, bytes[start...])
    }

    /// Every event in a file the event monitor writes (`--event-monitor path=`), leaving out an
    /// event still being written; none if the file does not exist.
    public static func events(inFile path: String) throws(EventsError) -> [Event] {
        guard let data = FileManager.default.contents(atPath: path) else { return [] }
        return try events(cloudHypervisorStream: Array(data)).events
    }

    /// The shape of an event on the wire.
    private struct WireEvent: Decodable {
        struct Timestamp: Decodable {
            var secs: Int64
            var nanos: Int64
        }

        var timestamp: Timestamp
        var source: String
        var event: String
        var properties: [String: String]?
    }
}
