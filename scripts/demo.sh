#!/usr/bin/env bash
# Sets up and runs Strata's main job: `strata serve` on a local store directory (default
# ./strata-data), a volume created and exported as a vhost-user-blk device, and the QEMU
# command line that attaches it. The daemon stays in the foreground; Ctrl-C stops it.
# Usage: scripts/demo.sh [STORE_DIR] [VOLUME] [SIZE]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/strata-target}"
cargo build --release -q -p strata
strata="$CARGO_TARGET_DIR/release/strata"
store=$(realpath -m "${1:-./strata-data}")
vol=${2:-vm1}
size=${3:-10G}
mkdir -p "$store"
"$strata" --store "$store" serve 2> "$store.log" &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null' EXIT
for _ in $(seq 100); do [ -S "$store/strata.sock" ] && break; sleep 0.1; done
"$strata" --store "$store" volume info "$vol" >/dev/null 2>&1 || "$strata" --store "$store" volume create "$vol" --size "$size"
sock="$store/$vol.vhost.sock"
# A daemon restarted on the same store serves its recorded exports again by itself.
if "$strata" --store "$store" --json volume info "$vol" | grep -q '"exported": null'; then
  "$strata" --store "$store" export vhost-user "$vol" --socket "$sock" --queues 2
else
  sock=$("$strata" --store "$store" --json volume info "$vol" | sed -n 's/.*"exported": "\(.*\)",/\1/p')
fi
cat <<MSG

strata is serving $store (log: $store.log). Attach the volume to a VM with:

  qemu-system-x86_64 -machine q35,accel=kvm:tcg,memory-backend=mem \\
    -object memory-backend-memfd,id=mem,size=2G,share=on -m 2G -smp 2 \\
    -chardev socket,id=vol0,path=$sock,reconnect=1 \\
    -device vhost-user-blk-pci,chardev=vol0,num-queues=2 \\
    ... your kernel/disk/boot options ...

Meanwhile, from another shell:
  $strata --store $store checkpoint create $vol@installed
  $strata --store $store checkpoint list $vol
  $strata --store $store volume create sandbox1 --from $vol@installed --ephemeral

Ctrl-C stops the daemon (exports are closed and the store is committed).
MSG
wait $daemon
