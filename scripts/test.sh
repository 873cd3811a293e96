#!/usr/bin/env bash
# Sets up and runs the whole test suite: both the native-addon path and the pure-TypeScript fallback.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== test suite (native addon) =="
npx vitest run
echo "== image and CLI tests without the native addon (TypeScript fallback) =="
KSCINC_NO_NATIVE=1 npx vitest run test/image test/cli.test.ts test/interop
