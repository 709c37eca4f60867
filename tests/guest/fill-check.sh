# After space was freed: e2fsck replays the journal and repairs what it must (prints its
# exit code), a second e2fsck finds nothing, the synced files read back, and new writes
# stick.
/usr/sbin/e2fsck -fy /dev/vda > /tmp/fsck.log 2>&1
rc=$?
sed 's/^/fsck: /' /tmp/fsck.log
echo "STRATA-INFO fsck_rc=$rc"
set -e
/usr/sbin/e2fsck -fn /dev/vda
mount -t ext4 /dev/vda /mnt
(cd /mnt/keep && md5sum -c a.md5 && md5sum -c b.md5)
dd if=/dev/urandom of=/mnt/keep/c bs=1M count=8 conv=fsync 2>/dev/null
umount /mnt
/usr/sbin/e2fsck -fn /dev/vda
