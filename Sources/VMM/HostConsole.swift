import Foundation
import Machine

/// The host side of the guest's serial console: where its output goes and where its input comes from.
final class HostConsole: Sendable {
    /// Receives the guest's console bytes; nil when the UART is off.
    let output: (@Sendable ([UInt8]) -> Void)?
    private let descriptor: Int32?
    private let readsTerminal: Bool
    private let savedTerminal: termios?

    /// - Parameter truncating: whether a `file` console starts empty; a VM that arrives by
    ///   migration appends to it instead, since its source may have written there.
    init(mode: SerialMode, truncating: Bool = true) throws {
        switch mode {
        case .off:
            output = nil
            descriptor = nil
        case .null:
            output = { _ in }
            descriptor = nil
        case .tty:
            descriptor = STDOUT_FILENO
            output = { bytes in HostConsole.writeAll(STDOUT_FILENO, bytes) }
        case let .file(path):
            let fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC | (truncating ? O_TRUNC : O_APPEND), 0o644)
            guard fd >= 0 else {
                throw ConfigurationError(flag: "--serial", "cannot open \(path): \(String(cString: strerror(errno)))")
            }
            descriptor = fd
            output = { bytes in HostConsole.writeAll(fd, bytes) }
        }
        readsTerminal = mode == .tty && isatty(STDIN_FILENO) == 1
        if readsTerminal {
            var settings = termios()
            tcgetattr(STDIN_FILENO, &settings)
            savedTerminal = settings
        } else {
            savedTerminal = nil
        }
    }

    /// Starts forwarding the terminal's keystrokes to the guest, in raw mode, when stdin is a terminal.
    func forwardInput(to machine: Machine) {
        guard readsTerminal, var raw = savedTerminal else { return }
        cfmakeraw(&raw)
        raw.c_oflag = savedTerminal?.c_oflag ?? raw.c_oflag  // keep output post-processing (\n → \r\n)
        tcsetattr(STDIN_FILENO, TCSANOW, &raw)
        let thread = Thread {
            var buffer = [UInt8](repeating: 0, count: 64)
            while true {
                let count = buffer.withUnsafeMutableBytes { read(STDIN_FILENO, $0.baseAddress, $0.count) }
                if count <= 0 { return }
                machine.sendConsoleInput(Array(buffer[0..<count]))
            }
        }
        thread.name = "console-input"
        thread.start()
    }

    /// Puts the terminal back as it was.
    func restore() {
        guard var settings = savedTerminal else { return }
        tcsetattr(STDIN_FILENO, TCSANOW, &settings)
    }

    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) {
        var offset = 0
        while offset < bytes.count {
            let written = bytes[offset...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            if written < 0 {
                if errno == EINTR { continue }
                return
            }
            offset += written
        }
    }
}
