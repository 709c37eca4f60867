# mkfs.ext4 and a file to keep, synced, then a clean unmount.
set -e
/usr/sbin/mke2fs -q -t ext4 -F /dev/vda
mount -t ext4 /dev/vda /mnt
mkdir /mnt/keep
dd if=/dev/urandom of=/mnt/keep/a bs=1M count=4 2>/dev/null
(cd /mnt/keep && md5sum a > a.md5)
sync
umount /mnt
