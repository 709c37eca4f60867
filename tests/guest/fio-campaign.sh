# The kill campaign's guest job (strata/tests/qemu_guest.rs): random 4 KiB writes with a
# crc32c header in every block and an fsync every 16 writes, then a verify pass that reads
# every block back; long enough for the daemon to be killed and restarted many times.
set -e
echo "STRATA-INFO fio-campaign starting"
/usr/sbin/fio --name=campaign --filename=/dev/vda --direct=1 --ioengine=psync --rw=randwrite --bs=4k --size=128M --fsync=16 --verify=crc32c --verify_fatal=1 --do_verify=1 --output-format=terse >/tmp/campaign.out
echo "STRATA-INFO fio-campaign verified"
