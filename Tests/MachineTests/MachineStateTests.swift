import FerryTestSupport
import Foundation
import KVM
import Testing
@testable import Machine

/// A machine state built by hand: what `Machine.saveState()` produces, without needing KVM.
func sampleMachineState(cpus: Int = 2, memorySize: UInt64 = 64 << 20) -> MachineState {
    let configuration = MachineConfiguration(cpus: cpus, memorySize: memorySize, kernel: "/nonexistent/kernel",
                                             commandLine: "console=ttyS0")
    let vcpus = (0..<cpus).map { index in
        var registers = Registers()
        registers.rip = 0x10_0000 + UInt64(index)
        registers.rax = 0xFFFF_FFFF_FFFF_FFFF
        var special = SpecialRegisters()
        special.cr0 = 0x8000_0011
        special.interruptBitmap = [1, 0, 0, 1 << 63]
        return VCPUState(id: UInt32(index), cpuid: [CPUIDEntry(function: 1, eax: 0x806F8, ebx: UInt32(index) << 24)],
                         mpState: 0, registers: registers, specialRegisters: special,
                         floatingPoint: .xsave([UInt8](repeating: 0x7F, count: 4096)),
                         extendedControlRegisters: [UInt8](repeating: 1, count: 392),
                         debugRegisters: [UInt8](repeating: 0, count: 128),
                         localAPIC: [UInt8](repeating: 0xAB, count: 1024),
                         msrs: [MSREntry(index: 0x10, data: 123_456_789), MSREntry(index: 0xC000_0082, data: .max)],
                         events: [UInt8](repeating: 0, count: 64), tscKHz: 2_445_404)
    }
    let vm = PlatformState(picMaster: [UInt8](repeating: 0, count: 520), picSlave: [UInt8](repeating: 1, count: 520),
                     ioapic: [UInt8](repeating: 2, count: 520), pit: [UInt8](repeating: 3, count: 112),
                     clock: 987_654_321)
    return MachineState(configuration: configuration, vcpus: vcpus, platform: vm, devices: [
        try! Serial8250(output: { _ in }, setInterrupt: { _ in }).saveDeviceState(id: Machine.DeviceID.serial),
        try! I8042(onReset: {}).saveDeviceState(id: Machine.DeviceID.i8042),
    ])
}

@Suite struct MachineStateTests {
    @Test func machineStateSurvivesJSON() throws {
        let state = sampleMachineState()
        let data = try JSONEncoder().encode(state)
        #expect(try JSONDecoder().decode(MachineState.self, from: data) == state)
    }

    @Test(arguments: [0, MachineState.currentFormatVersion - 1, MachineState.currentFormatVersion + 1, 99])
    func anotherFormatVersionIsRefusedWhenDecodingNamingBothVersions(version: Int) throws {
        var state = sampleMachineState()
        state.formatVersion = version
        let data = try JSONEncoder().encode(state)
        #expect {
            _ = try JSONDecoder().decode(MachineState.self, from: data)
        } throws: { error in
            let text = "\(error)"
            return text.contains("format version \(version)") && text.contains("reads version \(MachineState.currentFormatVersion)")
        }
    }

    @Test func anotherFormatVersionIsRefusedBeforeTheRestOfTheStateIsRead() throws {
        // A future format may change any field; the version must be what the error is about.
        let json = #"{"formatVersion": 99, "vcpus": "a shape this Ferry does not know"}"#
        #expect {
            _ = try JSONDecoder().decode(MachineState.self, from: Data(json.utf8))
        } throws: { error in
            error is MachineError && "\(error)".contains("format version 99")
        }
    }
}

/// Machines made to receive a state, which need /dev/kvm.
@Suite(.enabled(if: KVMSystem.isAvailable, kvmMissing))
struct MachineRestoreRefusalTests {
    func receivingMachine(cpus: Int = 2, memorySize: UInt64 = 64 << 20) throws -> Machine {
        try Machine.forRestore(configuration: MachineConfiguration(cpus: cpus, memorySize: memorySize, kernel: "/nonexistent/kernel"),
                               serialOutput: { _ in }, onStop: { _, _ in })
    }

    @Test func stateOfAnotherVersionIsRefused() throws {
        var state = sampleMachineState()
        state.formatVersion = 7
        let machine = try receivingMachine()
        #expect { try machine.restore(state) } throws: { "\($0)".contains("format version 7") }
    }

    @Test func stateWithAnotherVCPUCountIsRefusedNamingBothCounts() throws {
        let machine = try receivingMachine(cpus: 1)
        #expect {
            try machine.restore(sampleMachineState(cpus: 2))
        } throws: { error in
            "\(error)".contains("has 2 vCPUs") && "\(error)".contains("this machine has 1")
        }
        #expect(throws: MachineError.self, "a refused restore leaves the machine unable to start") { try machine.start() }
    }

    @Test func stateWithAnotherMemorySizeIsRefusedNamingBothSizes() throws {
        let machine = try receivingMachine(memorySize: 128 << 20)
        #expect {
            try machine.restore(sampleMachineState(memorySize: 64 << 20))
        } throws: { error in
            "\(error)".contains("64 MiB") && "\(error)".contains("this machine has 128 MiB")
        }
    }

    @Test func stateWithOtherDevicesIsRefused() throws {
        var state = sampleMachineState()
        state.devices.removeLast()
        let machine = try receivingMachine()
        #expect { try machine.restore(state) } throws: { "\($0)".contains("devices") }
    }

    @Test func machineThatBootsAKernelRefusesAState() throws {
        let guest = try TestGuest.path.get()
        let machine = try Machine.forBoot(configuration: MachineConfiguration(cpus: 1, memorySize: 64 << 20, kernel: guest),
                                          serialOutput: { _ in }, onStop: { _, _ in })
        #expect { try machine.restore(sampleMachineState(cpus: 1)) } throws: {
            "\($0)".contains("the VM is ready; it must be awaiting a saved state to restore a saved state")
        }
    }

    @Test func savingIsRefusedUnlessPausedNamingTheState() throws {
        let machine = try receivingMachine()
        #expect { _ = try machine.saveState() } throws: { "\($0)".contains("the VM is awaiting a saved state; it must be paused or ready to save its state") }
        #expect(throws: MachineError.self) { try machine.saveMemory(toFile: "/nonexistent/memory") }
    }
}
