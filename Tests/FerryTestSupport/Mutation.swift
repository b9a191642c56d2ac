import Foundation

/// One random change to a JSON body: structural (a member removed, added or replaced by a value
/// of another type, an extreme number, a long or odd string, deep nesting) or textual (truncated,
/// a byte changed, garbage spliced in).
public enum Mutation {
    public static func body(from document: Any, text: String, using generator: inout SplitMix64) -> [UInt8] {
        if Int.random(in: 0..<5, using: &generator) == 0 {
            return textual(Array(text.utf8), using: &generator)
        }
        let mutated = structural(document, using: &generator, depth: 0)
        return (try? JSONSerialization.data(withJSONObject: mutated, options: [.fragmentsAllowed])).map(Array.init) ?? Array(text.utf8)
    }

    public static func textual(_ bytes: [UInt8], using generator: inout SplitMix64) -> [UInt8] {
        var bytes = bytes
        let position = Int.random(in: 0..<bytes.count, using: &generator)
        switch Int.random(in: 0..<4, using: &generator) {
        case 0: return Array(bytes.prefix(position))
        case 1: bytes[position] = UInt8.random(in: 0...255, using: &generator)
        case 2: bytes.insert(contentsOf: Array("{[\"\\u0000\":,}]".utf8).shuffled(using: &generator), at: position)
        default: bytes = Array(repeating: UInt8(ascii: "["), count: 100_000) + bytes
        }
        return bytes
    }

    /// `value` with one change somewhere inside it.
    public static func structural(_ value: Any, using generator: inout SplitMix64, depth: Int) -> Any {
        if var object = value as? [String: Any], !object.isEmpty, Int.random(in: 0..<4, using: &generator) != 0 || depth == 0 {
            let key = object.keys.sorted()[Int.random(in: 0..<object.count, using: &generator)]
            switch Int.random(in: 0..<6, using: &generator) {
            case 0: object.removeValue(forKey: key)
            case 1: object["unknown_\(generator.next() % 100)"] = randomValue(using: &generator)
            case 2: object[key] = randomValue(using: &generator)
            default: object[key] = structural(object[key]!, using: &generator, depth: depth + 1)
            }
            return object
        }
        if var array = value as? [Any], !array.isEmpty, Int.random(in: 0..<4, using: &generator) != 0 {
            let index = Int.random(in: 0..<array.count, using: &generator)
            switch Int.random(in: 0..<4, using: &generator) {
            case 0: array.remove(at: index)
            case 1: array.append(array[index])
            default: array[index] = structural(array[index], using: &generator, depth: depth + 1)
            }
            return array
        }
        return randomValue(using: &generator)
    }

    public static func randomValue(using generator: inout SplitMix64) -> Any {
        switch Int.random(in: 0..<10, using: &generator) {
        case 0: return NSNull()
        case 1: return Bool.random(using: &generator)
        case 2: return [Int64.min, -1, 0, 1, 3, 255, 256, 65_536, Int64(UInt32.max), Int64.max][Int.random(in: 0..<10, using: &generator)]
        case 3: return Double.random(in: -1e20...1e20, using: &generator)
        case 4: return String(repeating: "x", count: Int.random(in: 0...5000, using: &generator))
        case 5: return ["", "file:///", "tcp:", "unix:", "Tty", "Pty", "File", "Socket", "Off", "..", "/", "{}", "\u{0}", "é", "fd=3",
                        "52:54:00:00:00:00", "tcp:[::1]:0", "file:///tmp/../etc"][Int.random(in: 0..<18, using: &generator)]
        case 6: return [randomValue(using: &generator)]
        case 7: return ["mode": "File"]
        case 8: return [String]()
        default: return [String: Any]()
        }
    }
}
