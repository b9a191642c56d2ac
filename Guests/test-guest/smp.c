/*
 * smp.c - find the CPUs in the Intel MP table (MultiProcessor Specification
 * 1.4, chapter 4) and start the application processors with INIT-SIPI-SIPI
 * (section B.4) through the real-mode trampoline (trampoline.S).
 */
#include "kernel.h"

#define MPF_SIGNATURE       0x5F504D5F  /* "_MP_" read as a little-endian u32 */
#define MPC_SIGNATURE       0x504D4350  /* "PCMP" */
#define MPF_ALIGN           16          /* the floating pointer is 16-byte aligned */
#define MPF_LENGTH_UNIT     16          /* its length field counts 16-byte units */
#define BDA_EBDA_SEGMENT    0x40E       /* BIOS data area: real-mode segment of the EBDA */
#define BDA_BASE_MEMORY_KIB 0x413       /* BIOS data area: base memory size in KiB */
#define REAL_MODE_SEGMENT_SHIFT 4       /* real mode: linear address = segment << 4 */
#define KIB                 1024
#define EBDA_MIN            0x80000     /* plausible EBDA start range (below 640 KiB) */
#define EBDA_MAX            0xA0000
#define SEARCH_WINDOW       1024        /* spec: first KiB of the EBDA / last KiB of base memory */
#define BIOS_ROM_START      0xF0000     /* spec: the BIOS ROM area 0xF0000-0xFFFFF */
#define BIOS_ROM_END        0x100000
#define MPC_ENTRY_PROCESSOR 0           /* entry types and sizes (spec tables 4-3 .. 4-8) */
#define MPC_PROCESSOR_SIZE  20
#define MPC_OTHER_SIZE      8           /* bus, I/O APIC, I/O and local interrupt entries */
#define MPC_LAST_KNOWN_TYPE 4
#define MPC_CPU_ENABLED     0x01
#define DEFAULT_CONFIG_CPUS 2           /* spec chapter 5: default configurations have two CPUs */

/* INIT-SIPI-SIPI timing (MP spec B.4; Intel SDM vol. 3, 8.4.4.1). */
#define INIT_DELAY_US       10000       /* 10 ms after INIT */
#define SIPI_DELAY_US       200         /* 200 us after each STARTUP */
#define AP_START_TIMEOUT_US 1000000     /* give up on an AP after 1 s */
#define AP_POLL_US          1000        /* check for the AP every 1 ms while waiting */
#define SIPI_VECTOR         (AP_TRAMPOLINE_BASE >> 12)   /* STARTUP vector = page number */

struct mp_floating {
    u32 signature;
    u32 config_paddr;
    u8 length;
    u8 revision;
    u8 checksum;
    u8 features[5];
} __attribute__((packed));

struct mp_config {
    u32 signature;
    u16 base_length;
    u8 revision;
    u8 checksum;
    char oem[8];
    char product[12];
    u32 oem_table;
    u16 oem_table_size;
    u16 entry_count;
    u32 lapic_paddr;
    u16 ext_length;
    u8 ext_checksum;
    u8 reserved;
} __attribute__((packed));

struct mp_processor {
    u8 type;
    u8 apic_id;
    u8 apic_version;
    u8 flags;
    u32 signature;
    u32 features;
    u32 reserved[2];
} __attribute__((packed));

extern u32 ap_entry_cr3;
extern u64 ap_entry_stack;
extern const char ap_trampoline_start[], ap_trampoline_end[];

u32 cpu_count = 1;
volatile u32 cpus_online;
volatile u32 ap_boot_cpu;
volatile u32 ap_started;
static u32 cpu_apic_ids[MAX_CPUS];  /* processors to run on (the BSP among them) */
static int have_cpu_list;           /* 0: no table found, run on the BSP only */

static u8 checksum(const u8 *p, u64 len)
{
    u8 sum = 0;
    while (len--)
        sum += *p++;
    return sum;
}

static const struct mp_floating *search(u64 start, u64 end)
{
    for (u64 p = start; p + sizeof(struct mp_floating) <= end; p += MPF_ALIGN) {
        const struct mp_floating *mpf = (const struct mp_floating *)p;
        if (mpf->signature == MPF_SIGNATURE && mpf->length != 0 &&
            checksum((const u8 *)mpf, (u64)mpf->length * MPF_LENGTH_UNIT) == 0)
            return mpf;
    }
    return NULL;
}

/* Reads a u16 at a fixed low physical address (hidden from the compiler, which objects to them). */
static u16 read_low16(u64 paddr)
{
    __asm__("" : "+r"(paddr));
    return *(volatile u16 *)paddr;
}

static const struct mp_floating *find_floating(void)
{
    const struct mp_floating *mpf = NULL;
    u64 ebda = (u64)read_low16(BDA_EBDA_SEGMENT) << REAL_MODE_SEGMENT_SHIFT;
    u64 base_end = (u64)read_low16(BDA_BASE_MEMORY_KIB) * KIB;
    if (ebda >= EBDA_MIN && ebda < EBDA_MAX)
        mpf = search(ebda, ebda + SEARCH_WINDOW);
    if (!mpf && base_end >= EBDA_MIN + SEARCH_WINDOW && base_end <= EBDA_MAX)
        mpf = search(base_end - SEARCH_WINDOW, base_end);
    if (!mpf)
        mpf = search(BIOS_ROM_START, BIOS_ROM_END);
    return mpf;
}

