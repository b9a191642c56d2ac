/// Builds the byte image of a firmware or boot structure, little-endian, field by field.
struct LittleEndianBytes {
    private(set) var bytes: [UInt8] = []

    init() {}

    mutating func append<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    /// Appends ASCII text padded with spaces (or cut) to exactly `width` bytes.
    mutating func appendPadded(_ text: String, width: Int) {
        let ascii = Array(text.utf8.prefix(width))
        bytes.append(contentsOf: ascii)
        bytes.append(contentsOf: repeatElement(UInt8(ascii: " "), count: width - ascii.count))
    }

    mutating func append(_ other: [UInt8]) {
        bytes.append(contentsOf: other)
    }

    mutating func appendZeros(_ count: Int) {
        bytes.append(contentsOf: repeatElement(0, count: count))
    }

    /// Overwrites bytes at `offset` with `value`, little-endian.
    mutating func set<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        withUnsafeBytes(of: value.littleEndian) { source in
            for (index, byte) in source.enumerated() { bytes[offset + index] = byte }
        }
    }

    var count: Int { bytes.count }
}

extension Array where Element == UInt8 {
    /// Reads a little-endian integer at `offset`, or nil if the array is too short.
    func littleEndian<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T? {
        guard offset >= 0, offset + MemoryLayout<T>.size <= count else { return nil }
        var value: T = 0
        for index in (0..<MemoryLayout<T>.size).reversed() {
            value = value << 8 | T(self[offset + index])
        }
        return value
    }

    /// The byte that makes the 8-bit sum of `self` plus it zero (MP table and BIOS checksums).
    var checksumComplement: UInt8 {
        UInt8(truncatingIfNeeded: 0 &- reduce(UInt8(0), &+))
    }
}
