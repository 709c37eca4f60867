#!/usr/bin/env bash
# Sets up and runs every check CI runs: format, lints, and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/strata-target}"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --release -- --show-output 2>&1 | tee "$log"

# Fuzz what reads untrusted bytes, briefly (longer campaigns: STRATA_FUZZ_SECS=3600
# scripts/test.sh, or cargo fuzz run in fuzz/): the guest-facing request parser and
# descriptor walker, the decoder of remote manifests (seeded with a valid body), and the
# decoders of tree metadata blocks.
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked -q
for target in virtio_request manifest_decode tree_decode; do
  mkdir -p "fuzz/corpus/$target"
  if [ -d "fuzz/seeds/$target" ]; then cp -n "fuzz/seeds/$target"/* "fuzz/corpus/$target/" || true; fi
  (cd fuzz && CARGO_TARGET_DIR=/var/tmp/strata-fuzz-target RUSTC_BOOTSTRAP=1 \
    cargo fuzz run "$target" "corpus/$target" -- -max_total_time="${STRATA_FUZZ_SECS:-30}" 2>&1 | tail -3)
  echo "fuzz: $target ran ${STRATA_FUZZ_SECS:-30}s without a crash"
done

# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f; exit (f > 0 || p == 0) }' "$log"
