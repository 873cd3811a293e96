/* sync_file_range(2) off the event loop (kscinc_sync.c). */
#ifndef KSCINC_SYNC_H
#define KSCINC_SYNC_H
#include <stdbool.h>
#include <node_api.h>

/* Adds syncFileRange to `exports` (Linux; elsewhere nothing). False when N-API failed. */
bool kscinc_sync_register(napi_env env, napi_value exports);

#endif
