import Foundation

/// A device whose state is saved while the VM is paused and restored before it runs again (Cloud
/// Hypervisor's `Snapshottable`). The machine registers each such device under an id and walks them
/// for `Machine.saveState()` and `Machine.restore(_:)`; a device joins snapshots and migration by
/// conforming and being registered, without changes to the code that saves.
public protocol StatefulDevice: AnyObject, Sendable {
    /// Everything the guest could observe of the device, as a plain value.
    associatedtype SavedState: Codable, Equatable, Sendable

    func saveState() -> SavedState
    /// Replaces the device's state with `state`, refusing a state the device could never be in.
    func restoreState(_ state: SavedState) throws(MachineError)
}

/// One device's saved state inside a `MachineState`: the id the machine registered the device under
/// and the device's `SavedState` as JSON text (keys sorted, so equal states have equal text).
public struct DeviceState: Codable, Equatable, Sendable {
    public var id: String
    public var json: String

    public init(id: String, json: String) {
        self.id = id
        self.json = json
    }
}

extension StatefulDevice {
    /// Saves the device's state as a `DeviceState` under `id`.
    public func saveDeviceState(id: String) throws -> DeviceState {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return DeviceState(id: id, json: String(decoding: try encoder.encode(saveState()), as: UTF8.self))
    }

    /// Restores the device from a `DeviceState` made by `saveDeviceState(id:)`.
    public func restoreDeviceState(_ saved: DeviceState) throws(MachineError) {
        let state: SavedState
        do {
            state = try JSONDecoder().decode(SavedState.self, from: Data(saved.json.utf8))
        } catch {
            throw MachineError(.invalidState, "the saved state of device \(saved.id) does not decode as \(SavedState.self): \(error)")
        }
        try restoreState(state)
    }

    /// Codes the device's current state to JSON and back, discarding both (`Machine.rehearseDeviceStateCoding`).
    func rehearseStateCoding(id: String) {
        guard let saved = try? saveDeviceState(id: id) else { return }
        _ = try? JSONDecoder().decode(SavedState.self, from: Data(saved.json.utf8))
    }
}
