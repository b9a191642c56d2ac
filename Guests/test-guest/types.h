/* types.h - fixed-size integer types (no libc in this guest). */
#ifndef TYPES_H
#define TYPES_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define NULL ((void *)0)
#define MIB (1024UL * 1024UL)
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

#endif
