# A longer verified fio run (used to kill and restart the daemon underneath it).
set -e
echo "STRATA-INFO fio-long starting"
/usr/sbin/fio --name=long --filename=/dev/vda --direct=1 --ioengine=psync --rw=randwrite --bs=4k --size=48M --verify=crc32c --verify_fatal=1 --do_verify=1 --output-format=terse >/tmp/long.out
echo "STRATA-INFO fio-long verified"
