/// A Cloud Hypervisor-style option value: `key=value,key=value`, or a bare word (`tty`, `off`).
public struct OptionList: Equatable, Sendable {
    public private(set) var values: [String: String] = [:]
    /// Bare words without `=`, in order.
    public private(set) var words: [String] = []

    /// Parses `text` for `flag`, accepting only `allowedKeys`; the error names the flag and what is allowed.
    public init(parsing text: String, flag: String, allowedKeys: Set<String>) throws(ConfigurationError) {
        for item in text.split(separator: ",", omittingEmptySubsequences: false) {
            guard !item.isEmpty else { throw ConfigurationError(flag: flag, "empty item in '\(text)'") }
            if let equals = item.firstIndex(of: "=") {
                let key = String(item[..<equals])
                let value = String(item[item.index(after: equals)...])
                guard allowedKeys.contains(key) else {
                    throw ConfigurationError(flag: flag, "unknown option '\(key)'; expected \(allowedKeys.sorted().map { "\($0)=" }.joined(separator: ", "))")
                }
                guard values[key] == nil else { throw ConfigurationError(flag: flag, "'\(key)' given twice") }
                values[key] = value
            } else {
                words.append(String(item))
            }
        }
    }

    public subscript(key: String) -> String? { values[key] }
}

/// A command-line or configuration value Ferry cannot use; says which flag and what to write instead.
public struct ConfigurationError: Error, CustomStringConvertible, Equatable, Sendable {
    public var flag: String
    public var message: String

    public init(flag: String, _ message: String) {
        self.flag = flag
        self.message = message
    }

    public var description: String { "\(flag): \(message)" }
}

/// Sizes as Cloud Hypervisor writes them: a number of bytes with an optional binary suffix K, M, G or T.
public enum ByteSize {
    public static func parse(_ text: String, flag: String) throws(ConfigurationError) -> UInt64 {
        let multipliers: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
        var digits = Substring(text)
        var multiplier: UInt64 = 1
        if let last = digits.last?.uppercased().first, let value = multipliers[last] {
            multiplier = value
            digits = digits.dropLast()
        }
        guard !digits.isEmpty, digits.allSatisfy(\.isASCII), let number = UInt64(digits) else {
            throw ConfigurationError(flag: flag, "'\(text)' is not a size; write bytes or a number with K, M, G or T, e.g. 512M or 1G")
        }
        let (bytes, overflow) = number.multipliedReportingOverflow(by: multiplier)
        guard !overflow else { throw ConfigurationError(flag: flag, "'\(text)' is too large") }
        return bytes
    }
}
