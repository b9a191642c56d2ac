import Foundation
import HostOS
import KVM

/// How the boot vCPU enters the kernel.
public enum BootEntry: Equatable, Sendable {
    /// PVH: 32-bit entry with EBX pointing at `hvm_start_info`.
    case pvh(entry: UInt32, startInfo: UInt64)
    /// Linux boot protocol: 64-bit entry with RSI pointing at the zero page.
    case linux64(entry: UInt64, zeroPage: UInt64)
}

/// Loads a kernel (PVH ELF or bzImage, chosen from the file's contents), its initramfs and command
/// line, and the firmware tables a guest expects, into guest memory.
///
/// Loading is planned first — which file bytes go where, where the initramfs goes — against the
/// guest's RAM layout alone, with every value from the image checked; `check` runs only the plan,
/// so a VMM can refuse an image that cannot boot before it builds anything.
public enum BootLoader {
    static let pageSize: UInt64 = 4096

    /// What loading a kernel writes where.
    struct Plan {
        enum Kernel {
            case pvh(ELFKernel)
            case linux64(BzImage, loadEnd: UInt64)
        }

        var kernel: Kernel
        /// Where the initramfs goes, if there is one.
        var initramfsAddress: UInt64?
    }

    /// Checks that the kernel, initramfs and command line can boot in guest RAM of `memorySize`
    /// bytes; throws an `invalidImage` error saying why not. Reads the kernel, only the size of
    /// the initramfs.
    public static func check(kernelPath: String, initramfsPath: String?, commandLine: String, memorySize: UInt64) throws(MachineError) {
        let kernel = try readFile(kernelPath, what: "kernel")
        let initramfsSize = try initramfsPath.map { path throws(MachineError) in try fileSize(path, what: "initramfs") }
        try checkCommandLine(commandLine)
        _ = try plan(kernel: kernel, kernelPath: kernelPath, initramfsSize: initramfsSize, ram: GuestRAMLayout.ranges(size: memorySize))
    }

    /// Loads the kernel and initramfs files into `memory` with the command line and the boot
    /// tables; returns where the boot vCPU enters the kernel.
    public static func load(kernelPath: String, initramfsPath: String?, commandLine: String, cpuCount: Int,
                            pciSlots: [Int] = [], memory: GuestMemory) throws(MachineError) -> BootEntry {
        let kernel = try readFile(kernelPath, what: "kernel")
        let initramfs = try initramfsPath.map { path throws(MachineError) in try readFile(path, what: "initramfs") }
        return try load(kernel: kernel, named: kernelPath, initramfs: initramfs, commandLine: commandLine, cpuCount: cpuCount,
                        pciSlots: pciSlots, memory: memory)
    }

    /// `load(kernelPath:…)` for images already in memory; `name` names the kernel in errors.
    static func load(kernel: [UInt8], named name: String, initramfs: [UInt8]?, commandLine: String, cpuCount: Int,
                     pciSlots: [Int] = [], memory: GuestMemory) throws(MachineError) -> BootEntry {
        try checkCommandLine(commandLine)
        let plan = try plan(kernel: kernel, kernelPath: name, initramfsSize: initramfs.map { UInt64($0.count) },
                            ram: memory.ranges)

        try memory.write(Array(commandLine.utf8) + [0], at: BootLayout.commandLineAddress)
        try memory.write(MPTable.bytes(cpuCount: cpuCount, pciSlots: pciSlots, at: BootLayout.mpTableAddress), at: BootLayout.mpTableAddress)
        try memory.write(BootCPUState.gdtBytes, at: BootLayout.gdtAddress)
        if let initramfs, let address = plan.initramfsAddress {
            try memory.write(initramfs, at: address)
        }
        let memoryMap = E820Map.entries(for: memory.ranges)
        switch plan.kernel {
        case .pvh(let elf):
            for segment in elf.segments {
                try memory.write(kernel[segment.fileRange], at: segment.physicalAddress)
                let zeros = segment.memorySize - UInt64(segment.fileRange.count)
                if zeros > 0 {
                    // The plan checked that the segment lies in guest RAM, so `zeros` fits an Int.
                    try memory.fill(0, count: Int(zeros), at: segment.physicalAddress + UInt64(segment.fileRange.count))
                }
            }
            var modules: [(address: UInt64, size: UInt64)] = []
            if let initramfs, let address = plan.initramfsAddress { modules.append((address, UInt64(initramfs.count))) }
            let info = StartInfo.bytes(at: BootLayout.startInfoAddress, commandLineAddress: BootLayout.commandLineAddress,
                                       modules: modules, memoryMap: memoryMap)
            try memory.write(info, at: BootLayout.startInfoAddress)
            return .pvh(entry: elf.pvhEntry, startInfo: BootLayout.startInfoAddress)
        case .linux64(let image, _):
            try memory.write(kernel[image.kernelOffset...], at: BootLayout.kernelLoadAddress)
            for table in PageTables.tables() {
                try memory.write(table.bytes, at: table.address)
            }
            var initrd: (address: UInt32, size: UInt32)?
            if let initramfs, let address = plan.initramfsAddress {
                // The plan placed it below 4 GiB and checked its size fits 32 bits.
                initrd = (UInt32(truncatingIfNeeded: address), UInt32(truncatingIfNeeded: initramfs.count))
            }
            let zeroPage = try ZeroPage.bytes(kernel: image, commandLineAddress: UInt32(BootLayout.commandLineAddress),
                                              initrd: initrd, memoryMap: memoryMap)
            try memory.write(zeroPage, at: BootLayout.zeroPageAddress)
            return .linux64(entry: BootLayout.kernelLoadAddress + BzImage.entry64Offset, zeroPage: BootLayout.zeroPageAddress)
        }
    }

