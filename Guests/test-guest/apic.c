/*
 * apic.c - the local APIC in xAPIC (MMIO) mode: enable, periodic timer,
 * EOI, INIT/STARTUP IPIs, and a timer-based microsecond delay. Also masks
 * the legacy 8259 PICs so only the LAPIC interrupts the CPUs.
 */
#include "kernel.h"

/* LAPIC register offsets (Intel SDM vol. 3, table 10-1). */
#define LAPIC_ID            0x020
#define LAPIC_TPR           0x080
#define LAPIC_EOI           0x0B0
#define LAPIC_SVR           0x0F0
#define LAPIC_ICR_LOW       0x300
#define LAPIC_ICR_HIGH      0x310
#define LAPIC_LVT_TIMER     0x320
#define LAPIC_LVT_LINT0     0x350
#define LAPIC_LVT_ERROR     0x370
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_CURRENT 0x390
#define LAPIC_TIMER_DIVIDE  0x3E0

#define LAPIC_ID_SHIFT      24          /* xAPIC ID is in bits 31:24 of the ID register and ICR high */
#define SVR_APIC_ENABLE     0x100       /* APIC software enable */
#define LVT_MASKED          0x10000
#define LVT_TIMER_PERIODIC  0x20000
#define TIMER_DIVIDE_BY_16  0x3         /* divide configuration encoding for /16 */
#define TIMER_DIVISOR       16
#define ICR_INIT            0x500       /* delivery mode INIT */
#define ICR_STARTUP         0x600       /* delivery mode STARTUP */
#define ICR_LEVEL_ASSERT    0x4000
#define ICR_SEND_PENDING    0x1000      /* delivery status */
#define ICR_POLL_LIMIT      1000000     /* polls of the delivery status before giving up */

/*
 * Timer frequency assumption: KVM's in-kernel LAPIC runs its timer off a
 * 1 GHz APIC bus (APIC_BUS_CYCLE_NS_DEFAULT = 1 ns in arch/x86/kvm/lapic.h),
 * which both Ferry and QEMU use. With divide-by-16 the counter runs at
 * 62.5 MHz, so 625000 counts = 10 ms = one tick at TICK_HZ = 100.
 */
#define KVM_APIC_BUS_HZ           1000000000UL
#define TIMER_COUNTS_PER_SECOND   (KVM_APIC_BUS_HZ / TIMER_DIVISOR)
#define LAPIC_TIMER_INITIAL_COUNT (TIMER_COUNTS_PER_SECOND / TICK_HZ)
#define MICROSECONDS_PER_SECOND   1000000UL

/* 8259 PIC data (mask) ports and the all-masked value (PC/AT architecture). */
#define PIC1_DATA           0x21
#define PIC2_DATA           0xA1
#define PIC_MASK_ALL        0xFF

static inline u32 lapic_read(u32 reg)
{
    return *(volatile u32 *)(u64)(LAPIC_PHYS_BASE + reg);
}

static inline void lapic_write(u32 reg, u32 value)
{
    *(volatile u32 *)(u64)(LAPIC_PHYS_BASE + reg) = value;
}

void pic_disable(void)
{
    outb(PIC1_DATA, PIC_MASK_ALL);
    outb(PIC2_DATA, PIC_MASK_ALL);
}

void lapic_init_cpu(void)
{
    lapic_write(LAPIC_SVR, SVR_APIC_ENABLE | VECTOR_SPURIOUS);
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);   /* no ExtINT from the (masked) PIC */
    lapic_write(LAPIC_LVT_ERROR, LVT_MASKED);
    lapic_write(LAPIC_TIMER_DIVIDE, TIMER_DIVIDE_BY_16);
    lapic_write(LAPIC_LVT_TIMER, LVT_TIMER_PERIODIC | VECTOR_TIMER);
    lapic_write(LAPIC_TIMER_INITIAL, LAPIC_TIMER_INITIAL_COUNT);
}

u32 lapic_id(void)
{
    return lapic_read(LAPIC_ID) >> LAPIC_ID_SHIFT;
}

void lapic_eoi(void)
{
    lapic_write(LAPIC_EOI, 0);
}

static void send_ipi(u32 apic_id, u32 command)
{
    lapic_write(LAPIC_ICR_HIGH, apic_id << LAPIC_ID_SHIFT);
    lapic_write(LAPIC_ICR_LOW, command);
    for (u32 i = 0; i < ICR_POLL_LIMIT && (lapic_read(LAPIC_ICR_LOW) & ICR_SEND_PENDING); i++)
        cpu_relax();
}

void lapic_send_init(u32 apic_id)
{
    send_ipi(apic_id, ICR_INIT | ICR_LEVEL_ASSERT);
}

void lapic_send_startup(u32 apic_id, u32 vector)
{
    send_ipi(apic_id, ICR_STARTUP | ICR_LEVEL_ASSERT | vector);
}

/* Waits by watching this CPU's periodic timer count down (the timer must be running). */
void udelay(u64 microseconds)
{
    u64 needed = microseconds * TIMER_COUNTS_PER_SECOND / MICROSECONDS_PER_SECOND;
    u64 elapsed = 0;
    u32 prev = lapic_read(LAPIC_TIMER_CURRENT);
    while (elapsed < needed) {
        cpu_relax();
        u32 now = lapic_read(LAPIC_TIMER_CURRENT);
        if (now <= prev)
            elapsed += prev - now;
        else
            elapsed += prev + (LAPIC_TIMER_INITIAL_COUNT - now);   /* reloaded in between */
        prev = now;
    }
}
