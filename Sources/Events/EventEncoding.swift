/// Byte-exact encoders for events (docs/events.md §2 and §7).
///
/// Strings are escaped as serde_json escapes them (`"`, `\`, `\b \f \n \r \t`, other control
/// characters as `\u00xx` in lower-case hex, everything else including `/` and non-ASCII UTF-8 as
/// is), plus Ferry's brace rule: `{` and `}` become `\u007b` and `\u007d` (guarantee 2).
public enum EventEncoding {
    /// The most bytes one encoded event may take, trailing `"\n\n"` included: `PIPE_BUF` on Linux, so
    /// a single `write(2)` to a FIFO is atomic (docs/events.md §2, guarantee 1).
    public static let maximumEventSize = 4096

    /// Appended to a property value that was cut to make its event fit `maximumEventSize`.
    public static let truncationMark = "…"

    /// Cloud Hypervisor's format: `serde_json::to_string_pretty` layout (two-space indentation), keys
    /// in the order `timestamp{secs,nanos}`, `source`, `event`, `properties` (keys sorted by their
    /// UTF-8 bytes, or `null`), followed by `"\n\n"`. At most `maximumEventSize` bytes: while the
    /// event is longer, the longest property value is cut at a character boundary and ends in `…`.
    public static func cloudHypervisor(_ event: Event) -> [UInt8] {
        var fields = EncodableFields(event)
        var encoded = fields.pretty()
        while encoded.count > maximumEventSize {
            fields.shorten(by: encoded.count - maximumEventSize)
            encoded = fields.pretty()
        }
        return encoded
    }

    /// Compact single-line JSON with the same fields in the same order, followed by `"\n"`
    /// (`GET /api/v1/vmm.events`, docs/events.md §7). Not truncated: a stream over HTTP has no
    /// atomic-write limit.
    public static func ndjson(_ event: Event) -> [UInt8] {
        EncodableFields(event).compact()
    }
}

/// An event's fields in the order and form they are written in.
private struct EncodableFields {
    var seconds: UInt64
    var nanoseconds: UInt64
    var source: String
    var name: String
    /// Sorted by key; `nil` for a `null` properties field.
    var properties: [(key: String, value: String)]?

    init(_ event: Event) {
        let (seconds, attoseconds) = event.timestamp.components
        if seconds < 0 || (seconds == 0 && attoseconds < 0) {
            self.seconds = 0
            self.nanoseconds = 0
        } else {
            self.seconds = UInt64(seconds)
            self.nanoseconds = UInt64(attoseconds / attosecondsPerNanosecond)
        }
        source = event.source.rawValue
        name = event.name
        properties = event.properties.map { properties in
            properties
                .map { (key: $0.key, value: $0.value) }
                .sorted { $0.key.utf8.lexicographicallyPrecedes($1.key.utf8) }
        }
    }

    /// serde_json's `PrettyFormatter` layout, then the blank line that ends an event.
    func pretty() -> [UInt8] {
        encoded(in: .pretty)
    }

    /// serde_json's `CompactFormatter` layout, then a newline.
    func compact() -> [UInt8] {
        encoded(in: .compact)
    }

    /// The separators that make the two layouts: everything else about them is the same.
    struct Layout {
        /// After `{` of the object, between its members, and before its closing `}`.
        var open, separator, close: String
        /// Between a key and its value.
        var colon: String
        /// Before and between the members of `timestamp` and `properties`, and before their `}`.
        var innerOpen, innerSeparator, innerClose: String
        /// After the whole event.
        var end: String

        static let pretty = Layout(open: "{\n  ", separator: ",\n  ", close: "\n}", colon: ": ",
                                   innerOpen: "{\n    ", innerSeparator: ",\n    ", innerClose: "\n  }", end: "\n\n")
        static let compact = Layout(open: "{", separator: ",", close: "}", colon: ":",
                                    innerOpen: "{", innerSeparator: ",", innerClose: "}", end: "\n")
    }

