/* Zero-copy replies of the NBD server (kscinc_send.c), and the argument helpers of kscinc_native.c they use. */
#ifndef KSCINC_SEND_H
#define KSCINC_SEND_H
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <node_api.h>

bool get_args(napi_env env, napi_callback_info info, size_t want, napi_value* argv);
bool get_fd(napi_env env, napi_value v, const char* fn, const char* syscall, int* out);
bool get_offset(napi_env env, napi_value v, const char* fn, const char* arg, const char* syscall, off_t* out);
bool get_bool(napi_env env, napi_value v, const char* fn, const char* arg, bool* out);
bool get_bytes(napi_env env, napi_value v, const char* fn, const char* arg, uint8_t** data, size_t* len);
napi_value throw_errno(napi_env env, int err, const char* syscall);
napi_value make_int64(napi_env env, int64_t n);

/* Adds cachedRange, sendFile and sendBytes to `exports` (Linux; elsewhere nothing). False when N-API failed. */
bool kscinc_send_register(napi_env env, napi_value exports);

#endif
