/*
 * kernel.c - the CPL-0 start-up sequence of the BSP and the APs, free
 * memory (for virtio buffers and the working set), the workload's memory
 * plan, and power-off.
 */
#include "kernel.h"
#include "virtio.h"

#define I8042_STATUS        0x64    /* i8042 status (read) / command (write) port */
#define I8042_INPUT_FULL    0x02    /* status: input buffer full, controller busy */
#define I8042_CMD_RESET     0xFE    /* pulse the CPU reset line; Ferry and QEMU -no-reboot exit */
#define I8042_POLL_LIMIT    100000  /* polls of the status before writing anyway */
#define PAGES_PER_MIB       (MIB / PAGE_SIZE)
#define GEN_PER_PAGE        (PAGE_SIZE / sizeof(u64))  /* generation entries per page */
#define MS_PER_TICK         (1000 / TICK_HZ)

u8 kstacks[MAX_CPUS][KSTACK_SIZE] __attribute__((aligned(PAGE_SIZE), section(".bss.noinit")));
u8 ustacks[MAX_CPUS][USTACK_SIZE] __attribute__((aligned(PAGE_SIZE), section(".bss.noinit")));

struct cpu_shared cpu_shared[MAX_CPUS];
struct workload_config wl_config;
volatile u32 wl_boot_complete;

static u64 ms_to_ticks(u64 ms)
{
    if (ms == 0)
        return 0;
    u64 ticks = ms / MS_PER_TICK;
    return ticks ? ticks : 1;
}

static u64 ram_total_bytes(void)
{
    u64 total = 0;
    for (u32 i = 0; i < ram_range_count; i++)
        total += ram_ranges[i].size;
    return total;
}

/*
 * Free memory = RAM above the end of the image, in whole pages, as a list of
 * ranges (wl_config.ranges). Virtio rings and buffers are taken off the
 * front of a range first (take_free_pages); what is left holds the
 * generation array (one u64 per working-set page) followed by the working set.
 */
static void collect_free_ranges(void)
{
    const u64 first_free = ((u64)__kernel_end + PAGE_SIZE - 1) & ~(u64)(PAGE_SIZE - 1);
    struct workload_config *c = &wl_config;

    for (u32 i = 0; i < ram_range_count && c->nranges < MAX_FREE_RANGES; i++) {
        u64 start = ram_ranges[i].base;
        u64 end = ram_ranges[i].base + ram_ranges[i].size;
        if (start < first_free)
            start = first_free;
        start = (start + PAGE_SIZE - 1) & ~(u64)(PAGE_SIZE - 1);
        end &= ~(u64)(PAGE_SIZE - 1);
        if (end <= start)
            continue;
        c->ranges[c->nranges].base = start;
        c->ranges[c->nranges].pages = (end - start) / PAGE_SIZE;
        c->nranges++;
    }
}

u64 take_free_pages(u64 pages)
{
    for (u32 i = 0; i < wl_config.nranges; i++) {
        struct free_range *r = &wl_config.ranges[i];
        if (r->pages >= pages) {
            u64 base = r->base;
            r->base += pages * PAGE_SIZE;
            r->pages -= pages;
            return base;
        }
    }
    return 0;
}

u64 largest_free_pages(void)
{
    u64 most = 0;
    for (u32 i = 0; i < wl_config.nranges; i++) {
        if (wl_config.ranges[i].pages > most)
            most = wl_config.ranges[i].pages;
    }
    return most;
}

/* Eight bytes per store: CPL-0 code may be emulated, and fmt.c's memset goes byte by byte. */
void clear_page(u64 page)
{
    volatile u64 *words = (volatile u64 *)page;
    for (u32 i = 0; i < PAGE_SIZE / sizeof(u64); i++)
        words[i] = 0;
}

static void plan_workload(void)
{
    u64 free_pages = 0;
    struct workload_config *c = &wl_config;
    for (u32 i = 0; i < c->nranges; i++)
        free_pages += c->ranges[i].pages;

    u64 want = boot_params.workset_mib * PAGES_PER_MIB;
    /* Largest whole number of MiB whose pages plus generation array fit. */
    u64 fit_mib = free_pages * GEN_PER_PAGE / (GEN_PER_PAGE + 1) / PAGES_PER_MIB;
    while (fit_mib && fit_mib * PAGES_PER_MIB + (fit_mib * PAGES_PER_MIB + GEN_PER_PAGE - 1) / GEN_PER_PAGE > free_pages)
        fit_mib--;
    if (boot_params.workset_mib > fit_mib) {
        struct line l;
        line_start(&l, "ferry-test-guest: workset_mib=");
        line_dec(&l, boot_params.workset_mib);
        line_str(&l, " clamped to ");
        line_dec(&l, fit_mib);
        line_str(&l, " (free RAM ");
        line_dec(&l, free_pages / PAGES_PER_MIB);
        line_str(&l, " MiB)");
        kprint(&l);
        boot_params.workset_mib = fit_mib;
        want = fit_mib * PAGES_PER_MIB;
    }
    c->workset_pages = want;
    c->gen_pages = (want + GEN_PER_PAGE - 1) / GEN_PER_PAGE;
    c->dirty_rate = boot_params.dirty_rate;
    c->heartbeat_ticks = ms_to_ticks(boot_params.heartbeat_ms);
    c->verify_ticks = ms_to_ticks(boot_params.verify_ms);
    blk_area.rate = boot_params.block_rate;
    net_area.ip = boot_params.net_ip;
    net_area.peer = boot_params.net_peer;
    net_area.stream_port = boot_params.net_stream_port;
    net_area.stream_rate = boot_params.net_stream_rate;
    net_area.stream_bytes = boot_params.net_stream_bytes;
    blk_area.verify_ticks = ms_to_ticks(boot_params.block_verify_ms);
    poweroff_ticks = boot_params.poweroff_s * TICK_HZ;
}

