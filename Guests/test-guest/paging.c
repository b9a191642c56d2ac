/*
 * paging.c - the final page tables: identity-map every 2 MiB page that holds
 * RAM (from the memory map), the first 2 MiB (BIOS data area, EBDA, MP table,
 * AP trampoline), the LAPIC page and the BARs of the virtio devices in use
 * (both uncached). Every mapping is writable and user-accessible: the CPL-3
 * workload touches kernel-shared data and rings the virtio doorbells directly.
 */
#include "kernel.h"

#define ENTRIES_PER_TABLE 512       /* 4 KiB table / 8-byte entries */
#define PDPT_SHIFT        30        /* one PDPT entry (one page directory) maps 1 GiB */
#define PD_SHIFT          21        /* one PD entry maps 2 MiB */
#define TABLE_FLAGS       (PTE_PRESENT | PTE_WRITE | PTE_USER)

typedef u64 page_table[ENTRIES_PER_TABLE] __attribute__((aligned(PAGE_SIZE)));

/* Not zeroed at boot (.bss.noinit): each table is cleared when taken into use. */
static page_table pml4 __attribute__((section(".bss.noinit")));
static page_table pdpt __attribute__((section(".bss.noinit")));
static page_table page_dirs[MAX_PHYS_GIB] __attribute__((section(".bss.noinit")));

static void clear_table(u64 *table)
{
    for (u32 i = 0; i < ENTRIES_PER_TABLE; i++)
        table[i] = 0;
}

static void map_large_page(u64 phys, u64 extra_flags)
{
    u64 gib = phys >> PDPT_SHIFT;
    u64 *pd = page_dirs[gib];
    if (!(pdpt[gib] & PTE_PRESENT)) {
        clear_table(pd);
        pdpt[gib] = (u64)pd | TABLE_FLAGS;
    }
    pd[(phys >> PD_SHIFT) % ENTRIES_PER_TABLE] = phys | TABLE_FLAGS | PTE_LARGE | extra_flags;
}

u64 paging_init(void)
{
    const u64 limit = (u64)MAX_PHYS_GIB << PDPT_SHIFT;
    int clipped = 0;

    clear_table(pml4);
    clear_table(pdpt);
    pml4[0] = (u64)pdpt | TABLE_FLAGS;

    map_large_page(0, 0);
    for (u32 i = 0; i < ram_range_count; i++) {
        u64 start = ram_ranges[i].base & ~(u64)(LARGE_PAGE_SIZE - 1);
        u64 end = ram_ranges[i].base + ram_ranges[i].size;
        if (end > limit) {
            end = limit;
            ram_ranges[i].size = ram_ranges[i].base < limit ? limit - ram_ranges[i].base : 0;
            clipped = 1;
        }
        for (u64 p = start; p < end; p += LARGE_PAGE_SIZE)
            map_large_page(p, 0);
    }
    map_large_page(LAPIC_PHYS_BASE, PTE_PCD | PTE_PWT);
    /* After RAM, so a 2 MiB page shared with RAM ends up uncached rather than device memory cached. */
    for (u32 i = 0; i < pci_mmio_range_count; i++) {
        u64 start = pci_mmio_ranges[i].base & ~(u64)(LARGE_PAGE_SIZE - 1);
        u64 end = pci_mmio_ranges[i].base + pci_mmio_ranges[i].size;
        for (u64 p = start; p < end; p += LARGE_PAGE_SIZE)
            map_large_page(p, PTE_PCD | PTE_PWT);
    }

    if (clipped)
        kprint_msg("RAM above 64 GiB is not used");
    return (u64)pml4;
}