    private func encoded(in layout: Layout) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(256)
        out.append(literal: layout.open + "\"timestamp\"" + layout.colon + layout.innerOpen + "\"secs\"" + layout.colon)
        out.append(literal: String(seconds))
        out.append(literal: layout.innerSeparator + "\"nanos\"" + layout.colon)
        out.append(literal: String(nanoseconds))
        out.append(literal: layout.innerClose + layout.separator + "\"source\"" + layout.colon)
        out.appendJSONString(source)
        out.append(literal: layout.separator + "\"event\"" + layout.colon)
        out.appendJSONString(name)
        out.append(literal: layout.separator + "\"properties\"" + layout.colon)
        switch properties {
        case nil:
            out.append(literal: "null")
        case let properties? where properties.isEmpty:
            out.append(literal: "{}")
        case let properties?:
            for (index, property) in properties.enumerated() {
                out.append(literal: index == 0 ? layout.innerOpen : layout.innerSeparator)
                out.appendJSONString(property.key)
                out.append(literal: layout.colon)
                out.appendJSONString(property.value)
            }
            out.append(literal: layout.innerClose)
        }
        out.append(literal: layout.close + layout.end)
        return out
    }

    /// Makes the encoding at least `excess` bytes shorter: cuts the longest property value first;
    /// only if every value is already down to `…` does it drop properties (last key first) and then
    /// cut the event name. Keys and names are chosen by Ferry's code, so those two steps are a
    /// safety net that keeps the size guarantee, not something a real event reaches.
    mutating func shorten(by excess: Int) {
        let markLength = EventEncoding.truncationMark.utf8.count
        if let properties,
           let longest = properties.indices
               .filter({ escapedLength(properties[$0].value) > markLength })
               .max(by: { escapedLength(properties[$0].value) < escapedLength(properties[$1].value) })
        {
            self.properties?[longest].value = truncated(properties[longest].value, shorterBy: excess)
        } else if let properties, !properties.isEmpty {
            self.properties?.removeLast()
        } else {
            name = truncated(name, shorterBy: excess)
        }
    }
}

private let attosecondsPerNanosecond: Int64 = 1_000_000_000

/// `text` cut at a Unicode scalar boundary so that its escaped form, with `…` appended, is at least
/// `excess` bytes shorter than the escaped `text`; just `…` if that is not possible.
private func truncated(_ text: String, shorterBy excess: Int) -> String {
    let mark = EventEncoding.truncationMark
    let budget = escapedLength(text) - excess - mark.utf8.count
    var used = 0
    var end = text.unicodeScalars.startIndex
    for scalar in text.unicodeScalars {
        let length = escapedLength(scalar)
        if used + length > budget { break }
        used += length
        end = text.unicodeScalars.index(after: end)
    }
    return String(text.unicodeScalars[..<end]) + mark
}

/// Bytes `text` takes between its quotes once escaped.
private func escapedLength(_ text: String) -> Int {
    text.utf8.reduce(0) { $0 + escapedLength(byte: $1) }
}

private func escapedLength(_ scalar: Unicode.Scalar) -> Int {
    scalar.isASCII ? escapedLength(byte: UInt8(scalar.value)) : UTF8.width(scalar)
}

private func escapedLength(byte: UInt8) -> Int {
    switch JSONEscape(byte) {
    case .verbatim: 1
    case .short: 2
    case .unicode: 6
    }
}

/// How serde_json, with Ferry's brace rule, writes one byte of a string.
private enum JSONEscape {
    case verbatim
    /// A backslash and this character.
    case short(UInt8)
    /// `\u00xx`.
    case unicode

    init(_ byte: UInt8) {
        switch byte {
        case UInt8(ascii: "\""): self = .short(UInt8(ascii: "\""))
        case UInt8(ascii: "\\"): self = .short(UInt8(ascii: "\\"))
        case 0x08: self = .short(UInt8(ascii: "b"))
        case 0x09: self = .short(UInt8(ascii: "t"))
        case 0x0A: self = .short(UInt8(ascii: "n"))
        case 0x0C: self = .short(UInt8(ascii: "f"))
        case 0x0D: self = .short(UInt8(ascii: "r"))
        case 0x00..<0x20, UInt8(ascii: "{"), UInt8(ascii: "}"): self = .unicode
        default: self = .verbatim
        }
    }
}

private let lowerCaseHexDigits = Array("0123456789abcdef".utf8)

extension [UInt8] {
    fileprivate mutating func append(literal text: String) {
        append(contentsOf: text.utf8)
    }

    fileprivate mutating func appendJSONString(_ text: String) {
        append(UInt8(ascii: "\""))
        for byte in text.utf8 {
            switch JSONEscape(byte) {
            case .verbatim:
                append(byte)
            case .short(let character):
                append(UInt8(ascii: "\\"))
                append(character)
            case .unicode:
                append(contentsOf: "\\u00".utf8)
                append(lowerCaseHexDigits[Int(byte >> 4)])
                append(lowerCaseHexDigits[Int(byte & 0x0F)])
            }
        }
        append(UInt8(ascii: "\""))
    }
}
