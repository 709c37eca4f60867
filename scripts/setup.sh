#!/usr/bin/env bash
# Installs what Strata needs to build and test on Debian 12 (run as root). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(build-essential pkg-config libclang-dev librocksdb-dev fio e2fsprogs
      qemu-system-x86 qemu-utils busybox-static cpio xz-utils util-linux mount
      stress-ng git attr acl bindfs fuse-overlayfs zstd gzip tar containerd runc golang-go)
# The commands the tests, benches and guest builder call, with the package that ships each.
# Checked as commands, not package names: this image ships qemu-utils 10.0 (a backport) that
# apt removes when it installs qemu-system-x86 7.2, which a package-status check never sees.
tools=(qemu-img:qemu-utils qemu-io:qemu-utils qemu-system-x86_64:qemu-system-x86
       qemu-storage-daemon:qemu-system-common fio:fio mke2fs:e2fsprogs e2fsck:e2fsprogs
       busybox:busybox-static cpio:cpio xz:xz-utils losetup:mount stress-ng:stress-ng git:git
       setfattr:attr getfattr:attr setfacl:acl bindfs:bindfs fuse-overlayfs:fuse-overlayfs
       npm:npm pkg-config:pkg-config cc:build-essential zstd:zstd gzip:gzip tar:tar
       sha256sum:coreutils containerd:containerd ctr:containerd
       containerd-shim-runc-v2:containerd runc:runc go:golang-go)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
for t in "${tools[@]}"; do
  command -v "${t%%:*}" >/dev/null || missing+=("${t##*:}")
done
if ((${#missing[@]})); then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  apt-get update -qq
  # QEMU's packages come from one source and must be installed at one version: ask for all
  # of them at the version apt would pick for qemu-system-x86, so none is swapped or removed.
  qemu_v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  if [ -n "$qemu_v" ] && [ "$qemu_v" != "(none)" ]; then
    for i in "${!missing[@]}"; do
      case "${missing[$i]}" in qemu-*) unset 'missing[i]' ;; esac
    done
    missing+=("qemu-system-x86=$qemu_v" "qemu-system-common=$qemu_v" "qemu-utils=$qemu_v")
  fi
  echo "setup: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --allow-downgrades "${missing[@]}" >/dev/null
elif ! apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | grep -q .; then
  # The QEMU test guest's kernel is fetched with apt-get download: it needs package lists.
  apt-get update -qq
fi
# Every promised command is present and runs, or setup fails naming it.
absent=()
for t in "${tools[@]}"; do command -v "${t%%:*}" >/dev/null || absent+=("${t%%:*} (${t##*:})"); done
qemu-img --version >/dev/null 2>&1 || absent+=("qemu-img does not run")
qemu-storage-daemon --version >/dev/null 2>&1 || absent+=("qemu-storage-daemon does not run")
if ((${#absent[@]})); then
  echo "setup: still missing after apt-get install: ${absent[*]}" >&2
  exit 1
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

# The node_modules phase of tree-bench (issue 13) installs bench/workload/npm offline from
# this cache, primed once from the npm registry (a failure here only warns: no test needs it,
# and the bench says the cache is missing).
NPM_CACHE="$GARAGE_ROOT/npm-cache"
lock_sum=$(sha256sum bench/workload/npm/package-lock.json | cut -c1-16)
if [ ! -e "$NPM_CACHE/.primed-$lock_sum" ]; then
  echo "setup: priming $NPM_CACHE for tree-bench's npm phase (once)"
  tmp=$(mktemp -d)
  cp bench/workload/npm/package.json bench/workload/npm/package-lock.json "$tmp/"
  if (cd "$tmp" && npm ci -q --cache "$NPM_CACHE" --ignore-scripts --no-audit --no-fund \
        --omit-lockfile-registry-resolved=false >/dev/null 2>&1); then
    touch "$NPM_CACHE/.primed-$lock_sum"
  else
    echo "setup: warning: could not prime the npm cache (tree-bench's npm phase needs it)" >&2
  fi
  rm -rf "$tmp"
fi

# containerd's snapshotter conformance suite (snapshots/testsuite; strata/tests/containerd.rs
# runs it, issue 14) is built in GOPATH mode, offline, from Debian's Go source packages:
# downloaded and unpacked here, not installed (installing golang-github-containerd-
# containerd-dev pulls ~120 packages and upgrades systemd). About 12 MB.
GOPATH_DIR="$GARAGE_ROOT/gopath"
go_pkgs=(golang-github-containerd-containerd-dev golang-github-containerd-continuity-dev
         golang-github-containerd-ttrpc-dev golang-github-coreos-bbolt-dev
         golang-github-gogo-protobuf-dev golang-github-golang-protobuf-1-5-dev
         golang-github-google-go-cmp-dev golang-github-gotestyourself-gotest.tools-dev
         golang-github-moby-sys-dev golang-github-opencontainers-go-digest-dev
         golang-github-pkg-errors-dev golang-github-sirupsen-logrus-dev golang-glog-dev
         golang-golang-x-net-dev golang-golang-x-oauth2-dev golang-golang-x-oauth2-google-dev
         golang-golang-x-sync-dev golang-golang-x-sys-dev golang-golang-x-text-dev
         golang-google-cloud-compute-metadata-dev golang-google-genproto-dev
         golang-google-grpc-dev golang-google-protobuf-dev)
go_stamp=$(printf '%s\n' "${go_pkgs[@]}" | sha256sum | cut -c1-16)
if [ ! -e "$GOPATH_DIR/.unpacked-$go_stamp" ]; then
  echo "setup: unpacking Debian's Go sources for containerd's snapshotter suite into $GOPATH_DIR (once)"
  tmp=$(mktemp -d)
  chmod 755 "$tmp"   # apt's sandbox user writes the downloads
  (cd "$tmp" && apt-get download -qq "${go_pkgs[@]}" 2>/dev/null) || {
    apt-get update -qq && (cd "$tmp" && apt-get download -qq "${go_pkgs[@]}")
  }
  rm -rf "$GOPATH_DIR"
  mkdir -p "$GOPATH_DIR"
  for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$GOPATH_DIR"; done
  rm -rf "$tmp"
  [ -d "$GOPATH_DIR/usr/share/gocode/src/github.com/containerd/containerd/snapshots/testsuite" ] || {
    echo "setup: containerd's snapshots/testsuite is missing from $GOPATH_DIR" >&2
    exit 1
  }
  touch "$GOPATH_DIR/.unpacked-$go_stamp"
fi
