/*
 * virtio_pci.c - the virtio PCI transport of a modern device (virtio spec
 * 1.2, 4.1) at CPL 0: find the vendor capabilities and their BARs (before
 * paging, so paging.c can map the BARs), then at set-up time reset the
 * device, negotiate features, set up split virtqueues and set DRIVER_OK
 * (spec 3.1.1). No interrupts: MSI-X stays disabled, every vector is
 * VIRTIO_MSI_NO_VECTOR and pci_enable turns INTx off; CPL 3 polls.
 */
#include "kernel.h"
#include "virtio.h"

#define PCI_STATUS              0x06
#define PCI_STATUS_CAP_LIST     0x10
#define PCI_CAP_POINTER         0x34
#define PCI_CAP_ID_VENDOR       0x09
#define PCI_CAP_LIMIT           48      /* capabilities followed at most (a looping list ends) */
#define PCI_SUBSYSTEM_ID        0x2E    /* virtio device type of a transitional device */

/* struct virtio_pci_cap (spec 4.1.4) field offsets, and cfg_type values. */
#define VIRTIO_CAP_CFG_TYPE     3
#define VIRTIO_CAP_BAR          4
#define VIRTIO_CAP_OFFSET       8
#define VIRTIO_CAP_LENGTH       12
#define VIRTIO_CAP_NOTIFY_MULT  16
#define VIRTIO_CAP_MIN_LEN      16      /* sizeof(struct virtio_pci_cap) */
#define VIRTIO_NOTIFY_CAP_MIN_LEN 20    /* ... plus notify_off_multiplier */
#define VIRTIO_CAP_COMMON       1
#define VIRTIO_CAP_NOTIFY       2
#define VIRTIO_CAP_ISR          3
#define VIRTIO_CAP_DEVICE       4
#define VIRTIO_CAP_TYPES        5       /* cfg_type 1..4 are used */
#define VIRTIO_COMMON_MIN_LEN   0x38    /* through queue_device */
#define VIRTIO_PCI_BARS         6

/* Device IDs (spec 4.1.2): modern = 0x1040 + type; transitional ones carry the type in the subsystem ID. */
#define VIRTIO_ID_MODERN_BASE   0x1040
#define VIRTIO_TYPE_BLOCK       2
#define VIRTIO_TYPE_CONSOLE     3
#define VIRTIO_TYPE_RNG         4
#define VIRTIO_TYPE_NET         1

#define RESET_POLL_LIMIT        1000    /* polls of device_status after a reset */
#define RESET_POLL_US           1000

struct virtio_dev virtio_blk = { .name = "blk" };
struct virtio_dev virtio_console = { .name = "console" };
struct virtio_dev virtio_rng = { .name = "rng" };
struct virtio_dev virtio_net = { .name = "net" };

struct cap {
    u32 found;
    u32 bar;
    u32 offset;
    u32 length;
};

static void report(const struct virtio_dev *d, u32 bdf, const char *what, const char *why)
{
    struct line l;
    line_start(&l, "ferry-test-guest: virtio ");
    line_str(&l, d->name);
    line_str(&l, " at ");
    line_bdf(&l, bdf);
    line_str(&l, what);
    line_str(&l, why);
    kprint(&l);
}

void virtio_report_failure(const struct virtio_dev *d, const char *why)
{
    report(d, d->bdf, " failed: ", why);
}

static struct virtio_dev *device_for(u32 bdf, u16 device_id)
{
    u32 type = device_id >= VIRTIO_ID_MODERN_BASE ? device_id - VIRTIO_ID_MODERN_BASE
                                                  : pci_read16(bdf, PCI_SUBSYSTEM_ID);
    if (type == VIRTIO_TYPE_BLOCK)
        return &virtio_blk;
    if (type == VIRTIO_TYPE_CONSOLE)
        return &virtio_console;
    if (type == VIRTIO_TYPE_RNG)
        return &virtio_rng;
    if (type == VIRTIO_TYPE_NET)
        return &virtio_net;
    struct line l;
    line_start(&l, "ferry-test-guest: virtio device type ");
    line_dec(&l, type);
    line_str(&l, " at ");
    line_bdf(&l, bdf);
    line_str(&l, " not used");
    kprint(&l);
    return NULL;
}

