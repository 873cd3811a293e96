/* AES-256-GCM functions of the addon (kscinc_aead.c). */
#ifndef KSCINC_AEAD_H
#define KSCINC_AEAD_H
#include <stdbool.h>
#include <node_api.h>

/* Adds aesGcmOpen, aesGcmSeal and gmacId to `exports` when the node binary exports OpenSSL's EVP
 * functions (else adds nothing). False when N-API failed. */
bool kscinc_aead_register(napi_env env, napi_value exports);

#endif
