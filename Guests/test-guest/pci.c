/*
 * pci.c - PCI configuration mechanism #1 (ports 0xCF8/0xCFC, PCI Local Bus
 * 3.0, 3.2.2.3.2), a scan of bus 0 for virtio functions, and BAR set-up: a
 * BAR the firmware (or VMM) assigned is kept; one left at zero gets an
 * address from a window below the IOAPIC/LAPIC. CPL 0 at boot only: every
 * config access is port I/O, so the scan stays short (bus 0, function 0 of
 * each device, other functions only of multi-function devices).
 */
#include "kernel.h"

#define PCI_CONFIG_ADDRESS  0xCF8
#define PCI_CONFIG_DATA     0xCFC
#define PCI_CONFIG_ENABLE   0x80000000
#define PCI_DEVICES         32          /* devices on one bus */
#define PCI_FUNCTIONS       8
#define PCI_BDF(dev, fn)    (((dev) << 3) | (fn))   /* bus 0 */

/* Configuration header offsets and bits (type 0 header). */
#define PCI_VENDOR_ID       0x00
#define PCI_DEVICE_ID       0x02
#define PCI_COMMAND         0x04
#define PCI_HEADER_TYPE     0x0E
#define PCI_BAR0            0x10
#define PCI_BARS            6
#define PCI_VENDOR_NONE     0xFFFF      /* no function: the read floats high */
#define PCI_VENDOR_ZERO     0x0000      /* a VMM without PCI may read zeros */
#define PCI_HEADER_MULTIFN  0x80
#define PCI_HEADER_LAYOUT   0x7F
#define PCI_HEADER_NORMAL   0x00
#define PCI_CMD_IO          0x0001
#define PCI_CMD_MEMORY      0x0002
#define PCI_CMD_MASTER      0x0004
#define PCI_CMD_INTX_OFF    0x0400
#define PCI_BAR_IO          0x1
#define PCI_BAR_TYPE_MASK   0x6
#define PCI_BAR_TYPE_64     0x4
#define PCI_BAR_FLAGS       0xF

#define VIRTIO_VENDOR       0x1AF4
#define VIRTIO_DEVICE_FIRST 0x1000      /* transitional 0x1000-0x103F, modern 0x1040-0x107F */
#define VIRTIO_DEVICE_LAST  0x107F
#define MAX_VIRTIO_FUNCTIONS 8

/* Unassigned BARs are placed downward from here (below the IOAPIC at 0xFEC00000 and the LAPIC). */
#define BAR_WINDOW_TOP      0xFE000000UL
#define FOUR_GIB            0x100000000UL

struct pci_mmio_range pci_mmio_ranges[PCI_MAX_MMIO_RANGES];
u32 pci_mmio_range_count;

/* Next free address (exclusive) for a BAR this guest assigns; lowered below every assigned BAR found. */
static u64 bar_window_top = BAR_WINDOW_TOP;

static void select_register(u32 bdf, u32 offset)
{
    outl(PCI_CONFIG_ADDRESS, PCI_CONFIG_ENABLE | (bdf << 8) | (offset & 0xFC));
}

u32 pci_read32(u32 bdf, u32 offset)
{
    select_register(bdf, offset);
    return inl(PCI_CONFIG_DATA);
}

u16 pci_read16(u32 bdf, u32 offset)
{
    select_register(bdf, offset);
    return inw(PCI_CONFIG_DATA + (offset & 2));
}

u8 pci_read8(u32 bdf, u32 offset)
{
    select_register(bdf, offset);
    return inb(PCI_CONFIG_DATA + (offset & 3));
}

void pci_write32(u32 bdf, u32 offset, u32 value)
{
    select_register(bdf, offset);
    outl(PCI_CONFIG_DATA, value);
}

/* 16-bit write: a 32-bit write to the command register would also hit the status register's RW1C bits. */
void pci_write16(u32 bdf, u32 offset, u16 value)
{
    select_register(bdf, offset);
    outw(PCI_CONFIG_DATA + (offset & 2), value);
}

void line_bdf(struct line *l, u32 bdf)
{
    static const char hex[] = "0123456789abcdef";
    char text[8];
    u32 dev = (bdf >> 3) & 0x1F;
    text[0] = hex[(bdf >> 12) & 0xF];
    text[1] = hex[(bdf >> 8) & 0xF];
    text[2] = ':';
    text[3] = hex[dev >> 4];
    text[4] = hex[dev & 0xF];
    text[5] = '.';
    text[6] = (char)('0' + (bdf & 7));
    text[7] = '\0';
    line_str(l, text);
}

static u64 low_ram_end(void)
{
    u64 end = 0;
    for (u32 i = 0; i < ram_range_count; i++) {
        u64 e = ram_ranges[i].base + ram_ranges[i].size;
        if (ram_ranges[i].base < FOUR_GIB && e > end)
            end = e < FOUR_GIB ? e : FOUR_GIB;
    }
    return end;
}

/* Keeps the assignment window below every 32-bit memory BAR the firmware assigned. */
static void note_assigned_bars(u32 bdf)
{
    for (u32 i = 0; i < PCI_BARS; i++) {
        u32 bar = pci_read32(bdf, PCI_BAR0 + 4 * i);
        if (bar & PCI_BAR_IO)
            continue;
        u64 base = bar & ~(u32)PCI_BAR_FLAGS;
        if ((bar & PCI_BAR_TYPE_MASK) == PCI_BAR_TYPE_64) {
            i++;
            if (i < PCI_BARS && pci_read32(bdf, PCI_BAR0 + 4 * i) != 0)
                continue;                       /* above 4 GiB: not in the window */
        }
        if (base != 0 && base < bar_window_top)
            bar_window_top = base;
    }
}

