#!/usr/bin/env bash
# Simulated hosts for the cross-host MPI test: "netns_hosts.sh up PREFIX N" makes N network
# namespaces PREFIX-h1..PREFIX-hN at 10.201.0.1..N on a private bridge (in namespace PREFIX-br),
# with no route out; "netns_hosts.sh down PREFIX N" removes them. Needs root.
set -euo pipefail
action=$1 prefix=$2 n=$3
case "$action" in
up)
    ip netns add "$prefix-br"
    ip -n "$prefix-br" link add br0 type bridge
    ip -n "$prefix-br" link set br0 up
    for i in $(seq 1 "$n"); do
        host="$prefix-h$i"
        ip netns add "$host"
        ip link add "$prefix-a$i" type veth peer name "$prefix-b$i"
        ip link set "$prefix-a$i" netns "$host"
        ip link set "$prefix-b$i" netns "$prefix-br"
        ip -n "$prefix-br" link set "$prefix-b$i" master br0 up
        ip -n "$host" link set lo up
        ip -n "$host" link set "$prefix-a$i" name eth0
        ip -n "$host" addr add "10.201.0.$i/24" dev eth0
        ip -n "$host" link set eth0 up
    done
    ;;
down)
    for i in $(seq 1 "$n"); do ip netns del "$prefix-h$i" 2>/dev/null || true; done
    ip netns del "$prefix-br" 2>/dev/null || true
    ;;
*)
    echo "usage: $0 up|down PREFIX N" >&2
    exit 2
    ;;
esac
