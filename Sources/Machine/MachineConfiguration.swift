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
    /// virtio-blk disks, in PCI slot order from slot 1.
    public var disks: [DiskConfiguration]
    /// virtio-net cards, in PCI slot order after the disks.
    public var networks: [NetworkConfiguration]
    /// A virtio-rng device reading this host file (`/dev/urandom`), or none.
    public var entropySource: String?
    /// Whether the guest has a virtio console (`--console off` leaves it out).
    public var virtioConsole: Bool
    /// Whether guest RAM is a memory file other processes can map (`--memory shared=on`, Cloud
    /// Hypervisor's `memory.shared`), which a local migration hands over instead of copying.
    public var sharedMemory: Bool

    /// At most 254 vCPUs: APIC id 255 is the broadcast id and the IOAPIC takes the id after the last CPU.
    public static let maximumCPUs = 254

    public init(cpus: Int = 1, memorySize: UInt64 = 512 << 20, kernel: String, initramfs: String? = nil,
                commandLine: String = "", serialPort: Bool = true, disks: [DiskConfiguration] = [],
                networks: [NetworkConfiguration] = [], entropySource: String? = nil, virtioConsole: Bool = false,
                sharedMemory: Bool = false) {
        self.cpus = cpus
        self.memorySize = memorySize
        self.kernel = kernel
        self.initramfs = initramfs
        self.commandLine = commandLine
        self.serialPort = serialPort
        self.disks = disks
        self.networks = networks
        self.entropySource = entropySource
        self.virtioConsole = virtioConsole
        self.sharedMemory = sharedMemory
    }

    private enum CodingKeys: String, CodingKey {
        case cpus, memorySize, kernel, initramfs, commandLine, serialPort, disks, networks, entropySource, virtioConsole, sharedMemory
    }

    /// A guest without devices or shared memory may leave those fields out.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        self.init(cpus: try container.decode(Int.self, forKey: .cpus),
                  memorySize: try container.decode(UInt64.self, forKey: .memorySize),
                  kernel: try container.decode(String.self, forKey: .kernel),
                  initramfs: try container.decodeIfPresent(String.self, forKey: .initramfs),
                  commandLine: try container.decode(String.self, forKey: .commandLine),
                  serialPort: try container.decode(Bool.self, forKey: .serialPort),
                  disks: try container.decodeIfPresent([DiskConfiguration].self, forKey: .disks) ?? [],
                  networks: try container.decodeIfPresent([NetworkConfiguration].self, forKey: .networks) ?? [],
                  entropySource: try container.decodeIfPresent(String.self, forKey: .entropySource),
                  virtioConsole: try container.decodeIfPresent(Bool.self, forKey: .virtioConsole) ?? false,
                  sharedMemory: try container.decodeIfPresent(Bool.self, forKey: .sharedMemory) ?? false)
    }

    /// The largest guest: 4 TiB. Guest RAM is mapped without reserving host memory (as Cloud
    /// Hypervisor maps it): pages the guest never touches cost nothing, and whether the host can
    /// back those it touches is its overcommit policy's decision, as with every VMM.
    public static let maximumMemorySize: UInt64 = 4 << 40

    /// Checks the values against what Ferry can run; the message names the field.
    public func validate() throws(MachineError) {
        guard (1...Self.maximumCPUs).contains(cpus) else {
            throw Self.invalid("cpus: \(cpus) is not between 1 and \(Self.maximumCPUs)")
        }
        guard memorySize >= GuestRAMLayout.minimumSize else {
            throw Self.invalid("memory size: \(memorySize >> 20) MiB is below the minimum of \(GuestRAMLayout.minimumSize >> 20) MiB")
        }
        guard memorySize % 4096 == 0 else {
            throw Self.invalid("memory size: \(memorySize) bytes is not a multiple of 4 KiB")
        }
        var ids = Set<String>()
        for disk in disks {
            guard !disk.id.isEmpty, disk.id.utf8.count <= 20 else {
                throw Self.invalid("disks: the id '\(disk.id)' must have 1 to 20 bytes (the guest reads it with get-id)")
            }
            guard ids.insert(disk.id).inserted else { throw Self.invalid("disks: two disks have the id '\(disk.id)'") }
        }
        try VirtioBlock.checkFiles(disks)
        var networkIDs = Set<String>(), macs = Set<MACAddress>()
        for network in networks {
            try network.validate()
            guard networkIDs.insert(network.id).inserted else { throw Self.invalid("net: two cards have the id '\(network.id)'") }
            guard macs.insert(network.mac).inserted else { throw Self.invalid("net: two cards have the mac \(network.mac)") }
        }
        if let entropySource, !FileManager.default.isReadableFile(atPath: entropySource) {
            throw Self.invalid("rng.src: \(entropySource) does not exist or is not readable")
        }
        let pciDevices = disks.count + networks.count + (entropySource == nil ? 0 : 1) + (virtioConsole ? 1 : 0)
        guard pciDevices < PCIBus.slotCount else {
            throw Self.invalid("devices: \(pciDevices) PCI devices do not fit in the \(PCIBus.slotCount - 1) slots of PCI bus 0")
        }
        for network in networks { try Tap.check(network) }
        guard memorySize <= Self.maximumMemorySize else {
            throw Self.invalid("memory size: \(memorySize >> 20) MiB is above the maximum of \(Self.maximumMemorySize >> 30) GiB")
        }
    }

    private static func invalid(_ message: String) -> MachineError {
        MachineError(.invalidConfiguration, message)
    }
}
