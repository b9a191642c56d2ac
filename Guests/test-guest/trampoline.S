/*
 * trampoline.S - real-mode start-up code for application processors.
 *
 * smp.c copies the bytes between ap_trampoline_start and ap_trampoline_end to
 * AP_TRAMPOLINE_BASE and sends STARTUP IPIs with vector AP_TRAMPOLINE_BASE >> 12,
 * so the AP starts here with CS = AP_TRAMPOLINE_BASE >> 4, IP = 0, in real mode.
 * It loads the shared GDT, enables protection and jumps to ap_pm32_entry
 * (boot.S), which continues exactly like the BSP's PVH entry.
 * Only offsets relative to ap_trampoline_start are used while in real mode.
 */
#include "layout.h"

    .section .text.trampoline, "ax"
    .code16
    .globl ap_trampoline_start, ap_trampoline_end
ap_trampoline_start:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl ap_trampoline_gdtr - ap_trampoline_start  /* 32-bit base: the GDT lives above 1 MiB */
    mov %cr0, %eax
    or $CR0_PE, %eax
    mov %eax, %cr0
    ljmpl $GDT_CODE32, $ap_pm32_entry

    .balign 8
ap_trampoline_gdtr:
    .word GDT_SIZE - 1
    .long gdt
ap_trampoline_end:
