import Glibc
import HostOS
import Testing
@testable import KVM

let kvmMissing = "needs /dev/kvm (absent or not accessible on this machine)"

@Suite(.enabled(if: KVMSystem.isAvailable, Comment(rawValue: kvmMissing)))
struct KVMSystemTests {
    @Test func systemReportsCapabilitiesAndSupportedCPUID() throws {
        let kvm = try KVMSystem()
        #expect(kvm.checkExtension(KVMCapability.irqchip) > 0)
        let cpuid = try kvm.supportedCPUID()
        #expect(cpuid.contains { $0.function == 0 })
        #expect(cpuid.contains { $0.function == 1 })
        #expect(try kvm.msrIndexList().contains(0x10), "the TSC MSR is saved and restored")
    }

    @Test func registersRoundTripThroughTheVCPU() throws {
        let vcpu = try KVMSystem().createVM().createVCPU(id: 0)
        var regs = try vcpu.registers()
        regs.rax = 0x1122_3344_5566_7788
        regs.r15 = 42
        regs.rip = 0x1000
        try vcpu.setRegisters(regs)
        #expect(try vcpu.registers() == regs)
        var sregs = try vcpu.specialRegisters()
        sregs.cr0 |= 1
        try vcpu.setSpecialRegisters(sregs)
        #expect(try vcpu.specialRegisters().cr0 & 1 == 1)
    }

    @Test func stateBlobOfTheWrongSizeIsRefusedWithTheOperationNamed() throws {
        let vcpu = try KVMSystem().createVM().createVCPU(id: 0)
        #expect(throws: SystemError.self) { try vcpu.setLocalAPIC([1, 2, 3]) }
        do {
            try vcpu.setEvents([])
        } catch let error as SystemError {
            #expect(error.description.contains("KVM_SET_VCPU_EVENTS"))
        }
    }

    @Test func failingIoctlNamesTheOperationAndErrno() throws {
        let vm = try KVMSystem().createVM()
        #expect {
            _ = try vm.dirtyLog(slot: 7, pageCount: 16)
        } throws: { error in
            let description = "\(error)"
            return description.contains("KVM_GET_DIRTY_LOG(slot 7)") && description.contains("errno")
        }
    }

    /// Runs real guest code: a 32-bit store to page 2, an `out`, then `hlt`, and checks the exits,
    /// the memory and KVM's dirty log.
    @Test func guestStoreShowsInMemoryAndInTheDirtyLog() throws {
        let pageCount = 16
        let size = pageCount * 4096
        let memory = try #require(mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0))
        defer { munmap(memory, size) }
        let code: [UInt8] = [0xC6, 0x05, 0x00, 0x20, 0x00, 0x00, 0x42, // mov byte [0x2000], 0x42
                             0xB0, 0x42,                               // mov al, 0x42
                             0xE6, 0x10,                               // out 0x10, al
                             0xF4]                                     // hlt
        (memory + 0x1000).copyMemory(from: code, byteCount: code.count)
        let vm = try KVMSystem().createVM()
        try vm.setMemoryRegion(slot: 0, guestAddress: 0, size: UInt64(size), hostAddress: memory, logDirtyPages: true)
        _ = try vm.dirtyLog(slot: 0, pageCount: pageCount)  // clear what loading the code dirtied
        let vcpu = try vm.createVCPU(id: 0)
        var sregs = try vcpu.specialRegisters()
        let flatCode = Segment(descriptor: 0x00CF_9B00_0000_FFFF, selector: 0x08)
        let flatData = Segment(descriptor: 0x00CF_9300_0000_FFFF, selector: 0x10)
        sregs.cs = flatCode
        sregs.ds = flatData; sregs.es = flatData; sregs.ss = flatData; sregs.fs = flatData; sregs.gs = flatData
        sregs.cr0 |= 1
        try vcpu.setSpecialRegisters(sregs)
        var regs = Registers()
        regs.rip = 0x1000
        try vcpu.setRegisters(regs)

        var exits: [VCPUExit] = []
        while exits.count < 8 {
            let exit = try vcpu.runOnce()
            if exit == .interrupted { continue }
            exits.append(exit)
            if exit == .halt { break }
        }
        #expect(exits == [.portIO(port: 0x10, size: 1, count: 1, isWrite: true, data: [0x42]), .halt])
        #expect(memory.load(fromByteOffset: 0x2000, as: UInt8.self) == 0x42)
        let dirty = try vm.dirtyLog(slot: 0, pageCount: pageCount)
        #expect(dirty[0] & (1 << 2) != 0, "page 2 was written by the guest")
        #expect(try vm.dirtyLog(slot: 0, pageCount: pageCount)[0] & (1 << 2) == 0, "reading the log clears it")
    }
}

