# mkfs.ext4, mount, write a tree of files, unmount, e2fsck -fn must be clean.
set -e
/usr/sbin/mke2fs -q -t ext4 -F /dev/vda
mount -t ext4 /dev/vda /mnt
mkdir -p /mnt/tree/a/b
for i in $(seq 1 200); do echo "file $i $(seq 1 $i)" > /mnt/tree/a/b/f$i; done
dd if=/dev/urandom of=/mnt/tree/big bs=1M count=8 2>/dev/null
md5sum /mnt/tree/big > /mnt/tree/big.md5
sync
umount /mnt
/usr/sbin/e2fsck -fn /dev/vda
mount -t ext4 -o ro /dev/vda /mnt
(cd /mnt/tree && md5sum -c big.md5 >/dev/null)
umount /mnt
