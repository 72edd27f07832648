/* SPDX-License-Identifier: Apache-2.0 */
/*
 * libFuzzer target for uffd_handshake_parse(): the first byte chooses how many fds come with
 * the message (0, 1 or 2: duplicates of /dev/null, so closing them is harmless), the rest is
 * the message. The parser owns every fd it is given, so after each input no fd may be left
 * open but the one a valid handshake returns, which is closed here.
 *
 *   clang -fsanitize=fuzzer,address,undefined ... && ./fuzz corpus/uffd-handshake
 *   gcc -DFUZZ_REPLAY_MAIN ... && ./replay corpus/uffd-handshake/\*   (no libFuzzer needed)
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/macro.h"
#include "fcctl/uffd.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int devnull = -EBADF;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	int fds[2] = {-EBADF, -EBADF};
	char *error = NULL;
	UffdHandshake h;
	size_t n_fds;
	int r;

	if (size == 0)
		return 0;
	if (devnull < 0) {
		devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
		if (devnull < 0)
			abort();
	}
	n_fds = data[0] % 3;
	for (size_t i = 0; i < n_fds; i++) {
		fds[i] = fcntl(devnull, F_DUPFD_CLOEXEC, 3);
		if (fds[i] < 0)
			abort();
	}

	r = uffd_handshake_parse((const char *)data + 1, size - 1, fds, n_fds, &h, &error);
	if (r >= 0) {
		/* what it accepted must make sense */
		if (n_fds != 1 || h.uffd != fds[0] || h.n_regions == 0 ||
		    h.n_regions > UFFD_MAX_REGIONS || error)
			abort();
		for (size_t i = 0; i < h.n_regions; i++) {
			const UffdRegion *reg = &h.regions[i];

			if (reg->size == 0 ||
			    (reg->page_size != 4096 && reg->page_size != 2u << 20) ||
			    reg->base_host_virt_addr % reg->page_size ||
			    reg->size % reg->page_size || reg->offset % reg->page_size ||
			    reg->base_host_virt_addr + reg->size < reg->base_host_virt_addr)
				abort();
		}
		close(h.uffd);
	} else if (!error)
		abort(); /* every refusal says why */
	free(error);

	/* every fd was closed, by the parser or above */
	for (size_t i = 0; i < n_fds; i++)
		if (fcntl(fds[i], F_GETFD) >= 0)
			abort();
	return 0;
}

#ifdef FUZZ_REPLAY_MAIN
/* Replays files (a corpus, crashes) without libFuzzer: for `make check`. */
int main(int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		_cleanup_fclose_ FILE *f = fopen(argv[i], "re");
		_cleanup_free_ uint8_t *buf = NULL;
		long size;

		if (!f || fseek(f, 0, SEEK_END) < 0 || (size = ftell(f)) < 0 ||
		    fseek(f, 0, SEEK_SET) < 0) {
			fprintf(stderr, "cannot read %s\n", argv[i]);
			return 1;
		}
		buf = malloc((size_t)size + 1);
		if (!buf || fread(buf, 1, (size_t)size, f) != (size_t)size) {
			fprintf(stderr, "cannot read %s\n", argv[i]);
			return 1;
		}
		LLVMFuzzerTestOneInput(buf, (size_t)size);
	}
	printf("%d inputs replayed\n", argc - 1);
	safe_close(devnull);
	return 0;
}
#endif
