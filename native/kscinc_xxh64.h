/* XXH64 for chunk ids (kscinc_xxh64.c; formats/repository.md §2). */
#ifndef KSCINC_XXH64_H
#define KSCINC_XXH64_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <node_api.h>

/* XXH64 of data[0, len) with `seed`. */
uint64_t kscinc_xxh64(const uint8_t* data, size_t len, uint64_t seed);

/* XXH64 of data[0, len) with two seeds in one pass over the data. */
void kscinc_xxh64_pair(const uint8_t* data, size_t len, uint64_t seed_a, uint64_t seed_b, uint64_t* a, uint64_t* b);

/* Adds xxh64 and xxh64Id to `exports`. False when N-API failed. */
bool kscinc_xxh64_register(napi_env env, napi_value exports);

#endif