/*
 * Sizes BAR index (memory decode off while all ones are written, as the
 * PCI spec requires) and returns its base, assigning one first if it is
 * zero. Returns 0 and sets *why if the BAR cannot be used.
 */
u64 pci_bar_setup(u32 bdf, u32 index, u64 *size, const char **why)
{
    u32 offset = PCI_BAR0 + 4 * index;
    u32 lo = pci_read32(bdf, offset);
    if (lo & PCI_BAR_IO) {
        *why = "capability in an I/O BAR";
        return 0;
    }
    int is64 = (lo & PCI_BAR_TYPE_MASK) == PCI_BAR_TYPE_64;
    if (is64 && index + 1 >= PCI_BARS) {
        *why = "64-bit BAR in the last slot";
        return 0;
    }
    u32 hi = is64 ? pci_read32(bdf, offset + 4) : 0;

    u16 command = pci_read16(bdf, PCI_COMMAND);
    pci_write16(bdf, PCI_COMMAND, command & ~(PCI_CMD_IO | PCI_CMD_MEMORY));
    pci_write32(bdf, offset, ~0U);
    u32 mask_lo = pci_read32(bdf, offset) & ~(u32)PCI_BAR_FLAGS;
    u32 mask_hi = ~0U;
    if (is64) {
        pci_write32(bdf, offset + 4, ~0U);
        mask_hi = pci_read32(bdf, offset + 4);
    }
    pci_write32(bdf, offset, lo);
    if (is64)
        pci_write32(bdf, offset + 4, hi);

    u64 base = ((u64)hi << 32) | (lo & ~(u32)PCI_BAR_FLAGS);
    u64 bytes = ~(((u64)mask_hi << 32) | mask_lo) + 1;
    if (mask_lo == 0 && (!is64 || mask_hi == 0)) {
        *why = "BAR not implemented";
        base = 0;
    } else if (base == 0) {
        /* Unassigned: the next naturally aligned slot below the window (BAR sizes are powers of two). */
        u64 slot = (bar_window_top - bytes) & ~(bytes - 1);
        if (bytes > bar_window_top || slot < low_ram_end()) {
            *why = "no room to assign the BAR";
        } else {
            base = slot;
            bar_window_top = slot;
            pci_write32(bdf, offset, (u32)base | (lo & PCI_BAR_FLAGS));
            if (is64)
                pci_write32(bdf, offset + 4, 0);
        }
    } else if (base + bytes > MAPPED_PHYS_LIMIT) {
        *why = "BAR above the mapped 64 GiB";
        base = 0;
    }
    pci_write16(bdf, PCI_COMMAND, command);
    if (base && pci_mmio_range_count < PCI_MAX_MMIO_RANGES) {
        pci_mmio_ranges[pci_mmio_range_count].base = base;
        pci_mmio_ranges[pci_mmio_range_count].size = bytes;
        pci_mmio_range_count++;
    } else if (base) {
        *why = "too many BARs";
        base = 0;
    }
    *size = bytes;
    return base;
}

void pci_enable(u32 bdf)
{
    u16 command = pci_read16(bdf, PCI_COMMAND);
    pci_write16(bdf, PCI_COMMAND, command | PCI_CMD_MEMORY | PCI_CMD_MASTER | PCI_CMD_INTX_OFF);
}

/*
 * Two passes over bus 0: the first notes every present function's assigned
 * BARs (so assignments cannot collide with them) and remembers the virtio
 * functions, the second hands those to virtio_probe.
 */
void pci_scan(void)
{
    u32 found[MAX_VIRTIO_FUNCTIONS];
    u16 ids[MAX_VIRTIO_FUNCTIONS];
    u32 count = 0;

    for (u32 dev = 0; dev < PCI_DEVICES; dev++) {
        for (u32 fn = 0; fn < PCI_FUNCTIONS; fn++) {
            u32 bdf = PCI_BDF(dev, fn);
            u32 id = pci_read32(bdf, PCI_VENDOR_ID);
            u16 vendor = (u16)id;
            if (vendor == PCI_VENDOR_NONE || vendor == PCI_VENDOR_ZERO) {
                if (fn == 0)
                    break;
                continue;
            }
            u8 header = pci_read8(bdf, PCI_HEADER_TYPE);
            if ((header & PCI_HEADER_LAYOUT) == PCI_HEADER_NORMAL) {
                note_assigned_bars(bdf);
                u16 device = (u16)(id >> 16);
                if (vendor == VIRTIO_VENDOR && device >= VIRTIO_DEVICE_FIRST &&
                    device <= VIRTIO_DEVICE_LAST && count < MAX_VIRTIO_FUNCTIONS) {
                    found[count] = bdf;
                    ids[count] = device;
                    count++;
                }
            }
            if (fn == 0 && !(header & PCI_HEADER_MULTIFN))
                break;
        }
    }
    for (u32 i = 0; i < count; i++)
        virtio_probe(found[i], ids[i]);
}
