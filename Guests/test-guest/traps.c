/*
 * traps.c - the C side of the interrupt and exception stubs in entry.S.
 *
 * Timer: count the tick, print the CPU's mailbox line if one is waiting,
 * power off at the requested tick (BSP), EOI.
 * Exceptions: print one line and halt the CPU forever - except the idle
 * trap: the workload executes HLT at CPL 3 when it has nothing to do, which
 * raises #GP(0); we skip the instruction and really halt until the next
 * interrupt, so idle vCPUs do not spin.
 * NMI: counted and returned from; the CPU's next timer tick prints
 * "NMI cpu=N count=M" (an NMI may arrive while the console lock is held).
 */
#include "kernel.h"

#define VECTOR_NMI          2       /* non-maskable interrupt */
#define VECTOR_GP           13      /* general protection fault */
#define VECTOR_PF           14      /* page fault */
#define OPCODE_HLT          0xF4
#define HLT_LENGTH          1
#define CPL_MASK            3       /* low two bits of CS = privilege level */
#define CPL_USER            3

u64 poweroff_ticks;
/* CPU whose timer handler powers off: the BSP, or the next CPU if the BSP died of an exception. */
static volatile u32 poweroff_cpu;
/* NMIs each CPU took, and how many of them its timer handler has reported. */
static volatile u32 nmis_taken[MAX_CPUS];
static u32 nmis_reported[MAX_CPUS];

static void print_mailbox(struct cpu_shared *me)
{
    me->mbox[MBOX_SIZE - 1] = '\0';
    console_lock();
    console_write(me->mbox);
    console_unlock();
    me->mbox_full = 0;
}

void timer_handler(void)
{
    u32 cpu = this_cpu();
    struct cpu_shared *me = &cpu_shared[cpu];
    u64 ticks = me->ticks + 1;
    me->ticks = ticks;
    if (me->mbox_full)
        print_mailbox(me);
    u32 nmis = nmis_taken[cpu];
    if (nmis != nmis_reported[cpu]) {
        nmis_reported[cpu] = nmis;
        struct line l;
        line_start(&l, "ferry-test-guest: NMI cpu=");
        line_dec(&l, cpu);
        line_str(&l, " count=");
        line_dec(&l, nmis);
        line_end(&l);
        console_lock();
        console_write(l.text);
        console_unlock();
    }
    if (cpu == poweroff_cpu && poweroff_ticks != 0 && ticks >= poweroff_ticks)
        machine_poweroff();
    lapic_eoi();
}

static int is_idle_trap(const struct trap_frame *f)
{
    return f->vector == VECTOR_GP && f->error == 0 && (f->cs & CPL_MASK) == CPL_USER &&
           f->rip >= KERNEL_PHYS_BASE && f->rip < (u64)__kernel_end &&
           *(const volatile u8 *)f->rip == OPCODE_HLT;
}

void exception_handler(struct trap_frame *f)
{
    if (f->vector == VECTOR_NMI) {
        nmis_taken[this_cpu()]++;
        return;
    }
    if (is_idle_trap(f)) {
        f->rip += HLT_LENGTH;
        /* STI's one-instruction shadow makes STI;HLT atomic: no wake-up is lost. */
        __asm__ volatile("sti; hlt; cli" : : : "memory");
        return;
    }
    u32 cpu = this_cpu();
    struct line l, detail;
    line_start(&l, "ferry-test-guest: exception vector=");
    line_dec(&l, f->vector);
    line_str(&l, " error=");
    line_hex16(&l, f->error);
    line_str(&l, " rip=");
    line_hex16(&l, f->rip);
    line_str(&l, " cpu=");
    line_dec(&l, cpu);
    line_end(&l);
    line_start(&detail, "ferry-test-guest: page fault address=");
    line_hex16(&detail, read_cr2());
    line_end(&detail);
    console_lock();
    console_write(l.text);
    if (f->vector == VECTOR_PF)
        console_write(detail.text);
    console_unlock();
    if (cpu == poweroff_cpu && cpus_online > 1)
        poweroff_cpu = (cpu + 1) % cpus_online;     /* so poweroff_s still ends the VM */
    halt_forever();
}