static void print_boot_line(void)
{
    struct line l;
    line_start(&l, "ferry-test-guest: boot cpus=");
    line_dec(&l, cpu_count);
    line_str(&l, " ram_mib=");
    line_dec(&l, ram_total_bytes() / MIB);
    line_str(&l, " workset_mib=");
    line_dec(&l, boot_params.workset_mib);
    line_str(&l, " dirty_rate=");
    if (boot_params.dirty_rate == DIRTY_RATE_MAX)
        line_str(&l, "max");
    else
        line_dec(&l, boot_params.dirty_rate);
    line_str(&l, " heartbeat_ms=");
    line_dec(&l, boot_params.heartbeat_ms);
    line_str(&l, " verify_ms=");
    line_dec(&l, boot_params.verify_ms);
    line_str(&l, " poweroff_s=");
    line_dec(&l, boot_params.poweroff_s);
    if (virtio_blk.ready) {                 /* only with a disk: tests parse the plain line */
        line_str(&l, " block_blocks=");
        line_dec(&l, boot_params.block_blocks);
        line_str(&l, " block_rate=");
        if (boot_params.block_rate == BLOCK_RATE_MAX)
            line_str(&l, "max");
        else
            line_dec(&l, boot_params.block_rate);
        line_str(&l, " block_verify_ms=");
        line_dec(&l, boot_params.block_verify_ms);
    }
    kprint(&l);
}

static void print_online(u32 cpu)
{
    struct line l;
    line_start(&l, "ferry-test-guest: cpu ");
    line_dec(&l, cpu);
    line_str(&l, " online");
    kprint(&l);
}

/* The user stack starts one slot below its top, as if user_main had been called (ABI alignment). */
static void __attribute__((noreturn)) run_workload(u32 cpu)
{
    enter_user((u64)user_main, (u64)ustacks[cpu] + USTACK_SIZE - sizeof(u64), cpu);
}

/* Entered from boot.S on CPU 0's kernel stack, interrupts off, boot page tables. */
void __attribute__((noreturn)) bsp_main(u32 start_info_paddr)
{
    console_init();
    pic_disable();
    pvh_parse(start_info_paddr);
    cpus_discover();
    pci_scan();                             /* before paging: the BARs in use get mapped */

    u64 cr3 = paging_init();
    write_cr3(cr3);
    idt_init();
    cpu_tables_load(0);
    lapic_init_cpu();

    collect_free_ranges();
    virtio_setup();                         /* takes its RAM before the working set is sized */
    plan_workload();
    print_boot_line();
    print_online(0);
    cpus_online = 1;
    smp_start_aps(cr3);

    wl_config.ncpus = cpus_online;
    __atomic_store_n(&wl_boot_complete, 1, __ATOMIC_RELEASE);
    run_workload(0);
}

/* Entered from boot.S (via the trampoline) on the kernel stack smp.c chose. */
void __attribute__((noreturn)) ap_main(void)
{
    u32 cpu = ap_boot_cpu;
    cpu_tables_load(cpu);
    lapic_init_cpu();
    print_online(cpu);
    __atomic_store_n(&ap_started, 1, __ATOMIC_RELEASE);
    run_workload(cpu);
}

/* BSP timer handler, at poweroff_ticks: print POWEROFF, then reset through the i8042. */
void __attribute__((noreturn)) machine_poweroff(void)
{
    struct cpu_shared *me = &cpu_shared[this_cpu()];
    console_lock();
    if (me->mbox_full) {
        me->mbox[MBOX_SIZE - 1] = '\0';
        console_write(me->mbox);
    }
    console_write("POWEROFF\n");
    console_unlock();
    for (u32 i = 0; i < I8042_POLL_LIMIT && (inb(I8042_STATUS) & I8042_INPUT_FULL); i++)
        cpu_relax();
    outb(I8042_STATUS, I8042_CMD_RESET);
    halt_forever();
}
