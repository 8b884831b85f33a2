#!/usr/bin/env bash
# A second simulated host for the cluster tests (root only).
#
#   bash scripts/netns.sh install   # iproute2 (ip, nsenter comes with util-linux), if missing
#   bash scripts/netns.sh up        # host "$P-h1" at 10.201.0.1; this machine joins as 10.201.0.254
#   bash scripts/netns.sh down      # remove both namespaces and the link (idempotent)
#
# The hosts meet on a bridge that lives in its own namespace ("$P-sw"), and nothing has a route
# out, so test traffic really crosses a (virtual) network and never leaves the machine. Start a
# process on the second host with: nsenter --net=/run/netns/$P-h1 <command>.
set -euo pipefail
P=${SHOAL_NETNS_PREFIX:-shoal}

case "${1:-}" in
install)
  if ! command -v ip >/dev/null || ! command -v nsenter >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends iproute2 util-linux
  fi
  ;;
up)
  "$0" down
  ip netns add "$P-sw"
  ip -n "$P-sw" link add br0 type bridge
  ip -n "$P-sw" link set br0 up
  # The second host.
  ip netns add "$P-h1"
  ip link add "$P-v1" type veth peer name "$P-p1"
  ip link set "$P-v1" netns "$P-h1"
  ip link set "$P-p1" netns "$P-sw"
  ip -n "$P-sw" link set "$P-p1" master br0 up
  ip -n "$P-h1" link set lo up
  ip -n "$P-h1" link set "$P-v1" name eth0
  ip -n "$P-h1" addr add 10.201.0.1/24 dev eth0
  ip -n "$P-h1" link set eth0 up
  # This machine (where the tests and the scheduler run) on the same bridge.
  ip link add "$P-v0" type veth peer name "$P-p0"
  ip link set "$P-p0" netns "$P-sw"
  ip -n "$P-sw" link set "$P-p0" master br0 up
  ip addr add 10.201.0.254/24 dev "$P-v0"
  ip link set "$P-v0" up
  ;;
down)
  ip link del "$P-v0" 2>/dev/null || true
  ip netns del "$P-h1" 2>/dev/null || true
  ip netns del "$P-sw" 2>/dev/null || true
  ;;
*)
  echo "usage: $0 install|up|down" >&2
  exit 2
  ;;
esac
