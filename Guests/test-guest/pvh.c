/*
 * pvh.c - what the loader tells us: struct hvm_start_info (Xen's
 * arch-x86/hvm/start_info.h), its memory map, and the kernel command line.
 * Runs on the boot page tables, so everything read must lie below BOOT_MAP_LIMIT (4 GiB).
 */
#include "kernel.h"
#include "virtio.h"

#define HVM_START_MAGIC      0x336ec578 /* xen/include/public/arch-x86/hvm/start_info.h */
#define HVM_START_MEMMAP_VERSION 1      /* memmap_paddr/memmap_entries exist from version 1 */
#define E820_TYPE_RAM        1          /* usable RAM in an e820-style map */
#define FALLBACK_LOW_RAM_END 0x9FC00    /* without a map: conventional memory below the EBDA */
#define FALLBACK_RAM_BYTES   (64 * MIB) /* without a map: assume this much RAM (and say so) */
#define LOW_MEMORY_END       0x100000   /* 1 MiB: start of extended memory */
#define CMDLINE_MAX          512        /* longest command line kept (longer ones are cut) */

/* Defaults of the command-line keys (see README.md). */
#define DEFAULT_WORKSET_MIB  16
#define DEFAULT_DIRTY_RATE   0
#define DEFAULT_HEARTBEAT_MS 1000
#define DEFAULT_VERIFY_MS    2000
#define DEFAULT_POWEROFF_S   0
#define DEFAULT_BLOCK_BLOCKS 1024
#define DEFAULT_BLOCK_RATE   200
#define DEFAULT_BLOCK_VERIFY_MS 2000
#define DEFAULT_BLOCK_BENCH  0
#define DEFAULT_BENCH_MIB    256
#define DEFAULT_BENCH_QD     4
#define DEFAULT_BENCH_RAND_QD 32
#define DEFAULT_BENCH_TICKS  200        /* 2 s at TICK_HZ */

struct hvm_start_info {
    u32 magic;
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    u64 memmap_paddr;       /* version >= 1 */
    u32 memmap_entries;     /* version >= 1 */
    u32 reserved;
};

struct hvm_memmap_entry {
    u64 addr;
    u64 size;
    u32 type;
    u32 reserved;
};

u64 pvh_rsdp_paddr;
struct ram_range ram_ranges[MAX_RAM_RANGES];
u32 ram_range_count;
struct boot_params boot_params = {
    .workset_mib = DEFAULT_WORKSET_MIB,
    .dirty_rate = DEFAULT_DIRTY_RATE,
    .heartbeat_ms = DEFAULT_HEARTBEAT_MS,
    .verify_ms = DEFAULT_VERIFY_MS,
    .poweroff_s = DEFAULT_POWEROFF_S,
    .block_blocks = DEFAULT_BLOCK_BLOCKS,
    .block_rate = DEFAULT_BLOCK_RATE,
    .block_verify_ms = DEFAULT_BLOCK_VERIFY_MS,
    .block_bench = DEFAULT_BLOCK_BENCH,
    .bench_mib = DEFAULT_BENCH_MIB,
    .bench_qd = DEFAULT_BENCH_QD,
    .bench_rand_qd = DEFAULT_BENCH_RAND_QD,
    .bench_ticks = DEFAULT_BENCH_TICKS,
    .net_stream_port = 5001,
    .net_stream_bytes = 64,
};

static char cmdline[CMDLINE_MAX];

static int readable(u64 paddr, u64 size)
{
    return paddr != 0 && paddr < BOOT_MAP_LIMIT && size <= BOOT_MAP_LIMIT - paddr;
}

static void add_ram(u64 base, u64 size)
{
    if (size == 0)
        return;
    if (ram_range_count == MAX_RAM_RANGES) {
        kprint_msg("too many RAM ranges in the memory map; ignoring the rest");
        return;
    }
    ram_ranges[ram_range_count].base = base;
    ram_ranges[ram_range_count].size = size;
    ram_range_count++;
}

