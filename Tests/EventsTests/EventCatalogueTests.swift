import FerryTestSupport
import Foundation
import Testing
@testable import Events

/// The catalogue of events in code and the contract in docs/events.md list the same events with
/// the same properties; every event survives the trip through the stream format and back.
@Suite struct EventCatalogueTests {
    /// One row of a table in section 4 of docs/events.md.
    struct DocumentedEvent: Equatable {
        var name: String
        var properties: Set<String>
        var optional: Set<String>
    }

    /// Every `| `source.event` | when | properties | optional properties |` row of docs/events.md.
    static func documentedEvents() throws -> [DocumentedEvent] {
        let text = try String(contentsOf: Repository.root.appendingPathComponent("docs/events.md"), encoding: .utf8)
        func keys(_ cell: Substring) -> Set<String> {
            Set(cell.split(separator: "`", omittingEmptySubsequences: false).enumerated()
                .filter { $0.offset % 2 == 1 }.map { String($0.element) })
        }
        return text.split(separator: "\n").compactMap { line in
            let cells = line.split(separator: "|", omittingEmptySubsequences: false).map { $0.trimmingCharacters(in: .whitespaces) }
            // "", event, when, properties, optional, ""
            guard cells.count == 6, cells[1].hasPrefix("`"), cells[1].hasSuffix("`"), cells[1].contains(".") else { return nil }
            return DocumentedEvent(name: String(cells[1].dropFirst().dropLast()),
                                   properties: keys(Substring(cells[3])), optional: keys(Substring(cells[4])))
        }
    }

    @Test func theDocumentListsExactlyTheCataloguesEventsAndProperties() throws {
        let documented = try Self.documentedEvents()
        #expect(documented.count == Set(documented.map(\.name)).count, "each event has one row")
        let catalogued = EventCatalogue.all.map { type in
            DocumentedEvent(name: type.qualifiedName,
                            properties: Set(type.propertyList.filter(\.required).map(\.key)),
                            optional: Set(type.propertyList.filter { !$0.required }.map(\.key)))
        }
        #expect(Set(documented.map(\.name)) == Set(catalogued.map(\.name)), "the same events")
        for event in catalogued {
            let row = documented.first { $0.name == event.name }
            #expect(row == event, "\(event.name): docs/events.md says \(row.map { "\($0.properties.sorted()) + optional \($0.optional.sorted())" } ?? "nothing"), the catalogue \(event.properties.sorted()) + optional \(event.optional.sorted())")
        }
    }

    @Test func everyEventSurvivesTheStreamFormatAndBack() throws {
        for type in EventCatalogue.all {
            try Self.roundTrip(type)
        }
    }

    static func roundTrip<P: EventPayload>(_ type: P.Type) throws {
        let example = P.example
        let event = Event(timestamp: .seconds(7), source: P.source, name: P.name, properties: example.properties)
        let read = try EventReader.event(json: EventEncoding.ndjson(event).dropLast())
        #expect(read == event, "\(P.qualifiedName) reads back as written")
        #expect(try read.decode(P.self) == example, "\(P.qualifiedName) decodes to its example")
        let pretty = try EventReader.events(cloudHypervisorStream: EventEncoding.cloudHypervisor(event))
        #expect(pretty.events == [event] && pretty.rest.isEmpty)
        // An event with no property writes `null`, as Cloud Hypervisor does.
        #expect((example.properties == nil) == P.propertyList.isEmpty, "\(P.qualifiedName)")
    }

    @Test func propertyNamesAreSnakeCase() {
        #expect(PropertyKey.snakeCase("migrationID") == "migration_id")
        #expect(PropertyKey.snakeCase("bandwidthBytesPerS") == "bandwidth_bytes_per_s")
        #expect(PropertyKey.snakeCase("receiverURL") == "receiver_url")
        #expect(PropertyKey.snakeCase("URLPath") == "url_path")
        #expect(PropertyKey.snakeCase("id") == "id")
        #expect(PropertyKey.snakeCase("wallClock") == "wall_clock")
    }

    @Test func anEventWhosePropertiesDoNotFitItsKindIsRefusedNamingTheProperty() throws {
        let missing = Event(timestamp: .zero, source: .vm, name: "migration-finished",
                            properties: ["migration_id": "x", "total_ms": "1", "downtime_ms": "1", "bytes_total": "1"])
        #expect { _ = try missing.decode(VMEvent.MigrationFinished.self) } throws: { "\($0)".contains("iterations is missing") }
        let malformed = Event(timestamp: .zero, source: .vm, name: "migration-cancelled",
                              properties: ["migration_id": "x", "reason": "bored"])
        #expect { _ = try malformed.decode(VMEvent.MigrationCancelled.self) } throws: { "\($0)".contains("reason") }
        let notANumber = Event(timestamp: .zero, source: .vmm, name: "events-dropped", properties: ["count": "many"])
        #expect { _ = try notANumber.decode(VMMEvent.EventsDropped.self) } throws: { "\($0)".contains("count") }
        #expect(try missing.decode(VMEvent.Booted.self) == nil, "another kind of event is not this one")
        // Properties a later Ferry adds are ignored.
        let extended = Event(timestamp: .zero, source: .vm, name: "shutdown", properties: ["reason": "api", "new": "x"])
        #expect(try extended.decode(VMEvent.Shutdown.self) == VMEvent.Shutdown(reason: .api))
    }

    @Test func theMonitorWritesTypedEventsAsTheirCatalogueEntriesSay() async throws {
        let monitor = EventMonitor(sink: nil)
        let stream = monitor.subscribe(sinceStart: false)
        monitor.emit(VMEvent.MigrationCancelled(migrationID: "id-1", reason: .timeout))
        monitor.emit(VMEvent.Booted())
        monitor.close()
        let events = await collect(stream)
        #expect(events.map(\.qualifiedName) == ["vm.migration-cancelled", "vm.booted"])
        #expect(events.first?.properties == ["migration_id": "id-1", "reason": "timeout"])
        #expect(events.last?.properties == nil)
    }
}
