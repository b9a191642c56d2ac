import KVM
import Testing
@testable import Machine

@Suite struct CPUIDTemplateTests {
    let supported = [
        CPUIDEntry(function: 0, eax: 0x1F),
        CPUIDEntry(function: 1, eax: 0x00A2_0F10, ebx: 0x0010_0800, ecx: 0x0000_0001, edx: 0x1789_3BFF),
        CPUIDEntry(function: 4, index: 0, eax: 0x0000_4121),
        CPUIDEntry(function: 0xB, index: 0, eax: 1, ebx: 2, ecx: 0x100, edx: 7),
        CPUIDEntry(function: 0xB, index: 1, eax: 4, ebx: 16, ecx: 0x201, edx: 7),
        CPUIDEntry(function: 0x4000_0000, eax: 0x4000_0001, ebx: 0x4B4D_564B),
    ]

    @Test(arguments: [(0, 1), (1, 2), (3, 4), (7, 8)])
    func eachVCPUSeesItsAPICIDAndTheCPUCount(vcpu: Int, count: Int) {
        let entries = CPUIDTemplate.entries(supported: supported, vcpu: vcpu, count: count)
        let leaf1 = entries.first { $0.function == 1 }!
        #expect(leaf1.ebx >> 24 == UInt32(vcpu))
        #expect((leaf1.ebx >> 16) & 0xFF == UInt32(count))
        #expect(leaf1.ebx & 0xFFFF == 0x0800, "brand index and CLFLUSH size pass through")
        #expect(leaf1.ecx & (1 << 31) != 0, "hypervisor bit")
        #expect((leaf1.edx & (1 << 28) != 0) == (count > 1))
        for entry in entries where entry.function == 0xB {
            #expect(entry.edx == UInt32(vcpu))
        }
        let cores = entries.first { $0.function == 0xB && $0.index == 1 }!
        #expect(cores.ebx == UInt32(count))
        #expect(1 << cores.eax >= count, "the core field of the APIC id is wide enough")
        let cache = entries.first { $0.function == 4 }!
        #expect(cache.eax >> 26 == UInt32(count - 1))
    }

    @Test func hostThatEmulatesGuestKernelCodeHidesWhatItsEmulatorCannotRun() {
        var features = supported
        features[1].ecx |= (1 << 13) | (1 << 26) | (1 << 28) | (1 << 0)   // CX16, XSAVE, AVX, SSE3
        let hidden = CPUIDTemplate.entries(supported: features, vcpu: 0, count: 1, hostEmulatesGuestKernel: true)
            .first { $0.function == 1 }!
        #expect(hidden.ecx & (1 << 13) == 0 && hidden.ecx & (1 << 26) == 0 && hidden.ecx & (1 << 28) == 0)
        #expect(hidden.ecx & 1 == 1, "other features stay")
        let native = CPUIDTemplate.entries(supported: features, vcpu: 0, count: 1).first { $0.function == 1 }!
        #expect(native.ecx & (1 << 13) != 0 && native.ecx & (1 << 26) != 0, "hardware hosts keep them")
    }

    @Test func leavesItDoesNotOwnPassThroughUnchanged() {
        let entries = CPUIDTemplate.entries(supported: supported, vcpu: 1, count: 2)
        #expect(entries.count == supported.count)
        #expect(entries.first { $0.function == 0x4000_0000 } == supported.last)
        #expect(entries.first { $0.function == 0 } == supported.first)
    }
}
