import FerryTestSupport
import Foundation
import HostOS
import Testing
@testable import Machine

/// Malformed kernels are refused with an `invalidImage` error, never a trap: seeded random
/// mutations of real kernels (the test guest's ELF, Debian's vmlinux and bzImage) go through the
/// loader's planning and loading into guest RAM. The fields a loader trusts are where the
/// mutations land: the ELF file header and program headers, the notes, the bzImage setup header.
@Suite(.serialized)
struct KernelMutationTests {
    static let seed: UInt64 = 0xB007_1E55_2026
    /// Mutated images per kernel.
    static let mutations = 400
    /// RAM the mutated kernels are loaded into: enough for Debian's kernel and its bzImage.
    static let memorySize: UInt64 = 256 << 20

    /// Values that break naive arithmetic, planted as 16-, 32- and 64-bit fields.
    static let interesting: [UInt64] = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x8000_0000, 0xFFFF_FFFF, 0x1_0000_0000,
                                        0x7FFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_F000, UInt64.max]

    /// The byte ranges of `image` a loader reads before it trusts anything.
    static func headerRegions(of image: [UInt8]) -> [Range<Int>] {
        if ELFKernel.isELF(image) {
            let programHeaders = Int(image.littleEndian(UInt64.self, at: 32) ?? 0)
            let count = Int(image.littleEndian(UInt16.self, at: 56) ?? 0)
            var regions = [0..<64, programHeaders..<min(image.count, programHeaders + count * 56)]
            // The notes: PT_NOTE segments.
            for index in 0..<count {
                let base = programHeaders + index * 56
                if image.littleEndian(UInt32.self, at: base) == 4,
                   let offset = image.littleEndian(UInt64.self, at: base + 8), let size = image.littleEndian(UInt64.self, at: base + 32),
                   offset + size <= UInt64(image.count) {
                    regions.append(Int(offset)..<Int(offset + size))
                }
            }
            return regions
        }
        return [0x1F1..<0x280]
    }

    /// One mutation of `image`, in a header region: a byte flipped, or an interesting value
    /// planted. Returns what it did and the bytes it changed.
    static func mutate(_ image: inout [UInt8], regions: [Range<Int>], using generator: inout SplitMix64) -> (String, Range<Int>) {
        let region = regions.randomElement(using: &generator) ?? 0..<64
        guard !region.isEmpty else { return ("none", 0..<0) }
        let offset = Int.random(in: region, using: &generator)
        if Bool.random(using: &generator) {
            image[offset] ^= UInt8.random(in: 1...255, using: &generator)
            return ("flip byte 0x\(String(offset, radix: 16))", offset..<offset + 1)
        }
        let value = interesting.randomElement(using: &generator) ?? 0
        let width = min([2, 4, 8].randomElement(using: &generator) ?? 8, image.count - offset)
        withUnsafeBytes(of: value.littleEndian) { bytes in
            for index in 0..<width { image[offset + index] = bytes[index] }
        }
        return ("plant 0x\(String(value, radix: 16)) (\(width) bytes) at 0x\(String(offset, radix: 16))", offset..<offset + width)
    }

    static func kernels() throws -> [(name: String, path: String)] {
        let linux = try LinuxGuest.paths.get()
        return [("the test guest", try TestGuest.path.get()),
                ("Debian's vmlinux", try #require(linux["vmlinux"])), ("Debian's bzImage", try #require(linux["bzimage"]))]
    }

    @Test func mutatedKernelsAreRefusedWithAnInvalidImageErrorNeverATrap() throws {
        let kernels = try Self.kernels()
        let memory = try GuestMemory(ranges: GuestRAMLayout.ranges(size: Self.memorySize))
        var generator = SplitMix64(seed: Self.seed)
        for (name, path) in kernels {
            let original = Array(try Data(contentsOf: URL(fileURLWithPath: path)))
            // The unmutated image loads.
            _ = try BootLoader.load(kernel: original, named: name, initramfs: nil, commandLine: "console=ttyS0", cpuCount: 1, memory: memory)
            let regions = Self.headerRegions(of: original)
            var image = original
            var refused = 0
            var loaded = 0
            for index in 0..<Self.mutations {
                let changes = (0..<Int.random(in: 1...3, using: &generator)).map { _ in
                    Self.mutate(&image, regions: regions, using: &generator)
                }
                do {
                    _ = try BootLoader.load(kernel: image, named: name, initramfs: nil, commandLine: "", cpuCount: 1, memory: memory)
                    loaded += 1
                } catch {
                    #expect(error.kind == .invalidImage, "\(name) mutation \(index) (\(changes.map(\.0))): \(error)")
                    refused += 1
                }
                // Undo the mutations where they were made: the images are large.
                for (_, changed) in changes { image.replaceSubrange(changed, with: original[changed]) }
            }
            print("kernel mutations of \(name) (seed 0x\(String(Self.seed, radix: 16))): \(refused) refused, \(loaded) still loaded")
            #expect(refused > 0, "the mutations reached fields the loader checks")
        }
    }
}
