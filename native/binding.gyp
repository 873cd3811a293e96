{
  "targets": [
    {
      "target_name": "kscinc_native",
      "sources": ["kscinc_native.c"],
      "defines": ["NAPI_VERSION=8", "_GNU_SOURCE", "_FILE_OFFSET_BITS=64"],
      "cflags": ["-Wall", "-Wextra", "-O2"],
      "cflags_c": ["-std=gnu11"],
      "xcode_settings": {
        "GCC_C_LANGUAGE_STANDARD": "gnu11",
        "WARNING_CFLAGS": ["-Wall", "-Wextra"]
      }
    }
  ]
}
