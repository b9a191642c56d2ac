import HostOS
/// PVH's `struct hvm_start_info` (version 1) with its module list and memory map, as the PVH boot
/// ABI defines them (xen/include/public/arch-x86/hvm/start_info.h).
public enum StartInfo {
    /// `XEN_HVM_START_MAGIC_VALUE`, what the guest checks first.
    static let magic: UInt32 = 0x336E_C578
    /// Version 1 adds the memory map.
    static let version: UInt32 = 1
    static let headerSize = 56        // sizeof(struct hvm_start_info)
    static let moduleEntrySize = 32   // sizeof(struct hvm_modlist_entry)
    static let memoryMapEntrySize = 24 // sizeof(struct hvm_memmap_table_entry)

    /// The structure placed at `address`: header, then one module entry per module, then the map.
    public static func bytes(at address: UInt64, commandLineAddress: UInt64,
                             modules: [(address: UInt64, size: UInt64)], memoryMap: [E820Entry]) -> [UInt8] {
        let moduleListAddress = address + UInt64(headerSize)
        let memoryMapAddress = moduleListAddress + UInt64(modules.count * moduleEntrySize)
        var info = LittleEndianBytes()
        info.append(magic)
        info.append(version)
        info.append(UInt32(0))                                 // flags
        info.append(UInt32(modules.count))                     // nr_modules
        info.append(modules.isEmpty ? UInt64(0) : moduleListAddress) // modlist_paddr
        info.append(commandLineAddress)                        // cmdline_paddr
        info.append(UInt64(0))                                 // rsdp_paddr: no ACPI, the guest scans
        info.append(memoryMapAddress)                          // memmap_paddr
        info.append(UInt32(memoryMap.count))                   // memmap_entries
        info.append(UInt32(0))                                 // reserved
        for module in modules {
            info.append(module.address)
            info.append(module.size)
            info.append(UInt64(0))                             // cmdline_paddr of the module
            info.append(UInt64(0))                             // reserved
        }
        for entry in memoryMap {
            info.append(entry.address)
            info.append(entry.size)
            info.append(entry.kind.rawValue)
            info.append(UInt32(0))
        }
        return info.bytes
    }
}
