#!/usr/bin/env bash
# Long fuzz runs of the cargo-fuzz targets in fuzz/ (docs/fuzzing.md), one after another.
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 600 s, every target)
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). The working corpus
# grows in fuzz/corpus/TARGET (not committed); the committed seeds in fuzz/seeds/TARGET are
# read too. Crashes, OOMs and timeouts are kept going past (fork mode) and saved in
# fuzz/artifacts/TARGET/; each becomes a regression file in fuzz/regressions/TARGET/ once
# fixed. Logs: ${FUZZ_LOGS:-/tmp}/fuzz-TARGET.log.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(pickle safetensors config idx image server_request server_infer)
declare -A max_len=([pickle]=8192 [safetensors]=4096 [config]=4096 [idx]=4096 [image]=16384
                    [server_request]=8192 [server_infer]=8192)
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  log="${FUZZ_LOGS:-/tmp}/fuzz-$t.log"
  echo "== $t: ${secs}s, log $log"
  cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10 \
    -max_len="${max_len[$t]}" -fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1 \
    -print_final_stats=1 >"$log" 2>&1 || echo "   exit $? (see $log)"
  tail -n 3 "$log"
  ls "artifacts/$t" | sed 's/^/   artifact: /' || true
done
