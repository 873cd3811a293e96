/* XXH64 (Yann Collet's 64-bit xxHash), written from the algorithm's published specification, for the    */
/* chunk ids of formats/repository.md §2: id(B) = xxh64(B, 0) ‖ xxh64(B, SEED_B), each half big-endian.   */
/*                                                                                                        */
/* xxh64(data, seed) -> bigint          one hash (for tests and tools)                                     */
/* xxh64Id(data, seedB, out, at)        both halves of an id into out[at, at+16): data is read in place    */
/*                                      (no copy) and once, the two seeds' accumulators side by side       */
/* data and out are Uint8Arrays (a Buffer is one); `at` a safe integer with at + 16 <= out.length.         */
#include <stdio.h>
#include <string.h>

#include "kscinc_xxh64.h"

#define P1 UINT64_C(11400714785074694791)
#define P2 UINT64_C(14029467366897019727)
#define P3 UINT64_C(1609587929392839161)
#define P4 UINT64_C(9650029242287828579)
#define P5 UINT64_C(2870177450012600261)

static inline uint64_t rotl64(uint64_t x, unsigned r) { return (x << r) | (x >> (64 - r)); }

/* Lanes are little-endian whatever the host's byte order. */
static inline uint64_t le64(const uint8_t* p) {
  uint64_t v;
  memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap64(v);
#endif
  return v;
}

