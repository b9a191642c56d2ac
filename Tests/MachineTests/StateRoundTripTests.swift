import HostOS
import Foundation
import KVM
import Testing
@testable import Machine

let kvmMissing = Comment(rawValue: "needs /dev/kvm (absent or not accessible on this machine)")

/// One stateful component and how to exercise it. Every component runs the same check (crosvm's
/// shared suspend tests): put it in a non-default state, save, restore into a fresh instance, save
/// again, and require the two saved values to be equal, and the saved value to survive JSON.
struct RoundTripSubject: Sendable, CustomTestStringConvertible {
    let name: String
    let check: @Sendable () throws -> Void
    var testDescription: String { name }

    /// - Parameters:
    ///   - fresh: a new instance in its initial state.
    ///   - prepare: moves an instance away from its initial state, so the test proves something.
    ///   - normalize: blanks what the component re-bases on restore by design (time stamps).
    static func make<Component, Saved: Codable & Equatable & Sendable>(
        _ name: String,
        fresh: @escaping @Sendable () throws -> Component,
        prepare: @escaping @Sendable (Component) throws -> Void,
        save: @escaping @Sendable (Component) throws -> Saved,
        restore: @escaping @Sendable (Component, Saved) throws -> Void,
        normalize: @escaping @Sendable (Saved) -> Saved = { $0 }
    ) -> RoundTripSubject {
        RoundTripSubject(name: name) {
            let original = try fresh()
            let initial = try save(original)
            try prepare(original)
            let saved = try save(original)
            #expect(normalize(saved) != normalize(initial), "prepare changed the state of \(name)")

            let copy = try fresh()
            try restore(copy, saved)
            let again = try save(copy)
            #expect(normalize(again) == normalize(saved), "state of \(name) after save, restore, save")

            let decoded = try JSONDecoder().decode(Saved.self, from: JSONEncoder().encode(saved))
            #expect(decoded == saved, "state of \(name) through JSON")
        }
    }

    /// The round trip through `StatefulDevice`, as the machine walks its devices.
    static func device<Device: StatefulDevice>(
        _ name: String, fresh: @escaping @Sendable () -> Device, prepare: @escaping @Sendable (Device) -> Void
    ) -> RoundTripSubject {
        make(name, fresh: fresh, prepare: prepare,
             save: { try $0.saveDeviceState(id: name) },
             restore: { try $0.restoreDeviceState($1) })
    }
}

enum StatefulComponents {
    static let devices: [RoundTripSubject] = [
        .device("Serial8250", fresh: { Serial8250(output: { _ in }, setInterrupt: { _ in }) }, prepare: { uart in
            uart.write(offset: 3, data: [0x83])     // DLAB on
            uart.write(offset: 0, data: [0x01])     // divisor 1: 115200 baud
            uart.write(offset: 3, data: [0x1B])     // 8E1
            uart.write(offset: 1, data: [0x03])     // receive and transmit interrupts
            uart.write(offset: 2, data: [0x01])     // FIFOs on
            uart.write(offset: 4, data: [0x0B])     // DTR, RTS, OUT2
            uart.write(offset: 7, data: [0x5A])
            uart.enqueueInput(Array("ls\n".utf8))
        }),
        .device("I8042", fresh: { I8042(onReset: {}) }, prepare: { controller in
            controller.write(offset: 4, data: [0x20])   // read configuration byte: output pending
        }),
    ]

    static let kvmBacked: [RoundTripSubject] = [
        .make("VMState", fresh: { try KVMTestVM() }, prepare: { vm in
            try vm.vm.setInterruptLine(Serial8250.interruptLine, high: true)
            try vm.vm.setInterruptLine(9, high: true)
        }, save: { try $0.vm.saveState() }, restore: { try $0.vm.restoreState($1) }, normalize: KVMTestVM.withoutTimestamps),

        .make("VCPUState", fresh: { try KVMTestVM() }, prepare: { vm in
            let vcpu = vm.vcpu
            let supported = try KVMSystem().supportedCPUID()
            try vcpu.setCPUID(CPUIDTemplate.entries(supported: supported, vcpu: 0, count: 1))
            try vcpu.setMSRs(BootMSRs.entries + [MSREntry(index: BootMSRs.lstar, data: 0xFFFF_FFFF_8100_0000)])
            try vcpu.setLocalAPIC(LocalAPICSetup.configure(try vcpu.localAPIC()))
            let (regs, sregs) = BootCPUState.pvh(entry: 0x10_0000, startInfo: 0x6000, base: try vcpu.specialRegisters())
            var registers = regs
            registers.rax = 0x1122_3344_5566_7788
            registers.r12 = 0xDEAD_BEEF
            try vcpu.setSpecialRegisters(sregs)
            try vcpu.setRegisters(registers)
        }, save: { vm in try vm.vcpu.saveState(vm.support) },
           restore: { vm, state in try vm.vcpu.restoreState(state, support: vm.support) },
           normalize: KVMTestVM.withoutTimestamps),
    ]
}

/// A bare KVM VM with the in-kernel interrupt controllers, a PIT and one vCPU that never runs.
final class KVMTestVM: Sendable {
    let vm: KVMVirtualMachine
    let vcpu: KVMVCPU
    let support: VCPUStateSupport

