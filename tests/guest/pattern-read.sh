# Prints the checksum of the first 16 MiB.
set -e
echo "STRATA-INFO md5=$(dd if=/dev/vda bs=1M count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
