import Foundation

/// Codable to and from CBOR (RFC 8949), the compact binary form of the migration's `state`
/// payload: a struct or keyed enum is a map with text keys, an array an array, `[UInt8]` and
/// `Data` a byte string, integers the shortest head that holds them, floating point a float64,
/// `nil` null. Only definite lengths, no tags; a decoder refuses anything else, duplicate keys,
/// nesting deeper than `maximumDepth`, and bytes after the value (docs/migration-protocol.md,
/// "The state payload"). Any CBOR reader reads what this writes.
public enum CBOR {
    /// How deep arrays and maps may nest in what `decode` accepts; Ferry's states nest about 8 deep.
    public static let maximumDepth = 64
    /// How many values `decode` accepts in all, so that a payload of one-byte items cannot make
    /// the receiver allocate tens of times its size; a Ferry state has a few thousand.
    public static let maximumItems = 1 << 18

    public static func encode(_ value: some Encodable) throws -> [UInt8] {
        let root = EncodingNode()
        try root.store(value, codingPath: [])
        var bytes: [UInt8] = []
        root.write(to: &bytes)
        return bytes
    }

    public static func decode<T: Decodable>(_ type: T.Type, from bytes: [UInt8]) throws -> T {
        var reader = Reader(bytes: bytes)
        let value = try reader.readValue(depth: 0)
        guard reader.offset == bytes.count else {
            throw DecodingError.dataCorrupted(.init(codingPath: [], debugDescription: "\(bytes.count - reader.offset) bytes follow the CBOR value"))
        }
        return try ValueDecoder(value: value, codingPath: []).decodeValue(type)
    }
}

// MARK: Encoding

/// One value being encoded; containers fill theirs in after they are handed out.
private final class EncodingNode {
    enum Content {
        case empty
        case unsigned(UInt64)
        case negative(UInt64)  // the CBOR argument: the value is -1 - argument
        case bytes([UInt8])
        case text(String)
        case float(Double)
        case bool(Bool)
        case null
        case array([EncodingNode])
        case map([(key: String, value: EncodingNode)])
    }

    var content = Content.empty

    func store<T: Encodable>(_ value: T, codingPath: [any CodingKey]) throws {
        // By type, not by cast: an empty array of anything casts to [UInt8].
        if T.self == [UInt8].self {
            content = .bytes(value as! [UInt8])
        } else if T.self == Data.self {
            content = .bytes(Array(value as! Data))
        } else {
            try value.encode(to: NodeEncoder(node: self, codingPath: codingPath))
        }
    }

    func storeInteger<T: BinaryInteger>(_ value: T) {
        content = value >= 0 ? .unsigned(UInt64(value)) : .negative(UInt64(-1 - Int64(value)))
    }

    func child(_ key: String) -> EncodingNode {
        let node = EncodingNode()
        if case .map(var entries) = content {
            content = .empty  // keeps the array uniquely referenced while it grows
            entries.append((key, node))
            content = .map(entries)
        }
        return node
    }

    func element() -> EncodingNode {
        let node = EncodingNode()
        if case .array(var elements) = content {
            content = .empty
            elements.append(node)
            content = .array(elements)
        }
        return node
    }

    func write(to bytes: inout [UInt8]) {
        switch content {
        case .empty, .null: bytes.append(0xF6)
        case let .unsigned(value): Self.head(0, value, into: &bytes)
        case let .negative(argument): Self.head(1, argument, into: &bytes)
        case let .bytes(data):
            Self.head(2, UInt64(data.count), into: &bytes)
            bytes.append(contentsOf: data)
        case let .text(string):
            Self.head(3, UInt64(string.utf8.count), into: &bytes)
            bytes.append(contentsOf: string.utf8)
        case let .float(value):
            bytes.append(0xFB)
            Self.bigEndian(value.bitPattern, 8, into: &bytes)
        case let .bool(value): bytes.append(value ? 0xF5 : 0xF4)
        case let .array(elements):
            Self.head(4, UInt64(elements.count), into: &bytes)
            for element in elements { element.write(to: &bytes) }
        case let .map(entries):
            Self.head(5, UInt64(entries.count), into: &bytes)
            for (key, value) in entries {
                Self.head(3, UInt64(key.utf8.count), into: &bytes)
                bytes.append(contentsOf: key.utf8)
                value.write(to: &bytes)
            }
        }
    }

    /// A major type with its argument in the shortest form (RFC 8949 §3).
    static func head(_ major: UInt8, _ argument: UInt64, into bytes: inout [UInt8]) {
        switch argument {
        case ..<24: bytes.append(major << 5 | UInt8(argument))
        case ...0xFF: bytes.append(major << 5 | 24); bigEndian(argument, 1, into: &bytes)
        case ...0xFFFF: bytes.append(major << 5 | 25); bigEndian(argument, 2, into: &bytes)
        case ...0xFFFF_FFFF: bytes.append(major << 5 | 26); bigEndian(argument, 4, into: &bytes)
        default: bytes.append(major << 5 | 27); bigEndian(argument, 8, into: &bytes)
        }
    }

    static func bigEndian(_ value: UInt64, _ count: Int, into bytes: inout [UInt8]) {
        for index in (0..<count).reversed() { bytes.append(UInt8(truncatingIfNeeded: value >> (8 * index))) }
    }
}

private struct NodeEncoder: Encoder {
    let node: EncodingNode
    let codingPath: [any CodingKey]
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    func container<Key: CodingKey>(keyedBy type: Key.Type) -> KeyedEncodingContainer<Key> {
        if case .map = node.content {} else { node.content = .map([]) }
        return KeyedEncodingContainer(KeyedNodeEncoder<Key>(node: node, codingPath: codingPath))
    }

    func unkeyedContainer() -> any UnkeyedEncodingContainer {
        if case .array = node.content {} else { node.content = .array([]) }
        return UnkeyedNodeEncoder(node: node, codingPath: codingPath)
    }

    func singleValueContainer() -> any SingleValueEncodingContainer { SingleNodeEncoder(node: node, codingPath: codingPath) }
}

private struct KeyedNodeEncoder<Key: CodingKey>: KeyedEncodingContainerProtocol {
    let node: EncodingNode
    let codingPath: [any CodingKey]

    func encodeNil(forKey key: Key) throws { node.child(key.stringValue).content = .null }
    func encode(_ value: Bool, forKey key: Key) throws { node.child(key.stringValue).content = .bool(value) }
    func encode(_ value: String, forKey key: Key) throws { node.child(key.stringValue).content = .text(value) }
    func encode(_ value: Double, forKey key: Key) throws { node.child(key.stringValue).content = .float(value) }
    func encode(_ value: Float, forKey key: Key) throws { node.child(key.stringValue).content = .float(Double(value)) }
    func encode(_ value: Int, forKey key: Key) throws { node.child(key.stringValue).storeInteger(value) }
    func encode(_ value: Int8, forKey key: Key) throws { node.child(key.stringValue).storeInteger(value) }
    func encode(_ value: Int16, forKey key: Key) throws { node.child(key.stringValue).storeInteger(value) }
    func encode(_ value: Int32, forKey key: Key) throws { node.child(key.stringValue).storeInteger(value) }
    func encode(_ value: Int64, forKey key: Key) throws { node.child(key.stringValue).storeInteger(value) }
    func encode(_ value: UInt, forKey key: Key) throws { node.child(key.stringValue).storeInteger(value) }
    func encode(_ value: UInt8, forKey key: Key) throws { node.child(key.stringValue).storeInteger(value) }
    func encode(_ value: UInt16, forKey key: Key) throws { node.child(key.stringValue).storeInteger(value) }
    func encode(_ value: UInt32, forKey key: Key) throws { node.child(key.stringValue).storeInteger(value) }
    func encode(_ value: UInt64, forKey key: Key) throws { node.child(key.stringValue).storeInteger(value) }
    func encode<T: Encodable>(_ value: T, forKey key: Key) throws {
        try node.child(key.stringValue).store(value, codingPath: codingPath + [key])
    }

    func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type, forKey key: Key) -> KeyedEncodingContainer<NestedKey> {
        NodeEncoder(node: node.child(key.stringValue), codingPath: codingPath + [key]).container(keyedBy: keyType)
    }

    func nestedUnkeyedContainer(forKey key: Key) -> any UnkeyedEncodingContainer {
        NodeEncoder(node: node.child(key.stringValue), codingPath: codingPath + [key]).unkeyedContainer()
    }

    func superEncoder() -> any Encoder { NodeEncoder(node: node.child("super"), codingPath: codingPath) }
    func superEncoder(forKey key: Key) -> any Encoder { NodeEncoder(node: node.child(key.stringValue), codingPath: codingPath + [key]) }
}

