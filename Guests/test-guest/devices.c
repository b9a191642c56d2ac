/*
 * devices.c - CPU 0's virtio work at CPL 3, next to its memory workload:
 * starts and steps the block workload (blk.c), the entropy check (rng.c)
 * and console output (vcon.c), and watches each device's status for
 * DEVICE_NEEDS_RESET. With block_bench=1 the block benchmark (bench.c)
 * runs to its end first, in place of the block workload. Only CPU 0 calls
 * these, so no locking.
 */
#include "user.h"
#include "virtio.h"

#define RNG_PERIOD_TICKS    (2 * TICK_HZ)   /* entropy check period without a block workload */
#define STATUS_CHECK_TICKS  TICK_HZ         /* device_status is read this often */

static struct virtio_dev *const devices[] = { &virtio_blk, &virtio_rng, &virtio_console, &virtio_net };
static u32 reset_reported;                  /* bit i: devices[i] was reported */
static u64 next_status_check;

void device_print(struct line *l)
{
    mbox_print(&cpu_shared[0], l);
}

static void check_status(void)
{
    for (u32 i = 0; i < ARRAY_SIZE(devices); i++) {
        struct virtio_dev *d = devices[i];
        if (!d->ready || (reset_reported & (1U << i)))
            continue;
        u8 status = *(volatile u8 *)(d->common + VIRTIO_COMMON_STATUS);
        if (status & VIRTIO_STATUS_NEEDS_RESET) {
            reset_reported |= 1U << i;
            struct line l;
            line_start(&l, "ferry-test-guest: virtio ");
            line_str(&l, d->name);
            line_str(&l, " DEVICE_NEEDS_RESET status=");
            line_hex16(&l, status);
            device_print(&l);
        }
    }
}

void devices_start(u64 now)
{
    if (bench_run())                        /* CPU 0 did nothing else meanwhile; time moved on */
        now = cpu_shared[0].ticks;
    vcon_send("ferry-test-guest: virtio console hello\n");
    blk_start(now);
    rng_start(now, blk_area.blocks && blk_area.verify_ticks ? blk_area.verify_ticks : RNG_PERIOD_TICKS);
    net_start(now);
    next_status_check = now;
}

int devices_step(u64 now)
{
    if (now >= next_status_check) {
        check_status();
        next_status_check = now + STATUS_CHECK_TICKS;
    }
    rng_step(now);
    int net = net_step(now);
    return blk_step(now) | net;
}

void devices_heartbeat(u64 seq)
{
    struct line l;
    line_start(&l, "CONSOLE seq=");
    line_dec(&l, seq);
    line_str(&l, " cpu=0");
    line_end(&l);
    vcon_send(l.text);
}
