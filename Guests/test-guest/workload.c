/*
 * workload.c - the CPL-3 workload, one instance per CPU (runs natively even
 * where CPL-0 code is emulated). It never does port I/O or INT n: console
 * output goes through its CPU's mailbox, time comes from its CPU's tick
 * counter, and when it has nothing to do it executes HLT, which traps to the
 * kernel (traps.c) and sleeps until the next interrupt.
 *
 * Each CPU owns the working-set pages [first, first + npages) and their
 * generation-array entries. Page p at generation g holds, in word i,
 * word_value(page_key(p, g), i). Rewrites go round-robin over the CPU's
 * pages, so after R rewrites local page j must be at generation
 * 1 + R / npages + (j < R % npages); verification checks the generation
 * array against that and every word against the generation.
 *
 * CPU 0 also runs the virtio data path (devices.c) between its chunks.
 */
#include "user.h"

#define WORDS_PER_PAGE  (PAGE_SIZE / sizeof(u64))
#define GEN_WORD_INDEX  WORDS_PER_PAGE      /* "word" reported when the generation entry is wrong */
#define WRITE_CHUNK     64                  /* pages rewritten between looks at the clock */
#define VERIFY_CHUNK    64                  /* pages verified between looks at the clock */
#define PAGE_SHIFT_KEY  32                  /* page index goes above the generation in the key */
#define FIRST_GENERATION 1                  /* generation written by the initial fill */

static volatile u32 fill_done;      /* CPUs that finished the initial fill */
static volatile u32 go;             /* set by CPU 0 after printing "ready" */

struct worker {
    u32 cpu;
    struct cpu_shared *shared;
    u64 first;                      /* first working-set page owned */
    u64 npages;                     /* pages owned */
    u64 rewrites;                   /* rewrites since the fill (R) */
    u64 written;                    /* pages written, fill included */
    u64 sum;                        /* running checksum of page keys written */
};

static inline u64 page_key(u64 page, u64 gen)
{
    return mix64((page << PAGE_SHIFT_KEY) ^ gen);
}

/* Address of the index-th free page (free memory may be split in several ranges). */
static u64 *free_page(u64 index)
{
    for (u32 r = 0; r < wl_config.nranges; r++) {
        if (index < wl_config.ranges[r].pages)
            return (u64 *)(wl_config.ranges[r].base + index * PAGE_SIZE);
        index -= wl_config.ranges[r].pages;
    }
    return NULL;    /* unreachable: the kernel sized the working set to fit */
}

static u64 *page_ptr(u64 page)
{
    return free_page(wl_config.gen_pages + page);
}

static volatile u64 *gen_slot(u64 page)
{
    return free_page(page / WORDS_PER_PAGE) + page % WORDS_PER_PAGE;
}

static u64 expected_gen(const struct worker *w, u64 local)
{
    return FIRST_GENERATION + w->rewrites / w->npages + (local < w->rewrites % w->npages ? 1 : 0);
}

static void write_page(struct worker *w, u64 local, u64 gen)
{
    u64 page = w->first + local;
    u64 key = page_key(page, gen);
    u64 *words = page_ptr(page);
    for (u64 i = 0; i < WORDS_PER_PAGE; i++)
        words[i] = word_value(key, i);
    __asm__ volatile("" : : : "memory");        /* page first, then its generation */
    *gen_slot(page) = gen;
    w->sum += key;
    w->written++;
}

static void rewrite_next(struct worker *w)
{
    u64 local = w->rewrites % w->npages;
    u64 gen = expected_gen(w, local) + 1;
    write_page(w, local, gen);
    w->rewrites++;
}

void mbox_print(struct cpu_shared *shared, struct line *l)
{
    if (l->len > MBOX_SIZE - 2)             /* room for the '\n' and the NUL */
        l->len = MBOX_SIZE - 2;
    line_end(l);
    memcpy(shared->mbox, l->text, l->len + 1);
    __asm__ volatile("" : : : "memory");
    shared->mbox_full = 1;
    while (shared->mbox_full)
        idle();
}

static void print(struct worker *w, struct line *l)
{
    mbox_print(w->shared, l);
}

struct verify_pass {
    u64 number;
    u64 cursor;                     /* next local page */
    int active;
    int failed;
    u64 fail_page, fail_word, fail_expected, fail_found;
};

static void record_failure(struct verify_pass *v, u64 page, u64 word, u64 expected, u64 found)
{
    if (v->failed)
        return;
    v->failed = 1;
    v->fail_page = page;
    v->fail_word = word;
    v->fail_expected = expected;
    v->fail_found = found;
}