/* The first capability of each cfg_type (spec 4.1.4: the driver uses the first one it can). */
static void read_caps(u32 bdf, struct cap caps[VIRTIO_CAP_TYPES], u32 *notify_multiplier)
{
    if (!(pci_read16(bdf, PCI_STATUS) & PCI_STATUS_CAP_LIST))
        return;
    u32 pos = pci_read8(bdf, PCI_CAP_POINTER) & ~3U;
    for (u32 n = 0; pos != 0 && n < PCI_CAP_LIMIT; n++) {
        u32 head = pci_read32(bdf, pos);            /* id, next, cap_len, cfg_type */
        u32 type = head >> 24;
        u32 len = (head >> 16) & 0xFF;
        u32 min_len = type == VIRTIO_CAP_NOTIFY ? VIRTIO_NOTIFY_CAP_MIN_LEN : VIRTIO_CAP_MIN_LEN;
        if ((head & 0xFF) == PCI_CAP_ID_VENDOR && type >= VIRTIO_CAP_COMMON &&
            type < VIRTIO_CAP_TYPES && len >= min_len && !caps[type].found) {
            u32 bar = pci_read8(bdf, pos + VIRTIO_CAP_BAR);
            if (bar < VIRTIO_PCI_BARS) {
                caps[type].found = 1;
                caps[type].bar = bar;
                caps[type].offset = pci_read32(bdf, pos + VIRTIO_CAP_OFFSET);
                caps[type].length = pci_read32(bdf, pos + VIRTIO_CAP_LENGTH);
                if (type == VIRTIO_CAP_NOTIFY)
                    *notify_multiplier = pci_read32(bdf, pos + VIRTIO_CAP_NOTIFY_MULT);
            }
        }
        pos = (head >> 8) & 0xFC;
    }
}

/* Sets up the BARs the capabilities name and checks that each region lies inside its BAR. */
static const char *map_caps(u32 bdf, const struct cap caps[VIRTIO_CAP_TYPES], u64 base[VIRTIO_PCI_BARS])
{
    u64 size[VIRTIO_PCI_BARS] = { 0 };
    const char *why = NULL;
    for (u32 t = VIRTIO_CAP_COMMON; t < VIRTIO_CAP_TYPES; t++) {
        if (!caps[t].found)
            continue;
        u32 b = caps[t].bar;
        if (size[b] == 0) {
            base[b] = pci_bar_setup(bdf, b, &size[b], &why);
            if (base[b] == 0)
                return why;
        }
        if ((u64)caps[t].offset + caps[t].length > size[b])
            return "capability outside its BAR";
    }
    return NULL;
}

/* Called by pci_scan for each virtio function on bus 0, before paging. */
void virtio_probe(u32 bdf, u16 device_id)
{
    struct virtio_dev *d = device_for(bdf, device_id);
    if (d == NULL)
        return;
    if (d->probed) {
        report(d, bdf, " ignored: ", "one device of each type is used");
        return;
    }
    d->bdf = bdf;

    struct cap caps[VIRTIO_CAP_TYPES] = { { 0 } };
    u32 multiplier = 0;
    u64 base[VIRTIO_PCI_BARS] = { 0 };
    read_caps(bdf, caps, &multiplier);
    const char *why = NULL;
    if (!caps[VIRTIO_CAP_COMMON].found)
        why = "no common configuration capability (legacy-only device?)";
    else if (!caps[VIRTIO_CAP_NOTIFY].found)
        why = "no notify capability";
    else if (caps[VIRTIO_CAP_COMMON].length < VIRTIO_COMMON_MIN_LEN)
        why = "common configuration too short";
    else
        why = map_caps(bdf, caps, base);
    if (why) {
        virtio_report_failure(d, why);
        return;
    }

    pci_enable(bdf);
    d->bar = base[caps[VIRTIO_CAP_COMMON].bar];
    d->common = (volatile u8 *)(d->bar + caps[VIRTIO_CAP_COMMON].offset);
    d->notify_base = (volatile u8 *)(base[caps[VIRTIO_CAP_NOTIFY].bar] + caps[VIRTIO_CAP_NOTIFY].offset);
    d->notify_multiplier = multiplier;
    d->notify_length = caps[VIRTIO_CAP_NOTIFY].length;
    if (caps[VIRTIO_CAP_DEVICE].found)
        d->device_cfg = (volatile u8 *)(base[caps[VIRTIO_CAP_DEVICE].bar] + caps[VIRTIO_CAP_DEVICE].offset);
    d->probed = 1;
}

