#!/usr/bin/env bash
# Installs what Strata needs to build and test on Debian 12 (run as root). Idempotent.
set -euo pipefail

pkgs=(build-essential pkg-config libclang-dev librocksdb-dev fio e2fsprogs
      qemu-system-x86 qemu-utils busybox-static cpio xz-utils util-linux mount
      stress-ng git attr acl bindfs)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
elif ! apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | grep -q .; then
  # The QEMU test guest's kernel is fetched with apt-get download: it needs package lists.
  apt-get update -qq
fi

# FUSE exports and their tests need /dev/fuse (the daemon mounts directly, as root).
[ -e /dev/fuse ] || modprobe fuse || { echo "setup: /dev/fuse is missing and modprobe fuse failed" >&2; exit 1; }

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install the Rust toolchain (rustup) first" >&2
  exit 1
fi
rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy

# Garage, the S3 server the remote tests and benchmarks run against (issue 6). Built once
# from crates.io (about 8 minutes on 2 cores) into a directory outside the clone, reused by
# every later run.
GARAGE_ROOT=/var/tmp/strata-tools
if ! "$GARAGE_ROOT/bin/garage" --version 2>/dev/null | grep -q 'cargo:2\.5\.0'; then
  echo "setup: building garage 2.5.0 into $GARAGE_ROOT (once)"
  CARGO_TARGET_DIR=/var/tmp/strata-garage-target cargo install garage --version 2.5.0 --locked --root "$GARAGE_ROOT" -q
fi

# pjdfstest and fsx (fsx-rs), the POSIX suites the tree tests run (issue 5): built once from
# crates.io into the same directory (about 2 minutes on 2 cores).
for tool in pjdfstest:0.2.2 fsx:0.3.2; do
  name=${tool%%:*} version=${tool##*:}
  if ! { grep -qs "\"$name $version " "$GARAGE_ROOT/.crates.toml" && [ -x "$GARAGE_ROOT/bin/$name" ]; }; then
    echo "setup: building $name $version into $GARAGE_ROOT (once)"
    CARGO_TARGET_DIR=/var/tmp/strata-tools-target cargo install "$name" --version "$version" --locked --root "$GARAGE_ROOT" -q
  fi
done
