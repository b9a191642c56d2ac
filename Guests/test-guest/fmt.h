/*
 * fmt.h - building console lines, and the few libc routines the compiler may
 * call. Pure code: used at CPL 0 and at CPL 3.
 */
#ifndef FMT_H
#define FMT_H

#include "types.h"

/* Longest line either privilege level builds, including the newline and NUL. */
#define LINE_MAX 192

struct line {
    u32 len;
    char text[LINE_MAX];
};

void line_start(struct line *l, const char *s);
void line_str(struct line *l, const char *s);
void line_dec(struct line *l, u64 value);
void line_hex16(struct line *l, u64 value);     /* 16 lower-case hex digits, no 0x */
void line_end(struct line *l);                  /* appends '\n' and NUL (truncating if needed) */

u64 str_len(const char *s);
void *memset(void *dst, int c, u64 n);
void *memcpy(void *dst, const void *src, u64 n);

#endif
