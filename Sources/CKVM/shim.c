// CKVM has no C code of its own: see include/CKVM.h.
