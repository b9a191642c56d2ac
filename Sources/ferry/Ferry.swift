import API
import ArgumentParser
import Dispatch
import Events
import Foundation
import HostOS
import Logging
import Machine
import VMM

/// `ferry`: the VMM process. One VM per process; flags spelled as Cloud Hypervisor spells them.
/// The entry point: parses (and checks) the command line on the main thread while it is the
/// process's only thread — `--landlock` confines the process there (docs/security.md) — and only
/// then starts Swift's concurrency to run the VMM.
@main
enum Main {
    static func main() {
        let command: Ferry
        do {
            guard let parsed = try Ferry.parseAsRoot() as? Ferry else { Ferry.exit() }
            command = parsed
        } catch {
            Ferry.exit(withError: error)
        }
        Task {
            var command = command
            do {
                try await command.run()
                Ferry.exit()
            } catch {
                Ferry.exit(withError: error)
            }
        }
        dispatchMain()
    }
}

struct Ferry: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ferry",
        abstract: "A KVM virtual machine monitor built around live migration that management software can watch.",
        discussion: """
            Runs one VM. With --kernel the VM is created and booted at once; with only \
            --api-socket the VMM waits for vm.create and vm.boot over its REST API.

            Without --api-socket, the process ends with its VM: when the guest powers off (exit \
            status 0), on SIGTERM or SIGINT (the VM is stopped, exit status 0), or when the VM \
            fails (exit status 1, with the reason on standard error). With --api-socket the VMM \
            outlives its guest and ends on vmm.shutdown, SIGTERM or SIGINT.

            Example:
              ferry --kernel vmlinux --initramfs initrd.img --cmdline "console=ttyS0" \\
                    --cpus boot=2 --memory size=1G --serial tty --event-monitor path=/tmp/vm1.events
            """
    )

    @Flag(name: [.customShort("V"), .customLong("version")],
          help: "Print the version, in Cloud Hypervisor's form (the Cloud Hypervisor release whose API Ferry serves, then Ferry's own), and exit.")
    var showVersion = false

    @Option(name: .customLong("api-socket"),
            help: ArgumentHelp("Serve the REST API on a Unix socket: path=PATH (or just PATH), or fd=N for an inherited listening socket.", valueName: "path=PATH|fd=N"))
    var apiSocket: String?

    @Option(help: ArgumentHelp("Kernel to boot: an x86-64 ELF with a PVH note (vmlinux) or a bzImage. Required without --api-socket.", valueName: "path"))
    var kernel: String?

    @Option(help: ArgumentHelp("Initramfs to hand the kernel.", valueName: "path"))
    var initramfs: String?

    @Option(help: ArgumentHelp("Kernel command line.", valueName: "string"))
    var cmdline: String = VMConfiguration.defaultCommandLine

    @Option(help: ArgumentHelp("Number of vCPUs: boot=N (1 to \(MachineConfiguration.maximumCPUs)).", valueName: "boot=N"))
    var cpus: String = "boot=1"

    @Option(help: ArgumentHelp("Guest memory: size=SIZE with K, M, G or T suffix (at least 64M); shared=on backs it with a memory file (for local migration).", valueName: "size=SIZE[,shared=on]"))
    var memory: String = "size=512M"

    @Option(help: ArgumentHelp("Guest serial console (COM1): off, null, pty, tty (standard output), file=PATH or socket=PATH.", valueName: "mode"))
    var serial: String = "null"

    @Option(help: ArgumentHelp("virtio console: off (no device), null, pty, tty (standard output) or file=PATH. Default: tty, or off when --serial is tty.", valueName: "mode"))
    var console: String?

    @Option(parsing: .singleValue,
            help: ArgumentHelp("A virtio-blk disk on a raw image (repeatable): path=FILE[,readonly=on][,id=ID][,direct=on].",
                               valueName: "path=FILE,..."))
    var disk: [String] = []

    @Option(parsing: .singleValue,
            help: ArgumentHelp("A virtio-net card on a tap (repeatable): tap=NAME|fd=N[,mac=MAC][,ip=IP,mask=MASK][,id=ID][,queue_size=N][,offload_tso|offload_ufo|offload_csum=off]. The tap is created if it does not exist.",
                               valueName: "tap=NAME,..."))
    var net: [String] = []

    @Option(help: ArgumentHelp("A virtio-rng device reading src=PATH (e.g. /dev/urandom).", valueName: "src=PATH"))
    var rng: String?

    @Option(name: .customLong("event-monitor"),
            help: ArgumentHelp("Write lifecycle events (Cloud Hypervisor's format) to path=PATH (file or FIFO) or fd=N.", valueName: "path=PATH|fd=N"))
    var eventMonitor: String?

    @Option(name: .customLong("log-level"), help: "Log level: trace, debug, info, warning, error.")
    var logLevel: Logger.Level = .warning

    @Flag(name: .customShort("v"), help: "More log output, as Cloud Hypervisor's -v: info, then debug (-vv), then trace (-vvv).")
    var verbosity: Int

    @Option(name: .customLong("log-file"), help: ArgumentHelp("Write the log to this file instead of standard error.", valueName: "path"))
    var logFile: String?

    @Option(help: ArgumentHelp("System-call filters, as Cloud Hypervisor's: true (a forbidden call ends the process, naming it), log (allowed and logged by the kernel) or false. See docs/security.md.", valueName: "true|false|log"))
    var seccomp: String = "true"

    @Flag(help: "Landlock, as Cloud Hypervisor's: from start the process may open only the paths its configuration names and those of --landlock-rules. Refused where the kernel lacks Landlock. See docs/security.md.")
    var landlock = false

    @Option(name: .customLong("landlock-rules"), parsing: .singleValue,
            help: ArgumentHelp("A path the process may still open with --landlock (repeatable): path=PATH,access=r|rw (rw: also create, remove and rename beneath a directory).",
                               valueName: "path=PATH,access=r|rw"))
    var landlockRules: [String] = []

    /// Parsed in `validate()` so that a bad value fails before anything starts.
    private var parsed: (vm: VMConfiguration?, events: EventSinkTarget?, socket: APIServer.Socket?)?

    enum CodingKeys: String, CodingKey {
        case showVersion, apiSocket, kernel, initramfs, cmdline, cpus, memory, serial, console, disk, net, rng, eventMonitor
        case logLevel, verbosity, logFile, seccomp, landlock, landlockRules
    }

    /// What `--version` prints: Cloud Hypervisor's `cloud-hypervisor vX.Y.Z` (which clients such as
    /// libvirt parse, up to the first `-`), then Ferry's own version.
    static var versionLine: String {
        "cloud-hypervisor \(VirtualMachineMonitor.buildVersion)"
    }

    mutating func validate() throws {
        if showVersion { throw CleanExit.message(Self.versionLine) }
        do {
            guard Seccomp.Mode(rawValue: seccomp) != nil else {
                throw ConfigurationError(flag: "--seccomp", "'\(seccomp)' is not a setting; use true, false or log")
            }
            let cpuCount = try VMConfiguration.parseCPUs(cpus)
            let (memorySize, sharedMemory) = try VMConfiguration.parseMemory(memory)
            let serialMode = try SerialMode(parsing: serial)
            // Cloud Hypervisor's default is a tty console; one terminal cannot be both.
            let consoleMode = try console.map { try SerialMode(parsing: $0, flag: "--console") } ?? (serialMode == .tty ? .off : .tty)
            if serialMode == .tty, consoleMode == .tty {
                throw ConfigurationError(flag: "--console", "--serial is tty already; only one of them can be tty")
            }
            let disks = try disk.enumerated().map { (index, text) throws(ConfigurationError) in
                try DiskConfiguration(parsing: text, index: index)
            }
            let networks = try net.enumerated().map { (index, text) throws(ConfigurationError) in
                try NetworkConfiguration(parsing: text, index: index)
            }
            let entropySource = try rng.map(parseEntropySource)
            let sink = try eventMonitor.map(VMConfiguration.parseEventMonitor)
            let socket = try apiSocket.map(Self.parseAPISocket)
            let extraRules = try landlockRules.map(Self.parseLandlockRule)
            if !landlock, !extraRules.isEmpty {
                throw ConfigurationError(flag: "--landlock-rules", "only with --landlock")
            }
            guard let kernel else {
                guard socket != nil else {
                    throw ConfigurationError(flag: "--kernel", "required unless --api-socket is given")
                }
                parsed = (nil, sink, socket)
                if landlock { try confine(vm: nil, sink: sink, socket: socket, extraRules: extraRules) }
                return
            }
            guard FileManager.default.isReadableFile(atPath: kernel) else {
                throw ConfigurationError(flag: "--kernel", "\(kernel) does not exist or is not readable")
            }
            if let initramfs, !FileManager.default.isReadableFile(atPath: initramfs) {
                throw ConfigurationError(flag: "--initramfs", "\(initramfs) does not exist or is not readable")
            }
            let machine = MachineConfiguration(cpus: cpuCount, memorySize: memorySize, kernel: kernel,
                                               initramfs: initramfs, commandLine: cmdline, disks: disks,
                                               networks: networks, entropySource: entropySource, sharedMemory: sharedMemory)
            do {
                try machine.validate()
            } catch {
                let flag = ["disk": "--disk", "net": "--net", "rng": "--rng", "cpus": "--cpus", "memory": "--memory"]
                    .first { error.message.hasPrefix($0.key) }?.value ?? "--kernel"
                throw ConfigurationError(flag: flag, error.message)
            }
            let vm = VMConfiguration(machine: machine, serial: serialMode, console: consoleMode)
            parsed = (vm, sink, socket)
            if landlock { try confine(vm: vm, sink: sink, socket: socket, extraRules: extraRules) }
        } catch let error as ConfigurationError {
            throw ValidationError(error.description)
        }
    }

    /// `--landlock-rules path=PATH,access=r|rw`, Cloud Hypervisor's spelling.
    static func parseLandlockRule(_ text: String) throws(ConfigurationError) -> Landlock.Rule {
        let options = try OptionList(parsing: text, flag: "--landlock-rules", allowedKeys: ["path", "access"])
        guard options.words.isEmpty, let path = options["path"], !path.isEmpty, let access = options["access"],
              ["r", "rw"].contains(access) else {
            throw ConfigurationError(flag: "--landlock-rules", "write path=PATH,access=r or access=rw, e.g. path=/var/lib/ferry/snapshots,access=rw")
        }
        return Landlock.Rule(path, write: access == "rw")
    }

    /// Confines the process with Landlock to what this configuration opens, now, while it is the
    /// only thread (docs/security.md): `vm`'s files, the API socket's and event file's
    /// directories, the log file, the devices a VM needs, what the runtime reads, and `extraRules`.
    func confine(vm: VMConfiguration?, sink: EventSinkTarget?, socket: APIServer.Socket?, extraRules: [Landlock.Rule]) throws(ConfigurationError) {
        var rules = Self.runtimeRules + extraRules
        /// The directory `path` is in.
        func directory(of path: String) -> String {
            let parent = (path as NSString).deletingLastPathComponent
            return parent.isEmpty ? "." : parent
        }
        /// A file that may not exist yet (it is created at start): its directory.
        func created(_ path: String) -> Landlock.Rule {
            FileManager.default.fileExists(atPath: path) ? Landlock.Rule(path, write: true) : Landlock.Rule(directory(of: path), write: true)
        }
        switch socket {
        case .path(let path)?: rules.append(Landlock.Rule(directory(of: path), write: true))
        // The server listens privately in the temporary directory and relays the inherited socket.
        case .fileDescriptor?: rules.append(Landlock.Rule(NSTemporaryDirectory(), write: true))
        case nil: break
        }
        if case .path(let path)? = sink { rules.append(created(path)) }
        if let logFile { rules.append(created(logFile)) }
        if let vm {
            let machine = vm.machine
            rules.append(Landlock.Rule(machine.kernel, write: false))
            if let initramfs = machine.initramfs { rules.append(Landlock.Rule(initramfs, write: false)) }
            rules += machine.disks.map { Landlock.Rule($0.path, write: !$0.readOnly) }
            if let source = machine.entropySource { rules.append(Landlock.Rule(source, write: false)) }
            for mode in [vm.serial, vm.console] {
                switch mode {
                case .file(let path): rules.append(created(path))
                case .socket(let path): rules.append(Landlock.Rule(directory(of: path), write: true))
                default: break
                }
            }
        }
        // The API server moves its socket into place from a staging directory: a rename across
        // directories, which Landlock allows from ABI 2 (Linux 5.19) on.
        if let abi = Landlock.abi, abi < 2 {
            throw ConfigurationError(flag: "--landlock", "this kernel's Landlock (ABI \(abi)) forbids moving files between directories, which the API socket needs; Linux 5.19 or later")
        }
        do {
            try Landlock.restrictProcess(to: rules)
        } catch {
            throw ConfigurationError(flag: "--landlock", error.description)
        }
    }

    /// What any Ferry process opens after start: KVM, taps, terminals and entropy; its own /proc and
    /// /sys entries; and what OpenSSL and name lookups read (their configuration, the libraries
    /// glibc loads for them).
    static let runtimeRules = [
        Landlock.Rule("/dev/kvm", write: true), Landlock.Rule("/dev/net/tun", write: true), Landlock.Rule("/dev/null", write: true),
        Landlock.Rule("/dev/urandom", write: false), Landlock.Rule("/dev/ptmx", write: true), Landlock.Rule("/dev/pts", write: true),
        Landlock.Rule("/proc", write: false), Landlock.Rule("/sys/devices/system/cpu", write: false),
        Landlock.Rule("/etc/hosts", write: false), Landlock.Rule("/etc/resolv.conf", write: false),
        Landlock.Rule("/etc/nsswitch.conf", write: false), Landlock.Rule("/etc/localtime", write: false),
        Landlock.Rule("/usr/share/zoneinfo", write: false), Landlock.Rule("/usr/lib/ssl", write: false),
        Landlock.Rule("/etc/ssl", write: false), Landlock.Rule("/usr/lib", write: false),
    ].filter { FileManager.default.fileExists(atPath: $0.path) }

    static let seccompSummary = [
        "true": "every thread is held to its system-call list; a forbidden call ends the process, naming it",
        "log": "forbidden system calls are allowed and logged by the kernel",
        "false": "no system-call filter",
    ]

    /// `--api-socket path=PATH`, `fd=N` or a bare path, as Cloud Hypervisor accepts.
    static func parseAPISocket(_ text: String) throws -> APIServer.Socket {
        let options = try OptionList(parsing: text, flag: "--api-socket", allowedKeys: ["path", "fd"])
        if options.words.isEmpty, options["fd"] == nil, let path = options["path"], !path.isEmpty { return .path(path) }
        if options.words.isEmpty, options["path"] == nil, let fd = options["fd"] {
            guard let descriptor = Int32(fd), descriptor > 2, fcntl(descriptor, F_GETFD) >= 0 else {
                throw ConfigurationError(flag: "--api-socket", "fd=\(fd) is not an open descriptor above 2")
            }
            return .fileDescriptor(descriptor)
        }
        if options.words.count == 1, options.values.isEmpty, let path = options.words.first,
           path.hasPrefix("/") || path.hasPrefix(".") {
            return .path(path)
        }
        throw ConfigurationError(flag: "--api-socket", "write path=PATH or fd=N, e.g. --api-socket path=/run/ferry/vm1.sock")
    }

    func run() async throws {
        guard let parsed else { throw ValidationError("arguments were not validated") }
        let level = [Logger.Level.info, .debug, .trace].prefix(verbosity).last.map { min($0, logLevel) } ?? logLevel
        try Self.bootstrapLogging(file: logFile)
        let logger = { var logger = Logger(label: "ferry"); logger.logLevel = level; return logger }()
        do {
            try Seccomp.confineProcess(Seccomp.Mode(rawValue: seccomp) ?? .enforce)
        } catch {
            throw ValidationError("--seccomp \(seccomp): \(error)")
        }
        logger.info("--seccomp \(seccomp): \(Self.seccompSummary[seccomp] ?? "")")
        let vmm = VirtualMachineMonitor(events: EventMonitor(sink: parsed.events), logger: logger,
                                        exitsWithVM: parsed.socket == nil)
        let signalSources = [SIGTERM, SIGINT].map { number in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number)
            source.setEventHandler { Task { await vmm.requestExit(.signalled(number)) } }
            source.resume()
            return source
        }
        defer { signalSources.forEach { $0.cancel() } }

        let server = parsed.socket.map { socket in
            Task {
                do {
                    try await APIServer(vmm: vmm, socket: socket, logger: logger).run()
                } catch {
                    await vmm.requestExit(.failed("--api-socket: \(error)"))
                }
            }
        }
        if let configuration = parsed.vm {
            do {
                try await vmm.create(configuration)
                try await vmm.boot()
            } catch {
                await vmm.requestExit(.failed("\(error)"))
            }
        }
        let exitReason = await vmm.waitForExit()
        await vmm.finish()
        server?.cancel()
        _ = await server?.result
        if case let .failed(message) = exitReason {
            FileHandle.standardError.write(Data("ferry: \(message)\n".utf8))
        }
        throw ExitCode(exitReason.exitStatus)
    }
}

extension Ferry {
    /// Logs go to standard error, or to `--log-file` (appended to, as Cloud Hypervisor's).
    static func bootstrapLogging(file path: String?) throws {
        guard let path else {
            LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
            return
        }
        let descriptor = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard descriptor >= 0 else {
            throw ValidationError("--log-file: cannot open \(path): \(String(cString: strerror(errno)))")
        }
        let stream = LogFileStream(handle: FileHandle(fileDescriptor: descriptor, closeOnDealloc: true))
        LoggingSystem.bootstrap { StreamLogHandler(label: $0, stream: stream) }
    }
}

/// A log file, written a line at a time.
struct LogFileStream: TextOutputStream, @unchecked Sendable {
    let handle: FileHandle

    mutating func write(_ text: String) {
        handle.write(Data(text.utf8))
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}
