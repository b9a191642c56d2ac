/*
 * bench.c - the block benchmark on CPU 0 (CPL 3, block_bench=1), through
 * this guest's own virtio-blk driver. Three phases, each keeping up to its
 * queue depth of requests in flight and polling the used ring (no
 * interrupts) until bench_ticks have passed, then draining:
 *
 *   seq_write     1 MiB writes, sequential over the first bench_mib MiB, wrapping
 *   seq_read      the same with reads
 *   rand_read_4k  4 KiB reads at uniformly random 4 KiB-aligned offsets there
 *
 * bench_run does the whole thing before CPU 0 starts its memory workload
 * and heartbeats, so nothing else competes for CPU 0 but the timer (which
 * also prints the result lines). Free request slots sit on a stack; a
 * slot's chain is rebuilt on every submit (header, data split at
 * segment_bytes, status), in its indirect table with INDIRECT_DESC or at
 * a fixed run of queue descriptors without it. New requests are published
 * as a batch behind one avail index update and one (EVENT_IDX-aware) kick.
 */
#include "user.h"
#include "virtio.h"

#define RAND_SEED           0x62656e6368UL  /* "bench": the same offsets every run */
#define PATTERN_SALT        0xbe4c          /* keeps the written data apart from other keys */
#define STALL_TICKS         (5 * TICK_HZ)   /* no completion for this long: BLOCK STALL, abort */
#define STATUS_UNSET        0xFF            /* status byte before the device writes it */
#define HEADER_BYTES        16              /* type, reserved, sector */
#define CHAIN_EXTRA         2               /* header and status descriptors */
#define SECTORS_PER_MIB     (MIB / SECTOR_SIZE)
#define RAND_PER_MIB        (MIB / BENCH_RAND_BYTES)
#define WORDS_PER_REQUEST   (BENCH_REQUEST_BYTES / sizeof(u64))

struct phase {
    const char *name;
    u32 type;                       /* VIRTIO_BLK_T_OUT or VIRTIO_BLK_T_IN */
    int random;                     /* 4 KiB at random offsets, bench_rand_qd deep; else 1 MiB sequential */
};

static const struct phase phases[] = {
    { "seq_write", VIRTIO_BLK_T_OUT, 0 },
    { "seq_read", VIRTIO_BLK_T_IN, 0 },
    { "rand_read_4k", VIRTIO_BLK_T_IN, 1 },
};

static struct {
    struct virtq *q;
    const struct phase *phase;
    u64 qd;                         /* slots in use this phase */
    u64 request_bytes;
    u64 chain;                      /* descriptors per request chain this phase */
    u64 next_mib;                   /* sequential: requests issued; offset = next_mib % mib */
    u64 rng;                        /* splitmix64 state */
    u16 free[VIRTQ_BENCH_MAX_SIZE];
    u64 nfree;
    u64 inflight;
    u64 ops, bytes;                 /* completed this phase */
} s;

static volatile u64 *ticks(void)
{
    return &cpu_shared[0].ticks;
}

/* splitmix64: a fixed seed, then mix64 of a Weyl sequence. */
static u64 next_random(void)
{
    s.rng += GOLDEN_GAMMA;
    return mix64(s.rng);
}

/* Uniform in [0, n): the high half of a 64x64-bit product (bias below n / 2^64). */
static u64 random_below(u64 n)
{
    return (u64)(((unsigned __int128)next_random() * n) >> 64);
}

static struct bench_slot *slot(u64 i)
{
    return (struct bench_slot *)(bench_area.slots + i * bench_area.slot_bytes);
}

static u64 buffer(u64 i)
{
    if (s.phase->random)
        return (u64)bench_area.rand_buffers + i * BENCH_RAND_BYTES;
    return (u64)bench_area.buffers + i * BENCH_REQUEST_BYTES;
}

static u64 next_sector(void)
{
    if (s.phase->random)
        return random_below(bench_area.mib * RAND_PER_MIB) * (BENCH_RAND_BYTES / SECTOR_SIZE);
    return (s.next_mib++ % bench_area.mib) * SECTORS_PER_MIB;
}

/* ---- Reporting --------------------------------------------------------- */

static void bad_start(struct line *l)
{
    line_start(l, "BLOCK BAD bench=");
    line_str(l, s.phase->name);
}

static void bad_status(u64 sector, u8 status)
{
    struct line l;
    bad_start(&l);
    line_str(&l, " sector=");
    line_dec(&l, sector);
    line_str(&l, " status=");
    line_dec(&l, status);
    device_print(&l);
}

static void bad_id(u32 id)
{
    struct line l;
    bad_start(&l);
    line_str(&l, " used_id=");
    line_dec(&l, id);
    device_print(&l);
}

static void stalled(u64 waited)
{
    struct line l;
    line_start(&l, "BLOCK STALL bench=");
    line_str(&l, s.phase->name);
    line_str(&l, " inflight=");
    line_dec(&l, s.inflight);
    line_str(&l, " ticks=");
    line_dec(&l, waited);
    device_print(&l);
}

