/*
 * layout.h - addresses, selectors, vectors and sizes shared by the assembly
 * and C parts of the test guest. Everything here is a plain #define so that
 * both the GNU assembler (through cpp) and the C compiler can use it.
 */
#ifndef LAYOUT_H
#define LAYOUT_H

/* ---- Memory layout --------------------------------------------------- */

/* Physical load address of the image; must match KERNEL_PHYS_BASE in linker.ld. */
#define KERNEL_PHYS_BASE        0x100000
/* Real-mode AP start-up code is copied here; below 1 MiB, 4 KiB aligned (SIPI vector = address >> 12). */
#define AP_TRAMPOLINE_BASE      0x8000
/* Size of a small page and of a large page (x86-64 paging, 4 KiB / 2 MiB). */
#define PAGE_SIZE               4096
#define LARGE_PAGE_SIZE         0x200000
/* The boot page tables (boot.S) identity-map the first 4 GiB with 2 MiB pages (4 page directories). */
#define BOOT_MAP_LIMIT          0x100000000
#define BOOT_MAP_DIRECTORIES    4       /* BOOT_MAP_LIMIT / 1 GiB */
/* The final page tables map physical addresses below this (RAM, and device BARs); above is ignored. */
#define MAX_PHYS_GIB            64
#define MAPPED_PHYS_LIMIT       (MAX_PHYS_GIB * 0x40000000UL)
/* Local APIC MMIO base (architectural default of IA32_APIC_BASE, Intel SDM vol. 3 10.4.1). */
#define LAPIC_PHYS_BASE         0xFEE00000

/* ---- Descriptor tables (gdt in boot.S) -------------------------------- */

#define GDT_KCODE64             0x08    /* 64-bit kernel code, DPL 0 */
#define GDT_KDATA               0x10    /* flat data, DPL 0 (also used in 32-bit mode) */
#define GDT_CODE32              0x18    /* flat 32-bit code, DPL 0 (boot and AP start-up) */
#define GDT_UDATA               0x23    /* flat data, DPL 3 (selector with RPL 3) */
#define GDT_UCODE64             0x2B    /* 64-bit user code, DPL 3 (selector with RPL 3) */
#define GDT_TSS_BASE            0x30    /* first TSS descriptor; each one takes 16 bytes */
#define GDT_STATIC_ENTRIES      6       /* null + the five segments above */
#define GDT_ENTRY_SIZE          8       /* bytes per GDT entry; a 64-bit TSS descriptor takes two */
#define TSS_DESC_SIZE           16
#define GDT_SIZE                (GDT_STATIC_ENTRIES * GDT_ENTRY_SIZE + MAX_CPUS * TSS_DESC_SIZE)

/* ---- CPUs, stacks, vectors -------------------------------------------- */

/* Most CPUs the guest will run on; more processors in the MP table are ignored (with a message). */
#define MAX_CPUS                64
/* Per-CPU kernel (CPL 0) stack; also identifies the CPU: index = (rsp - kstacks) / KSTACK_SIZE. */
#define KSTACK_SIZE             8192
/* Per-CPU user (CPL 3) stack. */
#define USTACK_SIZE             8192

#define VECTOR_TIMER            0x40    /* LAPIC timer; any vector >= 32 not used by exceptions */
#define VECTOR_SPURIOUS         0xFF    /* LAPIC spurious vector; low nibble 1111b (SDM 10.9) */
#define NUM_EXCEPTIONS          32      /* vectors 0..31 are reserved for exceptions */
#define IDT_ENTRIES             256

/* ---- Control registers and MSRs (Intel SDM vol. 3, 2.5 and 4.x) ------- */

#define CR0_PE                  0x00000001  /* protection enable */
#define CR0_NW                  0x20000000  /* not write-through */
#define CR0_CD                  0x40000000  /* cache disable */
#define CR0_PG                  0x80000000  /* paging */
#define CR4_PAE                 0x00000020  /* physical address extension (required for long mode) */
#define MSR_EFER                0xC0000080  /* extended feature enable register */
#define EFER_LME                0x00000100  /* long mode enable */

/* Page-table entry bits (Intel SDM vol. 3, 4.5). */
#define PTE_PRESENT             0x001
#define PTE_WRITE               0x002
#define PTE_USER                0x004
#define PTE_PWT                 0x008   /* with PCD and the default PAT: uncached */
#define PTE_PCD                 0x010
#define PTE_LARGE               0x080   /* 2 MiB page in a page-directory entry */

/* RFLAGS for the first entry to CPL 3: IF (bit 9) plus the always-one bit 1. */
#define RFLAGS_USER_INITIAL     0x202

#endif
