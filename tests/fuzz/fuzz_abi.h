/* The libFuzzer entry points every harness defines (force-included by
 * tests/fuzz/CMakeLists.txt, so -Wmissing-prototypes stays on). */
#ifndef KMS_FUZZ_ABI_H
#define KMS_FUZZ_ABI_H
#include <stddef.h>
#include <stdint.h>
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);
#endif
