/*
 * entry.S - interrupt and exception entry stubs, and the first entry to CPL 3.
 *
 * Every stub saves the caller-saved registers, calls a C handler (traps.c)
 * with a pointer to the saved state (struct trap_frame in kernel.h), restores
 * and returns with iretq. Nothing here but plain integer instructions: CPL-0
 * code may be emulated instruction by instruction.
 */
#include "layout.h"

/* Bytes pushed by a stub for the vector number and the (possibly dummy) error code. */
#define VECTOR_AND_ERROR_BYTES 16

.macro SAVE_SCRATCH
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
.endm

.macro RESTORE_SCRATCH
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
.endm

    .text

/* Exceptions without a CPU-pushed error code push a zero so all frames look alike. */
.macro EXC_NOERR vec
exc_stub_\vec:
    pushq $0
    pushq $\vec
    jmp exception_common
.endm

/* Exceptions with an error code (Intel SDM vol. 3, table 6-1: 8, 10-14, 17, 21, 29, 30). */
.macro EXC_ERR vec
exc_stub_\vec:
    pushq $\vec
    jmp exception_common
.endm

EXC_NOERR 0
EXC_NOERR 1
EXC_NOERR 2
EXC_NOERR 3
EXC_NOERR 4
EXC_NOERR 5
EXC_NOERR 6
EXC_NOERR 7
EXC_ERR   8
EXC_NOERR 9
EXC_ERR   10
EXC_ERR   11
EXC_ERR   12
EXC_ERR   13
EXC_ERR   14
EXC_NOERR 15
EXC_NOERR 16
EXC_ERR   17
EXC_NOERR 18
EXC_NOERR 19
EXC_NOERR 20
EXC_ERR   21
EXC_NOERR 22
EXC_NOERR 23
EXC_NOERR 24
EXC_NOERR 25
EXC_NOERR 26
EXC_NOERR 27
EXC_NOERR 28
EXC_ERR   29
EXC_ERR   30
EXC_NOERR 31

exception_common:
    SAVE_SCRATCH
    mov %rsp, %rdi
    call exception_handler          /* returns only after the CPL-3 idle trap */
    RESTORE_SCRATCH
    add $VECTOR_AND_ERROR_BYTES, %rsp
    iretq

    .globl timer_stub
timer_stub:
    SAVE_SCRATCH
    call timer_handler
    RESTORE_SCRATCH
    iretq

    /* Spurious LAPIC interrupts need no EOI (Intel SDM vol. 3, 10.9). */
    .globl spurious_stub
spurious_stub:
    iretq

/*
 * enter_user(rip, rsp, arg): drop to CPL 3 at rip with stack rsp, interrupts
 * enabled, first argument register = arg. Never returns.
 */
    .globl enter_user
enter_user:
    pushq $GDT_UDATA                /* SS */
    push %rsi                       /* RSP */
    pushq $RFLAGS_USER_INITIAL      /* RFLAGS: IF = 1 */
    pushq $GDT_UCODE64              /* CS */
    push %rdi                       /* RIP */
    mov %rdx, %rdi
    xor %eax, %eax
    xor %ebx, %ebx
    xor %ecx, %ecx
    xor %edx, %edx
    xor %esi, %esi
    xor %ebp, %ebp
    xor %r8d, %r8d
    xor %r9d, %r9d
    xor %r10d, %r10d
    xor %r11d, %r11d
    xor %r12d, %r12d
    xor %r13d, %r13d
    xor %r14d, %r14d
    xor %r15d, %r15d
    iretq

    .section .rodata
    .balign 8
    .globl exception_stubs
exception_stubs:
    .irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exc_stub_\vec
    .endr