private struct UnkeyedNodeEncoder: UnkeyedEncodingContainer {
    let node: EncodingNode
    let codingPath: [any CodingKey]
    var count: Int {
        if case let .array(elements) = node.content { return elements.count }
        return 0
    }

    func encodeNil() throws { node.element().content = .null }
    func encode(_ value: Bool) throws { node.element().content = .bool(value) }
    func encode(_ value: String) throws { node.element().content = .text(value) }
    func encode(_ value: Double) throws { node.element().content = .float(value) }
    func encode(_ value: Float) throws { node.element().content = .float(Double(value)) }
    func encode(_ value: Int) throws { node.element().storeInteger(value) }
    func encode(_ value: Int8) throws { node.element().storeInteger(value) }
    func encode(_ value: Int16) throws { node.element().storeInteger(value) }
    func encode(_ value: Int32) throws { node.element().storeInteger(value) }
    func encode(_ value: Int64) throws { node.element().storeInteger(value) }
    func encode(_ value: UInt) throws { node.element().storeInteger(value) }
    func encode(_ value: UInt8) throws { node.element().storeInteger(value) }
    func encode(_ value: UInt16) throws { node.element().storeInteger(value) }
    func encode(_ value: UInt32) throws { node.element().storeInteger(value) }
    func encode(_ value: UInt64) throws { node.element().storeInteger(value) }
    func encode<T: Encodable>(_ value: T) throws { try node.element().store(value, codingPath: codingPath) }

    func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type) -> KeyedEncodingContainer<NestedKey> {
        NodeEncoder(node: node.element(), codingPath: codingPath).container(keyedBy: keyType)
    }

    func nestedUnkeyedContainer() -> any UnkeyedEncodingContainer {
        NodeEncoder(node: node.element(), codingPath: codingPath).unkeyedContainer()
    }

    func superEncoder() -> any Encoder { NodeEncoder(node: node.element(), codingPath: codingPath) }
}

private struct SingleNodeEncoder: SingleValueEncodingContainer {
    let node: EncodingNode
    let codingPath: [any CodingKey]

    func encodeNil() throws { node.content = .null }
    func encode(_ value: Bool) throws { node.content = .bool(value) }
    func encode(_ value: String) throws { node.content = .text(value) }
    func encode(_ value: Double) throws { node.content = .float(value) }
    func encode(_ value: Float) throws { node.content = .float(Double(value)) }
    func encode(_ value: Int) throws { node.storeInteger(value) }
    func encode(_ value: Int8) throws { node.storeInteger(value) }
    func encode(_ value: Int16) throws { node.storeInteger(value) }
    func encode(_ value: Int32) throws { node.storeInteger(value) }
    func encode(_ value: Int64) throws { node.storeInteger(value) }
    func encode(_ value: UInt) throws { node.storeInteger(value) }
    func encode(_ value: UInt8) throws { node.storeInteger(value) }
    func encode(_ value: UInt16) throws { node.storeInteger(value) }
    func encode(_ value: UInt32) throws { node.storeInteger(value) }
    func encode(_ value: UInt64) throws { node.storeInteger(value) }
    func encode<T: Encodable>(_ value: T) throws { try node.store(value, codingPath: codingPath) }
}

// MARK: Decoding

/// A decoded CBOR value.
private enum Value {
    case unsigned(UInt64)
    case negative(UInt64)
    case bytes([UInt8])
    case text(String)
    case float(Double)
    case bool(Bool)
    case null
    case array([Value])
    case map([String: Value])

    var kind: String {
        switch self {
        case .unsigned, .negative: "an integer"
        case .bytes: "a byte string"
        case .text: "a text string"
        case .float: "a float"
        case .bool: "a boolean"
        case .null: "null"
        case .array: "an array"
        case .map: "a map"
        }
    }
}

/// Reads one value from bytes a peer sent: every length is checked against what is left before
/// anything is allocated for it.
private struct Reader {
    let bytes: [UInt8]
    var offset = 0
    var items = 0

