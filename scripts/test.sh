#!/usr/bin/env bash
# Sets up and runs the whole test suite: both the native-addon path and the pure-TypeScript fallback.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
results=$(mktemp -d)
status=0
echo "== test suite (native addon) =="
npx vitest run --reporter=default --reporter=json --outputFile.json="$results/native.json" || status=$?
echo "== image, CLI, interop and backup-engine tests without the native addon (TypeScript and lz4-napi fallback) =="
KSCINC_NO_NATIVE=1 npx vitest run test/image test/cli.test.ts test/interop test/compress.test.ts test/backup/engine.test.ts \
  --reporter=default --reporter=json --outputFile.json="$results/fallback.json" || status=$?
node -e '
  let passed = 0, failed = 0, skipped = 0;
  for (const f of process.argv.slice(1)) {
    try {
      const r = JSON.parse(require("fs").readFileSync(f, "utf8"));
      passed += r.numPassedTests; failed += r.numFailedTests; skipped += r.numPendingTests + r.numTodoTests;
    } catch { failed += 1; }
  }
  console.log(`tests: ${passed} passed, ${failed} failed` + (skipped ? `, ${skipped} skipped` : ""));
' "$results/native.json" "$results/fallback.json"
rm -rf "$results"
exit "$status"
