#!/usr/bin/env bash
# Sets up and runs the whole test suite: both the native-addon path and the pure-TypeScript fallback.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
results=$(mktemp -d)
status=0
# Static checks first (seconds each): types of the library and of the tests, lint, formatting.
static_failed=()
echo "== static checks: tsc (src, test), eslint, prettier =="
npx tsc -p tsconfig.json --noEmit || static_failed+=("tsc src")
npx tsc -p test/tsconfig.json || static_failed+=("tsc test")
npx eslint src test || static_failed+=("eslint (npx eslint src test)")
npx prettier --check --log-level warn src test bench scripts || static_failed+=("prettier (npx prettier --write src test bench scripts)")
[ ${#static_failed[@]} -eq 0 ] || status=1
echo "== test suite (native addon) =="
t0=$SECONDS
npx vitest run --reporter=default --reporter=json --outputFile.json="$results/native.json" || status=$?
native_s=$((SECONDS - t0))
echo "== image, CLI, interop and backup-engine tests without the native addon (TypeScript and lz4-napi fallback) =="
# Why these files (session 21): each runs code that takes another path without the addon (src/io/native.ts),
# and none was dropped. Every file of test/image and test/interop opens an image or a raw file for writing (lock:
# flock with the addon, flock through flock(1) or else the lock name of the file's device and inode without: src/io/file.ts lockExclusive); most also punch holes, seek
# data and holes, read through readCached and write through writeCrc (same file) or serve over NBD (sendfile);
# raw-extents checks SEEK_DATA against its absence; cli.test runs the CLI on images; compress.test and
# engine.test the addon's LZ4 and XXH64 against lz4-napi and the TypeScript hash. A run with the addon's
# exports wrapped (a --require preload logging each first call per test file) saw such calls from every one
# of these files it reached. The other folders run with the addon only.
KSCINC_NO_NATIVE=1 npx vitest run test/image test/cli/cli.test.ts test/interop test/util/compress.test.ts test/backup/engine.test.ts \
  --reporter=default --reporter=json --outputFile.json="$results/fallback.json" || status=$?
fallback_s=$((SECONDS - t0 - native_s))
node -e '
  let passed = 0, failed = 0, skipped = 0; const failures = [];
  for (const f of process.argv.slice(1)) {
    try {
      const r = JSON.parse(require("fs").readFileSync(f, "utf8"));
      passed += r.numPassedTests; failed += r.numFailedTests; skipped += r.numPendingTests + r.numTodoTests;
      for (const file of r.testResults ?? []) {
        for (const t of file.assertionResults ?? []) {
          if (t.status !== "failed") continue;
          const why = String((t.failureMessages ?? [])[0] ?? "").split("\n").slice(0, 6).join("\n    ");
          failures.push(`FAILED ${f.replace(/.*\//, "")} ${file.name.replace(process.cwd() + "/", "")} > ${t.fullName}\n    ${why}`);
        }
        if ((file.assertionResults ?? []).length === 0 && file.status === "failed")
          failures.push(`FAILED ${file.name.replace(process.cwd() + "/", "")}: ${String(file.message ?? "").slice(0, 400)}`);
      }
    } catch { failed += 1; failures.push(`no report: ${f}`); }
  }
  // The slowest files (what to trim when the suite outgrows its 30 minutes).
  const files = [];
  for (const f of process.argv.slice(1)) {
    try {
      for (const file of JSON.parse(require("fs").readFileSync(f, "utf8")).testResults ?? [])
        files.push([(file.endTime - file.startTime) / 1000, file.name.replace(process.cwd() + "/", "")]);
    } catch {}
  }
  files.sort((a, b) => b[0] - a[0]);
  console.log("slowest test files (s): " + files.slice(0, 15).map(([t, n]) => `${n} ${t.toFixed(0)}`).join(", "));
  // CI shows only the tail of the output: the failures are repeated here, last.
  for (const line of failures) console.log(line);
  console.log(`tests: ${passed} passed, ${failed} failed` + (skipped ? `, ${skipped} skipped` : ""));
' "$results/native.json" "$results/fallback.json"
echo "wall: native run ${native_s} s, fallback run ${fallback_s} s; load $(cut -d' ' -f1-3 /proc/loadavg)"
for s in "${static_failed[@]}"; do echo "FAILED static check: $s"; done
rm -rf "$results"
exit "$status"
