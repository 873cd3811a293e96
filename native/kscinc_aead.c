/*
 * AES-256-GCM for encrypted repositories (formats/repository.md §13.5, §13.6), through the OpenSSL that
 * the node binary links and exports (its headers ship with Node in include/node/openssl):
 *
 *   aesGcmOpen(key, aad, sealed, dst, at)          nonce ‖ ciphertext ‖ tag -> plain bytes at dst[at…]
 *   aesGcmSeal(key, nonce, aad, plain, dst, at)    plain -> nonce ‖ ciphertext ‖ tag at dst[at…]
 *   gmacId(ghKey, prpKey, data, out, at)           the §13.6 `gmac-aes-256` id of data, 16 bytes at out[at…]
 *
 * Why: node:crypto's update() returns a fresh buffer for every call, so a restore's workers spent a good
 * part of the decryption in allocation, page faults and garbage collection; these write into the caller's
 * buffers and allocate nothing per call (one cipher context per thread, reused).
 *
 * aesGcmOpen checks the tag before it returns: on a failure it returns -1 and the bytes it wrote are
 * zeroed first, so no unauthenticated byte is left for a caller to use. The plain bytes may be written
 * over the ciphertext exactly (dst + at == sealed + 12); aesGcmSeal may read the plain bytes from exactly
 * where the ciphertext goes (dst + at + 12). Any other overlap is a RangeError.
 *
 * The OpenSSL functions are weak references: an addon built against headers whose node does not export
 * them still loads, and then simply has no AEAD functions (the TypeScript side falls back to
 * node:crypto).
 */
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <node_api.h>

#include "kscinc_aead.h"

#if defined(__has_include)
#if __has_include(<openssl/evp.h>)
#include <openssl/evp.h>
#define KSCINC_HAVE_OPENSSL 1
#endif
#endif

#ifdef KSCINC_HAVE_OPENSSL

#pragma weak EVP_CIPHER_CTX_new
#pragma weak EVP_CIPHER_CTX_free
#pragma weak EVP_CIPHER_CTX_ctrl
#pragma weak EVP_CIPHER_CTX_set_padding
#pragma weak EVP_aes_256_gcm
#pragma weak EVP_aes_256_ecb
#pragma weak EVP_DecryptInit_ex
#pragma weak EVP_DecryptUpdate
#pragma weak EVP_DecryptFinal_ex
#pragma weak EVP_EncryptInit_ex
#pragma weak EVP_EncryptUpdate
#pragma weak EVP_EncryptFinal_ex

#define KEY 32
#define NONCE 12
#define TAG 16

/* This thread's contexts: the addon is loaded once per thread (main thread and each worker). */
static _Thread_local EVP_CIPHER_CTX *t_open, *t_seal, *t_gmac, *t_ecb;
static _Thread_local bool t_hook;

static bool openssl_present(void) {
  return EVP_CIPHER_CTX_new && EVP_CIPHER_CTX_free && EVP_CIPHER_CTX_ctrl && EVP_CIPHER_CTX_set_padding && EVP_aes_256_gcm &&
         EVP_aes_256_ecb && EVP_DecryptInit_ex && EVP_DecryptUpdate && EVP_DecryptFinal_ex && EVP_EncryptInit_ex &&
         EVP_EncryptUpdate && EVP_EncryptFinal_ex;
}

static void free_contexts(void* arg) {
  (void)arg;
  EVP_CIPHER_CTX** all[] = {&t_open, &t_seal, &t_gmac, &t_ecb};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
    if (*all[i]) EVP_CIPHER_CTX_free(*all[i]);
    *all[i] = NULL;
  }
  t_hook = false;
}

/* The thread's context in *slot, made on first use with its cipher set (no key yet): each call then only
 * sets the key and nonce. NULL (with an exception pending) when OpenSSL fails. */
