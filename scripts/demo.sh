#!/usr/bin/env bash
# Sets up and runs Strata's main job on a local store directory (default ./strata-data).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/strata-target}"
cargo run --release -p strata-engine --example demo -- "${1:-./strata-data}"
