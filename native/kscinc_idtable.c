/* The two loops of src/repo/chunkindex.ts that run over a whole repository's index once per backup, in C */
/* (issue 19: in a fresh process V8 runs them in its interpreter, then compiles them, ≈ 20 000 instructions */
/* an entry; here ≈ 30). The table is ChunkIndex's own typed arrays, changed in place; the slot of an id is */
/* the one ChunkIndex.find computes (the same hash of the four words and the seed, linear probing), so the */
/* two sides share one table.                                                                              */
/*                                                                                                         */
/* idTableAdd(keys: Uint32Array, pack: Uint32Array, seed, state: Uint32Array [count, maxCount], entries:   */
/*            Uint8Array, at, n, plusOne: Uint32Array) -> number                                           */
/*   Adds the ids of the n index entries (formats/repository.md §6: 40 bytes, pack number at +16) at       */
/*   entries[at...], an id already present skipped, the slot's pack set to plusOne[pack number]. Stops     */
/*   before an id that would make count exceed maxCount or that finds no empty slot (the caller grows the   */
/*   table and calls again), and                                                                           */
/*   returns the number of entries done; state[0] is the new count. Throws a RangeError when the entries   */
/*   lie outside `entries`, a pack number has no plusOne, or the table's arrays do not match.              */
/* idTableHasAll(keys, pack, seed, words: Uint32Array) -> boolean                                          */
/*   True when every id of `words` (four words each) but the zero id is in the table.                      */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "kscinc_idtable.h"

#define ENTRY 40

static void range_error(napi_env env, const char* fn, const char* what) {
  char msg[160];
  snprintf(msg, sizeof msg, "%s: %s", fn, what);
  napi_throw_range_error(env, NULL, msg);
}

/* A typed array of `want` type: its data and element count. */
static bool typed(napi_env env, napi_value v, napi_typedarray_type want, const char* fn, const char* arg, void** data, size_t* n) {
  bool is = false;
  napi_typedarray_type type;
  napi_value ab;
  size_t off;
  if (napi_is_typedarray(env, v, &is) != napi_ok || !is || napi_get_typedarray_info(env, v, &type, n, data, &ab, &off) != napi_ok || type != want) {
    char msg[160];
    snprintf(msg, sizeof msg, "%s: %s must be a %s", fn, arg, want == napi_uint8_array ? "Uint8Array" : "Uint32Array");
    napi_throw_type_error(env, NULL, msg);
    return false;
  }
  return true;
}

static bool u32_arg(napi_env env, napi_value v, const char* fn, const char* arg, uint32_t* out) {
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok || !(d >= 0 && d <= 4294967295.0) || d != (double)(uint32_t)d) {
    char msg[160];
    snprintf(msg, sizeof msg, "%s: %s must be an integer in [0, 2^32)", fn, arg);
    napi_throw_type_error(env, NULL, msg);
    return false;
  }
  *out = (uint32_t)d;
  return true;
}

