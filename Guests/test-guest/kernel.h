/*
 * kernel.h - declarations shared by the CPL-0 C files, and tiny wrappers
 * around privileged instructions. CPL-0 code may run emulated (slowly), so
 * it stays small and uses only plain integer instructions.
 */
#ifndef KERNEL_H
#define KERNEL_H

#include "types.h"
#include "layout.h"
#include "fmt.h"
#include "shared.h"

/* ---- Privileged instructions -------------------------------------------- */

static inline void outb(u16 port, u8 value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline u8 inb(u16 port)
{
    u8 value;
    __asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static inline void outw(u16 port, u16 value)
{
    __asm__ volatile("outw %0, %1" : : "a"(value), "Nd"(port));
}

static inline u16 inw(u16 port)
{
    u16 value;
    __asm__ volatile("inw %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static inline void outl(u16 port, u32 value)
{
    __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port));
}

static inline u32 inl(u16 port)
{
    u32 value;
    __asm__ volatile("inl %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static inline void write_cr3(u64 value)
{
    __asm__ volatile("mov %0, %%cr3" : : "r"(value) : "memory");
}

static inline u64 read_cr2(void)
{
    u64 value;
    __asm__ volatile("mov %%cr2, %0" : "=r"(value));
    return value;
}

static inline void cpu_relax(void)
{
    __asm__ volatile("pause" : : : "memory");
}

/* ---- Boot information (pvh.c) ------------------------------------------- */

#define MAX_RAM_RANGES 32

struct ram_range {
    u64 base;
    u64 size;
};

struct boot_params {
    u64 workset_mib;
    u64 dirty_rate;             /* DIRTY_RATE_MAX for "max" */
    u64 heartbeat_ms;
    u64 verify_ms;
    u64 poweroff_s;
    u64 block_blocks;
    u64 block_rate;             /* BLOCK_RATE_MAX for "max" */
    u64 block_verify_ms;
    u64 block_bench;            /* 1 = CPU 0 runs the block benchmark instead of the block workload */
    u64 bench_mib;
    u64 bench_qd;
    u64 bench_rand_qd;
    u64 bench_ticks;
    u64 net_ip;                 /* the guest's IPv4 address (host order); 0 = no network stack */
    u64 net_peer;               /* where the UDP stream goes (host order) */
    u64 net_stream_port;        /* its UDP port */
    u64 net_stream_rate;        /* datagrams per second; 0 = none, NET_RATE_MAX = as fast as the queue takes them */
    u64 net_stream_bytes;       /* payload bytes of each (at least 8: the sequence number) */
};

extern u64 pvh_rsdp_paddr;                      /* ACPI RSDP from hvm_start_info (0 = none) */
extern struct ram_range ram_ranges[MAX_RAM_RANGES];   /* sorted, non-overlapping */
extern u32 ram_range_count;
extern struct boot_params boot_params;

void pvh_parse(u32 start_info_paddr);

/* ---- Console (console.c) ------------------------------------------------ */

void console_init(void);
void console_lock(void);
void console_unlock(void);
void console_write(const char *text);           /* caller holds the lock */
void kprint(struct line *l);                    /* line_end + print under the lock */
void kprint_msg(const char *text);              /* "ferry-test-guest: <text>\n" */

/* ---- Paging (paging.c) -------------------------------------------------- */

u64 paging_init(void);                          /* returns the new CR3 */

/* ---- PCI (pci.c) ---------------------------------------------------------- */

#define PCI_MAX_MMIO_RANGES 8

struct pci_mmio_range {
    u64 base;
    u64 size;
};

/* BAR ranges of the devices in use; paging.c maps them uncached. */
extern struct pci_mmio_range pci_mmio_ranges[PCI_MAX_MMIO_RANGES];
extern u32 pci_mmio_range_count;

u32 pci_read32(u32 bdf, u32 offset);
u16 pci_read16(u32 bdf, u32 offset);
u8 pci_read8(u32 bdf, u32 offset);
void pci_write32(u32 bdf, u32 offset, u32 value);
void pci_write16(u32 bdf, u32 offset, u16 value);
void pci_scan(void);                            /* finds the virtio functions, calls virtio_probe */
u64 pci_bar_setup(u32 bdf, u32 index, u64 *size, const char **why);   /* base, 0 if unusable */
void pci_enable(u32 bdf);                       /* memory decode, bus master, INTx off */
void line_bdf(struct line *l, u32 bdf);         /* "bb:dd.f" */

/* ---- Virtio (virtio_pci.c, virtio_setup.c; structures in virtio.h) ------- */

struct virtio_dev;

void virtio_probe(u32 bdf, u16 device_id);      /* before paging: caps, BARs */
const char *virtio_begin(struct virtio_dev *d, u64 wanted);    /* reset .. FEATURES_OK; NULL = done */
const char *virtio_queue(struct virtio_dev *d, u32 index, u32 limit);  /* NULL = queue enabled */
u64 virtio_config64(const struct virtio_dev *d, u32 offset);
u32 virtio_config32(const struct virtio_dev *d, u32 offset);
void virtio_driver_ok(struct virtio_dev *d);
void virtio_fail(struct virtio_dev *d, const char *why);       /* FAILED + a console line */
void virtio_report_failure(const struct virtio_dev *d, const char *why);
void virtio_setup(void);                        /* after paging, before the working set is sized */
void bench_plan(struct virtio_dev *d);          /* block_bench=1: clamp the keys, carve the RAM (bench_setup.c) */

/* ---- Free memory (kernel.c) ------------------------------------------------ */

u64 take_free_pages(u64 pages);                 /* contiguous, not zeroed; 0 if no range has room */
u64 largest_free_pages(void);                   /* most pages take_free_pages can give at once */
void clear_page(u64 page);

/* ---- Descriptor tables (cpu.c) ------------------------------------------ */

void idt_init(void);
void cpu_tables_load(u32 cpu);                  /* TSS, ltr, lidt for this CPU */

/* ---- Local APIC (apic.c) ------------------------------------------------ */

void pic_disable(void);
void lapic_init_cpu(void);                      /* enable, mask LINT0, start the 100 Hz timer */
u32 lapic_id(void);
void lapic_eoi(void);
void lapic_send_init(u32 apic_id);
void lapic_send_startup(u32 apic_id, u32 vector);
void udelay(u64 microseconds);                  /* needs this CPU's timer running */

/* ---- SMP (smp.c) -------------------------------------------------------- */

extern u32 cpu_count;                           /* processors found (>= 1), the BSP included */
extern volatile u32 cpus_online;
extern volatile u32 ap_boot_cpu;                /* index of the AP being started */
extern volatile u32 ap_started;                 /* set by that AP once it is online */

void cpus_discover(void);                       /* MP table, cross-checked with the ACPI MADT */
void smp_start_aps(u64 cr3);

/* ---- ACPI (acpi.c) ----------------------------------------------------- */

u32 acpi_madt_cpus(u64 rsdp_paddr, u32 *ids, u32 max);

/* ---- Traps (traps.c) ---------------------------------------------------- */

/* Saved state, as laid out on the kernel stack by entry.S. */
struct trap_frame {
    u64 r11, r10, r9, r8, rdi, rsi, rdx, rcx, rax;
    u64 vector, error;
    u64 rip, cs, rflags, rsp, ss;               /* pushed by the CPU */
};

extern u64 poweroff_ticks;                      /* 0 = never */

/* ---- kernel.c ----------------------------------------------------------- */

extern u8 kstacks[MAX_CPUS][KSTACK_SIZE];
extern u8 ustacks[MAX_CPUS][USTACK_SIZE];
extern char __kernel_end[];

/* The CPU index, from the kernel stack pointer (each CPU has its own stack). */
static inline u32 this_cpu(void)
{
    u64 sp;
    __asm__ volatile("mov %%rsp, %0" : "=r"(sp));
    return (u32)((sp - (u64)kstacks) / KSTACK_SIZE);
}

void ap_main(void) __attribute__((noreturn));
void enter_user(u64 rip, u64 rsp, u64 arg) __attribute__((noreturn));
void halt_forever(void) __attribute__((noreturn));
void machine_poweroff(void) __attribute__((noreturn));

#endif
