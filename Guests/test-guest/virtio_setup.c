/*
 * virtio_setup.c - CPL-0 set-up of the virtio devices the probe found:
 * features per device type, queues, the RAM their requests and the block
 * workload use (carved before the working set is sized; the block
 * benchmark's in bench_setup.c), and one console line per device. The data
 * path is CPL 3 (devices.c and friends).
 */
#include "kernel.h"
#include "virtio.h"

/* Ring features are taken whenever offered (spec 6); the data path uses them. */
#define RING_FEATURES   (VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX)
#define BLK_FEATURES    (RING_FEATURES | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_RO)
/* The benchmark's 1 MiB requests must respect the device's segment limits, so it learns them. */
#define BENCH_FEATURES  (BLK_FEATURES | VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX)
#define BLK_CAPACITY    0               /* device config: capacity in 512-byte sectors (spec 5.2.4) */
#define GEN_PER_PAGE    (PAGE_SIZE / sizeof(u64))
#define CONSOLE_RECEIVEQ 0              /* port 0 without VIRTIO_CONSOLE_F_MULTIPORT (spec 5.3.2) */
#define CONSOLE_TRANSMITQ 1

struct blk_area blk_area;

static void report_ready(const struct virtio_dev *d, int with_capacity)
{
    struct line l;
    line_start(&l, "ferry-test-guest: virtio ");
    line_str(&l, d->name);
    line_str(&l, " at ");
    line_bdf(&l, d->bdf);
    line_str(&l, " bar=");
    line_hex16(&l, d->bar);
    line_str(&l, " features=");
    line_hex16(&l, d->features);
    line_str(&l, " queue_size=");
    line_dec(&l, d->vq[d->nqueues - 1].size);
    if (with_capacity) {
        line_str(&l, " capacity=");
        line_dec(&l, blk_area.capacity);
    }
    kprint(&l);
}

static void clamp_blocks(u64 limit, const char *why)
{
    if (boot_params.block_blocks <= limit)
        return;
    struct line l;
    line_start(&l, "ferry-test-guest: block_blocks=");
    line_dec(&l, boot_params.block_blocks);
    line_str(&l, " clamped to ");
    line_dec(&l, limit);
    line_str(&l, why);
    kprint(&l);
    boot_params.block_blocks = limit;
}

/*
 * The block workload's RAM: request page, write buffer, the generation and
 * mirror-generation arrays (zeroed at CPL 3), the mirror (never zeroed:
 * mirror_gen 0 says nothing was read there). block_blocks is clamped to the
 * disk and to half of the largest free range.
 */
static const char *plan_blocks(struct virtio_dev *d)
{
    blk_area.capacity = virtio_config64(d, BLK_CAPACITY);
    if (d->features & VIRTIO_BLK_F_RO) {
        kprint_msg("virtio blk is read-only; no block workload");
        boot_params.block_blocks = 0;
    }
    clamp_blocks(blk_area.capacity / SECTORS_PER_BLOCK, " (disk capacity)");
    u64 blocks = boot_params.block_blocks;
    u64 gen_pages = (blocks + GEN_PER_PAGE - 1) / GEN_PER_PAGE;
    u64 fixed = 2 + 2 * gen_pages;      /* request page, write buffer, two generation arrays */
    u64 room = largest_free_pages() / 2;
    clamp_blocks(room > fixed + 1 ? room - fixed - 1 : 0, " (free RAM)");
    blocks = boot_params.block_blocks;
    gen_pages = (blocks + GEN_PER_PAGE - 1) / GEN_PER_PAGE;

    d->page = (u8 *)take_free_pages(1);
    if (d->page == NULL)
        return "no RAM for requests";
    clear_page((u64)d->page);
    if (blocks == 0)
        return NULL;
    blk_area.write_buffer = (u64 *)take_free_pages(1);
    blk_area.gen = (u64 *)take_free_pages(gen_pages);
    blk_area.mirror_gen = (u64 *)take_free_pages(gen_pages);
    blk_area.mirror = (u8 *)take_free_pages(blocks);
    if (!blk_area.write_buffer || !blk_area.gen || !blk_area.mirror_gen || !blk_area.mirror)
        return "no RAM for the block workload";
    blk_area.blocks = blocks;
    return NULL;
}