    /// Parses the kernel and places it and the initramfs in `ram`, refusing anything that does not fit.
    static func plan(kernel: [UInt8], kernelPath: String, initramfsSize: UInt64?, ram: [GuestRAMRange]) throws(MachineError) -> Plan {
        if ELFKernel.isELF(kernel) {
            let elf = try ELFKernel(parsing: kernel)
            for segment in elf.segments {
                guard segment.physicalAddress >= BootLayout.kernelLoadAddress,
                      GuestRAMLayout.contains(ram, segment.physicalAddress, count: segment.memorySize)
                else {
                    throw MachineError(.invalidImage, "kernel segment at 0x\(String(segment.physicalAddress, radix: 16)) (\(segment.memorySize) bytes) does not fit in guest RAM above 1 MiB")
                }
            }
            let address = try initramfsSize.map { size throws(MachineError) in
                try placeInitramfs(size: size, above: elf.end, below: UInt64.max, ram: ram)
            }
            return Plan(kernel: .pvh(elf), initramfsAddress: address)
        }
        if BzImage.isBzImage(kernel) {
            let image = try BzImage(parsing: kernel)
            let payloadSize = UInt64(kernel.count - image.kernelOffset)
            let needed = max(payloadSize, UInt64(image.initSize))
            guard GuestRAMLayout.contains(ram, BootLayout.kernelLoadAddress, count: needed) else {
                throw MachineError(.invalidImage, "bzImage needs \(needed >> 20) MiB above 1 MiB; give the guest more memory")
            }
            let loadEnd = BootLayout.kernelLoadAddress + needed
            if let initramfsSize, initramfsSize > UInt64(UInt32.max) {
                throw MachineError(.invalidImage, "initramfs is \(initramfsSize >> 20) MiB; the Linux boot protocol takes at most 4 GiB")
            }
            let address = try initramfsSize.map { size throws(MachineError) in
                try placeInitramfs(size: size, above: loadEnd, below: UInt64(image.initrdAddressMax) + 1, ram: ram)
            }
            return Plan(kernel: .linux64(image, loadEnd: loadEnd), initramfsAddress: address)
        }
        throw MachineError(.invalidImage, "kernel \(kernelPath) is neither an ELF with a PVH note nor a bzImage")
    }

    /// The highest page-aligned address of RAM below 4 GiB (and below `limit`) where `size` bytes
    /// stay clear of a kernel that ends at `kernelEnd`.
    static func placeInitramfs(size: UInt64, above kernelEnd: UInt64, below limit: UInt64,
                               ram: [GuestRAMRange]) throws(MachineError) -> UInt64 {
        let lowRAMEnd = ram.first(where: { $0.start == 0 })?.end ?? 0
        let top = min(lowRAMEnd, limit)
        let kernelTop = kernelEnd.addingReportingOverflow(pageSize - 1)
        guard top > size, !kernelTop.overflow, (top - size) & ~(pageSize - 1) >= kernelTop.partialValue & ~(pageSize - 1) else {
            throw MachineError(.invalidImage, "initramfs (\(size >> 20) MiB) does not fit in guest RAM below 4 GiB beside the kernel; give the guest more memory")
        }
        return (top - size) & ~(pageSize - 1)
    }

    static func checkCommandLine(_ commandLine: String) throws(MachineError) {
        let bytes = commandLine.utf8.count + 1
        guard bytes <= BootLayout.commandLineCapacity else {
            throw MachineError(.invalidImage, "kernel command line is \(bytes - 1) bytes; at most \(BootLayout.commandLineCapacity - 1) fit")
        }
    }

    static func readFile(_ path: String, what: String) throws(MachineError) -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw MachineError(.invalidImage, "cannot read \(what) \(path): no such file or not readable")
        }
        return Array(data)
    }

    static func fileSize(_ path: String, what: String) throws(MachineError) -> UInt64 {
        var status = stat()
        guard stat(path, &status) == 0, access(path, R_OK) == 0 else {
            throw MachineError(.invalidImage, "cannot read \(what) \(path): no such file or not readable")
        }
        return UInt64(status.st_size)
    }
}