    func corrupt(_ what: String) -> DecodingError {
        .dataCorrupted(.init(codingPath: [], debugDescription: "CBOR at byte \(offset): \(what)"))
    }

    mutating func take(_ count: Int) throws -> ArraySlice<UInt8> {
        guard count <= bytes.count - offset else { throw corrupt("the value ends early") }
        defer { offset += count }
        return bytes[offset..<offset + count]
    }

    mutating func argument(_ low: UInt8) throws -> UInt64 {
        let width: Int
        switch low {
        case ..<24: return UInt64(low)
        case 24: width = 1
        case 25: width = 2
        case 26: width = 4
        case 27: width = 8
        default: throw corrupt("indefinite or reserved length \(low) (only definite lengths are read)")
        }
        return try take(width).reduce(0) { $0 << 8 | UInt64($1) }
    }

    /// A length that the rest of the bytes can hold, at `bytesEach` bytes at least per item.
    mutating func length(_ low: UInt8, bytesEach: Int) throws -> Int {
        let count = try argument(low)
        guard count <= UInt64(bytes.count - offset) / UInt64(bytesEach) else { throw corrupt("a length of \(count) exceeds the bytes left") }
        return Int(count)
    }

    mutating func readValue(depth: Int) throws -> Value {
        guard depth <= CBOR.maximumDepth else { throw corrupt("nested more than \(CBOR.maximumDepth) deep") }
        items += 1
        guard items <= CBOR.maximumItems else { throw corrupt("more than \(CBOR.maximumItems) values") }
        let initial = try take(1).first!
        let major = initial >> 5, low = initial & 0x1F
        switch major {
        case 0: return .unsigned(try argument(low))
        case 1: return .negative(try argument(low))
        case 2: return .bytes(Array(try take(try length(low, bytesEach: 1))))
        case 3: return .text(try text(low))
        case 4:
            let count = try length(low, bytesEach: 1)
            var elements: [Value] = []
            elements.reserveCapacity(count)
            for _ in 0..<count { elements.append(try readValue(depth: depth + 1)) }
            return .array(elements)
        case 5:
            let count = try length(low, bytesEach: 2)
            var entries: [String: Value] = [:]
            for _ in 0..<count {
                let keyHead = try take(1).first!
                guard keyHead >> 5 == 3 else { throw corrupt("a map key is not a text string") }
                let key = try text(keyHead & 0x1F)
                guard entries.updateValue(try readValue(depth: depth + 1), forKey: key) == nil else {
                    throw corrupt("the key \"\(key)\" appears twice in a map")
                }
            }
            return .map(entries)
        case 7:
            switch low {
            case 20: return .bool(false)
            case 21: return .bool(true)
            case 22: return .null
            case 27: return .float(Double(bitPattern: try argument(27)))
            default: throw corrupt("simple value or float form \(low) is not read")
            }
        default:
            throw corrupt("tags (major type 6) are not read")
        }
    }

    mutating func text(_ low: UInt8) throws -> String {
        let utf8 = try take(try length(low, bytesEach: 1))
        guard let string = String(validating: utf8, as: UTF8.self) else { throw corrupt("a text string is not UTF-8") }
        return string
    }
}

private struct ValueDecoder: Decoder {
    let value: Value
    let codingPath: [any CodingKey]
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    func mismatch(_ type: Any.Type) -> DecodingError {
        .typeMismatch(type, .init(codingPath: codingPath, debugDescription: "expected \(type), found \(value.kind)"))
    }

    func container<Key: CodingKey>(keyedBy type: Key.Type) throws -> KeyedDecodingContainer<Key> {
        guard case let .map(entries) = value else { throw mismatch([String: Any].self) }
        return KeyedDecodingContainer(KeyedValueDecoder<Key>(entries: entries, codingPath: codingPath))
    }

    func unkeyedContainer() throws -> any UnkeyedDecodingContainer {
        guard case let .array(elements) = value else { throw mismatch([Any].self) }
        return UnkeyedValueDecoder(elements: elements, codingPath: codingPath)
    }

    func singleValueContainer() throws -> any SingleValueDecodingContainer { self }

