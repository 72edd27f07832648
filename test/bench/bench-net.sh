#!/bin/sh
# make bench-net: network slots handed out from the ready pool versus built cold (p50/p99, and
# their ratio per round with min/median/max over the rounds); a hand-out from the pool with a
# non-default egress policy; the same with 1,000 slots in use (what a state file write costs
# then); 50 creates at once, as a sandbox manager does them; and slots per second under steady
# demand (8 sandboxes alive, each acquire releases the oldest) with and without the pool
# refilling in the background. Runs in a network namespace of its own, as the tests do; the
# machine's own network is not touched.
set -eu
build=$1
n=${BENCH_SLOTS:-100}
secs=${BENCH_SECONDS:-10}
rounds=${BENCH_ROUNDS:-3}
root=$(mktemp -d /tmp/ember-bench-net-XXXXXX)
opts="--netns-dir $root/ns --state $root/slots.json"
cleanup() {
	nsenter --net="$root/host" "$build/test/netns-tool" $opts reclaim >/dev/null 2>&1 || true
	umount -R -l "$root/ns" 2>/dev/null || true
	umount -l "$root/host" 2>/dev/null || true
	rm -rf "$root"
}
trap cleanup EXIT
touch "$root/host"
unshare --net="$root/host" true
nsenter --net="$root/host" ip link set lo up
tool() { nsenter --net="$root/host" "$build/test/netns-tool" $opts "$@"; }
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p" | head -n 1; }

echo "network slot bench, $n slots per case, $rounds rounds ($(nproc) CPUs):"
ratios=""
for round in $(seq "$rounds"); do
	cold=$(tool --pool 0 bench "$n")
	pooled=$(tool --pool 8 bench "$n")
	echo "$cold" | sed 's/^/  /'
	echo "$pooled" | sed 's/^/  /'
	c=$(echo "$cold" | field cold_acquire_p50_ms)
	p=$(echo "$pooled" | field pooled_acquire_p50_ms)
	ratios="$ratios $(awk -v c="$c" -v p="$p" 'BEGIN { printf "%.0f", c / p }')"
done
echo "  cold/pooled p50 ratio per round:$ratios (min/median/max:" \
	"$(echo "$ratios" | tr ' ' '\n' | sed '/^$/d' | sort -n |
		awk '{ v[NR] = $1 } END { printf "%s/%s/%s", v[1], v[int((NR + 1) / 2)], v[NR] }'))"

# 1,000 slots in use, as a restarted agent would load them (no namespaces behind them: only
# the bookkeeping and the state file are measured here).
/usr/bin/python3 -c 'import json, sys
json.dump({"slots": [{"index": 1000 + i, "owner": f"fill-{i}"} for i in range(1000)]},
          open(sys.argv[1], "w"))' "$root/slots1000.json"
echo "with 1,000 slots in use:"
nsenter --net="$root/host" "$build/test/netns-tool" --netns-dir "$root/ns" \
	--state "$root/slots1000.json" --pool 8 bench "$n" | sed 's/^/  /'

echo "50 creates at once (8 from the pool, the rest cold), then 50 destroys at once:"
tool --pool 8 burst 50 | sed 's/^/  /'

tool --pool 0 steady "$secs" | sed 's/^/  /'
tool --pool 8 steady "$secs" | sed 's/^/  /'
