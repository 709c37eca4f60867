#!/usr/bin/env bash
# Builds the QEMU test guest: a Debian 6.1 kernel and a busybox initramfs carrying the virtio
# and ext4 modules, fio, mke2fs and e2fsck, and the test scripts in tests/guest/.
# Usage: scripts/guest.sh [OUT_DIR]   (default /var/tmp/strata-guest; rebuilt when the scripts change)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-/var/tmp/strata-guest}
mkdir -p "$out"
# One builder at a time (tests run in parallel).
exec 9>"$out/.lock"
flock 9
stamp=$(cat "$here/scripts/guest.sh" "$here"/tests/guest/* | sha256sum | cut -c1-16)
if [ -f "$out/ready-$stamp" ]; then exit 0; fi

for tool in qemu-system-x86_64 busybox cpio fio mke2fs e2fsck xz; do
  command -v "$tool" >/dev/null || { echo "guest.sh: $tool is missing (run scripts/setup.sh)" >&2; exit 1; }
done

work="$out/work"
mkdir -p "$work"
cd "$work"
if [ ! -d kernel ]; then
  pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -1)
  [ -n "$pkg" ] || { echo "guest.sh: no linux-image-6.1.0-*-amd64 package found (apt-get update?)" >&2; exit 1; }
  rm -f ./*.deb
  apt-get -o APT::Sandbox::User=root download "$pkg" >/dev/null
  dpkg-deb -x ./*.deb kernel.tmp && mv kernel.tmp kernel
fi
kver=$(ls kernel/lib/modules | head -1)
cp "kernel/boot/vmlinuz-$kver" "$out/vmlinuz"

root="$work/root"
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,mnt,etc,lib/modules,tests}
cp "$(command -v busybox)" "$root/bin/busybox"
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk crc16 mbcache jbd2 crc32c_generic ext4; do
  f=$(find "kernel/lib/modules/$kver" -name "$m.ko*" | head -1)
  [ -n "$f" ] || { echo "guest.sh: module $m not found" >&2; exit 1; }
  case "$f" in
    *.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
    *) cp "$f" "$root/lib/modules/$m.ko" ;;
  esac
done
# Host binaries with the shared libraries they load.
for b in "$(command -v fio)" "$(command -v mke2fs)" "$(command -v e2fsck)"; do
  mkdir -p "$root/usr/sbin"
  cp "$b" "$root/usr/sbin/"
  for lib in $(ldd "$b" | grep -o '/[^ ]*' ); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
done
cp "$here"/tests/guest/* "$root/tests/"
cp "$here/tests/guest/init" "$root/init"
chmod +x "$root/init" "$root"/tests/*
(cd "$root" && find . | cpio -o -H newc --quiet) > "$out/initramfs.cpio"
rm -f "$out"/ready-*
touch "$out/ready-$stamp"
echo "guest.sh: built $out (kernel $kver)"
