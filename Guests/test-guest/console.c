/*
 * console.c - the 8250/16550 UART on COM1 and the global console lock.
 * Only CPL 0 touches the port; CPL 3 goes through the mailboxes (traps.c).
 */
#include "kernel.h"

#define COM1_BASE        0x3F8  /* standard PC I/O base of COM1 */
#define UART_THR         0      /* transmit holding register (DLAB = 0) */
#define UART_DLL         0      /* divisor latch low (DLAB = 1) */
#define UART_IER         1      /* interrupt enable register (DLAB = 0) */
#define UART_DLM         1      /* divisor latch high (DLAB = 1) */
#define UART_FCR         2      /* FIFO control register */
#define UART_LCR         3      /* line control register */
#define UART_MCR         4      /* modem control register */
#define UART_LSR         5      /* line status register */

#define LCR_DLAB         0x80   /* divisor latch access */
#define LCR_8N1          0x03   /* 8 data bits, no parity, 1 stop bit */
#define FCR_ENABLE_CLEAR 0x07   /* enable FIFOs and clear both */
#define MCR_DTR_RTS      0x03   /* DTR and RTS; OUT2 clear, so no IRQ line */
#define LSR_THR_EMPTY    0x20   /* transmitter holding register empty */
#define UART_DIVISOR     1      /* 115200 baud = 1.8432 MHz / 16 / 1 */
/* Polls of LSR before writing anyway (so a missing UART cannot hang the guest). */
#define UART_TX_POLL_LIMIT 100000
/* Acquire attempts before printing anyway (an exception while this CPU held the lock). */
#define CONSOLE_LOCK_SPIN_LIMIT 10000000

static volatile u32 console_lock_word;

void console_init(void)
{
    outb(COM1_BASE + UART_IER, 0);
    outb(COM1_BASE + UART_LCR, LCR_DLAB);
    outb(COM1_BASE + UART_DLL, UART_DIVISOR & 0xFF);
    outb(COM1_BASE + UART_DLM, UART_DIVISOR >> 8);
    outb(COM1_BASE + UART_LCR, LCR_8N1);
    outb(COM1_BASE + UART_FCR, FCR_ENABLE_CLEAR);
    outb(COM1_BASE + UART_MCR, MCR_DTR_RTS);
}

void console_lock(void)
{
    u64 spins = 0;
    while (__atomic_exchange_n(&console_lock_word, 1, __ATOMIC_ACQUIRE)) {
        while (console_lock_word) {
            cpu_relax();
            if (++spins == CONSOLE_LOCK_SPIN_LIMIT)
                return;
        }
    }
}

void console_unlock(void)
{
    __atomic_store_n(&console_lock_word, 0, __ATOMIC_RELEASE);
}

static void uart_putc(char c)
{
    for (u32 i = 0; i < UART_TX_POLL_LIMIT; i++) {
        if (inb(COM1_BASE + UART_LSR) & LSR_THR_EMPTY)
            break;
    }
    outb(COM1_BASE + UART_THR, (u8)c);
}

void console_write(const char *text)
{
    while (*text)
        uart_putc(*text++);
}

void kprint(struct line *l)
{
    line_end(l);
    console_lock();
    console_write(l->text);
    console_unlock();
}

void kprint_msg(const char *text)
{
    struct line l;
    line_start(&l, "ferry-test-guest: ");
    line_str(&l, text);
    kprint(&l);
}