/* With block_bench=1 the benchmark replaces the block workload: other features, a deeper queue, its own RAM. */
static const char *setup_blk(struct virtio_dev *d)
{
    int bench = boot_params.block_bench != 0;
    const char *why = virtio_begin(d, bench ? BENCH_FEATURES : BLK_FEATURES);
    if (why)
        return why;
    if (d->device_cfg == NULL)
        return "no device configuration capability";
    why = virtio_queue(d, 0, bench ? VIRTQ_BENCH_MAX_SIZE : VIRTQ_MAX_SIZE);
    if (why)
        return why;
    if (!(d->features & VIRTIO_F_INDIRECT_DESC) && d->vq[0].size < 4)
        return "request queue too small";
    if (!bench)
        return plan_blocks(d);
    blk_area.capacity = virtio_config64(d, BLK_CAPACITY);
    boot_params.block_blocks = 0;
    bench_plan(d);
    return NULL;
}

/* One page per device for its buffers (console: transmit buffers; rng: the request). */
static const char *setup_page(struct virtio_dev *d)
{
    d->page = (u8 *)take_free_pages(1);
    if (d->page == NULL)
        return "no RAM for buffers";
    clear_page((u64)d->page);
    return NULL;
}

static const char *setup_console(struct virtio_dev *d)
{
    /* VIRTIO_CONSOLE_F_MULTIPORT is not wanted: port 0 only, queues 0 and 1. */
    const char *why = virtio_begin(d, RING_FEATURES);
    if (!why)
        why = virtio_queue(d, CONSOLE_RECEIVEQ, VIRTQ_MAX_SIZE);
    if (!why)
        why = virtio_queue(d, CONSOLE_TRANSMITQ, VIRTQ_MAX_SIZE);
    return why ? why : setup_page(d);
}

static const char *setup_rng(struct virtio_dev *d)
{
    const char *why = virtio_begin(d, RING_FEATURES);
    if (!why)
        why = virtio_queue(d, 0, VIRTQ_MAX_SIZE);
    return why ? why : setup_page(d);
}

/*
 * virtio-net: MAC and link status from the device, mergeable receive
 * buffers when offered (each buffer still holds a whole frame; the stack
 * drops a frame that spans more); no offloads, so every frame arrives and
 * leaves with complete checksums. Queues of NET_QUEUE_SIZE and one buffer
 * per descriptor.
 */
#define NET_FEATURES    (RING_FEATURES | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MRG_RXBUF)
#define NET_CONFIG_STATUS 6

struct net_area net_area;

static const char *setup_net(struct virtio_dev *d)
{
    const char *why = virtio_begin(d, NET_FEATURES);
    if (why)
        return why;
    if (!(d->features & VIRTIO_NET_F_MAC) || d->device_cfg == NULL)
        return "the device has no MAC address";
    for (u32 i = 0; i < 6; i++)
        net_area.mac[i] = d->device_cfg[i];
    net_area.link_up = (d->features & VIRTIO_NET_F_STATUS) ? (d->device_cfg[NET_CONFIG_STATUS] & 1) : 1;
    why = virtio_queue(d, NET_RECEIVEQ, NET_QUEUE_SIZE);
    if (!why)
        why = virtio_queue(d, NET_TRANSMITQ, NET_QUEUE_SIZE);
    if (why)
        return why;
    u64 pages = NET_QUEUE_SIZE * NET_BUFFER_BYTES / PAGE_SIZE;
    net_area.rx = (u8 *)take_free_pages(pages);
    net_area.tx = (u8 *)take_free_pages(pages);
    if (!net_area.rx || !net_area.tx)
        return "no RAM for buffers";
    return NULL;
}

static void setup(struct virtio_dev *d, const char *(*fn)(struct virtio_dev *))
{
    if (!d->probed)
        return;
    const char *why = fn(d);
    if (why) {
        virtio_fail(d, why);
        return;
    }
    virtio_driver_ok(d);
    report_ready(d, d == &virtio_blk);
}

void virtio_setup(void)
{
    setup(&virtio_blk, setup_blk);
    setup(&virtio_rng, setup_rng);
    setup(&virtio_console, setup_console);
    setup(&virtio_net, setup_net);
}
