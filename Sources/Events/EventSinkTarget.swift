/// Where the event stream goes: `--event-monitor path=PATH` or `--event-monitor fd=N`, spelled as
/// Cloud Hypervisor spells them (docs/events.md §1).
public enum EventSinkTarget: Sendable, Equatable, CustomStringConvertible {
    /// A regular file (created or truncated, mode 0644) or an existing FIFO.
    case path(String)
    /// A descriptor inherited from the parent process. Descriptors 0–2 are never closed.
    case fileDescriptor(Int32)

    /// Parses `path=/x` or `fd=3`; throws an `EventsError` whose description says what to type instead.
    public init(parsing text: String) throws(EventsError) {
        guard let equals = text.firstIndex(of: "=") else {
            throw Self.invalid(Self.suggestion(forBareValue: text))
        }
        let key = text[..<equals]
        let value = String(text[text.index(after: equals)...])
        switch key {
        case "path":
            guard !value.isEmpty else {
                throw Self.invalid("'path=' needs a file or FIFO: write path=/run/ferry/vm.events")
            }
            self = .path(value)
        case "fd":
            guard let descriptor = Self.descriptorNumber(value) else {
                throw Self.invalid(
                    "'fd=\(value)' is not a descriptor number: write fd=N with N a decimal number from 0 to \(Int32.max), e.g. fd=3"
                )
            }
            self = .fileDescriptor(descriptor)
        default:
            throw Self.invalid("unknown key '\(key)' in '\(text)': write path=PATH or fd=N")
        }
    }

    /// The spelling `init(parsing:)` accepts.
    public var description: String {
        switch self {
        case .path(let path): "path=\(path)"
        case .fileDescriptor(let descriptor): "fd=\(descriptor)"
        }
    }

    private static func descriptorNumber(_ text: String) -> Int32? {
        guard !text.isEmpty, text.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }) else {
            return nil
        }
        return Int32(text)
    }

    private static func suggestion(forBareValue text: String) -> String {
        if text.isEmpty {
            return "empty event monitor: write path=PATH or fd=N"
        }
        if descriptorNumber(text) != nil {
            return "'\(text)' has no key: write fd=\(text) for a descriptor or path=\(text) for a file"
        }
        return "'\(text)' has no key: write path=\(text)"
    }

    private static func invalid(_ message: String) -> EventsError {
        EventsError(.invalidSinkTarget, "invalid --event-monitor: \(message)")
    }
}
