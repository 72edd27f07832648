#!/bin/sh
# make bench-storage: create and remove 100 sandbox disks over one base image and print the
# p50/p99 times, and the disk used by a fresh sandbox against the base image's size.
#   test/bench/bench-storage.sh BUILD_DIR dm     (inside the VM: test/vm/run -- ...)
#   test/bench/bench-storage.sh BUILD_DIR file   (on the host)
set -eu
build=$1
backend=$2
n=${BENCH_DISKS:-100}
if [ "$backend" = dm ]; then
	# In the VM: tmpfs under /tmp. TCG makes every syscall slow; compare ratios, not times.
	dir=$(mktemp -d /tmp/bench-storage-XXXXXX)
else
	# On the host: the filesystem that holds the build (where a state dir would live).
	mkdir -p "$build/bench"
	dir=$(mktemp -d "$build/bench/storage-XXXXXX")
fi
trap 'rm -rf "$dir"' EXIT
mkdir "$dir/tree"
# A small root filesystem's worth of files in a 1 GiB image.
head -c 50000000 /dev/urandom >"$dir/tree/payload"
cp -r /etc "$dir/tree/etc" 2>/dev/null || true
mkfs.ext4 -q -F -d "$dir/tree" "$dir/base.img" 1G
rm -rf "$dir/tree"
mkdir "$dir/disks"
where=$( [ "$backend" = dm ] && echo "in the VM (TCG, tmpfs)" || echo "on the host ($(df --output=fstype "$dir" | tail -1))" )
echo "storage bench, $backend backend, $where, $n disks over one 1 GiB base:"
"$build/test/storage-tool" --backend "$backend" bench "$n" "$dir/base.img" "$dir/disks" \
	$((256 * 1024 * 1024)) | tr ' ' '\n' | sed 's/^/  /'