static inline uint32_t le32(const uint8_t* p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

/* ChunkIndex.find's first slot: Math.imul on the words' bits, as uint32. */
static inline uint32_t first_slot(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3, uint32_t seed, uint32_t mask) {
  return (((w0 ^ w3 ^ seed) * 0x9e3779b1u) ^ ((w1 ^ w2) * 0x85ebca6bu)) & mask;
}

/* The table: keys (4 words a slot) and pack (0: empty); the slot count a power of two. */
typedef struct {
  uint32_t* keys;
  uint32_t* pack;
  uint32_t mask;
} table_t;

static bool table_of(napi_env env, napi_value k, napi_value p, const char* fn, table_t* t) {
  void *kd, *pd;
  size_t kn, pn;
  if (!typed(env, k, napi_uint32_array, fn, "keys", &kd, &kn) || !typed(env, p, napi_uint32_array, fn, "pack", &pd, &pn)) return false;
  if (pn == 0 || (pn & (pn - 1)) != 0 || kn != pn * 4 || pn > 0x80000000u) {
    range_error(env, fn, "the table's arrays do not match (keys 4 words a slot, a power of two of slots)");
    return false;
  }
  t->keys = kd;
  t->pack = pd;
  t->mask = (uint32_t)pn - 1;
  return true;
}

#define FULL UINT32_MAX

/* The slot holding the id, or the empty slot where it would go; FULL when every slot holds another id (the */
/* probe is bounded by the table, not by a count the caller keeps: a count that lies cannot make it spin).  */
static inline uint32_t find(const table_t* t, uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3, uint32_t seed) {
  uint32_t s = first_slot(w0, w1, w2, w3, seed, t->mask);
  for (uint32_t i = 0; i <= t->mask; i++) {
    if (t->pack[s] == 0) return s;
    const uint32_t* k = t->keys + (size_t)s * 4;
    if (k[0] == w0 && k[1] == w1 && k[2] == w2 && k[3] == w3) return s;
    s = (s + 1) & t->mask;
  }
  return FULL;
}

static napi_value IdTableAdd(napi_env env, napi_callback_info info) {
  const char* fn = "idTableAdd";
  size_t argc = 8;
  napi_value argv[8];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 8) {
    napi_throw_type_error(env, NULL, "idTableAdd: (keys, pack, seed, state, entries, at, n, plusOne)");
    return NULL;
  }
  table_t t;
  uint32_t seed, at, n;
  void *st, *ed, *pd;
  size_t stn, en, pn;
  if (!table_of(env, argv[0], argv[1], fn, &t) || !u32_arg(env, argv[2], fn, "seed", &seed) || !typed(env, argv[3], napi_uint32_array, fn, "state", &st, &stn) ||
      !typed(env, argv[4], napi_uint8_array, fn, "entries", &ed, &en) || !u32_arg(env, argv[5], fn, "at", &at) || !u32_arg(env, argv[6], fn, "n", &n) ||
      !typed(env, argv[7], napi_uint32_array, fn, "plusOne", &pd, &pn))
    return NULL;
  if (stn < 2) return range_error(env, fn, "state must hold [count, maxCount]"), NULL;
  if ((uint64_t)at + (uint64_t)n * ENTRY > en) return range_error(env, fn, "the entries lie outside the buffer"), NULL;
  uint32_t* state = st;
  const uint8_t* e = (const uint8_t*)ed + at;
  const uint32_t* plus_one = pd;
  uint32_t count = state[0], max_count = state[1];
  if (max_count > t.mask) max_count = t.mask; /* an empty slot always remains: the probe loop ends */
  uint32_t j = 0;
  for (; j < n; j++, e += ENTRY) {
    uint32_t w0 = le32(e), w1 = le32(e + 4), w2 = le32(e + 8), w3 = le32(e + 12), pno = le32(e + 16);
    if (pno >= pn || plus_one[pno] == 0) {
      state[0] = count;
      return range_error(env, fn, "an entry's pack number has no pack"), NULL;
    }
    uint32_t s = find(&t, w0, w1, w2, w3, seed);
    if (s == FULL) break; /* as when count reaches max_count: the caller grows the table */
    if (t.pack[s] != 0) continue;
    if (count + 1 > max_count) break;
    uint32_t* k = t.keys + (size_t)s * 4;
    k[0] = w0, k[1] = w1, k[2] = w2, k[3] = w3;
    t.pack[s] = plus_one[pno];
    count++;
  }
  state[0] = count;
  napi_value out;
  if (napi_create_uint32(env, j, &out) != napi_ok) return NULL;
  return out;
}

static napi_value IdTableHasAll(napi_env env, napi_callback_info info) {
  const char* fn = "idTableHasAll";
  size_t argc = 4;
  napi_value argv[4];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 4) {
    napi_throw_type_error(env, NULL, "idTableHasAll: (keys, pack, seed, words)");
    return NULL;
  }
  table_t t;
  uint32_t seed;
  void* wd;
  size_t wn;
  if (!table_of(env, argv[0], argv[1], fn, &t) || !u32_arg(env, argv[2], fn, "seed", &seed) || !typed(env, argv[3], napi_uint32_array, fn, "words", &wd, &wn)) return NULL;
  const uint32_t* w = wd;
  bool all = true;
  for (size_t o = 0; o + 3 < wn; o += 4) {
    if ((w[o] | w[o + 1] | w[o + 2] | w[o + 3]) == 0) continue;
    uint32_t s = find(&t, w[o], w[o + 1], w[o + 2], w[o + 3], seed);
    if (s == FULL || t.pack[s] == 0) {
      all = false;
      break;
    }
  }
  napi_value out;
  if (napi_get_boolean(env, all, &out) != napi_ok) return NULL;
  return out;
}

bool kscinc_idtable_register(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"idTableAdd", NULL, IdTableAdd, NULL, NULL, NULL, napi_enumerable, NULL},
      {"idTableHasAll", NULL, IdTableHasAll, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  return napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props) == napi_ok;
}
