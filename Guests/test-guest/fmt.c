/* fmt.c - line building and memset/memcpy (see fmt.h). */
#include "fmt.h"

/* Digits of the largest u64 in decimal. */
#define U64_DEC_DIGITS 20
/* Hex digits of a u64. */
#define U64_HEX_DIGITS 16

static void line_char(struct line *l, char c)
{
    /* Leave room for the '\n' and NUL that line_end adds. */
    if (l->len < LINE_MAX - 2)
        l->text[l->len++] = c;
}

void line_start(struct line *l, const char *s)
{
    l->len = 0;
    line_str(l, s);
}

void line_str(struct line *l, const char *s)
{
    while (*s)
        line_char(l, *s++);
}

void line_dec(struct line *l, u64 value)
{
    char digits[U64_DEC_DIGITS];
    int n = 0;
    do {
        digits[n++] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    while (n)
        line_char(l, digits[--n]);
}

void line_hex16(struct line *l, u64 value)
{
    static const char hex[] = "0123456789abcdef";
    for (int shift = (U64_HEX_DIGITS - 1) * 4; shift >= 0; shift -= 4)
        line_char(l, hex[(value >> shift) & 0xF]);
}

void line_end(struct line *l)
{
    l->text[l->len++] = '\n';
    l->text[l->len] = '\0';
}

u64 str_len(const char *s)
{
    u64 n = 0;
    while (s[n])
        n++;
    return n;
}

void *memset(void *dst, int c, u64 n)
{
    u8 *d = dst;
    while (n--)
        *d++ = (u8)c;
    return dst;
}

void *memcpy(void *dst, const void *src, u64 n)
{
    u8 *d = dst;
    const u8 *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}
