/*
 * user.h - declarations shared by the CPL-3 files: the pattern function,
 * idling, console output through the mailbox, and the device data path
 * that runs on CPU 0 next to its memory workload. Nothing here may do port
 * I/O or INT n (CPL 3).
 */
#ifndef USER_H
#define USER_H

#include "shared.h"
#include "fmt.h"

/* splitmix64 (Steele, Lea, Flood 2014): increment and finalizer multipliers. */
#define GOLDEN_GAMMA    0x9e3779b97f4a7c15UL
#define MIX_MUL1        0xbf58476d1ce4e5b9UL
#define MIX_MUL2        0x94d049bb133111ebUL

/* The splitmix64 finalizer (shift amounts and multipliers are the published ones). */
static inline u64 mix64(u64 z)
{
    z ^= z >> 30;
    z *= MIX_MUL1;
    z ^= z >> 27;
    z *= MIX_MUL2;
    z ^= z >> 31;
    return z;
}

/* Word i of a page or block whose key is key. */
static inline u64 word_value(u64 key, u64 i)
{
    return mix64(key + (i + 1) * GOLDEN_GAMMA);
}

static inline void idle(void)
{
    __asm__ volatile("hlt" : : : "memory");     /* #GP at CPL 3: the kernel's idle trap */
}

/* Hands a line to the kernel and waits until that CPU's timer interrupt printed it (workload.c). */
void mbox_print(struct cpu_shared *shared, struct line *l);

/* ---- CPU 0's device work (devices.c) ----------------------------------- */

void devices_start(u64 now);                    /* after "ready" */
int devices_step(u64 now);                      /* each loop; 1 = keep polling, do not idle */
void devices_heartbeat(u64 seq);                /* each CPU-0 heartbeat */
void device_print(struct line *l);              /* through CPU 0's mailbox */

/* ---- Split virtqueues (virtq.c) ---------------------------------------- */

struct virtq;
void virtq_post(struct virtq *q, u16 head);     /* publish the chain at head; notify if wanted */
void virtq_add(struct virtq *q, u16 head);      /* queue the chain at head, not yet visible to the device */
void virtq_kick(struct virtq *q);               /* publish what virtq_add queued; notify if wanted */
int virtq_take(struct virtq *q, u32 *id, u32 *len);    /* 1 = a used entry was consumed */

/* ---- The parts (blk.c, bench.c, rng.c, vcon.c) ------------------------- */

void blk_start(u64 now);
int blk_step(u64 now);                          /* 1 = a request is in flight or work was done */
int bench_run(void);                            /* the whole block benchmark if block_bench=1; 1 = it ran */
void rng_start(u64 now, u64 period_ticks);
void rng_step(u64 now);
void vcon_send(const char *text);               /* one line; dropped if every buffer is busy */
void net_start(u64 now);
int net_step(u64 now);                          /* 1 = the network stack is active (keep polling) */

#endif