static void verify_page(struct worker *w, struct verify_pass *v, u64 local)
{
    u64 page = w->first + local;
    u64 gen = expected_gen(w, local);
    u64 found_gen = *gen_slot(page);
    if (found_gen != gen)
        record_failure(v, page, GEN_WORD_INDEX, gen, found_gen);
    u64 key = page_key(page, gen);
    const volatile u64 *words = page_ptr(page);
    for (u64 i = 0; i < WORDS_PER_PAGE; i++) {
        u64 expected = word_value(key, i);
        u64 found = words[i];
        if (found != expected) {
            record_failure(v, page, i, expected, found);
            return;
        }
    }
}

static void report_pass(struct worker *w, struct verify_pass *v)
{
    struct line l;
    line_start(&l, v->failed ? "VERIFY FAIL cpu=" : "VERIFY OK cpu=");
    line_dec(&l, w->cpu);
    line_str(&l, " pass=");
    line_dec(&l, v->number);
    if (v->failed) {
        line_str(&l, " page=");
        line_dec(&l, v->fail_page);
        line_str(&l, " word=");
        line_dec(&l, v->fail_word);
        line_str(&l, " expected=");
        line_hex16(&l, v->fail_expected);
        line_str(&l, " found=");
        line_hex16(&l, v->fail_found);
    } else {
        line_str(&l, " pages=");
        line_dec(&l, w->npages);
    }
    print(w, &l);
}

static void heartbeat(struct worker *w, u64 seq, u64 ticks)
{
    struct line l;
    line_start(&l, "HEARTBEAT cpu=");
    line_dec(&l, w->cpu);
    line_str(&l, " seq=");
    line_dec(&l, seq);
    line_str(&l, " ticks=");
    line_dec(&l, ticks);
    line_str(&l, " sum=");
    line_hex16(&l, w->sum);
    line_str(&l, " written=");
    line_dec(&l, w->written);
    print(w, &l);
    if (w->cpu == 0)
        devices_heartbeat(seq);
}

void user_main(u64 cpu)
{
    struct worker w = { .cpu = (u32)cpu, .shared = &cpu_shared[cpu] };
    while (!wl_boot_complete)
        idle();

    const struct workload_config *c = &wl_config;
    w.first = c->workset_pages * cpu / c->ncpus;
    w.npages = c->workset_pages * (cpu + 1) / c->ncpus - w.first;

    for (u64 j = 0; j < w.npages; j++)
        write_page(&w, j, FIRST_GENERATION);
    __atomic_fetch_add(&fill_done, 1, __ATOMIC_RELEASE);
    if (cpu == 0) {
        while (fill_done < c->ncpus)
            idle();
        struct line l;
        line_start(&l, "ferry-test-guest: ready");
        print(&w, &l);
        __atomic_store_n(&go, 1, __ATOMIC_RELEASE);
        devices_start(w.shared->ticks);
    } else {
        while (!go)
            idle();
    }

    /* This CPU's share of dirty_rate; the remainder goes to the lowest indices. */
    int unlimited = c->dirty_rate == DIRTY_RATE_MAX;
    u64 rate = unlimited ? 0 : c->dirty_rate / c->ncpus + (cpu < c->dirty_rate % c->ncpus ? 1 : 0);
    u64 start = w.shared->ticks;
    u64 next_heartbeat = start + c->heartbeat_ticks;
    u64 next_verify = start + c->verify_ticks;
    u64 seq = 0;
    struct verify_pass v = { 0 };

    for (;;) {
        u64 now = w.shared->ticks;
        int busy = 0;

        if (c->heartbeat_ticks && now >= next_heartbeat) {
            heartbeat(&w, ++seq, now);
            next_heartbeat += c->heartbeat_ticks;
            if (next_heartbeat <= now)              /* fell behind: skip, do not burst */
                next_heartbeat = now + c->heartbeat_ticks;
        }

        if (c->verify_ticks && !v.active && now >= next_verify) {
            v.number++;
            v.cursor = 0;
            v.failed = 0;
            v.active = 1;
            next_verify += c->verify_ticks;
            if (next_verify <= now)
                next_verify = now + c->verify_ticks;
        }
        if (v.active) {
            for (u32 k = 0; k < VERIFY_CHUNK && v.cursor < w.npages; k++)
                verify_page(&w, &v, v.cursor++);
            if (v.cursor == w.npages) {
                v.active = 0;
                report_pass(&w, &v);
            }
            busy = 1;
        }

        if (w.npages) {
            /* Budget: rate * elapsed ticks / TICK_HZ pages since the start, minus those done. */
            u64 elapsed = now - start;
            u64 target = unlimited ? w.rewrites + WRITE_CHUNK
                                   : rate / TICK_HZ * elapsed + rate % TICK_HZ * elapsed / TICK_HZ;
            for (u32 k = 0; k < WRITE_CHUNK && w.rewrites < target; k++) {
                rewrite_next(&w);
                busy = 1;
            }
        }

        if (cpu == 0 && devices_step(now))      /* the device data path lives on CPU 0 */
            busy = 1;

        if (!busy)
            idle();
    }
}
