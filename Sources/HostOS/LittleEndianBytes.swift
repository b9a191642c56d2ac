/// Builds a little-endian byte image field by field: boot structures, firmware tables, memory
/// files and migration headers.
public struct LittleEndianBytes: Sendable {
    public private(set) var bytes: [UInt8] = []

    public init(capacity: Int = 0) {
        bytes.reserveCapacity(capacity)
    }

    /// Starts from existing bytes, to change fields in place with `set(_:at:)`.
    public init(_ bytes: [UInt8]) {
        self.bytes = bytes
    }

    public var count: Int { bytes.count }

    public mutating func append<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    public mutating func append(_ other: some Sequence<UInt8>) {
        bytes.append(contentsOf: other)
    }

    /// Appends ASCII text padded with spaces (or cut) to exactly `width` bytes.
    public mutating func appendPadded(_ text: String, width: Int) {
        let ascii = Array(text.utf8.prefix(width))
        bytes.append(contentsOf: ascii)
        bytes.append(contentsOf: repeatElement(UInt8(ascii: " "), count: width - ascii.count))
    }

    public mutating func appendZeros(_ count: Int) {
        bytes.append(contentsOf: repeatElement(0, count: count))
    }

    /// Overwrites the bytes at `offset` with `value`, little-endian; they must already exist.
    public mutating func set<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        withUnsafeBytes(of: value.littleEndian) { source in
            for (index, byte) in source.enumerated() { bytes[offset + index] = byte }
        }
    }
}

extension Collection where Element == UInt8, Index == Int {
    /// The little-endian integer at `offset` (counted from `startIndex`), or nil if it does not
    /// lie entirely inside the collection. Never traps, whatever `offset` is.
    public func littleEndian<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T? {
        let size = MemoryLayout<T>.size
        guard offset >= 0, offset <= count - size else { return nil }
        var value: T = 0
        let start = startIndex + offset
        for index in (start..<start + size).reversed() {
            value = value << 8 | T(self[index])
        }
        return value
    }

    /// The little-endian integer at `offset` (an `UInt64` from a file or header), or nil if it does
    /// not lie entirely inside the collection.
    public func littleEndian<T: FixedWidthInteger>(_ type: T.Type, at offset: UInt64) -> T? {
        guard let offset = Int(exactly: offset) else { return nil }
        return littleEndian(type, at: offset)
    }
}

extension Sequence where Element == UInt8 {
    /// The byte that makes the 8-bit sum of these bytes plus it zero (MP table and BIOS checksums).
    public var checksumComplement: UInt8 {
        UInt8(truncatingIfNeeded: 0 &- reduce(UInt8(0), &+))
    }
}
