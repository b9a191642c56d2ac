#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// One kind of event of docs/events.md, as a value: its source and name, and its properties as
/// the value's stored properties. Emitters build one and hand it to `EventMonitor.emit(_:)`;
/// readers get it back from a recorded `Event` with `Event.decode(_:)`. `EventCatalogue.all`
/// lists every kind.
///
/// A stored property `migrationID` is the event property `migration_id` (snake case, a run of
/// capitals as one word). Values are written as strings (docs/events.md §2): integers in decimal,
/// booleans as `true`/`false`, enumerations as their raw value; an optional property that is nil
/// is left out. An event with no properties has `null` properties, as Cloud Hypervisor writes them.
public protocol EventPayload: Decodable, Equatable, Sendable {
    static var source: EventSource { get }
    static var name: String { get }
    /// A value with every property set, optional ones included: the catalogue reads the event's
    /// properties from it, and the tests round-trip it.
    static var example: Self { get }
}

extension EventPayload {
    /// `source.name`, e.g. `vm.migration-started`.
    public static var qualifiedName: String { "\(source.rawValue).\(name)" }

    /// The event's properties as docs/events.md §2 writes them; nil when the event has none.
    public var properties: [String: String]? {
        var properties: [String: String] = [:]
        for child in Mirror(reflecting: self).children {
            guard let label = child.label, let value = PropertyValue.text(of: child.value) else { continue }
            properties[PropertyKey.snakeCase(label)] = value
        }
        return properties.isEmpty ? nil : properties
    }

    /// Every property of this kind of event, in declaration order, and whether it is always present.
    public static var propertyList: [(key: String, required: Bool)] {
        Mirror(reflecting: example).children.compactMap { child in
            child.label.map { (PropertyKey.snakeCase($0), !PropertyValue.isOptional(child.value)) }
        }
    }

    /// Rebuilds the payload from an event's properties; unknown properties are ignored, a missing
    /// required one or a value of the wrong form is an error naming the property.
    init(properties: [String: String]?) throws(EventsError) {
        let properties = properties ?? [:]
        var object: [String: PropertyValue.JSON] = [:]
        for child in Mirror(reflecting: Self.example).children {
            guard let label = child.label, let text = properties[PropertyKey.snakeCase(label)] else { continue }
            object[label] = PropertyValue.json(text, like: child.value)
        }
        do {
            self = try JSONDecoder().decode(Self.self, from: JSONEncoder().encode(object))
        } catch let error as DecodingError {
            throw EventsError(.malformedEvent, "\(Self.qualifiedName): \(PropertyValue.describe(error))")
        } catch {
            throw EventsError(.malformedEvent, "\(Self.qualifiedName): \(error)")
        }
    }
}

/// Property names: Swift's camel case to the event format's snake case.
enum PropertyKey {
    /// `migrationID` → `migration_id`, `bandwidthBytesPerS` → `bandwidth_bytes_per_s`,
    /// `receiverURL` → `receiver_url`.
    static func snakeCase(_ label: String) -> String {
        let characters = Array(label)
        var result = ""
        for (index, character) in characters.enumerated() {
            if character.isUppercase, index > 0 {
                let previous = characters[index - 1]
                let next = index + 1 < characters.count ? characters[index + 1] : nil
                // A new word starts at a capital after a lower-case letter or digit, or at the last
                // capital of a run that a lower-case letter follows ("URLPath" → "url_path").
                if !previous.isUppercase || (next?.isLowercase ?? false) { result += "_" }
            }
            result += character.lowercased()
        }
        return result
    }
}

/// Property values: how a stored property is written as text, and read back.
enum PropertyValue {
    /// A JSON value a payload's synthesized `Decodable` reads.
    enum JSON: Encodable {
        case string(String)
        case literal(Bool)
        case number(Int64)
        case unsigned(UInt64)

        func encode(to encoder: any Encoder) throws {
            var container = encoder.singleValueContainer()
            switch self {
            case .string(let text): try container.encode(text)
            case .literal(let value): try container.encode(value)
            case .number(let value): try container.encode(value)
            case .unsigned(let value): try container.encode(value)
            }
        }
    }

    /// `value` written as text; nil for an optional that holds nothing.
    static func text(of value: Any) -> String? {
        let value = unwrapped(value)
        switch value {
        case nil: return nil
        case let text as String: return text
        case let flag as Bool: return flag ? "true" : "false"
        case let number as any BinaryInteger: return "\(number)"
        case let raw as any RawRepresentable: return "\(raw.rawValue)"
        case let other?: return "\(other)"
        }
    }

    /// The JSON form of `text` for a property whose example value is `example`: a number or a
    /// boolean where the property is one and the text reads as one, a string otherwise (so that
    /// a malformed number fails to decode, naming the property).
    static func json(_ text: String, like example: Any) -> JSON {
        switch unwrapped(example) {
        case is Bool:
            if text == "true" || text == "false" { return .literal(text == "true") }
        case is any BinaryInteger:
            if let number = Int64(text) { return .number(number) }
            if let number = UInt64(text) { return .unsigned(number) }
        default:
            break
        }
        return .string(text)
    }

    static func isOptional(_ value: Any) -> Bool {
        Mirror(reflecting: value).displayStyle == .optional
    }

    /// The value an optional holds (nil if none), or `value` itself.
    private static func unwrapped(_ value: Any) -> Any? {
        let mirror = Mirror(reflecting: value)
        guard mirror.displayStyle == .optional else { return value }
        return mirror.children.first.map { unwrapped($0.value) } ?? nil
    }

    static func describe(_ error: DecodingError) -> String {
        func key(_ path: [any CodingKey]) -> String {
            path.last.map { PropertyKey.snakeCase($0.stringValue) } ?? "properties"
        }
        switch error {
        case let .keyNotFound(missing, _): return "property \(PropertyKey.snakeCase(missing.stringValue)) is missing"
        case let .typeMismatch(_, context), let .valueNotFound(_, context), let .dataCorrupted(context):
            return "property \(key(context.codingPath)) has a value of the wrong form"
        @unknown default: return "the properties do not fit"
        }
    }
}
