{
  "variables": {
    "have_lz4": "<!(test -f /usr/include/lz4.h && echo 1 || echo 0)",
    "have_libdeflate": "<!(test -f /usr/include/libdeflate.h && echo 1 || echo 0)"
  },
  "targets": [
    {
      "target_name": "kscinc_native",
      "sources": ["kscinc_native.c", "kscinc_aead.c", "kscinc_send.c", "kscinc_sync.c", "kscinc_ident.c", "kscinc_exit.c", "kscinc_idtable.c", "kscinc_pages.c"],
      "defines": ["NAPI_VERSION=8", "_GNU_SOURCE", "_FILE_OFFSET_BITS=64"],
      "cflags": ["-Wall", "-Wextra", "-O2"],
      "cflags_c": ["-std=gnu11"],
      "conditions": [
        ["1==1", { "sources": ["kscinc_xxh64.c"] }],
        ["have_lz4==1", { "defines": ["KSCINC_HAVE_LZ4"], "libraries": ["-llz4"] }],
        ["have_libdeflate==1", { "defines": ["KSCINC_HAVE_LIBDEFLATE"], "libraries": ["-ldeflate"] }]
      ],
      "xcode_settings": {
        "GCC_C_LANGUAGE_STANDARD": "gnu11",
        "WARNING_CFLAGS": ["-Wall", "-Wextra"]
      }
    }
  ]
}
