import CKVM
import Foundation
import HostOS
import Machine
import Synchronization

/// Where one VM's serial (or virtio) console goes on this host. A `file` console's descriptor,
/// and a `pty` or `socket` console's link, are owned here and closed when the VM that writes to
/// it is gone.
final class ConsoleOutput: Sendable {
    /// Receives the guest's console bytes. Best effort: a full disk, a closed terminal or a
    /// client that does not read must not stop the guest.
    let write: @Sendable ([UInt8]) -> Void
    /// The console file, for `file` mode.
    private let file: FileDescriptor?
    /// The pseudo-terminal or socket, for `pty` and `socket` modes: it also carries input.
    private let link: ConsoleLink?

    /// - Parameter appending: whether a `file` console keeps what it holds; a VM that arrives by
    ///   migration or restore appends, a booted one starts the file anew.
    /// - Parameter field: names the console in errors (`serial` or `console`).
    init(mode: SerialMode, field: String = "serial", appending: Bool = false) throws(VMMError) {
        switch mode {
        case .off, .null:
            file = nil
            link = nil
            write = { _ in }
        case .tty:
            file = nil
            link = nil
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
            link = nil
            write = { bytes in try? descriptor.writeAll(bytes) }
        case .pty, .socket:
            let made: ConsoleLink
            do {
                made = try ConsoleLink(mode: mode, name: field)
            } catch {
                throw VMMError(.invalidRequest, "\(field): \(error)", cause: error)
            }
            file = nil
            link = made
            write = { bytes in made.send(bytes) }
        }
    }

    /// The pseudo-terminal's path (`/dev/pts/N`) of a `pty` console, as `vm.info` reports it.
    var terminalPath: String? { link?.terminalPath }

    /// Sends what a `pty` or `socket` console's client types to `deliver` (the guest's UART or
    /// virtio console) from now on; nil: discards it.
    func deliverInput(to deliver: (@Sendable ([UInt8]) -> Void)?) {
        link?.deliverInput(to: deliver)
    }
}

/// A console that is also an input: a pseudo-terminal whose other end a client opens
/// (`virsh console`, `screen /dev/pts/N`), or a listening Unix socket that takes one client at a
/// time. One thread per link carries input; output is written by the guest's device without
/// waiting: bytes nobody reads are dropped once the pseudo-terminal's buffer is full, or while no
/// client is connected to the socket.
final class ConsoleLink: Sendable {
    private let shared: Shared
    let terminalPath: String?

    init(mode: SerialMode, name: String) throws(SystemError) {
        let wake = try Wakeup()
        switch mode {
        case .pty:
            let (main, sub, path) = try Self.openPseudoTerminal()
            shared = Shared(kind: .terminal(main: main, sub: sub), wake: wake)
            terminalPath = path
        case let .socket(path):
            // A socket left by an earlier run is replaced, as Cloud Hypervisor does.
            unlink(path)
            shared = Shared(kind: .socket(try ListeningSocket(on: .unix(path: path))), wake: wake)
            terminalPath = nil
        default:
            preconditionFailure("a \(mode) console has no link")
        }
        let shared = self.shared
        startThread(named: "console-\(name)") { shared.carryInput() }
    }

    deinit { shared.stop() }

    func send(_ bytes: [UInt8]) { shared.send(bytes) }

    func deliverInput(to deliver: (@Sendable ([UInt8]) -> Void)?) {
        shared.deliver.withLock { $0 = deliver }
    }

    /// A pseudo-terminal pair in raw mode: the main side (non-blocking, for the VMM) and the
    /// subsidiary side, which the VMM keeps open too so that the main side never reports a hang-up
    /// while no client has the terminal open.
    private static func openPseudoTerminal() throws(SystemError) -> (FileDescriptor, FileDescriptor, String) {
        var name = [CChar](repeating: 0, count: 128)
        let main = FileDescriptor(try systemCall("posix_openpt") { ckvm_open_pty(&name, name.count) })
        let path = String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let sub = FileDescriptor(try systemCall("open(\(path))") { open(path, O_RDWR | O_NOCTTY | O_CLOEXEC) })
        var settings = termios()
        try systemCall("tcgetattr(\(path))") { tcgetattr(sub.rawValue, &settings) }
        cfmakeraw(&settings)
        try systemCall("tcsetattr(\(path))") { tcsetattr(sub.rawValue, TCSANOW, &settings) }
        let flags = fcntl(main.rawValue, F_GETFL)
        try systemCall("fcntl(O_NONBLOCK)") { fcntl(main.rawValue, F_SETFL, flags | O_NONBLOCK) }
        return (main, sub, path)
    }

    /// What the input thread and the guest's device share; it lives until both let go of it.
    private final class Shared: Sendable {
        enum Kind {
            case terminal(main: FileDescriptor, sub: FileDescriptor)
            case socket(ListeningSocket)
        }

        let kind: Kind
        let wake: Wakeup
        let deliver = Mutex<(@Sendable ([UInt8]) -> Void)?>(nil)
        /// The socket console's client, if one is connected.
        let client = Mutex<FileDescriptor?>(nil)

        init(kind: Kind, wake: Wakeup) {
            self.kind = kind
            self.wake = wake
        }

        func send(_ bytes: [UInt8]) {
            switch kind {
            case let .terminal(main, _):
                // Non-blocking: what does not fit the terminal's buffer now is dropped.
                _ = bytes.withUnsafeBytes { Glibc.write(main.rawValue, $0.baseAddress, $0.count) }
            case .socket:
                client.withLock { client in
                    guard let connection = client else { return }
                    let sent = bytes.withUnsafeBytes {
                        Glibc.send(connection.rawValue, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT | MSG_NOSIGNAL))
                    }
                    if sent < 0, errno != EAGAIN, errno != EINTR { client = nil }
                }
            }
        }

        func stop() { wake.signal() }

        /// The input thread: until `stop()`, reads what the client types and delivers it.
        func carryInput() {
            var buffer = [UInt8](repeating: 0, count: 256)
            while true {
                let input: Int32
                var listener: ListeningSocket?
                switch kind {
                case let .terminal(main, _): input = main.rawValue
                case let .socket(socket):
                    listener = socket
                    input = client.withLock { $0?.rawValue } ?? -1
                }
                var watched = [wake.readEnd.rawValue]
                if let listener { watched.append(listener.rawDescriptor) }
                if input >= 0 { watched.append(input) }
                guard let ready = try? Poll.readable(watched, timeout: nil) else { return }
                if ready.contains(0) { return }
                if let listener, ready.contains(1),
                   let accepted = try? listener.accept(until: .now + .milliseconds(100)) {
                    // One client at a time: a new one takes over from the last.
                    client.withLock { $0 = accepted }
                    continue
                }
                guard input >= 0, ready.contains(watched.count - 1) else { continue }
                let count = buffer.withUnsafeMutableBytes { Glibc.read(input, $0.baseAddress, $0.count) }
                if count > 0 {
                    let bytes = Array(buffer[0..<count])
                    deliver.withLock { $0 }?(bytes)
                } else if count == 0 || (errno != EAGAIN && errno != EINTR) {
                    if case .socket = kind {
                        client.withLock { if $0?.rawValue == input { $0 = nil } }
                    } else {
                        Poll.sleep(for: .milliseconds(50))  // a terminal error: do not spin
                    }
                }
            }
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
            startThread(named: "console-input") { [self] in readKeystrokes() }
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