    func decodeValue<T: Decodable>(_ type: T.Type) throws -> T {
        if type == [UInt8].self || type == Data.self {
            guard case let .bytes(bytes) = value else { throw mismatch(type) }
            return (type == Data.self ? Data(bytes) as Any : bytes as Any) as! T
        }
        return try T(from: self)
    }

    func integer<T: FixedWidthInteger>(_ type: T.Type) throws -> T {
        let result: T?
        switch value {
        case let .unsigned(argument): result = T(exactly: argument)
        case let .negative(argument): result = argument <= UInt64(Int64.max) ? T(exactly: -1 - Int64(argument)) : nil
        default: throw mismatch(type)
        }
        guard let result else {
            throw DecodingError.dataCorrupted(.init(codingPath: codingPath, debugDescription: "the integer does not fit \(type)"))
        }
        return result
    }
}

extension ValueDecoder: SingleValueDecodingContainer {
    func decodeNil() -> Bool {
        if case .null = value { return true }
        return false
    }

    func decode(_ type: Bool.Type) throws -> Bool {
        guard case let .bool(result) = value else { throw mismatch(type) }
        return result
    }

    func decode(_ type: String.Type) throws -> String {
        guard case let .text(result) = value else { throw mismatch(type) }
        return result
    }

    func decode(_ type: Double.Type) throws -> Double {
        guard case let .float(result) = value else { throw mismatch(type) }
        return result
    }

    func decode(_ type: Float.Type) throws -> Float { Float(try decode(Double.self)) }
    func decode(_ type: Int.Type) throws -> Int { try integer(type) }
    func decode(_ type: Int8.Type) throws -> Int8 { try integer(type) }
    func decode(_ type: Int16.Type) throws -> Int16 { try integer(type) }
    func decode(_ type: Int32.Type) throws -> Int32 { try integer(type) }
    func decode(_ type: Int64.Type) throws -> Int64 { try integer(type) }
    func decode(_ type: UInt.Type) throws -> UInt { try integer(type) }
    func decode(_ type: UInt8.Type) throws -> UInt8 { try integer(type) }
    func decode(_ type: UInt16.Type) throws -> UInt16 { try integer(type) }
    func decode(_ type: UInt32.Type) throws -> UInt32 { try integer(type) }
    func decode(_ type: UInt64.Type) throws -> UInt64 { try integer(type) }
    func decode<T: Decodable>(_ type: T.Type) throws -> T { try decodeValue(type) }
}

private struct KeyedValueDecoder<Key: CodingKey>: KeyedDecodingContainerProtocol {
    let entries: [String: Value]
    let codingPath: [any CodingKey]

    var allKeys: [Key] { entries.keys.compactMap { Key(stringValue: $0) } }
    func contains(_ key: Key) -> Bool { entries[key.stringValue] != nil }

    func decoder(for key: Key) throws -> ValueDecoder {
        guard let value = entries[key.stringValue] else {
            throw DecodingError.keyNotFound(key, .init(codingPath: codingPath, debugDescription: "no \"\(key.stringValue)\" in the map"))
        }
        return ValueDecoder(value: value, codingPath: codingPath + [key])
    }

    func decodeNil(forKey key: Key) throws -> Bool { try decoder(for: key).decodeNil() }
    func decode(_ type: Bool.Type, forKey key: Key) throws -> Bool { try decoder(for: key).decode(type) }
    func decode(_ type: String.Type, forKey key: Key) throws -> String { try decoder(for: key).decode(type) }
    func decode(_ type: Double.Type, forKey key: Key) throws -> Double { try decoder(for: key).decode(type) }
    func decode(_ type: Float.Type, forKey key: Key) throws -> Float { try decoder(for: key).decode(type) }
    func decode(_ type: Int.Type, forKey key: Key) throws -> Int { try decoder(for: key).integer(type) }
    func decode(_ type: Int8.Type, forKey key: Key) throws -> Int8 { try decoder(for: key).integer(type) }
    func decode(_ type: Int16.Type, forKey key: Key) throws -> Int16 { try decoder(for: key).integer(type) }
    func decode(_ type: Int32.Type, forKey key: Key) throws -> Int32 { try decoder(for: key).integer(type) }
    func decode(_ type: Int64.Type, forKey key: Key) throws -> Int64 { try decoder(for: key).integer(type) }
    func decode(_ type: UInt.Type, forKey key: Key) throws -> UInt { try decoder(for: key).integer(type) }
    func decode(_ type: UInt8.Type, forKey key: Key) throws -> UInt8 { try decoder(for: key).integer(type) }
    func decode(_ type: UInt16.Type, forKey key: Key) throws -> UInt16 { try decoder(for: key).integer(type) }
    func decode(_ type: UInt32.Type, forKey key: Key) throws -> UInt32 { try decoder(for: key).integer(type) }
    func decode(_ type: UInt64.Type, forKey key: Key) throws -> UInt64 { try decoder(for: key).integer(type) }
    func decode<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T { try decoder(for: key).decodeValue(type) }

