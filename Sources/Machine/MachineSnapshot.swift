import KVM

extension Machine {
    /// Saves the state of every vCPU, the VM and every device. Only while paused: a paused vCPU has
    /// finished its last exit (see `settle`), so what KVM reports is complete.
    ///
    /// Order: the vCPUs (each in the order `KVMVCPU.saveState(_:)` documents), then the VM-wide
    /// state, then the devices, whose state no vCPU can change while they are parked.
    public func saveState() throws -> MachineState {
        try control.whileIn(.paused, to: "save its state") {
            let vcpuStates = try vcpus.map { try $0.saveState(vcpuStateSupport) }
            let vmState = try vm.saveState()
            let deviceStates = try statefulDevices.map { try $0.device.saveDeviceState(id: $0.id) }
            return MachineState(configuration: configuration, vcpus: vcpuStates, vm: vmState, devices: deviceStates)
        }
    }

    /// Writes guest RAM to a memory file (`GuestMemory.saveToFile(_:)`); only while paused.
    @discardableResult
    public func saveMemory(toFile path: String) throws -> MemoryFileSummary {
        try control.whileIn(.paused, to: "save its memory") {
            try memory.saveToFile(path)
        }
    }

    /// Reads guest RAM from a memory file (`GuestMemory.loadFromFile(_:)`); only on a machine made
    /// by `forRestore` that has not been restored yet.
    @discardableResult
    public func loadMemory(fromFile path: String) throws -> MemoryFileSummary {
        try whileAwaitingState(to: "load memory") {
            try memory.loadFromFile(path)
        }
    }

    /// Applies a saved state to a machine made by `forRestore`, before it first runs; afterwards
    /// the machine is `created` and `start()` runs the guest from where it was saved. Load its
    /// RAM first (`loadMemory(fromFile:)`).
    ///
    /// Refuses, before changing anything, a state of another format version, of another vCPU
    /// count or memory size, or whose devices are not this machine's. After a failure while
    /// applying, the machine refuses to start until a restore succeeds.
    ///
    /// Order: devices first (they only take values, and refuse bad ones before KVM is touched);
    /// then each vCPU (in the order `KVMVCPU.restoreState(_:support:)` documents); then the
    /// VM-wide state, interrupt controllers before the clock, as `KVMVirtualMachine.restoreState(_:)`
    /// explains.
    public func restore(_ state: MachineState) throws {
        try MachineState.checkVersion(state.formatVersion)
        try whileAwaitingState(to: "restore a saved state") {
            try checkFits(state)
            for (saved, (id, device)) in zip(state.devices, statefulDevices) {
                precondition(saved.id == id, "checkFits matched the device order")
                try device.restoreDeviceState(saved)
            }
            for (saved, vcpu) in zip(state.vcpus, vcpus) {
                try vcpu.restoreState(saved, support: vcpuStateSupport)
            }
            try vm.restoreState(state.vm)
            awaitingState.withLock { $0 = false }
        }
    }

    /// Refuses a state that does not fit this machine, saying how.
    private func checkFits(_ state: MachineState) throws {
        guard state.configuration.cpus == configuration.cpus, state.vcpus.count == configuration.cpus else {
            throw MachineError("the saved machine has \(state.vcpus.count) vCPUs (configured: \(state.configuration.cpus)); this machine has \(configuration.cpus)")
        }
        guard state.configuration.memorySize == configuration.memorySize else {
            throw MachineError("the saved machine has \(state.configuration.memorySize >> 20) MiB of memory (\(state.configuration.memorySize) bytes); this machine has \(configuration.memorySize >> 20) MiB (\(configuration.memorySize) bytes)")
        }
        for (index, saved) in state.vcpus.enumerated() where saved.id != UInt32(index) {
            throw MachineError("saved vCPU state \(index) belongs to vCPU \(saved.id); states must be in vCPU id order")
        }
        let savedIDs = state.devices.map(\.id)
        let ownIDs = statefulDevices.map(\.id)
        guard savedIDs == ownIDs else {
            throw MachineError("the saved machine's devices are [\(savedIDs.joined(separator: ", "))]; this machine's are [\(ownIDs.joined(separator: ", "))]")
        }
    }

    private func whileAwaitingState<T>(to operation: String, _ body: () throws -> T) throws -> T {
        try control.whileIn(.created, to: operation) {
            guard awaitingState.withLock({ $0 }) else {
                throw MachineError("the VM was not created to receive a saved state (or has received one); cannot \(operation)")
            }
            return try body()
        }
    }
}
