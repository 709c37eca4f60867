# fio with crc32c verification, sequential and random, and fsync-heavy jobs, on /dev/vda.
set -e
common="--filename=/dev/vda --direct=1 --ioengine=psync --verify=crc32c --verify_fatal=1 --do_verify=1"
/usr/sbin/fio --name=seq --rw=write --bs=64k --size=48M $common --output-format=terse >/tmp/seq.out
/usr/sbin/fio --name=rand --rw=randwrite --bs=4k --size=16M --offset=64M $common --output-format=terse >/tmp/rand.out
/usr/sbin/fio --name=fsync --rw=randwrite --bs=4k --size=8M --offset=96M --fsync=4 $common --output-format=terse >/tmp/fsync.out
/usr/sbin/fio --name=mixed --rw=randrw --bs=16k --size=8M --offset=112M --offset_increment=8M --numjobs=2 $common --output-format=terse >/tmp/mixed.out
echo "STRATA-INFO fio jobs passed verification"
