/*
 * boot.S - PVH entry and the switch to long mode.
 *
 * The BSP arrives at pvh_entry in 32-bit protected mode (paging off, flat
 * segments, EBX = physical address of struct hvm_start_info). Application
 * processors arrive at ap_pm32_entry from the real-mode trampoline
 * (trampoline.S). Both then share enter_long_mode and long_entry, which calls
 * bsp_main(start_info) or ap_main() in kernel.c.
 */
#include "layout.h"

/* Xen ELF note type "physical 32-bit entry point" (xen/include/public/elfnote.h). */
#define XEN_ELFNOTE_PHYS32_ENTRY 18

/* Segment descriptor fields (Intel SDM vol. 3, 3.4.5): base 0, limit 0xFFFFF pages. */
#define SEG_LIMIT_LOW       0xFFFF          /* limit bits 15:0 */
#define SEG_LIMIT_HIGH      0xF             /* limit bits 19:16 */
#define SEG_ACCESS_KCODE    0x9A            /* present, DPL 0, code, execute/read */
#define SEG_ACCESS_KDATA    0x92            /* present, DPL 0, data, read/write */
#define SEG_ACCESS_UCODE    0xFA            /* present, DPL 3, code, execute/read */
#define SEG_ACCESS_UDATA    0xF2            /* present, DPL 3, data, read/write */
#define SEG_FLAGS_LONG      0xA             /* G=1 (4 KiB granularity), L=1 (64-bit code) */
#define SEG_FLAGS_32        0xC             /* G=1, D/B=1 (32-bit) */
#define SEG_DESC(access, flags) \
    (SEG_LIMIT_LOW | ((access) << 40) | (SEG_LIMIT_HIGH << 48) | ((flags) << 52))

#define ENTRIES_PER_TABLE   512             /* entries in one 4 KiB paging structure */

/* ---- The PVH note: name "Xen", type 18, descriptor = entry address ----- */
/* The descriptor is 8 bytes like Linux's (readers take the low 32 bits); 4-byte alignment as QEMU expects. */
    .section .note.pvh, "a", @note
    .balign 4
    .long 2f - 1f                           /* namesz */
    .long 4f - 3f                           /* descsz */
    .long XEN_ELFNOTE_PHYS32_ENTRY          /* type */
1:  .asciz "Xen"
2:  .balign 4
3:  .quad pvh_entry
4:  .balign 4

/* ---- 32-bit code ------------------------------------------------------- */
    .section .text.boot, "ax"
    .code32
    .globl pvh_entry
pvh_entry:
    cli
    cld
    mov %ebx, pvh_start_info_paddr          /* loader's flat DS is still valid here */
    lgdt gdtr
    ljmp $GDT_CODE32, $1f
1:  mov $GDT_KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs

    /* Zero .bss (small: per-CPU mailboxes and counters). Plain loop: CPL-0 code may be emulated. */
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
2:  cmp %ecx, %edi
    jae 3f
    movl $0, (%edi)
    add $4, %edi                            /* one 4-byte store per iteration (linker.ld aligns the end) */
    jmp 2b
3:
    xor %esi, %esi                          /* ESI = 0: this is the BSP */
    mov $boot_pml4, %eax
    jmp enter_long_mode

    /* Application processors: arrive from trampoline.S with CS = GDT_CODE32, paging off. */
    .globl ap_pm32_entry
ap_pm32_entry:
    mov $GDT_KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov $1, %esi                            /* ESI = 1: this is an AP */
    mov ap_entry_cr3, %eax                  /* the final page tables, set by smp.c */

    /* EAX = physical address of the PML4; ESI = 0 (BSP) or 1 (AP). */
enter_long_mode:
    mov %eax, %cr3
    mov %cr4, %eax
    or $CR4_PAE, %eax
    mov %eax, %cr4
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov %cr0, %eax
    and $(0xFFFFFFFF ^ (CR0_CD | CR0_NW)), %eax  /* caches on (an AP after INIT has CD=NW=1) */
    or $(CR0_PG | CR0_PE), %eax
    mov %eax, %cr0
    ljmp $GDT_KCODE64, $long_entry

/* ---- 64-bit code ------------------------------------------------------- */
    .code64
long_entry:
    mov $GDT_KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    test %esi, %esi
    jnz 1f
    lea kstacks + KSTACK_SIZE(%rip), %rsp   /* the BSP uses CPU 0's kernel stack */
    mov pvh_start_info_paddr(%rip), %edi
    call bsp_main
    jmp halt_forever
1:  mov ap_entry_stack(%rip), %rsp
    call ap_main
    .globl halt_forever
halt_forever:
    cli
    hlt
    jmp halt_forever

/* ---- Data -------------------------------------------------------------- */
    .section .data
    .balign 4
    .globl pvh_start_info_paddr, ap_entry_cr3
pvh_start_info_paddr:   .long 0             /* EBX at PVH entry */
ap_entry_cr3:           .long 0             /* PML4 used by APs (must be below 4 GiB) */
    .balign 8
    .globl ap_entry_stack
ap_entry_stack:         .quad 0             /* initial RSP of the AP being started */

    /* One GDT for all CPUs and modes; TSS descriptors are filled in by cpu.c. */
    .balign 16
    .globl gdt, gdt_end
gdt:
    .quad 0                                             /* null */
    .quad SEG_DESC(SEG_ACCESS_KCODE, SEG_FLAGS_LONG)    /* GDT_KCODE64 */
    .quad SEG_DESC(SEG_ACCESS_KDATA, SEG_FLAGS_32)      /* GDT_KDATA */
    .quad SEG_DESC(SEG_ACCESS_KCODE, SEG_FLAGS_32)      /* GDT_CODE32 */
    .quad SEG_DESC(SEG_ACCESS_UDATA, SEG_FLAGS_32)      /* GDT_UDATA */
    .quad SEG_DESC(SEG_ACCESS_UCODE, SEG_FLAGS_LONG)    /* GDT_UCODE64 */
    .fill MAX_CPUS * TSS_DESC_SIZE, 1, 0                /* one TSS descriptor per CPU */
gdt_end:
    .if gdt_end - gdt - GDT_SIZE
    .error "GDT_SIZE in layout.h does not match the GDT"
    .endif
    .balign 8
gdtr:
    .word GDT_SIZE - 1
    .quad gdt                                   /* 32-bit lgdt uses the low 4 bytes */

    /*
     * Boot page tables: identity-map the first BOOT_MAP_LIMIT bytes with 2 MiB
     * pages. Static data, so no CPL-0 instructions are spent building them.
     * paging.c replaces them with tables covering all RAM and the LAPIC.
     */
    .balign PAGE_SIZE
boot_pml4:
    .quad boot_pdpt + (PTE_PRESENT | PTE_WRITE)
    .fill ENTRIES_PER_TABLE - 1, 8, 0
boot_pdpt:
    .set boot_pd_index, 0
    .rept BOOT_MAP_DIRECTORIES
    .quad boot_pd + boot_pd_index * PAGE_SIZE + (PTE_PRESENT | PTE_WRITE)
    .set boot_pd_index, boot_pd_index + 1
    .endr
    .fill ENTRIES_PER_TABLE - BOOT_MAP_DIRECTORIES, 8, 0
boot_pd:
    .set boot_pd_addr, 0
    .rept BOOT_MAP_LIMIT / LARGE_PAGE_SIZE
    .quad boot_pd_addr + (PTE_PRESENT | PTE_WRITE | PTE_LARGE)
    .set boot_pd_addr, boot_pd_addr + LARGE_PAGE_SIZE
    .endr
