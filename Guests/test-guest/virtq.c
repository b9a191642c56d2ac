/*
 * virtq.c - the driver side of a split virtqueue (virtio spec 1.2, 2.7) at
 * CPL 3: publish descriptor chains (one, or a batch behind one avail index
 * update), ring the doorbell when the device asks for it, consume used
 * entries. No interrupts: callers poll virtq_take.
 *
 * Ordering on x86: stores are not reordered with stores nor loads with
 * loads, so a compiler barrier orders descriptor/ring writes before the
 * avail index, and the used index before the used entry. The one
 * store->load pair that needs a fence is "publish avail idx, then read the
 * device's notification suppression" (spec 2.7.13.4; Linux's virtio_mb).
 */
#include "user.h"
#include "virtio.h"

static inline void compiler_barrier(void)
{
    __asm__ volatile("" : : : "memory");
}

static inline void full_barrier(void)
{
    __asm__ volatile("mfence" : : : "memory");
}

/* With VIRTIO_F_EVENT_IDX: used_event follows the avail ring, avail_event the used ring (spec 2.7.6, 2.7.8). */
static volatile u16 *used_event(struct virtq *q)
{
    return &q->avail->ring[q->size];
}

static volatile u16 *avail_event(struct virtq *q)
{
    return (volatile u16 *)&q->used->ring[q->size];
}

void virtq_add(struct virtq *q, u16 head)
{
    q->avail->ring[q->avail_idx & (q->size - 1)] = head;
    q->avail_idx++;
}

void virtq_kick(struct virtq *q)
{
    u16 old = q->avail->idx;
    u16 next = q->avail_idx;
    if (old == next)
        return;
    compiler_barrier();
    q->avail->idx = next;
    full_barrier();

    int kick;
    if (q->event_idx)   /* vring_need_event: did next pass the index the device asked to hear about? */
        kick = (u16)(next - *avail_event(q) - 1) < (u16)(next - old);
    else
        kick = !(q->used->flags & VIRTQ_USED_F_NO_NOTIFY);
    if (kick)
        *q->notify = q->index;      /* a 16-bit write of the queue index, as Linux does */
}

void virtq_post(struct virtq *q, u16 head)
{
    virtq_add(q, head);
    virtq_kick(q);
}

int virtq_take(struct virtq *q, u32 *id, u32 *len)
{
    if (q->used->idx == q->last_used)
        return 0;
    compiler_barrier();
    volatile struct virtq_used_elem *e = &q->used->ring[q->last_used & (q->size - 1)];
    *id = e->id;
    *len = e->len;
    q->last_used++;
    /* Keep used_event far ahead of what the device will reach: it never needs to signal. */
    if (q->event_idx)
        *used_event(q) = (u16)(q->last_used + VIRTQ_EVENT_DISTANCE);
    compiler_barrier();
    return 1;
}
