#!/usr/bin/env bash
# Sets up and runs the whole test suite: dependencies, native addon, TypeScript build, vitest (both the
# native addon path and the pure-TypeScript fallback path).
set -euo pipefail
cd "$(dirname "$0")/.."
npm ci --no-audit --no-fund
npm run build
echo "== test suite (native addon) =="
npx vitest run
echo "== image tests without the native addon (TypeScript fallback) =="
KSCINC_NO_NATIVE=1 npx vitest run test/image
