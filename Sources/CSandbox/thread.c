#define _GNU_SOURCE
#include "CSandbox.h"

#include <pthread.h>

// pthread_setname_np needs _GNU_SOURCE, which the Swift importer's view of the C library lacks.
void ferry_name_current_thread(const char *name) {
    pthread_setname_np(pthread_self(), name);
}
