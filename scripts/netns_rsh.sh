#!/bin/sh
# Open MPI's remote shell for simulated hosts: "netns_rsh.sh HOST COMMAND..." runs COMMAND in
# network namespace HOST, with its own hostname HOST (a UTS namespace), as ssh would on a host.
host="$1"
shift
exec ip netns exec "$host" unshare --uts /bin/sh -c "hostname $host; $*"