    init() throws {
        let kvm = try KVMSystem()
        support = try kvm.vcpuStateSupport()
        vm = try kvm.createVM()
        try vm.createInterruptController()
        try vm.createPIT()
        vcpu = try vm.createVCPU(id: 0)
    }

    /// `struct kvm_pit_channel_state` is 24 bytes; `count_load_time`, the host time the count
    /// was loaded at, is its last 8. KVM_SET_PIT2 reloads every count and stamps it anew.
    static let pitChannelSize = 24
    static let pitCountLoadTimeOffset = 16

    /// VM state without the kvmclock reading and the PIT's load time stamps, which move on by design.
    static func withoutTimestamps(_ state: PlatformState) -> PlatformState {
        var state = state
        state.clock = 0
        for channel in 0..<3 {
            let offset = channel * pitChannelSize + pitCountLoadTimeOffset
            state.pit.replaceSubrange(offset..<offset + 8, with: repeatElement(0, count: 8))
        }
        return state
    }

    /// IA32_TIME_STAMP_COUNTER keeps counting after it is restored.
    static func withoutTimestamps(_ state: VCPUState) -> VCPUState {
        var state = state
        state.msrs = state.msrs.map { $0.index == BootMSRs.tsc ? MSREntry(index: $0.index, data: 0) : $0 }
        return state
    }
}

@Suite struct StateRoundTripTests {
    @Test(arguments: StatefulComponents.devices)
    func deviceStateSurvivesSaveRestoreSave(_ subject: RoundTripSubject) throws {
        try subject.check()
    }

    @Test(.enabled(if: KVMSystem.isAvailable, kvmMissing), arguments: StatefulComponents.kvmBacked)
    func kvmStateSurvivesSaveRestoreSave(_ subject: RoundTripSubject) throws {
        try subject.check()
    }

    @Test func restoredSerialPortHandsTheGuestTheSameBytesAndRegisters() throws {
        let original = Serial8250(output: { _ in }, setInterrupt: { _ in })
        original.write(offset: 1, data: [0x01])
        original.write(offset: 7, data: [0xA5])
        original.enqueueInput([0x41, 0x42])
        let copy = Serial8250(output: { _ in }, setInterrupt: { _ in })
        try copy.restoreState(original.saveState())
        #expect(copy.read(offset: 2, size: 1) == [0x04], "received-data interrupt identified")
        #expect(copy.read(offset: 0, size: 1) == [0x41])
        #expect(copy.read(offset: 0, size: 1) == [0x42])
        #expect(copy.read(offset: 5, size: 1)[0] & 1 == 0, "FIFO drained")
        #expect(copy.read(offset: 7, size: 1) == [0xA5])
    }

    @Test func serialStateThatNoUARTCouldBeInIsRefused() {
        let uart = Serial8250(output: { _ in }, setInterrupt: { _ in })
        var state = Serial8250.SavedState()
        state.receive = [UInt8](repeating: 0x20, count: Serial8250.receiveCapacity + 1)
        #expect(throws: MachineError.self) { try uart.restoreState(state) }
        state = Serial8250.SavedState()
        state.interruptEnable = 0xF1
        #expect(throws: MachineError.self) { try uart.restoreState(state) }
        #expect(uart.saveState() == Serial8250.SavedState(), "a refused state changes nothing")
    }

    @Test func deviceStateOfAnotherShapeIsRefusedNamingTheDevice() {
        let controller = I8042(onReset: {})
        #expect {
            try controller.restoreDeviceState(DeviceState(id: "i8042", json: "{\"pendingOutput\":\"x\"}"))
        } throws: { error in
            "\(error)".contains("device i8042")
        }
    }

    @Test(.enabled(if: KVMSystem.isAvailable, kvmMissing))
    func restoredTimeStampCounterContinuesFromTheSavedValue() throws {
        let original = try KVMTestVM()
        try original.vcpu.setMSRs([MSREntry(index: BootMSRs.tsc, data: 1 << 40)])
        let saved = try original.vcpu.saveState(original.support)
        let copy = try KVMTestVM()
        try copy.vcpu.restoreState(saved, support: copy.support)
        let savedTSC = try #require(saved.msrs.first { $0.index == BootMSRs.tsc }?.data)
        let restoredTSC = try #require(try copy.vcpu.msrs([BootMSRs.tsc]).first?.data)
        #expect(savedTSC >= 1 << 40)
        #expect(restoredTSC >= savedTSC && restoredTSC - savedTSC < 1 << 36, "TSC continues, neither reset nor far ahead")
    }

    @Test(.enabled(if: KVMSystem.isAvailable, kvmMissing))
    func vcpuStateIsRefusedByAVCPUWithAnotherID() throws {
        let vm = try KVMTestVM()
        var state = try vm.vcpu.saveState(vm.support)
        state.id = 3
        #expect(throws: SystemError.self) { try vm.vcpu.restoreState(state, support: vm.support) }
    }

    @Test(.enabled(if: KVMSystem.isAvailable, kvmMissing))
    func interruptControllerStateIsRefusedForAnotherController() throws {
        let vm = try KVMTestVM()
        var state = try vm.vm.saveState()
        swap(&state.picMaster, &state.ioapic)
        #expect {
            try vm.vm.restoreState(state)
        } throws: { error in
            "\(error)".contains("KVM_SET_IRQCHIP(picMaster)")
        }
    }
}