static EVP_CIPHER_CTX* context(napi_env env, EVP_CIPHER_CTX** slot, bool decrypt, bool ecb) {
  if (*slot) return *slot;
  if (!t_hook) {
    if (napi_add_env_cleanup_hook(env, free_contexts, NULL) != napi_ok) {
      napi_throw_error(env, NULL, "kscinc_native: napi_add_env_cleanup_hook failed");
      return NULL;
    }
    t_hook = true;
  }
  EVP_CIPHER_CTX* c = EVP_CIPHER_CTX_new();
  const EVP_CIPHER* cipher = ecb ? EVP_aes_256_ecb() : EVP_aes_256_gcm();
  int ok = c != NULL && (decrypt ? EVP_DecryptInit_ex(c, cipher, NULL, NULL, NULL) : EVP_EncryptInit_ex(c, cipher, NULL, NULL, NULL)) == 1;
  if (ok && ecb) ok = EVP_CIPHER_CTX_set_padding(c, 0) == 1;
  if (!ok) {
    if (c) EVP_CIPHER_CTX_free(c);
    napi_throw_error(env, NULL, "kscinc_native: OpenSSL could not make an AES-256 context");
    return NULL;
  }
  *slot = c;
  return c;
}

/* ------------------------------------------------------------------------ */
/* Arguments                                                                */

static bool bytes_arg(napi_env env, napi_value v, const char* fn, const char* name, uint8_t** data, size_t* len) {
  bool is_typed = false;
  napi_typedarray_type type;
  void* base;
  napi_value ab;
  size_t offset;
  if (napi_is_typedarray(env, v, &is_typed) != napi_ok || !is_typed ||
      napi_get_typedarray_info(env, v, &type, len, &base, &ab, &offset) != napi_ok || type != napi_uint8_array) {
    char msg[160];
    snprintf(msg, sizeof msg, "%s(): the \"%s\" argument must be a Uint8Array", fn, name);
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", msg);
    return false;
  }
  *data = (uint8_t*)base;
  return true;
}

static bool key_arg(napi_env env, napi_value v, const char* fn, const char* name, uint8_t** key) {
  size_t len;
  if (!bytes_arg(env, v, fn, name, key, &len)) return false;
  if (len < KEY) {
    char msg[160];
    snprintf(msg, sizeof msg, "%s(): the \"%s\" argument must hold 32 bytes", fn, name);
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", msg);
    return false;
  }
  return true;
}

/* An offset 0 … limit (a safe integer). */
static bool offset_arg(napi_env env, napi_value v, const char* fn, size_t limit, size_t* out) {
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok || !(d >= 0 && d <= (double)limit) || (double)(size_t)d != d) {
    char msg[160];
    snprintf(msg, sizeof msg, "%s(): the offset must be an integer 0 … %zu", fn, limit);
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", msg);
    return false;
  }
  *out = (size_t)d;
  return true;
}

static bool args(napi_env env, napi_callback_info info, size_t want, napi_value* argv, const char* fn) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < want) {
    char msg[96];
    snprintf(msg, sizeof msg, "%s(): %zu arguments expected", fn, want);
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", msg);
    return false;
  }
  return true;
}

/* True when [a, a+an) and [b, b+bn) overlap other than by being the same start. */
static bool bad_overlap(const uint8_t* a, size_t an, const uint8_t* b, size_t bn) {
  if (a == b || an == 0 || bn == 0) return false;
  return a < b + bn && b < a + an;
}

static napi_value number(napi_env env, int64_t n) {
  napi_value v;
  if (napi_create_int64(env, n, &v) != napi_ok) return NULL;
  return v;
}

static napi_value range_error(napi_env env, const char* fn, const char* what) {
  char msg[192];
  snprintf(msg, sizeof msg, "%s(): %s", fn, what);
  napi_throw_range_error(env, "ERR_OUT_OF_RANGE", msg);
  return NULL;
}

/* ------------------------------------------------------------------------ */

/* aesGcmOpen(key, aad, sealed, dst, at) -> the plain length n (sealed is nonce ‖ n bytes ‖ tag), written
 * at dst[at…]; -1 when the tag does not check (those n bytes are zeroed). */