static inline uint32_t le32(const uint8_t* p) {
  uint32_t v;
  memcpy(&v, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap32(v);
#endif
  return v;
}

static inline uint64_t round64(uint64_t acc, uint64_t lane) { return rotl64(acc + lane * P2, 31) * P1; }

static inline uint64_t merge64(uint64_t h, uint64_t v) { return (h ^ round64(0, v)) * P1 + P4; }

/* The four accumulators after the last whole 32-byte stripe, folded into one. */
static inline uint64_t converge(const uint64_t v[4]) {
  uint64_t h = rotl64(v[0], 1) + rotl64(v[1], 7) + rotl64(v[2], 12) + rotl64(v[3], 18);
  for (int i = 0; i < 4; i++) h = merge64(h, v[i]);
  return h;
}

static inline void init_acc(uint64_t v[4], uint64_t seed) {
  v[0] = seed + P1 + P2;
  v[1] = seed + P2;
  v[2] = seed;
  v[3] = seed - P1;
}

/* The tail (fewer than 32 bytes at p, `n` of them) and the final avalanche. `h` already has len added. */
static uint64_t finish(uint64_t h, const uint8_t* p, size_t n) {
  for (; n >= 8; p += 8, n -= 8) h = rotl64(h ^ round64(0, le64(p)), 27) * P1 + P4;
  if (n >= 4) {
    h = rotl64(h ^ ((uint64_t)le32(p) * P1), 23) * P2 + P3;
    p += 4;
    n -= 4;
  }
  for (; n > 0; p++, n--) h = rotl64(h ^ ((uint64_t)*p * P5), 11) * P1;
  h ^= h >> 33;
  h *= P2;
  h ^= h >> 29;
  h *= P3;
  h ^= h >> 32;
  return h;
}

/* Whole 32-byte stripes of p[0, n) (n a multiple of 32) into the accumulators, kept in registers meanwhile.
 * The prefetch 2 KiB ahead (a hint: it never faults, even past the end) nearly halves the time on data
 * that is not in the cache, on the project's machines (bench/chunkid-hash.mjs --cold). */
static void stripes(uint64_t v[4], const uint8_t* p, size_t n) {
  uint64_t v0 = v[0], v1 = v[1], v2 = v[2], v3 = v[3];
  for (const uint8_t* end = p + n; p < end; p += 32) {
#if defined(__GNUC__)
    __builtin_prefetch(p + 2048);
#endif
    v0 = round64(v0, le64(p));
    v1 = round64(v1, le64(p + 8));
    v2 = round64(v2, le64(p + 16));
    v3 = round64(v3, le64(p + 24));
  }
  v[0] = v0;
  v[1] = v1;
  v[2] = v2;
  v[3] = v3;
}

uint64_t kscinc_xxh64(const uint8_t* data, size_t len, uint64_t seed) {
  size_t whole = len & ~(size_t)31;
  uint64_t h;
  if (whole > 0) {
    uint64_t v[4];
    init_acc(v, seed);
    stripes(v, data, whole);
    h = converge(v);
  } else {
    h = seed + P5;
  }
  return finish(h + (uint64_t)len, data + whole, len - whole);
}

/* The data goes by in blocks that stay in the L1 cache between the two seeds' passes over them: one read
 * from memory, and four accumulators at a time (eight would not fit in x86-64's registers, and the speed
 * is bound by the multiplier anyway). */
#define PAIR_BLOCK 32768

void kscinc_xxh64_pair(const uint8_t* data, size_t len, uint64_t seed_a, uint64_t seed_b, uint64_t* a, uint64_t* b) {
  size_t whole = len & ~(size_t)31;
  uint64_t ha, hb;
  if (whole > 0) {
    uint64_t va[4], vb[4];
    init_acc(va, seed_a);
    init_acc(vb, seed_b);
    for (size_t at = 0; at < whole; at += PAIR_BLOCK) {
      size_t n = whole - at < PAIR_BLOCK ? whole - at : PAIR_BLOCK;
      stripes(va, data + at, n);
      stripes(vb, data + at, n);
    }
    ha = converge(va);
    hb = converge(vb);
  } else {
    ha = seed_a + P5;
    hb = seed_b + P5;
  }
  *a = finish(ha + (uint64_t)len, data + whole, len - whole);
  *b = finish(hb + (uint64_t)len, data + whole, len - whole);
}

/* ------------------------------------------------------------------------ */
/* N-API                                                                    */

static napi_value fail_type(napi_env env, const char* fn, const char* name, const char* what) {
  char msg[160];
  snprintf(msg, sizeof msg, "%s(): the \"%s\" argument must be %s", fn, name, what);
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", msg);
  return NULL;
}

static bool bytes_of(napi_env env, napi_value v, const char* fn, const char* name, const uint8_t** data, size_t* len) {
  bool is_typed = false;
  napi_typedarray_type type;
  void* base = NULL;
  napi_value ab;
  size_t offset;
  if (napi_is_typedarray(env, v, &is_typed) != napi_ok || !is_typed ||
      napi_get_typedarray_info(env, v, &type, len, &base, &ab, &offset) != napi_ok || type != napi_uint8_array) {
    fail_type(env, fn, name, "a Uint8Array");
    return false;
  }
  *data = *len > 0 ? (const uint8_t*)base : (const uint8_t*)"";
  return true;
}

static bool seed_of(napi_env env, napi_value v, const char* fn, const char* name, uint64_t* seed) {
  bool lossless;
  if (napi_get_value_bigint_uint64(env, v, seed, &lossless) != napi_ok) {
    fail_type(env, fn, name, "a bigint");
    return false;
  }
  if (!lossless) {
    char msg[160];
    snprintf(msg, sizeof msg, "%s(): the \"%s\" argument must be a bigint in 0 .. 2^64-1", fn, name);
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", msg);
    return false;
  }
  return true;
}

static void put_be64(uint8_t* p, uint64_t v) {
  for (int i = 7; i >= 0; i--, v >>= 8) p[i] = (uint8_t)v;
}

static napi_value Xxh64(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  if (argc < 2) return fail_type(env, "xxh64", "seed", "a bigint");
  const uint8_t* data;
  size_t len;
  uint64_t seed;
  if (!bytes_of(env, argv[0], "xxh64", "data", &data, &len) || !seed_of(env, argv[1], "xxh64", "seed", &seed)) return NULL;
  napi_value r;
  if (napi_create_bigint_uint64(env, kscinc_xxh64(data, len, seed), &r) != napi_ok) return NULL;
  return r;
}

static napi_value Xxh64Id(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  if (argc < 4) return fail_type(env, "xxh64Id", "at", "a number");
  const uint8_t *data, *out;
  size_t len, out_len;
  uint64_t seed_b;
  double at;
  if (!bytes_of(env, argv[0], "xxh64Id", "data", &data, &len) || !seed_of(env, argv[1], "xxh64Id", "seedB", &seed_b) ||
      !bytes_of(env, argv[2], "xxh64Id", "out", &out, &out_len))
    return NULL;
  if (napi_get_value_double(env, argv[3], &at) != napi_ok) return fail_type(env, "xxh64Id", "at", "a number");
  if (!(at >= 0 && at <= 9007199254740991.0) || at != (double)(size_t)at || out_len < 16 || (size_t)at > out_len - 16) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "xxh64Id(): out[at, at + 16) must lie inside out");
    return NULL;
  }
  uint64_t a, b;
  kscinc_xxh64_pair(data, len, 0, seed_b, &a, &b);
  uint8_t* o = (uint8_t*)out + (size_t)at;
  put_be64(o, a);
  put_be64(o + 8, b);
  return NULL;
}

bool kscinc_xxh64_register(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"xxh64", NULL, Xxh64, NULL, NULL, NULL, napi_enumerable, NULL},
      {"xxh64Id", NULL, Xxh64Id, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  return napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props) == napi_ok;
}
