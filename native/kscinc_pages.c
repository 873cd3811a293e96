/* ksc_inc's pages of sealed 16-byte records decoded in C (issue 19: a fresh process, the CLI, decodes a     */
/* whole page of 4096 records to use one of them; in V8's interpreter and then TurboFan that cost ≈ 4 000   */
/* instructions a record, here ≈ 100): map pages (src/image/maptable.ts, formats/ksc_inc.md §5.2) and      */
/* bitmap pages (src/image/sparse-bitmap.ts, §6).                                                          */
/*                                                                                                         */
/* mapPageDecode(raw: Uint8Array, first, tag, limits: Float64Array [blocks, blockSize, fileEnd],            */
/*               state: Uint8Array, host: Float64Array, csum: Uint32Array, csumValid: Uint8Array,          */
/*               suspects: Uint32Array) -> number                                                          */
/*   For each 16-byte entry i of raw (n = raw.length / 16; every array holds n): checks its seal           */
/*   (crc32(tag u32 ‖ (first + i) u64 ‖ the entry's 12 payload bytes), all little-endian, as sealWords)     */
/*   and its descriptor as MapTable.entryProblem does, sets state/host/csum/csumValid from its words, and   */
/*   lists i in `suspects` when any check fails. Returns the count of suspects; the caller decides what      */
/*   each of them is (entryProblem) and what goes into its arrays. A TypeError or RangeError when the      */
/*   arguments do not match.                                                                               */
/* bitmapPageDecode(raw: Uint8Array, first, tag, bits: Uint32Array) -> number                              */
/*   For each 16-byte record w of raw (bits holds 2 words a record): its third word must be 0 and its seal  */
/*   (as above, index first + w) must hold; its two bit words go to bits[2w], bits[2w + 1]. Returns -1, or   */
/*   the first record that fails (the records from it on are not decoded).                                 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "kscinc_pages.h"

/* formats/ksc_inc.md §5.2 (src/format/constants.ts): descriptor bits and block states. */
#define STATE_MASK 3u
#define CSUM_VALID 4u
#define RESERVED_MASK 0xff8u
#define STATE_UNALLOCATED 0u
#define STATE_DATA 2u

static uint32_t crc_table[256];

static void crc_init(void) {
  for (uint32_t n = 0; n < 256; n++) {
    uint32_t c = n;
    for (int k = 0; k < 8; k++) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
    crc_table[n] = c;
  }
}

/* The running (pre-inverted) CRC-32 `c` over the 4 little-endian bytes of `w`. */
static inline uint32_t crc_u32(uint32_t c, uint32_t w) {
  c = crc_table[(c ^ w) & 0xff] ^ (c >> 8);
  c = crc_table[(c ^ (w >> 8)) & 0xff] ^ (c >> 8);
  c = crc_table[(c ^ (w >> 16)) & 0xff] ^ (c >> 8);
  return crc_table[(c ^ (w >> 24)) & 0xff] ^ (c >> 8);
}

