# Writes past the disk's space (its quota, or a full store): one more file synced first,
# then 4 MiB files, each with fsync, until one fails. No unmount: init's poweroff -f then
# cuts the power, with whatever the guest had not flushed lost.
set -e
mount -t ext4 /dev/vda /mnt
dd if=/dev/urandom of=/tmp/r bs=1M count=4 2>/dev/null
cp /tmp/r /mnt/keep/b
(cd /mnt/keep && md5sum b > b.md5)
sync
i=0
while [ $i -lt 200 ]; do
  dd if=/tmp/r of=/mnt/f$i bs=1M conv=fsync 2>/dev/null || break
  i=$((i+1))
done
echo "STRATA-INFO filled=$i ioerrors=$(dmesg | grep -c 'I/O error')"
dmesg | grep -m5 -E 'I/O error|EXT4-fs' || true
