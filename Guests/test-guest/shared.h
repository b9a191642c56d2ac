/*
 * shared.h - state shared between the kernel (CPL 0) and the workload (CPL 3).
 * All RAM is mapped user-accessible, so CPL 3 reads and writes these directly.
 */
#ifndef SHARED_H
#define SHARED_H

#include "types.h"
#include "layout.h"

/* Timer interrupts per second on every CPU. */
#define TICK_HZ 100
/* Size of one CPU's console mailbox, including the NUL (lines must stay shorter). */
#define MBOX_SIZE 128
/* Cache-line size, to keep CPUs' counters apart. */
#define CACHE_LINE 64
/* Most separate free-memory ranges the workload can use. */
#define MAX_FREE_RANGES 32
/* dirty_rate value meaning "as fast as possible". */
#define DIRTY_RATE_MAX (~0UL)

/* Per-CPU: tick counter (written by that CPU's timer handler) and console mailbox. */
struct cpu_shared {
    volatile u64 ticks;
    volatile u32 mbox_full;     /* CPL 3 sets it after filling mbox; CPL 0 clears it after printing */
    u32 reserved;
    char mbox[MBOX_SIZE];       /* one NUL-terminated line ending in '\n' */
} __attribute__((aligned(CACHE_LINE)));

struct free_range {
    u64 base;                   /* physical = virtual address, page aligned */
    u64 pages;
};

/* Written by the BSP at CPL 0 before wl_boot_complete is set; read-only for CPL 3. */
struct workload_config {
    u32 ncpus;                  /* CPUs online, indices 0..ncpus-1 */
    u32 nranges;
    u64 gen_pages;              /* pages at the start of free memory that hold the generation array */
    u64 workset_pages;          /* working-set pages, following the generation array */
    u64 dirty_rate;             /* pages/s over all CPUs, or DIRTY_RATE_MAX */
    u64 heartbeat_ticks;        /* 0 = no heartbeats */
    u64 verify_ticks;           /* 0 = no verification */
    struct free_range ranges[MAX_FREE_RANGES];
};

extern struct cpu_shared cpu_shared[MAX_CPUS];
extern struct workload_config wl_config;
extern volatile u32 wl_boot_complete;

/* The CPL-3 entry point (workload.c); arg = CPU index. */
void user_main(u64 cpu) __attribute__((noreturn));

#endif
