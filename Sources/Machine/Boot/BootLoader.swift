import Foundation
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
public enum BootLoader {
    static let pageSize: UInt64 = 4096

    public static func load(kernelPath: String, initramfsPath: String?, commandLine: String, cpuCount: Int,
                            memory: GuestMemory) throws -> BootEntry {
        let kernel = try readFile(kernelPath, what: "kernel")
        let initramfs = try initramfsPath.map { try readFile($0, what: "initramfs") }
        let commandLineBytes = Array(commandLine.utf8) + [0]
        guard commandLineBytes.count <= BootLayout.commandLineCapacity else {
            throw MachineError("kernel command line is \(commandLineBytes.count - 1) bytes; at most \(BootLayout.commandLineCapacity - 1) fit")
        }
        try memory.write(commandLineBytes, at: BootLayout.commandLineAddress)
        try memory.write(MPTable.bytes(cpuCount: cpuCount, at: BootLayout.mpTableAddress), at: BootLayout.mpTableAddress)
        try memory.write(BootCPUState.gdtBytes, at: BootLayout.gdtAddress)
        let memoryMap = E820Map.entries(for: memory.ranges)

        if ELFKernel.isELF(kernel) {
            let elf = try ELFKernel(parsing: kernel)
            for segment in elf.segments {
                guard segment.physicalAddress >= BootLayout.kernelLoadAddress,
                      memory.contains(segment.physicalAddress, count: Int(segment.memorySize))
                else {
                    throw MachineError("kernel segment at 0x\(String(segment.physicalAddress, radix: 16)) (\(segment.memorySize) bytes) does not fit in guest RAM above 1 MiB")
                }
                try memory.write(kernel[segment.fileOffset..<segment.fileOffset + segment.fileSize],
                                 at: segment.physicalAddress)
                let zeroCount = Int(segment.memorySize) - segment.fileSize
                if zeroCount > 0 {
                    try memory.fill(0, count: zeroCount, at: segment.physicalAddress + UInt64(segment.fileSize))
                }
            }
            var modules: [(address: UInt64, size: UInt64)] = []
            if let initramfs {
                let address = try placeInitramfs(initramfs, above: elf.end, below: UInt64.max, memory: memory)
                modules.append((address, UInt64(initramfs.count)))
            }
            let info = StartInfo.bytes(at: BootLayout.startInfoAddress, commandLineAddress: BootLayout.commandLineAddress,
                                       modules: modules, memoryMap: memoryMap)
            try memory.write(info, at: BootLayout.startInfoAddress)
            return .pvh(entry: elf.pvhEntry, startInfo: BootLayout.startInfoAddress)
        }

        if BzImage.isBzImage(kernel) {
            let image = try BzImage(parsing: kernel)
            let payload = kernel[image.kernelOffset...]
            let loadEnd = BootLayout.kernelLoadAddress + UInt64(max(payload.count, Int(image.initSize)))
            guard memory.contains(BootLayout.kernelLoadAddress, count: Int(loadEnd - BootLayout.kernelLoadAddress)) else {
                throw MachineError("bzImage needs \((loadEnd - BootLayout.kernelLoadAddress) >> 20) MiB above 1 MiB; give the guest more memory")
            }
            try memory.write(payload, at: BootLayout.kernelLoadAddress)
            var initrd: (address: UInt32, size: UInt32)?
            if let initramfs {
                let address = try placeInitramfs(initramfs, above: loadEnd, below: UInt64(image.initrdAddressMax) + 1,
                                                 memory: memory)
                initrd = (UInt32(address), UInt32(initramfs.count))
            }
            for table in PageTables.tables() {
                try memory.write(table.bytes, at: table.address)
            }
            let zeroPage = try ZeroPage.bytes(kernel: image, commandLineAddress: UInt32(BootLayout.commandLineAddress),
                                              initrd: initrd, memoryMap: memoryMap)
            try memory.write(zeroPage, at: BootLayout.zeroPageAddress)
            return .linux64(entry: BootLayout.kernelLoadAddress + BzImage.entry64Offset, zeroPage: BootLayout.zeroPageAddress)
        }
        throw MachineError("kernel \(kernelPath) is neither an ELF with a PVH note nor a bzImage")
    }

    /// Puts the initramfs at the highest page-aligned address of RAM below 4 GiB (and below `limit`)
    /// that stays clear of the kernel.
    static func placeInitramfs(_ bytes: [UInt8], above kernelEnd: UInt64, below limit: UInt64,
                               memory: GuestMemory) throws -> UInt64 {
        let lowRAMEnd = memory.ranges.first(where: { $0.start == 0 })?.end ?? 0
        let top = min(lowRAMEnd, limit)
        let size = UInt64(bytes.count)
        guard top > size, (top - size) & ~(pageSize - 1) >= (kernelEnd + pageSize - 1) & ~(pageSize - 1) else {
            throw MachineError("initramfs (\(size >> 20) MiB) does not fit in guest RAM below 4 GiB beside the kernel; give the guest more memory")
        }
        let address = (top - size) & ~(pageSize - 1)
        try memory.write(bytes, at: address)
        return address
    }

    static func readFile(_ path: String, what: String) throws -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw MachineError("cannot read \(what) \(path): no such file or not readable")
        }
        return Array(data)
    }
}