/* Sort by base (insertion sort: a handful of entries) and merge overlapping or adjacent ranges. */
static void normalize_ram(void)
{
    for (u32 i = 1; i < ram_range_count; i++) {
        struct ram_range r = ram_ranges[i];
        u32 j = i;
        while (j > 0 && ram_ranges[j - 1].base > r.base) {
            ram_ranges[j] = ram_ranges[j - 1];
            j--;
        }
        ram_ranges[j] = r;
    }
    u32 out = 0;
    for (u32 i = 0; i < ram_range_count; i++) {
        if (out > 0) {
            struct ram_range *prev = &ram_ranges[out - 1];
            u64 prev_end = prev->base + prev->size;
            if (ram_ranges[i].base <= prev_end) {
                u64 end = ram_ranges[i].base + ram_ranges[i].size;
                if (end > prev_end)
                    prev->size = end - prev->base;
                continue;
            }
        }
        ram_ranges[out++] = ram_ranges[i];
    }
    ram_range_count = out;
}

static void use_fallback_ram(const char *why)
{
    struct line l;
    line_start(&l, "ferry-test-guest: ");
    line_str(&l, why);
    line_str(&l, "; assuming ");
    line_dec(&l, FALLBACK_RAM_BYTES / MIB);
    line_str(&l, " MiB of RAM");
    kprint(&l);
    ram_range_count = 0;
    add_ram(0, FALLBACK_LOW_RAM_END);
    add_ram(LOW_MEMORY_END, FALLBACK_RAM_BYTES - LOW_MEMORY_END);
}

static void parse_memmap(const struct hvm_start_info *si)
{
    if (si->version < HVM_START_MEMMAP_VERSION || si->memmap_entries == 0) {
        use_fallback_ram("no memory map in hvm_start_info");
        return;
    }
    u64 bytes = (u64)si->memmap_entries * sizeof(struct hvm_memmap_entry);
    if (!readable(si->memmap_paddr, bytes)) {
        use_fallback_ram("memory map out of reach");
        return;
    }
    const struct hvm_memmap_entry *e = (const struct hvm_memmap_entry *)si->memmap_paddr;
    for (u32 i = 0; i < si->memmap_entries; i++) {
        if (e[i].type == E820_TYPE_RAM)
            add_ram(e[i].addr, e[i].size);
    }
    if (ram_range_count == 0)
        use_fallback_ram("no RAM in the memory map");
}

static void copy_cmdline(u64 paddr)
{
    if (paddr == 0)
        return;
    if (!readable(paddr, 1)) {
        kprint_msg("command line out of reach; using defaults");
        return;
    }
    const char *src = (const char *)paddr;
    u32 n = 0;
    while (n < CMDLINE_MAX - 1 && (u64)(src + n) < BOOT_MAP_LIMIT && src[n])
        n++;
    memcpy(cmdline, src, n);
    cmdline[n] = '\0';
}

static int key_is(const char *start, u32 len, const char *key)
{
    u32 i = 0;
    for (; i < len && key[i]; i++) {
        if (start[i] != key[i])
            return 0;
    }
    return i == len && key[i] == '\0';
}

/* Decimal value of value[0..len); returns 0 if it is not a plain decimal number. */
static int parse_decimal(const char *value, u32 len, u64 *out)
{
    /* Values above this would overflow once multiplied by 10. */
    const u64 limit = ~0UL / 10;
    u64 n = 0;
    if (len == 0)
        return 0;
    for (u32 i = 0; i < len; i++) {
        if (value[i] < '0' || value[i] > '9' || n > limit)
            return 0;
        n = n * 10 + (u64)(value[i] - '0');
    }
    *out = n;
    return 1;
}

static void bad_value(const char *key)
{
    struct line l;
    line_start(&l, "ferry-test-guest: ignoring bad value of ");
    line_str(&l, key);
    kprint(&l);
}

