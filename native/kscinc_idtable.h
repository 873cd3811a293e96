/* The chunk-id table's bulk loops (kscinc_idtable.c, src/repo/chunkindex.ts). */
#ifndef KSCINC_IDTABLE_H
#define KSCINC_IDTABLE_H
#include <stdbool.h>
#include <node_api.h>

/* Adds idTableAdd and idTableHasAll to `exports`. False when N-API failed. */
bool kscinc_idtable_register(napi_env env, napi_value exports);

#endif