static inline uint32_t le32(const uint8_t* p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

static bool typed(napi_env env, napi_value v, napi_typedarray_type want, const char* fn, const char* arg, void** data, size_t* n) {
  bool is = false;
  napi_typedarray_type type;
  napi_value ab;
  size_t off;
  if (napi_is_typedarray(env, v, &is) != napi_ok || !is || napi_get_typedarray_info(env, v, &type, n, data, &ab, &off) != napi_ok || type != want) {
    char msg[160];
    snprintf(msg, sizeof msg, "%s: %s has the wrong type", fn, arg);
    napi_throw_type_error(env, NULL, msg);
    return false;
  }
  return true;
}

static bool number_arg(napi_env env, napi_value v, const char* fn, const char* arg, double max, double* out) {
  if (napi_get_value_double(env, v, out) != napi_ok || !(*out >= 0 && *out <= max) || *out != (double)(uint64_t)*out) {
    char msg[160];
    snprintf(msg, sizeof msg, "%s: %s must be a whole number in [0, %.0f]", fn, arg, max);
    napi_throw_type_error(env, NULL, msg);
    return false;
  }
  return true;
}

static napi_value MapPageDecode(napi_env env, napi_callback_info info) {
  size_t argc = 9;
  napi_value argv[9];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  if (argc < 9) {
    napi_throw_type_error(env, NULL, "mapPageDecode: 9 arguments expected");
    return NULL;
  }
  void *raw_d, *lim_d, *state_d, *host_d, *csum_d, *valid_d, *sus_d;
  size_t raw_n, lim_n, state_n, host_n, csum_n, valid_n, sus_n;
  double first_d, tag_d;
  if (!typed(env, argv[0], napi_uint8_array, "mapPageDecode", "raw", &raw_d, &raw_n) || !number_arg(env, argv[1], "mapPageDecode", "first", 9007199254740991.0, &first_d) ||
      !number_arg(env, argv[2], "mapPageDecode", "tag", 4294967295.0, &tag_d) || !typed(env, argv[3], napi_float64_array, "mapPageDecode", "limits", &lim_d, &lim_n) ||
      !typed(env, argv[4], napi_uint8_array, "mapPageDecode", "state", &state_d, &state_n) || !typed(env, argv[5], napi_float64_array, "mapPageDecode", "host", &host_d, &host_n) ||
      !typed(env, argv[6], napi_uint32_array, "mapPageDecode", "csum", &csum_d, &csum_n) || !typed(env, argv[7], napi_uint8_array, "mapPageDecode", "csumValid", &valid_d, &valid_n) ||
      !typed(env, argv[8], napi_uint32_array, "mapPageDecode", "suspects", &sus_d, &sus_n))
    return NULL;
  size_t n = raw_n / 16;
  if (raw_n % 16 != 0 || lim_n < 3 || state_n < n || host_n < n || csum_n < n || valid_n < n || sus_n < n) {
    napi_throw_range_error(env, NULL, "mapPageDecode: the arrays do not match the page");
    return NULL;
  }
  const uint8_t* raw = raw_d;
  const double* lim = lim_d;
  uint8_t* state = state_d;
  double* host = host_d;
  uint32_t* csum = csum_d;
  uint8_t* valid = valid_d;
  uint32_t* sus = sus_d;
  const uint64_t first = (uint64_t)first_d;
  const double blocks = lim[0];
  /* Whole numbers below 2^53 (MapTable's own); anything else makes every data entry a suspect. */
  const uint64_t bs = lim[1] >= 1 && lim[1] < 9007199254740992.0 && lim[1] == (double)(uint64_t)lim[1] ? (uint64_t)lim[1] : 0;
  const uint64_t end = lim[2] >= 0 && lim[2] < 9007199254740992.0 ? (uint64_t)lim[2] : 0;
  const uint32_t head = crc_u32(0xffffffffu, (uint32_t)tag_d);
  uint32_t count = 0;
  for (size_t i = 0; i < n; i++) {
    const uint8_t* e = raw + i * 16;
    const uint32_t lo = le32(e), hi = le32(e + 4), cs = le32(e + 8), stored = le32(e + 12);
    const uint64_t block = first + i;
    uint32_t c = crc_u32(crc_u32(head, (uint32_t)block), (uint32_t)(block >> 32));
    c = crc_u32(crc_u32(crc_u32(c, lo), hi), cs) ^ 0xffffffffu;
    const uint32_t st = lo & STATE_MASK;
    const uint64_t off = (uint64_t)hi << 32 | (lo & ~0xfffu);
    bool bad = c != stored || st == 3 || (lo & RESERVED_MASK) != 0 || hi >= 0x200000u || ((double)block >= blocks && st != STATE_UNALLOCATED);
    if (!bad && st == STATE_DATA) {
      bad = bs == 0 || off % bs != 0 || off < 8192 || off + bs > end;
    } else if (!bad) {
      bad = off != 0 || (lo & CSUM_VALID) != 0;
    }
    state[i] = (uint8_t)st;
    host[i] = (double)off;
    csum[i] = cs;
    valid[i] = (lo & CSUM_VALID) != 0;
    if (bad) sus[count++] = (uint32_t)i;
  }
  napi_value out;
  if (napi_create_uint32(env, count, &out) != napi_ok) return NULL;
  return out;
}

static napi_value BitmapPageDecode(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  if (argc < 4) {
    napi_throw_type_error(env, NULL, "bitmapPageDecode: 4 arguments expected");
    return NULL;
  }
  void *raw_d, *bits_d;
  size_t raw_n, bits_n;
  double first_d, tag_d;
  if (!typed(env, argv[0], napi_uint8_array, "bitmapPageDecode", "raw", &raw_d, &raw_n) || !number_arg(env, argv[1], "bitmapPageDecode", "first", 9007199254740991.0, &first_d) ||
      !number_arg(env, argv[2], "bitmapPageDecode", "tag", 4294967295.0, &tag_d) || !typed(env, argv[3], napi_uint32_array, "bitmapPageDecode", "bits", &bits_d, &bits_n))
    return NULL;
  size_t n = raw_n / 16;
  if (raw_n % 16 != 0 || bits_n < 2 * n) {
    napi_throw_range_error(env, NULL, "bitmapPageDecode: the arrays do not match the page");
    return NULL;
  }
  const uint8_t* raw = raw_d;
  uint32_t* bits = bits_d;
  const uint64_t first = (uint64_t)first_d;
  const uint32_t head = crc_u32(0xffffffffu, (uint32_t)tag_d);
  int64_t bad = -1;
  for (size_t w = 0; w < n; w++) {
    const uint8_t* e = raw + w * 16;
    const uint32_t lo = le32(e), hi = le32(e + 4), zero = le32(e + 8), stored = le32(e + 12);
    const uint64_t index = first + w;
    uint32_t c = crc_u32(crc_u32(head, (uint32_t)index), (uint32_t)(index >> 32));
    c = crc_u32(crc_u32(crc_u32(c, lo), hi), zero) ^ 0xffffffffu;
    if (zero != 0 || c != stored) {
      bad = (int64_t)w;
      break;
    }
    bits[2 * w] = lo;
    bits[2 * w + 1] = hi;
  }
  napi_value out;
  if (napi_create_int64(env, bad, &out) != napi_ok) return NULL;
  return out;
}

bool kscinc_pages_register(napi_env env, napi_value exports) {
  crc_init();
  napi_property_descriptor props[] = {
      {"mapPageDecode", NULL, MapPageDecode, NULL, NULL, NULL, napi_enumerable, NULL},
      {"bitmapPageDecode", NULL, BitmapPageDecode, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  return napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props) == napi_ok;
}