/* ---- Common configuration accessors (little-endian MMIO, as on x86) ------ */

static inline u8 common8(const struct virtio_dev *d, u32 offset)
{
    return *(volatile u8 *)(d->common + offset);
}

static inline u16 common16(const struct virtio_dev *d, u32 offset)
{
    return *(volatile u16 *)(d->common + offset);
}

static inline u32 common32(const struct virtio_dev *d, u32 offset)
{
    return *(volatile u32 *)(d->common + offset);
}

static inline void set_common8(const struct virtio_dev *d, u32 offset, u8 value)
{
    *(volatile u8 *)(d->common + offset) = value;
}

static inline void set_common16(const struct virtio_dev *d, u32 offset, u16 value)
{
    *(volatile u16 *)(d->common + offset) = value;
}

static inline void set_common32(const struct virtio_dev *d, u32 offset, u32 value)
{
    *(volatile u32 *)(d->common + offset) = value;
}

/* 64-bit fields as two 32-bit writes, low half first (spec 4.1.3.1 allows it; Linux does the same). */
static void set_common64(const struct virtio_dev *d, u32 offset, u64 value)
{
    set_common32(d, offset, (u32)value);
    set_common32(d, offset + 4, (u32)(value >> 32));
}

static void add_status(const struct virtio_dev *d, u8 bits)
{
    set_common8(d, VIRTIO_COMMON_STATUS, common8(d, VIRTIO_COMMON_STATUS) | bits);
}

/*
 * Reset, ACKNOWLEDGE, DRIVER, feature negotiation, FEATURES_OK (spec 3.1.1
 * steps 1-6). wanted = the features this driver can use; the result is
 * wanted & offered. VIRTIO_F_VERSION_1 is required.
 */
const char *virtio_begin(struct virtio_dev *d, u64 wanted)
{
    set_common8(d, VIRTIO_COMMON_STATUS, 0);
    u32 polls = 0;
    while (common8(d, VIRTIO_COMMON_STATUS) != 0) {
        if (++polls == RESET_POLL_LIMIT)
            return "device_status stays non-zero after reset";
        udelay(RESET_POLL_US);
    }
    add_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
    add_status(d, VIRTIO_STATUS_DRIVER);

    set_common32(d, VIRTIO_COMMON_DFSELECT, 0);
    u64 offered = common32(d, VIRTIO_COMMON_DF);
    set_common32(d, VIRTIO_COMMON_DFSELECT, 1);
    offered |= (u64)common32(d, VIRTIO_COMMON_DF) << 32;
    if (!(offered & VIRTIO_F_VERSION_1))
        return "VIRTIO_F_VERSION_1 not offered";
    d->features = offered & wanted;
    set_common32(d, VIRTIO_COMMON_GFSELECT, 0);
    set_common32(d, VIRTIO_COMMON_GF, (u32)d->features);
    set_common32(d, VIRTIO_COMMON_GFSELECT, 1);
    set_common32(d, VIRTIO_COMMON_GF, (u32)(d->features >> 32));
    add_status(d, VIRTIO_STATUS_FEATURES_OK);
    if (!(common8(d, VIRTIO_COMMON_STATUS) & VIRTIO_STATUS_FEATURES_OK))
        return "FEATURES_OK not accepted";
    set_common16(d, VIRTIO_COMMON_MSIX, VIRTIO_MSI_NO_VECTOR);
    return NULL;
}