@Suite(.enabled(if: KVMSystem.isAvailable, Comment(rawValue: kvmMissing)))
struct KVMPendingExitTests {
    /// Runs `code` at 0x1000 in flat 32-bit protected mode until its first port I/O exit.
    func vcpuStoppedAtFirstPortAccess(_ code: [UInt8]) throws -> (KVMVirtualMachine, KVMVCPU, UnsafeMutableRawPointer) {
        let size = 16 * 4096
        let memory = try #require(mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0))
        (memory + 0x1000).copyMemory(from: code, byteCount: code.count)
        let vm = try KVMSystem().createVM()
        try vm.setMemoryRegion(slot: 0, guestAddress: 0, size: UInt64(size), hostAddress: memory)
        let vcpu = try vm.createVCPU(id: 0)
        var sregs = try vcpu.specialRegisters()
        sregs.cs = Segment(descriptor: 0x00CF_9B00_0000_FFFF, selector: 0x08)
        let data = Segment(descriptor: 0x00CF_9300_0000_FFFF, selector: 0x10)
        sregs.ds = data; sregs.es = data; sregs.ss = data; sregs.fs = data; sregs.gs = data
        sregs.cr0 |= 1
        try vcpu.setSpecialRegisters(sregs)
        var regs = Registers()
        regs.rip = 0x1000
        try vcpu.setRegisters(regs)
        for _ in 0..<8 {
            if case .portIO = try vcpu.runOnce() { return (vm, vcpu, memory) }
        }
        throw SystemError("test", errno: 0, detail: "no port I/O exit")
    }

    @Test func portReadReachesRAXOnlyOnceThePendingExitIsCompletedAndNothingElseRuns() throws {
        let (_, vcpu, memory) = try vcpuStoppedAtFirstPortAccess([0xE4, 0x10,   // in al, 0x10
                                                                  0xB0, 0x07,   // mov al, 7
                                                                  0xF4])        // hlt
        defer { munmap(memory, 16 * 4096) }
        vcpu.completeRead([0x99])
        #expect(try vcpu.completePendingExit() == nil)
        let regs = try vcpu.registers()
        #expect(regs.rax & 0xFF == 0x99, "the value read is in AL")
        #expect(regs.rip == 0x1002, "RIP is past the in, and the next instruction has not run")
        #expect(try vcpu.completePendingExit() == nil, "nothing is left pending")
    }

    @Test func portWriteLeavesRIPPastTheOutOnceCompleted() throws {
        let (_, vcpu, memory) = try vcpuStoppedAtFirstPortAccess([0xB0, 0x42,   // mov al, 0x42
                                                                  0xE6, 0x10,   // out 0x10, al
                                                                  0xB0, 0x07,   // mov al, 7
                                                                  0xF4])        // hlt
        defer { munmap(memory, 16 * 4096) }
        #expect(try vcpu.completePendingExit() == nil)
        let regs = try vcpu.registers()
        #expect(regs.rip == 0x1004)
        #expect(regs.rax & 0xFF == 0x42)
    }
}
