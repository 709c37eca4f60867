# Writes a random 16 MiB pattern at offset 0 and prints its checksum.
set -e
dd if=/dev/urandom of=/tmp/p bs=1M count=16 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=1M oflag=direct 2>/dev/null
sync
echo "STRATA-INFO md5=$(md5sum /tmp/p | cut -d' ' -f1)"
