/* A small program over the real zstd library (the sources the zstd-sys crate bundles), built
 * to wasm32-wasi by scripts/build-c-corpus for fncache's source-edit benchmark. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "zstd.h"

static const char *greeting = "fncache: zstd round trip";

int main(void) {
    size_t n = 1 << 16;
    char *input = malloc(n);
    for (size_t i = 0; i < n; i++) input[i] = (char)("abcdefgh"[i % 8] + (i / 4096));
    size_t bound = ZSTD_compressBound(n);
    char *packed = malloc(bound);
    size_t packed_size = ZSTD_compress(packed, bound, input, n, 3);
    char *back = malloc(n);
    size_t back_size = ZSTD_decompress(back, n, packed, packed_size);
    printf("%s: %zu -> %zu -> %zu bytes, %s (%s)\n", greeting, n, packed_size, back_size,
           memcmp(input, back, n) == 0 ? "identical" : "DIFFERENT",
           ZSTD_getErrorName(packed_size));
    return back_size == n ? 0 : 1;
}
