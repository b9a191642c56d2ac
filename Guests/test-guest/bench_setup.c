/*
 * bench_setup.c - CPL-0 planning of the block benchmark (block_bench=1):
 * how a 1 MiB request is split into data descriptors (size_max, seg_max,
 * queue size), the keys clamped to the disk, the queue and free RAM (a
 * line each), and the request slots and data buffers carved before the
 * working set is sized. The benchmark itself runs at CPL 3 (bench.c).
 * Anything that rules it out is a line, not a device failure: the disk
 * stays usable, just idle.
 */
#include "kernel.h"
#include "virtio.h"

#define BLK_SIZE_MAX        8       /* device config: bytes per data segment at most (spec 5.2.4) */
#define BLK_SEG_MAX         12      /* device config: data segments per request at most */
#define CHAIN_EXTRA         2       /* a chain holds header and status besides the data */
#define SECTORS_PER_MIB     (MIB / SECTOR_SIZE)
#define PAGES_PER_MIB       (MIB / PAGE_SIZE)
#define SLOT_ALIGN          64      /* slots start on cache lines */

struct bench_area bench_area;

static void no_bench(const char *why)
{
    struct line l;
    line_start(&l, "ferry-test-guest: no block benchmark: ");
    line_str(&l, why);
    kprint(&l);
}

/* Brings *value into [low, high] and says so when it changes. */
static void clamp(const char *key, u64 *value, u64 low, u64 high, const char *why)
{
    u64 v = *value < low ? low : *value > high ? high : *value;
    if (v == *value)
        return;
    struct line l;
    line_start(&l, "ferry-test-guest: ");
    line_str(&l, key);
    line_str(&l, "=");
    line_dec(&l, *value);
    line_str(&l, " clamped to ");
    line_dec(&l, v);
    line_str(&l, why);
    kprint(&l);
    *value = v;
}

static u64 segments(u64 bytes)
{
    return (bytes + bench_area.segment_bytes - 1) / bench_area.segment_bytes;
}

/* Requests of `segs` data descriptors the queue holds: one descriptor each with INDIRECT_DESC, else a chain. */
static u64 queue_room(const struct virtq *q, u64 segs)
{
    return bench_area.indirect ? q->size : q->size / (segs + CHAIN_EXTRA);
}

static void print_plan(u64 segs)
{
    struct line l;
    line_start(&l, "ferry-test-guest: block_bench=1 bench_mib=");
    line_dec(&l, bench_area.mib);
    line_str(&l, " bench_qd=");
    line_dec(&l, bench_area.qd);
    line_str(&l, " bench_rand_qd=");
    line_dec(&l, bench_area.rand_qd);
    line_str(&l, " bench_ticks=");
    line_dec(&l, bench_area.ticks);
    line_str(&l, " segments=");
    line_dec(&l, segs);
    line_str(&l, " indirect=");
    line_dec(&l, bench_area.indirect);
    kprint(&l);
}

void bench_plan(struct virtio_dev *d)
{
    struct bench_area *b = &bench_area;
    const struct virtq *q = &d->vq[0];
    if (d->features & VIRTIO_BLK_F_RO) {
        no_bench("virtio blk is read-only");
        return;
    }
    u64 disk_mib = blk_area.capacity / SECTORS_PER_MIB;
    if (disk_mib == 0) {
        no_bench("disk smaller than 1 MiB");
        return;
    }
    b->indirect = (d->features & VIRTIO_F_INDIRECT_DESC) != 0;

    /* A physically contiguous 1 MiB buffer is one descriptor unless the device caps segment size. */
    b->segment_bytes = BENCH_REQUEST_BYTES;
    if (d->features & VIRTIO_BLK_F_SIZE_MAX) {
        u64 size_max = virtio_config32(d, BLK_SIZE_MAX);
        if (size_max && size_max < b->segment_bytes)
            b->segment_bytes = size_max;
    }
    u64 max_segs = q->size - CHAIN_EXTRA;  /* a chain (or indirect table) never exceeds the queue size */
    if (d->features & VIRTIO_BLK_F_SEG_MAX) {
        u64 seg_max = virtio_config32(d, BLK_SEG_MAX);
        if (seg_max && seg_max < max_segs)
            max_segs = seg_max;
    }
    u64 segs = segments(BENCH_REQUEST_BYTES);
    u64 rand_segs = segments(BENCH_RAND_BYTES);
    if (segs > max_segs) {
        no_bench("a 1 MiB request needs more data descriptors than the device takes");
        return;
    }

    b->mib = boot_params.bench_mib;
    b->qd = boot_params.bench_qd;
    b->rand_qd = boot_params.bench_rand_qd;
    b->ticks = boot_params.bench_ticks;
    clamp("bench_mib", &b->mib, 1, ~0UL, " (at least 1)");
    clamp("bench_mib", &b->mib, 1, disk_mib, " (disk capacity)");
    clamp("bench_qd", &b->qd, 1, ~0UL, " (at least 1)");
    clamp("bench_qd", &b->qd, 1, queue_room(q, segs), " (queue)");
    clamp("bench_qd", &b->qd, 0, largest_free_pages() / 2 / PAGES_PER_MIB, " (free RAM)");
    clamp("bench_rand_qd", &b->rand_qd, 1, ~0UL, " (at least 1)");
    clamp("bench_rand_qd", &b->rand_qd, 1, queue_room(q, rand_segs), " (queue)");
    if (b->qd == 0) {
        no_bench("no RAM for its buffers");
        return;
    }

    u64 slots = b->qd > b->rand_qd ? b->qd : b->rand_qd;
    b->slot_bytes = sizeof(struct bench_slot) + (segs + CHAIN_EXTRA) * sizeof(struct virtq_desc);
    b->slot_bytes = (b->slot_bytes + SLOT_ALIGN - 1) & ~(u64)(SLOT_ALIGN - 1);
    b->slots = (u8 *)take_free_pages((slots * b->slot_bytes + PAGE_SIZE - 1) / PAGE_SIZE);
    b->buffers = (u8 *)take_free_pages(b->qd * PAGES_PER_MIB);
    b->rand_buffers = (u8 *)take_free_pages(b->rand_qd * (BENCH_RAND_BYTES / PAGE_SIZE));
    if (!b->slots || !b->buffers || !b->rand_buffers) {
        no_bench("no RAM for its buffers");
        return;
    }
    b->enabled = 1;
    print_plan(segs);
}
