import Foundation

/// What a VM is made of, as its guest sees it: Cloud Hypervisor's `VmConfig` reduced to what
/// Ferry's machine needs. Nothing here says where the host puts anything (console files, sockets):
/// a migration carries this value, and the destination decides those for itself.
public struct MachineConfiguration: Codable, Equatable, Sendable {
    public var cpus: Int
    public var memorySize: UInt64
    public var kernel: String
    public var initramfs: String?
    public var commandLine: String
    /// Whether the guest has the COM1 UART (`--serial off` leaves it out).
    public var serialPort: Bool

    /// At most 254 vCPUs: APIC id 255 is the broadcast id and the IOAPIC takes the id after the last CPU.
    public static let maximumCPUs = 254

    public init(cpus: Int = 1, memorySize: UInt64 = 512 << 20, kernel: String, initramfs: String? = nil,
                commandLine: String = "", serialPort: Bool = true) {
        self.cpus = cpus
        self.memorySize = memorySize
        self.kernel = kernel
        self.initramfs = initramfs
        self.commandLine = commandLine
        self.serialPort = serialPort
    }

    /// This host's RAM: no guest may have more.
    public static var hostMemory: UInt64 { ProcessInfo.processInfo.physicalMemory }

    /// Checks the values against what Ferry and this host can run; the message names the field.
    public func validate(hostMemory: UInt64? = MachineConfiguration.hostMemory) throws(MachineError) {
        guard (1...Self.maximumCPUs).contains(cpus) else {
            throw Self.invalid("cpus: \(cpus) is not between 1 and \(Self.maximumCPUs)")
        }
        guard memorySize >= GuestRAMLayout.minimumSize else {
            throw Self.invalid("memory size: \(memorySize >> 20) MiB is below the minimum of \(GuestRAMLayout.minimumSize >> 20) MiB")
        }
        guard memorySize % 4096 == 0 else {
            throw Self.invalid("memory size: \(memorySize) bytes is not a multiple of 4 KiB")
        }
        if let hostMemory, memorySize > hostMemory {
            throw Self.invalid("memory size: \(memorySize >> 20) MiB exceeds this host's \(hostMemory >> 20) MiB of RAM")
        }
    }

    private static func invalid(_ message: String) -> MachineError {
        MachineError(.invalidConfiguration, message)
    }
}
