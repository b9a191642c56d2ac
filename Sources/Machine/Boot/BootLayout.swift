/// Fixed guest-physical addresses of the structures Ferry writes before the first instruction runs.
/// All lie in the first 640 KiB, below where any kernel is loaded.
public enum BootLayout {
    /// The boot GDT (`BootGDT`).
    public static let gdtAddress: UInt64 = 0x500
    /// An empty IDT: the guest installs its own before enabling interrupts.
    public static let idtAddress: UInt64 = 0x520
    /// PVH: `struct hvm_start_info`, followed by the module list and the memory map.
    public static let startInfoAddress: UInt64 = 0x6000
    /// Linux boot protocol: `struct boot_params`, the "zero page".
    public static let zeroPageAddress: UInt64 = 0x7000
    /// Stack pointer handed to a Linux kernel entered at its 64-bit entry point.
    public static let bootStackPointer: UInt64 = 0x8FF0
    /// Identity-mapping page tables for the 64-bit entry: PML4, PDPT, then one PD per GiB mapped.
    public static let pml4Address: UInt64 = 0x9000
    public static let pdptAddress: UInt64 = 0xA000
    public static let pageDirectoriesAddress: UInt64 = 0xB000
    /// The kernel command line (NUL-terminated).
    public static let commandLineAddress: UInt64 = 0x20000
    /// Largest command line accepted, including the terminating NUL (Linux's COMMAND_LINE_SIZE on x86).
    public static let commandLineCapacity = 2048
    /// The Extended BIOS Data Area: conventional RAM ends here, as on a PC with 639 KiB of base memory.
    public static let ebdaStart: UInt64 = 0x9FC00
    /// The MP table, in the BIOS ROM area (0xF0000–0xFFFFF) that MP-spec scanners search; 64 KiB
    /// there leaves room for one processor entry per possible vCPU.
    public static let mpTableAddress: UInt64 = 0xF0000
    /// Kernels are loaded at 1 MiB, the first address above the legacy BIOS area.
    public static let kernelLoadAddress: UInt64 = 0x10_0000
    /// Where KVM may put the real-mode TSS on Intel hosts (three pages below the IOAPIC / BIOS ROM).
    public static let kvmTSSAddress: UInt64 = 0xFFFB_D000
    /// Where KVM may put its real-mode identity-map page on Intel hosts (the page before the TSS).
    public static let kvmIdentityMapAddress: UInt64 = 0xFFFB_C000
    /// The local APIC's MMIO page (Intel SDM Vol. 3A, 11.4.1) and the IOAPIC's (ICH/82093AA default).
    public static let localAPICAddress: UInt32 = 0xFEE0_0000
    public static let ioAPICAddress: UInt32 = 0xFEC0_0000
}
