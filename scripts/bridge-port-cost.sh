#!/usr/bin/env bash
# The kernel's own cost of adding a veth endpoint as a network grows, without micropod: N times,
# one RTM_NEWLINK of a veth with its peer created in a namespace of its own (as micropod's
# netns attach does), timed with `strace -T`, then both ends up (the peer with no IPv6
# link-local address). Prints the median of the first and the last 50 creates.
#
#   scripts/bridge-port-cost.sh bridge|nobridge|shard4 [N]    (as root; N defaults to 1000)
#
# bridge: every host end on one bridge; nobridge: on none; shard4: spread over four bridges.
# Everything happens in namespaces named mpbpc-* that the script makes and removes on every
# path; the machine's own network namespace is not touched. Needs iproute2, strace, python3.
set -euo pipefail

mode=${1:-}
n=${2:-1000}
case $mode in
  bridge | nobridge | shard4) ;;
  *)
    echo "usage: $0 bridge|nobridge|shard4 [N]" >&2
    exit 2
    ;;
esac
if ! [[ $n =~ ^[0-9]+$ ]] || ((n < 100 || n > 1000)); then
  echo "N must be 100..1000 (a bridge holds at most 1023 ports)" >&2
  exit 2
fi
[[ $(id -u) == 0 ]] || { echo "run as root: it creates network namespaces" >&2; exit 2; }

host=mpbpc-host-$$
made=0
out=$(mktemp)
cleanup() {
  ip netns del "$host" 2>/dev/null || true
  for ((i = 1; i <= made; i++)); do ip netns del "mpbpc-$$-$i" 2>/dev/null || true; done
  rm -f "$out"
}
trap cleanup EXIT INT TERM

ip netns add "$host"
ip -n "$host" link set lo up
for b in 0 1 2 3; do
  ip -n "$host" link add "pcbr$b" type bridge
  ip -n "$host" link set "pcbr$b" up
done

for ((i = 1; i <= n; i++)); do
  ns=mpbpc-$$-$i
  ip netns add "$ns"
  made=$i
  case $mode in
    bridge) master=(master pcbr0) ;;
    nobridge) master=() ;;
    shard4) master=(master "pcbr$((i % 4))") ;;
  esac
  # The last sendmsg of `ip link add` is the RTM_NEWLINK; -T appends its time in seconds.
  took=$(strace -T -e trace=sendmsg ip -n "$host" link add "pc$i" "${master[@]}" \
    type veth peer name eth0 netns "$ns" 2>&1 >/dev/null | grep -o '<[0-9.]*>' | tail -1 | tr -d '<>')
  ip -n "$host" link set "pc$i" up
  ip -n "$ns" link set eth0 addrgenmode none
  ip -n "$ns" link set eth0 up
  echo "$took" >>"$out"
done

python3 - "$mode" "$n" "$out" <<'EOF'
import statistics, sys
mode, n, path = sys.argv[1], sys.argv[2], sys.argv[3]
ms = [float(line) * 1e3 for line in open(path) if line.strip()]
first, last = statistics.median(ms[:50]), statistics.median(ms[-50:])
print(f"{mode}: veth create (peer in its own namespace), median of the first and last 50 of {n}: "
      f"{first:.2f} ms -> {last:.2f} ms ({last / first:.2f}x)")
EOF
