/*
 * cpu.c - per-CPU descriptor tables: a 64-bit TSS per CPU (RSP0 = that CPU's
 * kernel stack) in the shared GDT from boot.S, and the shared IDT.
 */
#include "kernel.h"

#define TSS_TYPE_AVAILABLE  0x89    /* present, DPL 0, 64-bit TSS (available) - SDM vol. 3, 8.2.3 */
#define IDT_TYPE_INTERRUPT  0x8E    /* present, DPL 0, 64-bit interrupt gate - SDM vol. 3, 6.14.1 */

struct tss {
    u32 reserved0;
    u64 rsp[3];
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
} __attribute__((packed));

struct idt_entry {
    u16 offset_low;
    u16 selector;
    u8 ist;
    u8 type;
    u16 offset_mid;
    u32 offset_high;
    u32 reserved;
} __attribute__((packed));

struct descriptor_pointer {
    u16 limit;
    u64 base;
} __attribute__((packed));

extern u64 gdt[];
extern void (*const exception_stubs[NUM_EXCEPTIONS])(void);
extern void timer_stub(void);
extern void spurious_stub(void);

static struct tss tss[MAX_CPUS];
static struct idt_entry idt[IDT_ENTRIES] __attribute__((aligned(16)));

static void set_gate(u32 vector, void (*handler)(void))
{
    u64 addr = (u64)handler;
    idt[vector].offset_low = (u16)addr;
    idt[vector].selector = GDT_KCODE64;
    idt[vector].ist = 0;
    idt[vector].type = IDT_TYPE_INTERRUPT;
    idt[vector].offset_mid = (u16)(addr >> 16);
    idt[vector].offset_high = (u32)(addr >> 32);
    idt[vector].reserved = 0;
}

/* Called once by the BSP; unused vectors stay not-present (a stray one raises #GP). */
void idt_init(void)
{
    for (u32 v = 0; v < NUM_EXCEPTIONS; v++)
        set_gate(v, exception_stubs[v]);
    set_gate(VECTOR_TIMER, timer_stub);
    set_gate(VECTOR_SPURIOUS, spurious_stub);
}

void cpu_tables_load(u32 cpu)
{
    struct tss *t = &tss[cpu];
    t->rsp[0] = (u64)kstacks[cpu] + KSTACK_SIZE;
    t->iomap_base = sizeof(struct tss);     /* no I/O bitmap: CPL 3 has no port access */

    /*
     * 16-byte system descriptor (SDM vol. 3, figure 8-4): limit 15:0 in bits 15:0,
     * base 23:0 in bits 39:16, type/present in bits 47:40, limit 19:16 in bits 51:48,
     * base 31:24 in bits 63:56; the second quadword holds base 63:32.
     */
    u64 base = (u64)t;
    u64 limit = sizeof(struct tss) - 1;
    u32 index = GDT_STATIC_ENTRIES + cpu * (TSS_DESC_SIZE / GDT_ENTRY_SIZE);
    gdt[index] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | ((u64)TSS_TYPE_AVAILABLE << 40) |
                 (((limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56);
    gdt[index + 1] = base >> 32;

    u16 selector = (u16)(GDT_TSS_BASE + TSS_DESC_SIZE * cpu);
    __asm__ volatile("ltr %0" : : "r"(selector) : "memory");

    struct descriptor_pointer idtr = { sizeof(idt) - 1, (u64)idt };
    __asm__ volatile("lidt %0" : : "m"(idtr) : "memory");
}
