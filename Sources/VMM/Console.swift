import Foundation
import HostOS
import Machine
import Synchronization

/// Where one VM's serial console output goes on this host. A `file` console's descriptor is owned
/// here and closed when the VM that writes to it is gone.
final class ConsoleOutput: Sendable {
    /// Receives the guest's console bytes. Best effort: a full disk or a closed terminal must not
    /// stop the guest.
    let write: @Sendable ([UInt8]) -> Void
    /// The console file, for `file` mode.
    private let file: FileDescriptor?

    /// - Parameter appending: whether a `file` console keeps what it holds; a VM that arrives by
    ///   migration or restore appends, a booted one starts the file anew.
    /// - Parameter field: names the console in errors (`serial` or `console`).
    init(mode: SerialMode, field: String = "serial", appending: Bool = false) throws(VMMError) {
        switch mode {
        case .off, .null:
            file = nil
            write = { _ in }
        case .tty:
            file = nil
            write = { bytes in try? writeAll(STDOUT_FILENO, bytes) }
        case let .file(path):
            let flags = O_WRONLY | O_CREAT | O_CLOEXEC | (appending ? O_APPEND : O_TRUNC)
            let descriptor: FileDescriptor
            do {
                descriptor = FileDescriptor(try systemCall("open(\(path))") { open(path, flags, 0o644) })
            } catch {
                throw VMMError(.invalidRequest, "\(field): cannot open \(path): \(errnoDescription(error.errno))", cause: error)
            }
            file = descriptor
            write = { bytes in try? descriptor.writeAll(bytes) }
        }
    }
}

/// The VMM's terminal: when standard input is a terminal, its keystrokes go, in raw mode, to the
/// guest whose console is `tty` — whichever VM that is now. One per VMM process; one thread reads
/// the terminal for the process's lifetime, and holds no VM once it is detached.
final class TerminalInput: Sendable {
    private struct State {
        var target: Machine?
        /// Whether keystrokes go to the virtio console rather than the UART.
        var toVirtioConsole = false
        var readerStarted = false
    }

    private let state = Mutex(State())
    /// The terminal's settings before raw mode; nil when standard input is not a terminal.
    private let savedSettings: termios?

    init() {
        guard isatty(STDIN_FILENO) == 1 else {
            savedSettings = nil
            return
        }
        var settings = termios()
        tcgetattr(STDIN_FILENO, &settings)
        savedSettings = settings
    }

    /// Sends the terminal's keystrokes to `machine`'s UART (or virtio console) from now on, in raw mode.
    func attach(_ machine: Machine, virtioConsole: Bool = false) {
        guard var raw = savedSettings else { return }
        let startReader = state.withLock { state in
            state.target = machine
            state.toVirtioConsole = virtioConsole
            defer { state.readerStarted = true }
            return !state.readerStarted
        }
        cfmakeraw(&raw)
        raw.c_oflag = savedSettings?.c_oflag ?? raw.c_oflag  // keep output post-processing (\n → \r\n)
        tcsetattr(STDIN_FILENO, TCSANOW, &raw)
        if startReader {
            let thread = Thread { [self] in readKeystrokes() }
            thread.name = "console-input"
            thread.start()
        }
    }

    /// Stops forwarding keystrokes and puts the terminal back as it was.
    func detach() {
        guard var settings = savedSettings else { return }
        state.withLock { $0.target = nil }
        tcsetattr(STDIN_FILENO, TCSANOW, &settings)
    }

    private func readKeystrokes() {
        var buffer = [UInt8](repeating: 0, count: 64)
        while true {
            let count = buffer.withUnsafeMutableBytes { bytes in
                (try? systemCall("read") { read(STDIN_FILENO, bytes.baseAddress, bytes.count) }) ?? 0
            }
            if count <= 0 { return }
            let keys = Array(buffer[0..<count])
            let (target, virtio) = state.withLock { ($0.target, $0.toVirtioConsole) }
            if virtio { target?.sendVirtioConsoleInput(keys) } else { target?.sendConsoleInput(keys) }
        }
    }
}
