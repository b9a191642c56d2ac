/*
 * rng.c - the entropy check on CPU 0 (CPL 3): every period, ask virtio-rng
 * (spec 5.4) for RNG_REQUEST_BYTES into a zeroed device-writable buffer and
 * report what came back. One request at a time; polled, never waited for.
 */
#include "user.h"
#include "virtio.h"

#define RNG_HEAD 0                  /* the one request uses descriptor 0 */

static struct {
    int active;
    int pending;
    int stall_reported;
    u64 period;
    u64 next;                       /* tick of the next request */
    u64 posted;                     /* tick the pending request was posted */
} r;

static void report(u32 len)
{
    const volatile u8 *buf = virtio_rng.page;
    int nonzero = 0;
    for (u32 i = 0; i < len && i < RNG_REQUEST_BYTES; i++)
        nonzero |= buf[i] != 0;
    struct line l;
    int ok = len > 0 && len <= RNG_REQUEST_BYTES && nonzero;
    line_start(&l, ok ? "RNG OK bytes=" : "RNG BAD bytes=");
    line_dec(&l, len);
    if (!ok)
        line_str(&l, len == 0 ? " empty" : len > RNG_REQUEST_BYTES ? " too-long" : " all-zero");
    device_print(&l);
}

void rng_start(u64 now, u64 period_ticks)
{
    if (!virtio_rng.ready)
        return;
    r.period = period_ticks;
    r.next = now;
    r.active = 1;
}

void rng_step(u64 now)
{
    if (!r.active)
        return;
    struct virtq *q = &virtio_rng.vq[0];
    if (r.pending) {
        u32 id, len;
        if (virtq_take(q, &id, &len)) {
            r.pending = 0;
            report(len);
        } else if (!r.stall_reported && now - r.posted >= r.period) {
            r.stall_reported = 1;
            struct line l;
            line_start(&l, "RNG BAD stalled ticks=");
            line_dec(&l, now - r.posted);
            device_print(&l);
        }
        return;
    }
    if (now < r.next)
        return;
    memset(virtio_rng.page, 0, RNG_REQUEST_BYTES);
    q->desc[RNG_HEAD].addr = (u64)virtio_rng.page;
    q->desc[RNG_HEAD].len = RNG_REQUEST_BYTES;
    q->desc[RNG_HEAD].flags = VIRTQ_DESC_F_WRITE;
    q->desc[RNG_HEAD].next = 0;
    r.pending = 1;
    r.stall_reported = 0;
    r.posted = now;
    r.next += r.period;
    if (r.next <= now)
        r.next = now + r.period;
    virtq_post(q, RNG_HEAD);
}
