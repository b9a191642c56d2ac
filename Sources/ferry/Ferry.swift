import ArgumentParser
import Events
import Foundation
import Logging
import Machine
import VMM

/// `ferry`: the VMM process. One VM per process; flags spelled as Cloud Hypervisor spells them.
@main
struct Ferry: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ferry",
        abstract: "A KVM virtual machine monitor built around live migration that management software can watch.",
        discussion: """
            Boots one VM and runs it until the guest powers off (exit status 0), the process gets \
            SIGTERM or SIGINT (the VM is stopped, exit status 0), or the VM fails (exit status 1, \
            with the reason on standard error).

            Example:
              ferry --kernel vmlinux --initramfs initrd.img --cmdline "console=ttyS0" \\
                    --cpus boot=2 --memory size=1G --event-monitor path=/tmp/vm1.events
            """,
        version: VirtualMachineMonitor.version
    )

    @Option(help: ArgumentHelp("Kernel to boot: an x86-64 ELF with a PVH note (vmlinux) or a bzImage.", valueName: "path"))
    var kernel: String

    @Option(help: ArgumentHelp("Initramfs to hand the kernel.", valueName: "path"))
    var initramfs: String?

    @Option(help: ArgumentHelp("Kernel command line.", valueName: "string"))
    var cmdline: String = VMConfiguration.defaultCommandLine

    @Option(help: ArgumentHelp("Number of vCPUs: boot=N (1 to \(MachineConfiguration.maximumCPUs)).", valueName: "boot=N"))
    var cpus: String = "boot=1"

    @Option(help: ArgumentHelp("Guest memory: size=SIZE with K, M, G or T suffix (at least 64M).", valueName: "size=SIZE"))
    var memory: String = "size=512M"

    @Option(help: ArgumentHelp("Guest serial console (COM1): tty (standard output), file=PATH, null or off.", valueName: "mode"))
    var serial: String = "tty"

    @Option(help: ArgumentHelp("virtio console: only off, Ferry has none; use --serial.", valueName: "mode"))
    var console: String = "off"

    @Option(name: .customLong("event-monitor"),
            help: ArgumentHelp("Write lifecycle events (Cloud Hypervisor's format) to path=PATH (file or FIFO) or fd=N.", valueName: "path=PATH|fd=N"))
    var eventMonitor: String?

    @Option(name: .customLong("log-level"), help: "Log level on standard error: trace, debug, info, warning, error.")
    var logLevel: Logger.Level = .warning

    /// Parsed in `validate()` so that a bad value fails before anything starts.
    private var parsed: (vm: VMConfiguration, events: EventSinkTarget?)?

    enum CodingKeys: String, CodingKey {
        case kernel, initramfs, cmdline, cpus, memory, serial, console, eventMonitor, logLevel
    }

    mutating func validate() throws {
        do {
            let cpuCount = try VMConfiguration.parseCPUs(cpus)
            let memorySize = try VMConfiguration.parseMemory(memory)
            let serialMode = try SerialMode(parsing: serial)
            try VMConfiguration.parseConsole(console)
            let sink = try eventMonitor.map(VMConfiguration.parseEventMonitor)
            guard FileManager.default.isReadableFile(atPath: kernel) else {
                throw ConfigurationError(flag: "--kernel", "\(kernel) does not exist or is not readable")
            }
            if let initramfs, !FileManager.default.isReadableFile(atPath: initramfs) {
                throw ConfigurationError(flag: "--initramfs", "\(initramfs) does not exist or is not readable")
            }
            let machine = MachineConfiguration(cpus: cpuCount, memorySize: memorySize, kernel: kernel,
                                               initramfs: initramfs, commandLine: cmdline)
            parsed = (VMConfiguration(machine: machine, serial: serialMode), sink)
        } catch let error as ConfigurationError {
            throw ValidationError(error.description)
        }
    }

    func run() throws {
        guard let parsed else { throw ValidationError("arguments were not validated") }
        LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
        var logger = Logger(label: "ferry")
        logger.logLevel = logLevel
        let monitor = VirtualMachineMonitor(events: EventMonitor(sink: parsed.events), logger: logger)
        let outcome = monitor.run(parsed.vm)
        if case let .failed(message) = outcome {
            FileHandle.standardError.write(Data("ferry: \(message)\n".utf8))
        }
        throw ExitCode(outcome.exitStatus)
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}
