/* ksc_inc's map and bitmap pages decoded in C (kscinc_pages.c). */
#ifndef KSCINC_PAGES_H
#define KSCINC_PAGES_H
#include <stdbool.h>
#include <node_api.h>

/* Adds mapPageDecode and bitmapPageDecode to `exports`. False when N-API failed. */
bool kscinc_pages_register(napi_env env, napi_value exports);

#endif
