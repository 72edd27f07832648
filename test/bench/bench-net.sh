#!/bin/sh
# make bench-net: network slots handed out from the ready pool versus built cold (p50/p99), and
# slots per second under steady demand (8 sandboxes alive, each acquire releases the oldest)
# with and without the pool refilling in the background. Runs in a network namespace of its
# own, as the tests do; the machine's own network is not touched.
set -eu
build=$1
n=${BENCH_SLOTS:-100}
secs=${BENCH_SECONDS:-10}
root=$(mktemp -d /tmp/ember-bench-net-XXXXXX)
cleanup() {
	nsenter --net="$root/host" "$build/test/netns-tool" $opts reclaim >/dev/null 2>&1 || true
	umount -R -l "$root/ns" 2>/dev/null || true
	umount -l "$root/host" 2>/dev/null || true
	rm -rf "$root"
}
opts="--netns-dir $root/ns --state $root/slots.json"
trap cleanup EXIT
touch "$root/host"
unshare --net="$root/host" true
nsenter --net="$root/host" ip link set lo up
tool() { nsenter --net="$root/host" "$build/test/netns-tool" $opts "$@"; }
echo "network slot bench, $n slots per case ($(nproc) CPUs):"
tool --pool 0 bench "$n" | sed 's/^/  /'
tool --pool 8 bench "$n" | sed 's/^/  /'
tool --pool 0 steady "$secs" | sed 's/^/  /'
tool --pool 8 steady "$secs" | sed 's/^/  /'