static napi_value AesGcmOpen(napi_env env, napi_callback_info info) {
  static const char* fn = "aesGcmOpen";
  napi_value argv[5];
  uint8_t *key, *aad, *sealed, *dst;
  size_t aad_len, sealed_len, dst_len, at;
  if (!args(env, info, 5, argv, fn) || !key_arg(env, argv[0], fn, "key", &key) || !bytes_arg(env, argv[1], fn, "aad", &aad, &aad_len) ||
      !bytes_arg(env, argv[2], fn, "sealed", &sealed, &sealed_len) || !bytes_arg(env, argv[3], fn, "dst", &dst, &dst_len) ||
      !offset_arg(env, argv[4], fn, dst_len, &at))
    return NULL;
  if (sealed_len < NONCE + TAG) return range_error(env, fn, "sealed bytes shorter than a nonce and a tag");
  size_t n = sealed_len - NONCE - TAG;
  if (n > dst_len - at) return range_error(env, fn, "the plain bytes do not fit dst");
  if (n > INT_MAX || aad_len > INT_MAX) return range_error(env, fn, "more than INT_MAX bytes");
  uint8_t* out = dst + at;
  const uint8_t* ct = sealed + NONCE;
  if (bad_overlap(out, n, ct, n) || bad_overlap(out, n, sealed, NONCE) || bad_overlap(out, n, sealed + NONCE + n, TAG))
    return range_error(env, fn, "dst overlaps the sealed bytes other than exactly in place");
  EVP_CIPHER_CTX* c = context(env, &t_open, true, false);
  if (!c) return NULL;
  uint8_t tag[TAG];
  memcpy(tag, sealed + NONCE + n, TAG);
  int len = 0;
  bool ok = EVP_DecryptInit_ex(c, NULL, NULL, key, sealed) == 1 && (aad_len == 0 || EVP_DecryptUpdate(c, NULL, &len, aad, (int)aad_len) == 1) &&
            (n == 0 || EVP_DecryptUpdate(c, out, &len, ct, (int)n) == 1) && EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, TAG, tag) == 1;
  if (!ok) {
    memset(out, 0, n);
    napi_throw_error(env, NULL, "kscinc_native: OpenSSL AES-256-GCM decryption failed");
    return NULL;
  }
  uint8_t last[16];
  if (EVP_DecryptFinal_ex(c, last, &len) != 1) {
    memset(out, 0, n); /* unauthenticated: nothing of it stays */
    return number(env, -1);
  }
  return number(env, (int64_t)n);
}

/* aesGcmSeal(key, nonce, aad, plain, dst, at) -> bytes written at dst[at…]: nonce ‖ ciphertext ‖ tag. */
static napi_value AesGcmSeal(napi_env env, napi_callback_info info) {
  static const char* fn = "aesGcmSeal";
  napi_value argv[6];
  uint8_t *key, *nonce, *aad, *plain, *dst;
  size_t nonce_len, aad_len, n, dst_len, at;
  if (!args(env, info, 6, argv, fn) || !key_arg(env, argv[0], fn, "key", &key) || !bytes_arg(env, argv[1], fn, "nonce", &nonce, &nonce_len) ||
      !bytes_arg(env, argv[2], fn, "aad", &aad, &aad_len) || !bytes_arg(env, argv[3], fn, "plain", &plain, &n) ||
      !bytes_arg(env, argv[4], fn, "dst", &dst, &dst_len) || !offset_arg(env, argv[5], fn, dst_len, &at))
    return NULL;
  if (nonce_len != NONCE) return range_error(env, fn, "the nonce must be 12 bytes");
  if (NONCE + n + TAG > dst_len - at) return range_error(env, fn, "nonce, ciphertext and tag do not fit dst");
  if (n > INT_MAX || aad_len > INT_MAX) return range_error(env, fn, "more than INT_MAX bytes");
  uint8_t* out = dst + at;
  if (bad_overlap(out + NONCE, n, plain, n) || bad_overlap(out, NONCE, plain, n) || bad_overlap(out + NONCE + n, TAG, plain, n))
    return range_error(env, fn, "the plain bytes overlap dst other than exactly in place");
  EVP_CIPHER_CTX* c = context(env, &t_seal, false, false);
  if (!c) return NULL;
  uint8_t iv[NONCE];
  memcpy(iv, nonce, NONCE);
  int len = 0;
  uint8_t last[16];
  bool ok = EVP_EncryptInit_ex(c, NULL, NULL, key, iv) == 1 && (aad_len == 0 || EVP_EncryptUpdate(c, NULL, &len, aad, (int)aad_len) == 1) &&
            (n == 0 || EVP_EncryptUpdate(c, out + NONCE, &len, plain, (int)n) == 1) && EVP_EncryptFinal_ex(c, last, &len) == 1 &&
            EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, TAG, out + NONCE + n) == 1;
  if (!ok) {
    napi_throw_error(env, NULL, "kscinc_native: OpenSSL AES-256-GCM encryption failed");
    return NULL;
  }
  memcpy(out, iv, NONCE);
  return number(env, (int64_t)(NONCE + n + TAG));
}

