// Scheduling calls tests need that glibc declares only with _GNU_SOURCE, which Swift's Glibc
// module does not define.
#ifndef FERRY_CTESTSUPPORT_H
#define FERRY_CTESTSUPPORT_H

/// Lets the calling thread run only on CPU `cpu`; 0 on success, -1 with errno set.
int ferry_test_pin_thread(int cpu);

/// Lets the calling thread run on every CPU of the machine again.
int ferry_test_unpin_thread(void);

/// The lowest-numbered CPU the calling thread may run on, or -1.
int ferry_test_first_cpu(void);

#endif
