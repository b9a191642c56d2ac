import HostOS
/// `struct boot_params` (the "zero page") for the Linux boot protocol's 64-bit entry
/// (Documentation/arch/x86/zero-page.rst gives the offsets used here).
public enum ZeroPage {
    static let size = 4096
    static let e820EntryCountOffset = 0x1E8
    static let videoModeOffset = 0x1FA
    static let typeOfLoaderOffset = 0x210
    static let loadFlagsOffset = 0x211
    static let ramdiskImageOffset = 0x218
    static let ramdiskSizeOffset = 0x21C
    static let heapEndOffset = 0x224
    static let commandLinePointerOffset = 0x228
    static let e820TableOffset = 0x2D0
    static let e820TableCapacity = 128       // E820_MAX_ENTRIES_ZEROPAGE
    static let videoModeNormal: UInt16 = 0xFFFF
    static let loaderUndefined: UInt8 = 0xFF  // type_of_loader: no registered loader id
    static let loadedHigh: UInt8 = 0x01       // LOADED_HIGH: kernel at 1 MiB
    static let canUseHeap: UInt8 = 0x80       // CAN_USE_HEAP: heap_end_ptr is valid
    static let heapEnd: UInt16 = 0xFE00       // the boot protocol's usual heap end for a 64 KiB setup

    public static func bytes(kernel: BzImage, commandLineAddress: UInt32,
                             initrd: (address: UInt32, size: UInt32)?, memoryMap: [E820Entry]) throws(MachineError) -> [UInt8] {
        guard memoryMap.count <= e820TableCapacity else {
            throw MachineError(.invalidConfiguration, "the memory map has \(memoryMap.count) entries; the zero page holds \(e820TableCapacity)")
        }
        var page = LittleEndianBytes()
        page.appendZeros(size)
        for (index, byte) in kernel.setupHeader.enumerated() {
            page.set(byte, at: BzImage.setupHeaderStart + index)
        }
        page.set(videoModeNormal, at: videoModeOffset)
        page.set(loaderUndefined, at: typeOfLoaderOffset)
        let flags = (kernel.setupHeader.count > loadFlagsOffset - BzImage.setupHeaderStart
            ? kernel.setupHeader[loadFlagsOffset - BzImage.setupHeaderStart] : 0) | loadedHigh | canUseHeap
        page.set(flags, at: loadFlagsOffset)
        page.set(heapEnd, at: heapEndOffset)
        page.set(commandLineAddress, at: commandLinePointerOffset)
        page.set(initrd?.address ?? 0, at: ramdiskImageOffset)
        page.set(initrd?.size ?? 0, at: ramdiskSizeOffset)
        page.set(UInt8(memoryMap.count), at: e820EntryCountOffset)
        for (index, entry) in memoryMap.enumerated() {
            let offset = e820TableOffset + index * 20
            page.set(entry.address, at: offset)
            page.set(entry.size, at: offset + 8)
            page.set(entry.kind.rawValue, at: offset + 16)
        }
        return page.bytes
    }
}