/* A dotted quad, a.b.c.d, into host order. */
static int parse_ipv4(const char *s, u32 len, u64 *out)
{
    u64 address = 0, part = 0;
    u32 parts = 0, digits = 0;
    for (u32 i = 0; i <= len; i++) {
        if (i == len || s[i] == '.') {
            if (digits == 0 || part > 255)
                return 0;
            address = address << 8 | part;
            parts++;
            part = 0;
            digits = 0;
        } else if (s[i] >= '0' && s[i] <= '9' && digits < 3) {
            part = part * 10 + (u64)(s[i] - '0');
            digits++;
        } else {
            return 0;
        }
    }
    if (parts != 4)
        return 0;
    *out = address;
    return 1;
}

static void parse_option(const char *word, u32 len)
{
    static const struct {
        const char *key;
        u64 *value;
    } numeric[] = {
        { "workset_mib", &boot_params.workset_mib },
        { "heartbeat_ms", &boot_params.heartbeat_ms },
        { "verify_ms", &boot_params.verify_ms },
        { "poweroff_s", &boot_params.poweroff_s },
        { "dirty_rate", &boot_params.dirty_rate },
        { "block_blocks", &boot_params.block_blocks },
        { "block_rate", &boot_params.block_rate },
        { "block_verify_ms", &boot_params.block_verify_ms },
        { "block_bench", &boot_params.block_bench },
        { "bench_mib", &boot_params.bench_mib },
        { "bench_qd", &boot_params.bench_qd },
        { "bench_rand_qd", &boot_params.bench_rand_qd },
        { "bench_ticks", &boot_params.bench_ticks },
        { "net_stream_port", &boot_params.net_stream_port },
        { "net_stream_rate", &boot_params.net_stream_rate },
        { "net_stream_bytes", &boot_params.net_stream_bytes },
    };
    u32 eq = 0;
    while (eq < len && word[eq] != '=')
        eq++;
    if (eq == len)
        return;
    const char *value = word + eq + 1;
    u32 value_len = len - eq - 1;
    if (key_is(word, eq, "dirty_rate") && key_is(value, value_len, "max")) {
        boot_params.dirty_rate = DIRTY_RATE_MAX;
        return;
    }
    if (key_is(word, eq, "net_stream_rate") && key_is(value, value_len, "max")) {
        boot_params.net_stream_rate = NET_RATE_MAX;
        return;
    }
    if (key_is(word, eq, "net_ip") || key_is(word, eq, "net_peer")) {
        u64 *target = key_is(word, eq, "net_ip") ? &boot_params.net_ip : &boot_params.net_peer;
        if (!parse_ipv4(value, value_len, target))
            bad_value(key_is(word, eq, "net_ip") ? "net_ip" : "net_peer");
        return;
    }
    if (key_is(word, eq, "block_rate") && key_is(value, value_len, "max")) {
        boot_params.block_rate = BLOCK_RATE_MAX;
        return;
    }
    for (u32 i = 0; i < ARRAY_SIZE(numeric); i++) {
        if (key_is(word, eq, numeric[i].key)) {
            if (!parse_decimal(value, value_len, numeric[i].value))
                bad_value(numeric[i].key);
            return;
        }
    }
    /* Unknown keys are ignored. */
}

static void parse_cmdline(void)
{
    const char *p = cmdline;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *start = p;
        while (*p && *p != ' ')
            p++;
        if (p > start)
            parse_option(start, (u32)(p - start));
    }
}

void pvh_parse(u32 start_info_paddr)
{
    const struct hvm_start_info *si = (const struct hvm_start_info *)(u64)start_info_paddr;
    if (!readable(start_info_paddr, sizeof(*si)) || si->magic != HVM_START_MAGIC) {
        use_fallback_ram("no valid hvm_start_info");
    } else {
        parse_memmap(si);
        copy_cmdline(si->cmdline_paddr);
        pvh_rsdp_paddr = si->rsdp_paddr;
    }
    normalize_ram();
    parse_cmdline();
}