/* Device-specific configuration, 64-bit field read twice over until config_generation holds still (spec 4.1.4.3.1). */
u64 virtio_config64(const struct virtio_dev *d, u32 offset)
{
    u32 generation, lo, hi;
    do {
        generation = common8(d, VIRTIO_COMMON_CFGGENERATION);
        lo = *(volatile u32 *)(d->device_cfg + offset);
        hi = *(volatile u32 *)(d->device_cfg + offset + 4);
    } while (generation != common8(d, VIRTIO_COMMON_CFGGENERATION));
    return ((u64)hi << 32) | lo;
}

/* A 32-bit device-specific configuration field: one read is atomic, no generation check needed. */
u32 virtio_config32(const struct virtio_dev *d, u32 offset)
{
    return *(volatile u32 *)(d->device_cfg + offset);
}

/*
 * Queue `index` (spec 4.1.5.1.3): the size is the largest power of two
 * <= min(queue_size, limit). Zeroed contiguous pages hold the descriptor
 * table, then the avail ring at VIRTQ_AVAIL_OFFSET (or right after a larger
 * table) and the used ring 1 KiB after it: one page up to 64 entries, two
 * for 128 or 256.
 */
const char *virtio_queue(struct virtio_dev *d, u32 index, u32 limit)
{
    set_common16(d, VIRTIO_COMMON_Q_SELECT, (u16)index);
    u32 max = common16(d, VIRTIO_COMMON_Q_SIZE);
    if (max == 0)
        return "queue missing";
    u32 size = limit;
    while (size > max)
        size >>= 1;
    u32 notify_offset = (u32)common16(d, VIRTIO_COMMON_Q_NOFF) * d->notify_multiplier;
    if (notify_offset + sizeof(u16) > d->notify_length)
        return "queue notify address outside the notify capability";
    u64 avail_offset = size * sizeof(struct virtq_desc);
    if (avail_offset < VIRTQ_AVAIL_OFFSET)
        avail_offset = VIRTQ_AVAIL_OFFSET;
    u64 used_offset = avail_offset + (VIRTQ_USED_OFFSET - VIRTQ_AVAIL_OFFSET);
    u64 used_end = used_offset + sizeof(struct virtq_used) + (size + 1) * sizeof(struct virtq_used_elem);
    u64 pages = (used_end + PAGE_SIZE - 1) / PAGE_SIZE;
    u64 page = take_free_pages(pages);
    if (page == 0)
        return "no RAM for the queue";
    for (u64 i = 0; i < pages; i++)
        clear_page(page + i * PAGE_SIZE);

    struct virtq *q = &d->vq[index];
    q->index = (u16)index;
    q->size = (u16)size;
    q->event_idx = (d->features & VIRTIO_F_EVENT_IDX) != 0;
    q->desc = (struct virtq_desc *)page;
    q->avail = (volatile struct virtq_avail *)(page + avail_offset);
    q->used = (volatile struct virtq_used *)(page + used_offset);
    q->notify = (volatile u16 *)(d->notify_base + notify_offset);
    /* Polling only: ask the device not to signal (flags with plain rings, used_event with EVENT_IDX). */
    if (q->event_idx)
        q->avail->ring[size] = VIRTQ_EVENT_DISTANCE;
    else
        q->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;

    set_common16(d, VIRTIO_COMMON_Q_SIZE, (u16)size);
    set_common64(d, VIRTIO_COMMON_Q_DESCLO, page);
    set_common64(d, VIRTIO_COMMON_Q_AVAILLO, page + avail_offset);
    set_common64(d, VIRTIO_COMMON_Q_USEDLO, page + used_offset);
    set_common16(d, VIRTIO_COMMON_Q_MSIX, VIRTIO_MSI_NO_VECTOR);
    set_common16(d, VIRTIO_COMMON_Q_ENABLE, 1);
    d->nqueues = index + 1;
    return NULL;
}

void virtio_driver_ok(struct virtio_dev *d)
{
    add_status(d, VIRTIO_STATUS_DRIVER_OK);
    d->ready = 1;
}

/* Gives up on the device (spec 3.1.1: set FAILED) and says why. */
void virtio_fail(struct virtio_dev *d, const char *why)
{
    add_status(d, VIRTIO_STATUS_FAILED);
    virtio_report_failure(d, why);
}
