import Synchronization

/// The i8042 keyboard controller, as much of it as a guest needs to reset the machine: writing the
/// "pulse reset line" command 0xFE to the command port ends the VM (how Linux's `reboot=k` and the
/// test guest power off; Firecracker behaves the same way). No keyboard is attached.
public final class I8042: PortIODevice, StatefulDevice {
    /// Data port 0x60 and command/status port 0x64.
    public static let ports: ClosedRange<UInt16> = 0x60...0x64
    static let commandOffset: UInt16 = 4
    static let resetCommand: UInt8 = 0xFE
    /// Command 0x20 reads the controller configuration byte; answer "keyboard interface disabled".
    static let readConfigurationCommand: UInt8 = 0x20
    static let statusOutputBufferFull: UInt8 = 1 << 0

    /// The controller's state: the byte waiting in its output buffer, if any.
    public struct SavedState: Codable, Equatable, Sendable {
        public var pendingOutput: UInt8?

        public init(pendingOutput: UInt8? = nil) {
            self.pendingOutput = pendingOutput
        }
    }

    private let onReset: @Sendable () -> Void
    private let pendingOutput = Mutex<UInt8?>(nil)

    public init(onReset: @escaping @Sendable () -> Void) {
        self.onReset = onReset
    }

    public func read(offset: UInt16, size: Int) -> [UInt8] {
        let byte: UInt8 = pendingOutput.withLock { pending in
            if offset == Self.commandOffset { return pending == nil ? 0 : Self.statusOutputBufferFull }
            if offset == 0 { defer { pending = nil }; return pending ?? 0 }
            return 0xFF
        }
        return [UInt8](repeating: byte, count: max(size, 1))
    }

    public func write(offset: UInt16, data: [UInt8]) {
        guard offset == Self.commandOffset, let command = data.first else { return }
        switch command {
        case Self.resetCommand:
            onReset()
        case Self.readConfigurationCommand:
            pendingOutput.withLock { $0 = 0x10 }
        default:
            break
        }
    }

    public func saveState() -> SavedState {
        SavedState(pendingOutput: pendingOutput.withLock { $0 })
    }

    public func restoreState(_ state: SavedState) throws(MachineError) {
        pendingOutput.withLock { $0 = state.pendingOutput }
    }
}
