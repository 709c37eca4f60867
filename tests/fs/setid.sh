#!/bin/sh
# Set-id bits and file capabilities after write, truncate and chown, as root and as
# nobody (65534). Run in a directory; prints one line per case. strata/tests/tree.rs runs
# it on tmpfs and on a tree mount and compares the outputs.
set -u
as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups sh -c "$1"; }
show() { echo "$1 $(stat -c %A "$2")"; }
cap() { setfattr -n security.capability -v 0sAQAAAgAgAAAAAAAAAAAAAAAAAAA= "$1"; }
has_cap() { getfattr -n security.capability "$1" >/dev/null 2>&1 && echo kept || echo gone; }

touch a && chmod 6755 a && chown 1000:1000 a && show "chown 6755" a
touch b && chmod 6755 b && chown 0 b && show "chown to the same owner" b
touch c && chmod 2745 c && chown 1000 c && show "chown 2745 (sgid, no g+x)" c
touch d && chmod 6777 d && as_nobody "echo x >> d" && show "write by nobody" d
touch e && chmod 6777 e && echo x >> e && show "write by root" e
touch f && chmod 6777 f && as_nobody "truncate -s 100 f" && show "truncate by nobody" f
touch g && chmod 6777 g && truncate -s 100 g && show "truncate by root" g
touch h && chmod 6767 h && as_nobody "echo x >> h" && show "write by nobody, no g+x" h
touch i && chown 65534:65534 i && chmod 6777 i && as_nobody "echo x >> i" && show "write by owner nobody" i
touch j && chmod 6777 j && as_nobody "echo x > j" && show "O_TRUNC open by nobody" j
touch k && chmod 6777 k && echo x >> k && as_nobody "echo y >> k" && show "second write by nobody" k
touch l && cap l && echo y >> l && echo "capability after a write: $(has_cap l)"
touch m && cap m && chown 1000 m && echo "capability after a chown: $(has_cap m)"
touch n && cap n && truncate -s 10 n && echo "capability after a truncate: $(has_cap n)"
mkdir o && chmod 2755 o && chown 1000 o && show "chown of a directory" o