/* Fills ids (up to max) with the enabled processors' APIC ids in table order; returns how many
   the table lists (0: no usable table). */
static u32 mp_table_cpus(u32 *ids, u32 max)
{
    const struct mp_floating *mpf = find_floating();
    u32 count = 0;
    if (!mpf)
        return 0;
    if (mpf->config_paddr == 0) {
        for (u32 i = 0; i < DEFAULT_CONFIG_CPUS && count < max; i++)
            ids[count++] = i;
        return count;
    }
    const struct mp_config *mpc = (const struct mp_config *)(u64)mpf->config_paddr;
    if (mpc->signature != MPC_SIGNATURE || checksum((const u8 *)mpc, mpc->base_length) != 0) {
        kprint_msg("bad MP configuration table");
        return 0;
    }
    const u8 *entry = (const u8 *)(mpc + 1);
    const u8 *end = (const u8 *)mpc + mpc->base_length;
    for (u32 i = 0; i < mpc->entry_count && entry < end; i++) {
        if (*entry == MPC_ENTRY_PROCESSOR) {
            const struct mp_processor *cpu = (const struct mp_processor *)entry;
            if (cpu->flags & MPC_CPU_ENABLED) {
                if (count < max)
                    ids[count] = cpu->apic_id;
                count++;
            }
            entry += MPC_PROCESSOR_SIZE;
        } else if (*entry <= MPC_LAST_KNOWN_TYPE) {
            entry += MPC_OTHER_SIZE;
        } else {
            break;      /* unknown entry type: its size is unknown too */
        }
    }
    return count;
}

static void print_source(const char *what, u32 mp_count, u32 madt_count)
{
    struct line l;
    line_start(&l, "ferry-test-guest: MP table lists ");
    line_dec(&l, mp_count);
    line_str(&l, " processor(s), ACPI MADT ");
    line_dec(&l, madt_count);
    line_str(&l, "; ");
    line_str(&l, what);
    kprint(&l);
}

/*
 * The CPUs come from the MP table. Where an ACPI MADT lists more enabled
 * processors (SeaBIOS's MP table has one entry per package), the MADT wins.
 * Runs on the boot page tables (first 4 GiB identity-mapped).
 */
void cpus_discover(void)
{
    static u32 madt_ids[MAX_CPUS];
    u32 mp_count = mp_table_cpus(cpu_apic_ids, MAX_CPUS);
    u32 madt_count = acpi_madt_cpus(pvh_rsdp_paddr, madt_ids, MAX_CPUS);
    u32 found = mp_count;
    if (madt_count > mp_count) {
        print_source("using the MADT", mp_count, madt_count);
        memcpy(cpu_apic_ids, madt_ids, sizeof(madt_ids));
        found = madt_count;
    }
    if (found == 0) {
        print_source("running on the boot CPU only", 0, 0);
        cpu_count = 1;
        return;
    }
    have_cpu_list = 1;
    cpu_count = found;
    if (found > MAX_CPUS) {
        kprint_msg("more processors than MAX_CPUS; ignoring the rest");
        cpu_count = MAX_CPUS;
    }
}

static void start_failed(u32 apic_id)
{
    struct line l;
    line_start(&l, "ferry-test-guest: application processor with APIC id ");
    line_dec(&l, apic_id);
    line_str(&l, " did not start (no response to INIT-SIPI-SIPI)");
    kprint(&l);
}

/* Starts one AP as CPU index `cpu`; returns 1 once it is online. */
static int start_ap(u32 apic_id, u32 cpu)
{
    ap_boot_cpu = cpu;
    ap_started = 0;
    ap_entry_stack = (u64)kstacks[cpu] + KSTACK_SIZE;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);

    lapic_send_init(apic_id);
    udelay(INIT_DELAY_US);
    lapic_send_startup(apic_id, SIPI_VECTOR);
    udelay(SIPI_DELAY_US);
    if (!ap_started) {
        lapic_send_startup(apic_id, SIPI_VECTOR);
        udelay(SIPI_DELAY_US);
    }
    for (u64 waited = 0; !ap_started && waited < AP_START_TIMEOUT_US; waited += AP_POLL_US)
        udelay(AP_POLL_US);
    if (ap_started)
        return 1;
    lapic_send_init(apic_id);   /* park it again so it cannot start late with a reused index */
    start_failed(apic_id);
    return 0;
}

/* BSP: its LAPIC timer and its own online state must already be set up; cr3 = final page tables. */
void smp_start_aps(u64 cr3)
{
    if (!have_cpu_list)
        return;
    ap_entry_cr3 = (u32)cr3;    /* loaded in 32-bit mode: the tables lie in the image, below 4 GiB */
    u32 self = lapic_id();
    const u8 *src = (const u8 *)ap_trampoline_start;
    memcpy((void *)AP_TRAMPOLINE_BASE, src, (u64)(ap_trampoline_end - ap_trampoline_start));

    for (u32 i = 0; i < cpu_count; i++) {
        if (cpu_apic_ids[i] == self)
            continue;
        if (start_ap(cpu_apic_ids[i], cpus_online))
            cpus_online++;
    }
}
