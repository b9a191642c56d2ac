import APIModels
import FerryClient
import FerryTestSupport
import Foundation
import HostOS
import Testing

/// Kernels crafted to break a loader's arithmetic — a segment of 2⁶⁴ − 4 KiB, program headers at
/// the end of the 64-bit offset space, a segment past the end of the file — answer `vm.create` or
/// `vm.boot` with a 400 that names the fault, and the VMM goes on serving.
@Suite(.enabled(if: Repository.kvmAvailable, needsKVM))
struct CraftedKernelTests {
    /// The test guest's ELF with one field of its first `PT_LOAD` program header (or of the file
    /// header) replaced.
    struct Craft: Sendable, CustomTestStringConvertible {
        var testDescription: String
        /// Offset of the field from the program header (nil: from the file's start), and its new value.
        var programHeaderField: Int?
        var fileOffset: Int?
        var value: UInt64
        /// What the error must name.
        var message: String

        func apply(to image: inout [UInt8]) throws {
            var bytes = LittleEndianBytes(image)
            if let fileOffset {
                bytes.set(value, at: fileOffset)
            } else if let field = programHeaderField {
                let table = Int(try #require(image.littleEndian(UInt64.self, at: 32)))
                let count = Int(try #require(image.littleEndian(UInt16.self, at: 56)))
                let load = try #require((0..<count).first { image.littleEndian(UInt32.self, at: table + $0 * 56) == 1 })
                bytes.set(value, at: table + load * 56 + field)
            }
            image = bytes.bytes
        }
    }

    static let crafts = [
        Craft(testDescription: "p_memsz 2^64 - 4 KiB", programHeaderField: 40, value: 0xFFFF_FFFF_FFFF_F000,
              message: "runs past the end of the address space"),
        Craft(testDescription: "p_memsz larger than guest RAM", programHeaderField: 40, value: 1 << 40,
              message: "does not fit in guest RAM"),
        Craft(testDescription: "e_phoff 2^64 - 256", fileOffset: 32, value: 0xFFFF_FFFF_FFFF_FF00,
              message: "program header 0"),
        Craft(testDescription: "a segment offset past the end of the file", programHeaderField: 8, value: 1 << 32,
              message: "lies outside the"),
    ]

    @Test(arguments: crafts)
    func craftedKernelGets400NamingTheFaultAndTheVMMGoesOn(craft: Craft) async throws {
        let directory = try TemporaryDirectory()
        var image = Array(try Data(contentsOf: URL(fileURLWithPath: try TestGuest.path.get())))
        try craft.apply(to: &image)
        let kernel = directory.path("crafted.elf")
        try Data(image).write(to: URL(fileURLWithPath: kernel))
        let vmm = try await TestVMM("vmm", in: directory)

        let guest = TestGuestVM(cpus: 1, memoryMiB: 128, workload: "workset_mib=1")
        var refusal: APIError?
        do {
            try await vmm.api.send(.vmCreate, body: guest.configuration(kernel: kernel))
            // A VMM may take the image at vm.create; then vm.boot must refuse it.
            try await vmm.api.send(.vmBoot)
        } catch let error as APIError {
            refusal = error
        }
        let error = try #require(refusal, "the crafted kernel was accepted")
        #expect(error.status == 400, "\(error)")
        #expect(error.description.contains(craft.message), "the error names the fault: \(error)")
        #expect(vmm.process.waitForExit(timeout: .zero) == nil, "the VMM still runs: \(vmm.process.standardError)")
        _ = try await vmm.api.send(.vmmPing)

        // The VMM is not wedged: a good kernel boots in it now.
        _ = try? await vmm.api.send(.vmDelete)
        try await vmm.boot(guest)
        #expect(await vmm.shutDown(), "the VMM shuts down cleanly: \(vmm.process.standardError)")
    }
}