    func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type, forKey key: Key) throws -> KeyedDecodingContainer<NestedKey> {
        try decoder(for: key).container(keyedBy: type)
    }

    func nestedUnkeyedContainer(forKey key: Key) throws -> any UnkeyedDecodingContainer { try decoder(for: key).unkeyedContainer() }

    func superDecoder() throws -> any Decoder {
        ValueDecoder(value: entries["super"] ?? .null, codingPath: codingPath)
    }

    func superDecoder(forKey key: Key) throws -> any Decoder {
        ValueDecoder(value: entries[key.stringValue] ?? .null, codingPath: codingPath + [key])
    }
}

private struct UnkeyedValueDecoder: UnkeyedDecodingContainer {
    let elements: [Value]
    let codingPath: [any CodingKey]
    var currentIndex = 0

    init(elements: [Value], codingPath: [any CodingKey]) {
        self.elements = elements
        self.codingPath = codingPath
    }

    var count: Int? { elements.count }
    var isAtEnd: Bool { currentIndex >= elements.count }

    private struct Index: CodingKey {
        var stringValue: String { "\(intValue!)" }
        var intValue: Int?
        init(_ index: Int) { intValue = index }
        init?(stringValue: String) { nil }
        init?(intValue: Int) { self.intValue = intValue }
    }

    mutating func next() throws -> ValueDecoder {
        guard !isAtEnd else {
            throw DecodingError.valueNotFound(Any.self, .init(codingPath: codingPath, debugDescription: "the array has only \(elements.count) elements"))
        }
        defer { currentIndex += 1 }
        return ValueDecoder(value: elements[currentIndex], codingPath: codingPath + [Index(currentIndex)])
    }

    mutating func decodeNil() throws -> Bool {
        guard !isAtEnd, case .null = elements[currentIndex] else { return false }
        currentIndex += 1
        return true
    }

    mutating func decode(_ type: Bool.Type) throws -> Bool { try next().decode(type) }
    mutating func decode(_ type: String.Type) throws -> String { try next().decode(type) }
    mutating func decode(_ type: Double.Type) throws -> Double { try next().decode(type) }
    mutating func decode(_ type: Float.Type) throws -> Float { try next().decode(type) }
    mutating func decode(_ type: Int.Type) throws -> Int { try next().integer(type) }
    mutating func decode(_ type: Int8.Type) throws -> Int8 { try next().integer(type) }
    mutating func decode(_ type: Int16.Type) throws -> Int16 { try next().integer(type) }
    mutating func decode(_ type: Int32.Type) throws -> Int32 { try next().integer(type) }
    mutating func decode(_ type: Int64.Type) throws -> Int64 { try next().integer(type) }
    mutating func decode(_ type: UInt.Type) throws -> UInt { try next().integer(type) }
    mutating func decode(_ type: UInt8.Type) throws -> UInt8 { try next().integer(type) }
    mutating func decode(_ type: UInt16.Type) throws -> UInt16 { try next().integer(type) }
    mutating func decode(_ type: UInt32.Type) throws -> UInt32 { try next().integer(type) }
    mutating func decode(_ type: UInt64.Type) throws -> UInt64 { try next().integer(type) }
    mutating func decode<T: Decodable>(_ type: T.Type) throws -> T { try next().decodeValue(type) }

    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type) throws -> KeyedDecodingContainer<NestedKey> {
        try next().container(keyedBy: type)
    }

    mutating func nestedUnkeyedContainer() throws -> any UnkeyedDecodingContainer { try next().unkeyedContainer() }
    mutating func superDecoder() throws -> any Decoder { try next() }
}