/* gmacId(ghKey, prpKey, data, out, at): AES-256(prpKey, GCM tag under ghKey, zero nonce, data as AAD). */
static napi_value GmacId(napi_env env, napi_callback_info info) {
  static const char* fn = "gmacId";
  static const uint8_t zero_nonce[NONCE] = {0};
  napi_value argv[5];
  uint8_t *gh, *prp, *data, *out;
  size_t n, out_len, at;
  if (!args(env, info, 5, argv, fn) || !key_arg(env, argv[0], fn, "ghKey", &gh) || !key_arg(env, argv[1], fn, "prpKey", &prp) ||
      !bytes_arg(env, argv[2], fn, "data", &data, &n) || !bytes_arg(env, argv[3], fn, "out", &out, &out_len) || !offset_arg(env, argv[4], fn, out_len, &at))
    return NULL;
  if (out_len - at < 16) return range_error(env, fn, "16 bytes do not fit out");
  EVP_CIPHER_CTX* g = context(env, &t_gmac, false, false);
  if (!g) return NULL;
  EVP_CIPHER_CTX* e = context(env, &t_ecb, false, true);
  if (!e) return NULL;
  int len = 0;
  bool ok = EVP_EncryptInit_ex(g, NULL, NULL, gh, zero_nonce) == 1;
  for (size_t o = 0; ok && o < n; o += (size_t)(INT_MAX / 2)) {
    size_t piece = n - o < (size_t)(INT_MAX / 2) ? n - o : (size_t)(INT_MAX / 2);
    ok = EVP_EncryptUpdate(g, NULL, &len, data + o, (int)piece) == 1;
  }
  uint8_t last[16], t[TAG], id[16];
  ok = ok && EVP_EncryptFinal_ex(g, last, &len) == 1 && EVP_CIPHER_CTX_ctrl(g, EVP_CTRL_GCM_GET_TAG, TAG, t) == 1;
  ok = ok && EVP_EncryptInit_ex(e, NULL, NULL, prp, NULL) == 1 && EVP_EncryptUpdate(e, id, &len, t, 16) == 1 && len == 16;
  memset(t, 0, sizeof t);
  if (!ok) {
    napi_throw_error(env, NULL, "kscinc_native: OpenSSL GMAC failed");
    return NULL;
  }
  memcpy(out + at, id, 16);
  return NULL;
}

bool kscinc_aead_register(napi_env env, napi_value exports) {
  if (!openssl_present()) return true;
  napi_property_descriptor props[] = {
      {"aesGcmOpen", NULL, AesGcmOpen, NULL, NULL, NULL, napi_enumerable, NULL},
      {"aesGcmSeal", NULL, AesGcmSeal, NULL, NULL, NULL, napi_enumerable, NULL},
      {"gmacId", NULL, GmacId, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  return napi_define_properties(env, exports, sizeof props / sizeof props[0], props) == napi_ok;
}

#else

bool kscinc_aead_register(napi_env env, napi_value exports) {
  (void)env;
  (void)exports;
  return true;
}

#endif
