/*
 * acpi.c - the processors listed in the ACPI MADT (ACPI 6.x, 5.2.5 and
 * 5.2.12). Only a cross-check for the MP table: SeaBIOS (QEMU's firmware)
 * lists just the first logical CPU of each package in its MP table, so under
 * QEMU's default topology (-smp N = N cores in one socket) the MP table shows
 * one CPU while the MADT shows all of them. Ferry provides no ACPI tables.
 * Runs on the boot page tables (identity map of the first 4 GiB).
 */
#include "kernel.h"

#define RSDP_SIGNATURE_LEN  8
#define RSDP_V1_LENGTH      20          /* bytes covered by the ACPI 1.0 checksum */
#define ACPI_XSDT_REVISION  2           /* RSDP revision from which xsdt_paddr exists */
#define MADT_SIGNATURE      0x43495041  /* "APIC" as a little-endian u32 */
#define MADT_LOCAL_APIC     0           /* MADT entry type: processor local APIC */
#define MADT_LAPIC_ENABLED  0x1
#define MADT_ENTRY_HEADER   2           /* every MADT entry starts with type and length bytes */
#define MAX_SDT_LENGTH      0x100000    /* sanity bound for table lengths */

struct rsdp {
    char signature[RSDP_SIGNATURE_LEN];
    u8 checksum;
    char oem[6];
    u8 revision;
    u32 rsdt_paddr;
    u32 length;
    u64 xsdt_paddr;
    u8 ext_checksum;
    u8 reserved[3];
} __attribute__((packed));

struct sdt_header {
    u32 signature;
    u32 length;
    u8 revision;
    u8 checksum;
    char oem[6];
    char oem_table[8];
    u32 oem_revision;
    u32 creator;
    u32 creator_revision;
} __attribute__((packed));

struct madt {
    struct sdt_header header;
    u32 lapic_paddr;
    u32 flags;
} __attribute__((packed));

struct madt_local_apic {
    u8 type;
    u8 length;
    u8 acpi_id;
    u8 apic_id;
    u32 flags;
} __attribute__((packed));

static u8 sum_bytes(const u8 *p, u64 len)
{
    u8 sum = 0;
    while (len--)
        sum += *p++;
    return sum;
}

static int is_rsdp(u64 paddr)
{
    static const char signature[RSDP_SIGNATURE_LEN] = { 'R', 'S', 'D', ' ', 'P', 'T', 'R', ' ' };
    const u8 *p = (const u8 *)paddr;
    for (u32 i = 0; i < RSDP_SIGNATURE_LEN; i++) {
        if (p[i] != (u8)signature[i])
            return 0;
    }
    return sum_bytes(p, RSDP_V1_LENGTH) == 0;
}

static const struct sdt_header *valid_table(u64 paddr)
{
    if (paddr == 0 || paddr >= BOOT_MAP_LIMIT - sizeof(struct sdt_header))
        return NULL;
    const struct sdt_header *h = (const struct sdt_header *)paddr;
    if (h->length < sizeof(*h) || h->length > MAX_SDT_LENGTH || paddr + h->length > BOOT_MAP_LIMIT)
        return NULL;
    return h;
}

static const struct madt *find_madt(const struct rsdp *rsdp)
{
    int wide = rsdp->revision >= ACPI_XSDT_REVISION && rsdp->xsdt_paddr != 0;
    const struct sdt_header *root = valid_table(wide ? rsdp->xsdt_paddr : rsdp->rsdt_paddr);
    if (!root)
        return NULL;
    u32 entry_size = wide ? sizeof(u64) : sizeof(u32);
    u32 count = (root->length - sizeof(*root)) / entry_size;
    const u8 *entries = (const u8 *)(root + 1);
    for (u32 i = 0; i < count; i++) {
        u64 paddr;
        if (wide)
            memcpy(&paddr, entries + i * entry_size, sizeof(u64));
        else
            paddr = *(const u32 *)(entries + i * entry_size);
        const struct sdt_header *h = valid_table(paddr);
        if (h && h->signature == MADT_SIGNATURE && h->length >= sizeof(struct madt) &&
            sum_bytes((const u8 *)h, h->length) == 0)
            return (const struct madt *)h;
    }
    return NULL;
}

/*
 * Fills ids (up to max) with the enabled local APIC ids of the MADT; returns
 * how many it lists (0: no MADT). The RSDP comes from hvm_start_info only (no
 * legacy memory search: that would cost emulated CPL-0 time on every boot).
 */
u32 acpi_madt_cpus(u64 rsdp_paddr, u32 *ids, u32 max)
{
    if (rsdp_paddr == 0 || rsdp_paddr >= BOOT_MAP_LIMIT - sizeof(struct rsdp) || !is_rsdp(rsdp_paddr))
        return 0;
    const struct madt *madt = find_madt((const struct rsdp *)rsdp_paddr);
    if (!madt)
        return 0;
    u32 count = 0;
    const u8 *p = (const u8 *)(madt + 1);
    const u8 *end = (const u8 *)madt + madt->header.length;
    while (p + MADT_ENTRY_HEADER <= end && p[1] >= MADT_ENTRY_HEADER && p + p[1] <= end) {
        const struct madt_local_apic *e = (const struct madt_local_apic *)p;
        if (e->type == MADT_LOCAL_APIC && e->length >= sizeof(*e) && (e->flags & MADT_LAPIC_ENABLED)) {
            if (count < max)
                ids[count] = e->apic_id;
            count++;
        }
        p += p[1];
    }
    return count;
}