static void report(u64 elapsed)
{
    struct line l;
    line_start(&l, "BENCH ");
    line_str(&l, s.phase->name);
    line_str(&l, s.phase->random ? " ops=" : " bytes=");
    line_dec(&l, s.phase->random ? s.ops : s.bytes);
    line_str(&l, " ticks=");
    line_dec(&l, elapsed);
    line_str(&l, " qd=");
    line_dec(&l, s.qd);
    device_print(&l);
}

/* ---- Requests ---------------------------------------------------------- */

/* Queues (virtq_add) the request in slot i; the caller kicks once for the batch. */
static void submit(u64 i)
{
    struct bench_slot *r = slot(i);
    r->type = s.phase->type;
    r->reserved = 0;
    r->sector = next_sector();
    r->status = STATUS_UNSET;

    /* Indices in `chain` are table-relative: 0.. in the indirect table, first.. in the queue's. */
    int indirect = bench_area.indirect;
    u16 first = indirect ? 0 : (u16)(i * s.chain);
    struct virtq_desc *chain = indirect ? r->table : s.q->desc + first;
    u16 data_flags = VIRTQ_DESC_F_NEXT | (s.phase->type == VIRTIO_BLK_T_IN ? VIRTQ_DESC_F_WRITE : 0);
    u16 n = 0;
    set_desc(&chain[n], (u64)r, HEADER_BYTES, VIRTQ_DESC_F_NEXT, first + n + 1);
    n++;
    u64 addr = buffer(i);
    for (u64 left = s.request_bytes; left; n++) {
        u64 len = left < bench_area.segment_bytes ? left : bench_area.segment_bytes;
        set_desc(&chain[n], addr, (u32)len, data_flags, first + n + 1);
        addr += len;
        left -= len;
    }
    set_desc(&chain[n], (u64)&r->status, 1, VIRTQ_DESC_F_WRITE, 0);
    n++;
    if (indirect)
        set_desc(&s.q->desc[i], (u64)r->table, n * sizeof(struct virtq_desc), VIRTQ_DESC_F_INDIRECT, 0);
    virtq_add(s.q, indirect ? (u16)i : first);
    s.inflight++;
}

/* A used entry came back: 1 = fine (its slot is free again), 0 = BLOCK BAD printed. */
static int complete(u32 id)
{
    u64 i = bench_area.indirect ? id : id / s.chain;
    if (i >= s.qd || (!bench_area.indirect && id % s.chain)) {
        bad_id(id);
        return 0;
    }
    struct bench_slot *r = slot(i);
    if (r->status != VIRTIO_BLK_S_OK) {
        bad_status(r->sector, r->status);
        return 0;
    }
    s.inflight--;
    s.ops++;
    s.bytes += s.request_bytes;
    s.free[s.nfree++] = (u16)i;
    return 1;
}

/* One phase; 1 = done and reported, 0 = aborted (a line says why). */
static int run_phase(const struct phase *p)
{
    s.phase = p;
    s.qd = p->random ? bench_area.rand_qd : bench_area.qd;
    s.request_bytes = p->random ? BENCH_RAND_BYTES : BENCH_REQUEST_BYTES;
    s.chain = (s.request_bytes + bench_area.segment_bytes - 1) / bench_area.segment_bytes + CHAIN_EXTRA;
    s.next_mib = 0;
    s.nfree = 0;
    for (u64 i = s.qd; i > 0; i--)
        s.free[s.nfree++] = (u16)(i - 1);
    s.inflight = s.ops = s.bytes = 0;

    /* Start on a tick edge, so only the end of the count is off (by under a tick). */
    u64 edge = *ticks();
    while (*ticks() == edge)
        __asm__ volatile("pause");
    u64 start = *ticks();
    u64 last_done = start;
    for (;;) {
        u64 now = *ticks();
        if (now - start < bench_area.ticks) {
            if (s.nfree) {
                while (s.nfree)
                    submit(s.free[--s.nfree]);
                virtq_kick(s.q);
            }
        } else if (s.inflight == 0) {
            break;
        }
        u32 id, len;
        while (virtq_take(s.q, &id, &len)) {
            if (!complete(id))
                return 0;
            last_done = now;
        }
        if (s.inflight && now - last_done >= STALL_TICKS) {
            stalled(now - last_done);
            return 0;
        }
    }
    report(*ticks() - start);
    return 1;
}

/* Any data will do; a pattern rather than zeros so the device cannot shortcut it. */
static void fill_buffers(void)
{
    for (u64 i = 0; i < bench_area.qd; i++) {
        u64 *words = (u64 *)((u64)bench_area.buffers + i * BENCH_REQUEST_BYTES);
        u64 key = mix64(i ^ PATTERN_SALT);
        for (u64 w = 0; w < WORDS_PER_REQUEST; w++)
            words[w] = word_value(key, w);
    }
}

int bench_run(void)
{
    if (!virtio_blk.ready || !bench_area.enabled)
        return 0;
    s.q = &virtio_blk.vq[0];
    s.rng = RAND_SEED;
    fill_buffers();
    for (u64 k = 0; k < ARRAY_SIZE(phases); k++) {
        if (!run_phase(&phases[k]))
            return 1;
    }
    struct line l;
    line_start(&l, "BENCH done");
    device_print(&l);
    return 1;
}
