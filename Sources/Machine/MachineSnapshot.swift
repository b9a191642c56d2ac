import HostOS
import KVM

extension Machine {
    /// Saves the state of every vCPU, the platform and every device. Only while paused (a paused
    /// vCPU has finished its last exit, see `settle`, so what KVM reports is complete) or ready
    /// (no vCPU has run since it was booted or restored).
    ///
    /// Order: the vCPUs (each in the order `KVMVCPU.saveState(_:)` documents), then the platform
    /// state, then the devices, whose state no vCPU can change while they are parked.
    public func saveState() throws(MachineError) -> MachineState {
        try control.whileIn(.paused, .ready, to: "save its state") { _ throws(MachineError) in
            do {
                let vcpuStates = try vcpus.map { try $0.saveState(vcpuStateSupport) }
                let platform = try vm.saveState()
                let deviceStates = try statefulDevices.map { try $0.device.saveDeviceState(id: $0.id) }
                return MachineState(configuration: configuration, vcpus: vcpuStates, platform: platform, devices: deviceStates)
            } catch {
                throw MachineError.host("saving the machine state", error)
            }
        }
    }

    /// Writes guest RAM to a memory file (`GuestMemory.saveToFile(_:)`); only while paused or ready.
    @discardableResult
    public func saveMemory(toFile path: String) throws(MachineError) -> MemoryFileSummary {
        try control.whileIn(.paused, .ready, to: "save its memory") { _ throws(MachineError) in
            try memory.saveToFile(path)
        }
    }

    /// Reads guest RAM from a memory file (`GuestMemory.loadFromFile(_:)`); only on a machine made
    /// by `forRestore` that has not been restored yet.
    @discardableResult
    public func loadMemory(fromFile path: String) throws(MachineError) -> MemoryFileSummary {
        try control.whileIn(.awaitingState, to: "load memory") { _ throws(MachineError) in
            try memory.loadFromFile(path)
        }
    }

    /// Applies a saved state to a machine made by `forRestore`, before it first runs; afterwards
    /// the machine is `ready` and `start()` runs the guest from where it was saved. Load its RAM
    /// first (`loadMemory(fromFile:)`).
    ///
    /// Refuses (`invalidState`), before changing anything, a state of another format version, of
    /// another vCPU count or memory size, or whose devices are not this machine's. A state that
    /// KVM refuses while it is applied is `invalidState` when the state itself is malformed and
    /// `hostFailure` when the ioctl failed; either way the machine stays `awaitingState` and
    /// refuses to start until a restore succeeds.
    ///
    /// Order: devices first (they only take values, and refuse bad ones before KVM is touched);
    /// then each vCPU (in the order `KVMVCPU.restoreState(_:support:)` documents); then the
    /// platform state, interrupt controllers before the clock, as
    /// `KVMVirtualMachine.restoreState(_:)` explains.
    public func restore(_ state: MachineState) throws(MachineError) {
        try MachineState.checkVersion(state.formatVersion)
        try control.whileIn(.awaitingState, to: "restore a saved state") { phase throws(MachineError) in
            try checkFits(state)
            for (saved, (_, device)) in zip(state.devices, statefulDevices) {
                try device.restoreDeviceState(saved)
            }
            do {
                for (saved, vcpu) in zip(state.vcpus, vcpus) {
                    try vcpu.restoreState(saved, support: vcpuStateSupport)
                }
                try vm.restoreState(state.platform)
            } catch let error as SystemError where error.errno == 0 {
                throw MachineError(.invalidState, "the saved state does not fit: \(error)", cause: error)
            } catch {
                throw MachineError.host("restoring the machine state", error)
            }
            phase = .ready
        }
    }

    /// Refuses a state that does not fit this machine, saying how.
    private func checkFits(_ state: MachineState) throws(MachineError) {
        guard state.configuration.cpus == configuration.cpus, state.vcpus.count == configuration.cpus else {
            throw MachineError(.invalidState, "the saved machine has \(state.vcpus.count) vCPUs (configured: \(state.configuration.cpus)); this machine has \(configuration.cpus)")
        }
        guard state.configuration.memorySize == configuration.memorySize else {
            throw MachineError(.invalidState, "the saved machine has \(state.configuration.memorySize >> 20) MiB of memory (\(state.configuration.memorySize) bytes); this machine has \(configuration.memorySize >> 20) MiB (\(configuration.memorySize) bytes)")
        }
        guard state.configuration.serialPort == configuration.serialPort else {
            throw MachineError(.invalidState, "the saved machine \(state.configuration.serialPort ? "has" : "has no") serial port; this machine \(configuration.serialPort ? "has" : "has none")")
        }
        for (index, saved) in state.vcpus.enumerated() where saved.id != UInt32(index) {
            throw MachineError(.invalidState, "saved vCPU state \(index) belongs to vCPU \(saved.id); states must be in vCPU id order")
        }
        let savedIDs = state.devices.map(\.id)
        let ownIDs = statefulDevices.map(\.id)
        guard savedIDs == ownIDs else {
            throw MachineError(.invalidState, "the saved machine's devices are [\(savedIDs.joined(separator: ", "))]; this machine's are [\(ownIDs.joined(separator: ", "))]")
        }
    }
}
