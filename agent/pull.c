/* SPDX-License-Identifier: Apache-2.0 */
/*
 * PullTemplate: templates downloaded over HTTP(S), verified by sha256, with progress.
 *
 * One engine thread drives every transfer through libcurl's multi interface: no thread per
 * download, a pull that waits for a retry costs nothing, and an abort is a
 * curl_multi_remove_handle() on the thread that owns the handles. The engine thread writes
 * the bytes as they arrive (the rootfs sparse: all-zero 4 KiB blocks are skipped); a hasher
 * thread reads them back from the page cache and hashes them (OpenSSL EVP) on the other core,
 * so that SHA-256, which costs about as much CPU as receiving and writing together, does not
 * halve the download rate. VERIFYING then only compares digests. A flusher thread starts the
 * hashed ranges' writeback, so that the sync before the install is short.
 *
 * On disk a pull is <templates>/.pull-<id>/ holding pull.json (the request; state pulling or
 * failed) and the artifacts under their final names. Installing writes template.json there
 * and renames the directory to <id>/, as RegisterTemplate does with its temporary: a template
 * directory without a dot is complete. A restart finds .pull-<id>/ and resumes the pull from
 * the bytes already on disk (re-hashed), or shows it FAILED.
 *
 * A pull is not tied to a call: callers follow it (PullTemplate with the same request) and
 * go away as they like. The engine wakes followers at most every 100 ms while bytes arrive and
 * at every phase change; each follower decides what to send.
 *
 * Locking: Manager.lock, then PullEngine.lock (never the other way round). The engine thread
 * alone touches the transfer fields of a Pull; the byte counters are atomics.
 */
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "common/error.h"
#include "common/fileio.h"
#include "common/id.h"
#include "common/log.h"
#include "crash-point.h"
#include "manager-internal.h"
#include "messages.h"
#include "node-sandbox.h"

#define PULL_RECORD        "pull.json"
#define PULL_DIR_PREFIX    ".pull-"
#define WAKE_INTERVAL_USEC 100000ULL
#define RETRY_MAX_DELAY_MS 30000ULL
#define SPARSE_BLOCK       4096
#define N_ARTIFACTS        3

typedef enum ArtState {
	ART_WAITING, /* no transfer yet, or a retry is due at retry_at */
	ART_RUNNING,
	ART_HASHING, /* all bytes in; the hasher catches up */
	ART_DONE,    /* all bytes in, size and digest right */
} ArtState;

/* Fields by owner; within each group, pointers and 64-bit fields first, then the smaller
 * ones and the strings (clang-tidy's padding check). */
typedef struct PullArtifact {
	/* the request (immutable once the pull exists) */
	const char *name; /* "kernel", "rootfs", "initrd" */
	const char *file; /* its name in the template directory */
	char *url;        /* NULL: no such artifact (initrd) */
	uint64_t size;    /* 0: not given */

	/* engine thread only */
	CURL *easy;
	char *cur_url;       /* where this attempt's redirects led; NULL: url */
	uint64_t range_from; /* the offset this attempt asked for */
	uint64_t last_rx;    /* CLOCK_MONOTONIC µs of this attempt's last byte */
	uint64_t retry_at;   /* CLOCK_MONOTONIC µs */
	long http_status;    /* an error status that ended the attempt */

	_Atomic uint64_t done;  /* bytes received and written */
	_Atomic uint64_t total; /* size, or what the server announced; 0 unknown */

	/* the hasher's (PullEngine.hlock) */
	EVP_MD_CTX *md;
	uint64_t hashed;  /* bytes of the file in md: done - hashed are still to hash */
	uint64_t flushed; /* bytes whose writeback the flusher started */

	/* engine thread only */
	ArtState st;
	int fd;
	unsigned failures;  /* attempts failed in a row without progress */
	RpcCode fail_code;  /* set by a callback that ended the attempt for good */
	unsigned redirects; /* followed in this attempt */
	/* the hasher's */
	int hash_error; /* a read or digest failure (-errno) */

	bool sparse;    /* (request) the rootfs: zero blocks are not written */
	bool checked;   /* (engine) this attempt's response status and range were looked at */
	bool from_disk; /* (engine) bytes of a previous run were taken over */
	/* the hasher's */
	bool hashing;     /* the hasher reads and hashes [hashed, …) outside the lock */
	bool flushing;    /* the flusher is in sync_file_range() on the fd */
	bool hash_listed; /* in PullEngine.hjobs */
	bool hash_all;    /* the transfer ended: hash the rest however little */

	char sha256[65]; /* (request) lowercase */
	/* engine thread only */
	char content_range[128];
	char errbuf[CURL_ERROR_SIZE];
	/* our own reason for ending an attempt, for good (fail_code) or to retry; curl
	 * overwrites errbuf */
	char why[256];
} PullArtifact;

struct Pull {
	_Atomic unsigned refs;
	PullEngine *e;
	char *id;
	char *dir; /* <templates>/.pull-<id>, as made; renamed away by a delete */
	int dir_fd;
	PullArtifact art[N_ARTIFACTS];
	char *boot_args;
	KvList labels;
	struct timespec create_time;
	bool resume; /* found on disk at start: take over the bytes there */

	/* (E) */
	Ember__V1__PullPhase phase;
	bool started, installing, aborted, finished;
	bool in_engine; /* in PullEngine.pulls, holding a reference */
	RpcCode code;
	char *error;
	RpcCall **followers;
	size_t n_followers;
	uint64_t last_wake;
	uint64_t last_done; /* bytes when the followers were last woken */
};

struct PullEngine {
	Manager *m;
	const Config *c;
	CURLM *multi;
	pthread_mutex_t lock;
	pthread_t thread;
	bool started;
	/* (E) */
	bool stop;
	Pull **pulls; /* not finished, in the order they came */
	bool again;   /* engine thread: a transfer ended, take another turn at once */
	size_t n_pulls;
	/* metrics */
	_Atomic uint64_t bytes, done_ok, done_failed, retries;

	/* the hasher thread: artifacts with bytes to hash */
	pthread_mutex_t hlock;
	pthread_cond_t hcond; /* the hasher's work, and a file no longer in use */
	pthread_cond_t fcond; /* the flusher's work */
	PullArtifact **hjobs;
	size_t n_hjobs;
	bool hstop;
	pthread_t hasher, flusher;
	bool hasher_started, flusher_started;
};

/* snprintf() for messages that may be cut: a URL or curl's error is long at worst. */
static void msgf(char *buf, size_t size, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void msgf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, size, fmt, ap);
	va_end(ap);
}

/* ---- pulls: life and records ---- */

static void pull_free(Pull *p)
{
	for (size_t i = 0; i < N_ARTIFACTS; i++) {
		PullArtifact *a = &p->art[i];
		free(a->url);
		free(a->cur_url);
		if (a->fd >= 0)
			close(a->fd);
		EVP_MD_CTX_free(a->md);
	}
	if (p->dir_fd >= 0)
		close(p->dir_fd);
	free(p->id);
	free(p->dir);
	free(p->boot_args);
	kv_list_done(&p->labels);
	free(p->error);
	free(p->followers);
	free(p);
}

Pull *pull_ref(Pull *p)
{
	atomic_fetch_add(&p->refs, 1);
	return p;
}

void pull_unref(Pull *p)
{
	if (p && atomic_fetch_sub(&p->refs, 1) == 1)
		pull_free(p);
}

static Pull *pull_new(PullEngine *e, const char *id)
{
	static const char *const names[N_ARTIFACTS] = {"kernel", "rootfs", "initrd"};
	static const char *const files[N_ARTIFACTS] = {"kernel", "rootfs.ext4", "initrd"};
	Pull *p = calloc(1, sizeof(*p));

	if (!p)
		return NULL;
	p->refs = 1;
	p->e = e;
	p->dir_fd = -EBADF;
	for (size_t i = 0; i < N_ARTIFACTS; i++) {
		p->art[i].name = names[i];
		p->art[i].file = files[i];
		p->art[i].fd = -EBADF;
		p->art[i].sparse = i == 1;
	}
	p->phase = EMBER__V1__PULL_PHASE__PULL_PHASE_DOWNLOADING;
	p->id = strdup(id);
	if (!p->id || asprintf(&p->dir, "%s/" PULL_DIR_PREFIX "%s", e->m->templates_dir, id) < 0) {
		p->dir = NULL;
		pull_free(p);
		return NULL;
	}
	return p;
}

/* A path that reaches a file of the pull's directory wherever a delete renamed it. */
static int pull_path(Pull *p, const char *name, char **ret)
{
	return asprintf(ret, "/proc/self/fd/%d/%s", p->dir_fd, name) < 0 ? -ENOMEM : 0;
}

static json_object *pull_to_json(Pull *p, const char *state, const char *reason)
{
	json_object *o = json_object_new_object();

	if (!o)
		return NULL;
	json_object_object_add(o, "id", json_object_new_string(p->id));
	json_object_object_add(o, "state", json_object_new_string(state));
	if (reason)
		json_object_object_add(o, "reason", json_object_new_string(reason));
	for (size_t i = 0; i < N_ARTIFACTS; i++) {
		PullArtifact *a = &p->art[i];
		if (!a->url)
			continue;
		json_object *ao = json_object_new_object();
		json_object_object_add(ao, "url", json_object_new_string(a->url));
		json_object_object_add(ao, "sha256", json_object_new_string(a->sha256));
		json_object_object_add(ao, "size_bytes", json_object_new_uint64(a->size));
		json_object_object_add(o, a->name, ao);
	}
	json_object_object_add(o, "boot_args", json_object_new_string(p->boot_args));
	json_object_object_add(o, "labels", kv_list_to_json(&p->labels));
	json_object_object_add(o, "create_time", timespec_to_json(&p->create_time));
	return o;
}

static int pull_record_write(Pull *p, const char *state, const char *reason)
{
	_cleanup_free_ char *path = NULL;
	json_object *o = pull_to_json(p, state, reason);
	int r;

	if (!o)
		return -ENOMEM;
	r = pull_path(p, PULL_RECORD, &path);
	if (r >= 0)
		r = record_write(path, o);
	json_object_put(o);
	return r;
}

/* Removes the pull's directory: its files through the fd, then the directory itself if it is
 * still where it was made (a delete may have renamed it, and a new pull of the id made
 * another one there since). */
static void pull_dir_remove(Pull *p)
{
	struct stat a, b;

	if (p->dir_fd < 0) {
		(void)rmdir(p->dir); /* made, never opened: empty */
		return;
	}
	(void)rm_rf_at(p->dir_fd);
	if (fstat(p->dir_fd, &a) == 0 && stat(p->dir, &b) == 0 && a.st_ino == b.st_ino &&
	    a.st_dev == b.st_dev)
		(void)rmdir(p->dir);
}

static bool sha256_valid(const char *s)
{
	if (!s || strlen(s) != 64)
		return false;
	for (size_t i = 0; i < 64; i++)
		if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f') ||
		      (s[i] >= 'A' && s[i] <= 'F')))
			return false;
	return true;
}

static bool url_valid(const char *u)
{
	/* Only http and https, with a host: curl would take many more schemes. */
	const char *host = strncasecmp(u, "http://", 7) == 0    ? u + 7
			   : strncasecmp(u, "https://", 8) == 0 ? u + 8
								: NULL;
	if (!host || !*host || *host == '/')
		return false;
	for (const char *c = u; *c; c++)
		if ((unsigned char)*c <= ' ' || *c == 0x7f)
			return false;
	return strlen(u) < 4096;
}

static int artifact_set(PullArtifact *a, const char *url, const char *sha256, uint64_t size)
{
	a->url = strdup(url);
	if (!a->url)
		return -ENOMEM;
	for (size_t i = 0; i < 64; i++)
		a->sha256[i] = (char)(sha256[i] >= 'A' && sha256[i] <= 'F' ? sha256[i] - 'A' + 'a'
									   : sha256[i]);
	a->sha256[64] = 0;
	a->size = size;
	atomic_store(&a->total, size);
	return 0;
}

static int pull_from_json(PullEngine *e, json_object *o, Pull **ret, bool *ret_failed,
			  char **ret_reason)
{
	const char *id = json_get_string(o, "id"), *state = json_get_string(o, "state");
	json_object *v;
	Pull *p;
	int r;

	if (!id || !id_is_valid(id) || !state)
		return -EBADMSG;
	p = pull_new(e, id);
	if (!p)
		return -ENOMEM;
	for (size_t i = 0; i < N_ARTIFACTS; i++) {
		if (!json_object_object_get_ex(o, p->art[i].name, &v))
			continue;
		const char *url = json_get_string(v, "url"), *sha = json_get_string(v, "sha256");
		if (!url || !url_valid(url) || !sha256_valid(sha)) {
			pull_free(p);
			return -EBADMSG;
		}
		if ((r = artifact_set(&p->art[i], url, sha, json_get_u64(v, "size_bytes"))) < 0) {
			pull_free(p);
			return r;
		}
	}
	p->boot_args = strdup(json_get_string(o, "boot_args") ?: "");
	json_object_object_get_ex(o, "labels", &v);
	r = p->boot_args ? kv_list_from_json(v, &p->labels) : -ENOMEM;
	if (r < 0 || !p->art[0].url || !p->art[1].url) {
		pull_free(p);
		return r < 0 ? r : -EBADMSG;
	}
	if (json_object_object_get_ex(o, "create_time", &v))
		timespec_from_json(v, &p->create_time);
	*ret_failed = strcmp(state, "failed") == 0;
	*ret_reason = strdup(json_get_string(o, "reason") ?: "the pull failed");
	if (!*ret_reason) {
		pull_free(p);
		return -ENOMEM;
	}
	p->resume = true;
	*ret = p;
	return 0;
}

/* Bytes received over the pull's artifacts; *ret_total (if asked) what is expected of them
 * (0 counted for an unknown size). */
static uint64_t pull_bytes(Pull *p, uint64_t *ret_total)
{
	uint64_t done = 0, total = 0;

	for (size_t i = 0; i < N_ARTIFACTS; i++) {
		done += atomic_load(&p->art[i].done);
		total += atomic_load(&p->art[i].total);
	}
	if (ret_total)
		*ret_total = total;
	return done;
}

/* ---- followers ---- */

static void pull_wake_locked(Pull *p)
{
	for (size_t i = 0; i < p->n_followers; i++)
		rpc_call_wake(p->followers[i]);
	p->last_wake = now_usec();
	p->last_done = pull_bytes(p, NULL);
}

static int pull_follow_locked(Pull *p, RpcCall *call)
{
	RpcCall **n = realloc(p->followers, (p->n_followers + 1) * sizeof(RpcCall *));
	if (!n)
		return -ENOMEM;
	p->followers = n;
	n[p->n_followers++] = call;
	return 0;
}

static void pull_unfollow_locked(Pull *p, RpcCall *call)
{
	for (size_t i = 0; i < p->n_followers; i++)
		if (p->followers[i] == call) {
			p->followers[i] = p->followers[--p->n_followers];
			return;
		}
}

static void pull_set_phase(Pull *p, Ember__V1__PullPhase phase)
{
	pthread_mutex_lock(&p->e->lock);
	p->phase = phase;
	pull_wake_locked(p);
	pthread_mutex_unlock(&p->e->lock);
}

/* ---- the hasher ---- */

#define HASH_CHUNK (4u << 20)
#define HASH_BATCH (1u << 20)
#define FLUSH_MIN  (8u << 20)

static void *hasher_main(void *userdata)
{
	PullEngine *e = userdata;
	char *buf = malloc(HASH_CHUNK);

	(void)pthread_setname_np(pthread_self(), "emberd-hash");

	pthread_mutex_lock(&e->hlock);
	while (!e->hstop) {
		PullArtifact *a = NULL;
		for (size_t i = 0; i < e->n_hjobs && !a; i++) {
			PullArtifact *j = e->hjobs[i];
			uint64_t pending = atomic_load(&j->done) - j->hashed;
			/* In batches: waking up for every few KiB received would cost more
			 * than the hashing. */
			if (!j->hashing && !j->hash_error && pending &&
			    (pending >= HASH_BATCH || j->hash_all))
				a = j;
		}
		if (!a) {
			pthread_cond_wait(&e->hcond, &e->hlock);
			continue;
		}
		uint64_t off = a->hashed, len = atomic_load(&a->done) - off;
		if (len > HASH_CHUNK)
			len = HASH_CHUNK;
		a->hashing = true;
		pthread_mutex_unlock(&e->hlock);

		/* [off, off + len) is written (done is stored after the write) and no reset
		 * happens while hashing is set: read it back from the page cache. */
		int r = buf ? 0 : -ENOMEM;
		uint64_t got = 0;
		while (r == 0 && got < len) {
			ssize_t n = pread(a->fd, buf + got, len - got, (off_t)(off + got));
			if (n < 0 && errno == EINTR)
				continue;
			if (n == 0) {
				/* past the end of a sparse file: zeros not written yet (the
				 * size is set when all bytes are in) */
				memset(buf + got, 0, len - got);
				break;
			}
			r = n < 0 ? -errno : 0;
			got += n > 0 ? (uint64_t)n : 0;
		}
		if (r == 0 && EVP_DigestUpdate(a->md, buf, len) != 1)
			r = -EIO;

		pthread_mutex_lock(&e->hlock);
		a->hashing = false;
		if (r < 0)
			a->hash_error = r;
		else
			a->hashed += len;
		pthread_cond_broadcast(&e->hcond);
		if (a->hashed >= a->flushed + FLUSH_MIN)
			pthread_cond_signal(&e->fcond);
		/* The engine waits for the last bytes of a finished transfer. */
		if (r < 0 || a->hashed == atomic_load(&a->done))
			curl_multi_wakeup(e->multi);
	}
	pthread_mutex_unlock(&e->hlock);
	free(buf);
	return NULL;
}

/* Writeback of what was hashed starts at once, on a thread of its own: sync_file_range()
 * blocks while the disk's queue is full, and neither the download nor the hashing should wait
 * for the disk; the sync before the install then has little left to write. */

static void *flusher_main(void *userdata)
{
	PullEngine *e = userdata;

	(void)pthread_setname_np(pthread_self(), "emberd-flush");
	pthread_mutex_lock(&e->hlock);
	while (!e->hstop) {
		PullArtifact *a = NULL;
		for (size_t i = 0; i < e->n_hjobs && !a; i++) {
			PullArtifact *j = e->hjobs[i];
			if (!j->flushing && j->hashed >= j->flushed + FLUSH_MIN)
				a = j;
		}
		if (!a) {
			pthread_cond_wait(&e->fcond, &e->hlock);
			continue;
		}
		uint64_t off = a->flushed, len = a->hashed - off;
		a->flushing = true;
		pthread_mutex_unlock(&e->hlock);
		(void)sync_file_range(a->fd, (off_t)off, (off_t)len, SYNC_FILE_RANGE_WRITE);
		pthread_mutex_lock(&e->hlock);
		a->flushing = false;
		a->flushed = off + len;
		pthread_cond_broadcast(&e->hcond);
	}
	pthread_mutex_unlock(&e->hlock);
	return NULL;
}

/* With hlock held: waits until neither the hasher nor the flusher uses a's file. */
static void hasher_idle_locked(PullEngine *e, PullArtifact *a)
{
	while (a->hashing || a->flushing)
		pthread_cond_wait(&e->hcond, &e->hlock);
}

static int hasher_add(PullEngine *e, PullArtifact *a)
{
	pthread_mutex_lock(&e->hlock);
	PullArtifact **n = realloc(e->hjobs, (e->n_hjobs + 1) * sizeof(PullArtifact *));
	if (!n) {
		pthread_mutex_unlock(&e->hlock);
		return -ENOMEM;
	}
	e->hjobs = n;
	n[e->n_hjobs++] = a;
	a->hash_listed = true;
	pthread_cond_broadcast(&e->hcond);
	pthread_mutex_unlock(&e->hlock);
	return 0;
}

static void hasher_remove(PullEngine *e, PullArtifact *a)
{
	pthread_mutex_lock(&e->hlock);
	hasher_idle_locked(e, a);
	for (size_t i = 0; a->hash_listed && i < e->n_hjobs; i++)
		if (e->hjobs[i] == a) {
			e->hjobs[i] = e->hjobs[--e->n_hjobs];
			break;
		}
	a->hash_listed = false;
	pthread_mutex_unlock(&e->hlock);
}

/* New bytes to hash: the hasher is woken for a batch, or for the rest once all are in. */
static void hasher_kick(PullEngine *e, PullArtifact *a, bool all)
{
	pthread_mutex_lock(&e->hlock);
	if (all)
		a->hash_all = true;
	if (all || atomic_load(&a->done) - a->hashed >= HASH_BATCH)
		pthread_cond_broadcast(&e->hcond);
	pthread_mutex_unlock(&e->hlock);
}

/* True when every byte received is hashed (or hashing failed). */
static bool hasher_caught_up(PullEngine *e, PullArtifact *a)
{
	pthread_mutex_lock(&e->hlock);
	bool yes = a->hash_error || (!a->hashing && a->hashed == atomic_load(&a->done));
	pthread_mutex_unlock(&e->hlock);
	return yes;
}

/* ---- transfers (engine thread) ---- */

static void artifact_stop(PullEngine *e, PullArtifact *a)
{
	if (a->easy) {
		curl_multi_remove_handle(e->multi, a->easy);
		curl_easy_cleanup(a->easy);
		a->easy = NULL;
	}
}

static void artifact_close(PullEngine *e, PullArtifact *a)
{
	artifact_stop(e, a);
	hasher_remove(e, a);
	if (a->fd >= 0) {
		close(a->fd);
		a->fd = -EBADF;
	}
}

static int artifact_reset(PullEngine *e, PullArtifact *a)
{
	int r = 0;

	pthread_mutex_lock(&e->hlock);
	hasher_idle_locked(e, a);
	if (ftruncate(a->fd, 0) < 0)
		r = -errno;
	else if (EVP_DigestInit_ex(a->md, EVP_sha256(), NULL) != 1)
		r = -EIO;
	atomic_store(&a->done, 0);
	a->hashed = 0;
	a->flushed = 0;
	a->hash_error = 0;
	a->hash_all = false;
	pthread_mutex_unlock(&e->hlock);
	a->from_disk = false;
	return r;
}

/* Writes data at offset off, skipping whole zero blocks of a sparse file. */
static int artifact_write(PullArtifact *a, const char *data, size_t n, uint64_t off)
{
	static const char zeros[SPARSE_BLOCK];

	if (!a->sparse) {
		while (n > 0) {
			ssize_t w = pwrite(a->fd, data, n, (off_t)off);
			if (w < 0 && errno == EINTR)
				continue;
			if (w < 0)
				return -errno;
			data += w, n -= (size_t)w, off += (uint64_t)w;
		}
		return 0;
	}
	while (n > 0) {
		/* A run of non-zero blocks is written at once; zero blocks are left as holes (the
		 * file is extended to its size at the end). */
		size_t head = SPARSE_BLOCK - (size_t)(off % SPARSE_BLOCK), run = 0;
		if (head > n)
			head = n;
		while (run < n) {
			size_t len =
				run == 0 ? head : (n - run < SPARSE_BLOCK ? n - run : SPARSE_BLOCK);
			if (memcmp(data + run, zeros, len) == 0)
				break;
			run += len;
		}
		if (run == 0) {
			size_t len = head;
			data += len, n -= len, off += len;
			continue;
		}
		size_t left = run;
		while (left > 0) {
			ssize_t w = pwrite(a->fd, data, left, (off_t)off);
			if (w < 0 && errno == EINTR)
				continue;
			if (w < 0)
				return -errno;
			data += w, left -= (size_t)w, n -= (size_t)w, off += (uint64_t)w;
		}
	}
	return 0;
}

static void artifact_fail(PullArtifact *a, RpcCode code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void artifact_fail(PullArtifact *a, RpcCode code, const char *fmt, ...)
{
	va_list ap;

	if (a->fail_code != RPC_OK)
		return;
	a->fail_code = code;
	va_start(ap, fmt);
	vsnprintf(a->why, sizeof(a->why), fmt, ap);
	va_end(ap);
}

/* The first body bytes of an attempt: the status, the range and the size are checked once. */
static bool artifact_check_response(Pull *p, PullArtifact *a)
{
	const Config *c = p->e->c;
	long status = 0;
	curl_off_t cl = -1;

	curl_easy_getinfo(a->easy, CURLINFO_RESPONSE_CODE, &status);
	curl_easy_getinfo(a->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
	a->checked = true;
	if (status < 200 || status > 299) {
		a->http_status = status;
		return false;
	}
	unsigned long long start = 0, end = 0, whole = 0;
	int got = status == 206
			  ? sscanf(a->content_range, "bytes %llu-%llu/%llu", &start, &end, &whole)
			  : 0;
	if (a->range_from > 0) {
		if (got >= 2 && start == a->range_from) {
			/* resumed where it stopped */
		} else {
			/* The server sent the whole file (200: no Range support) or another range:
			 * start over, the digest with it. */
			log_debug("pull %s: %s: resume from %llu refused (HTTP %ld%s%s), starting "
				  "over",
				  p->id, a->name, (unsigned long long)a->range_from, status,
				  a->content_range[0] ? ", " : "", a->content_range);
			int r = artifact_reset(p->e, a);
			if (r < 0) {
				artifact_fail(a, RPC_INTERNAL,
					      "%s: cannot restart the download: %s", a->name,
					      strerror(-r));
				return false;
			}
			if (status == 206) {
				/* another range than asked: the next attempt asks for all of it */
				msgf(a->why, sizeof(a->why), "unexpected Content-Range \"%s\"",
				     a->content_range);
				return false;
			}
			a->range_from = 0;
		}
	}
	/* The whole file's size: Content-Range's total, else where the body ends. */
	uint64_t announced = got == 3 && a->range_from > 0 ? whole
			     : cl >= 0                     ? a->range_from + (uint64_t)cl
							   : 0;
	if (a->size && announced && announced != a->size) {
		artifact_fail(a, RPC_DATA_LOSS,
			      "%s: the server announces %llu bytes, not size_bytes %llu", a->name,
			      (unsigned long long)announced, (unsigned long long)a->size);
		return false;
	}
	if (announced > c->max_artifact_bytes) {
		artifact_fail(a, RPC_RESOURCE_EXHAUSTED,
			      "%s: %llu bytes is more than max_artifact_bytes (%llu)", a->name,
			      (unsigned long long)announced,
			      (unsigned long long)c->max_artifact_bytes);
		return false;
	}
	if (!a->size)
		atomic_store(&a->total, announced);
	/* Enough room for what is still to come? (The rootfs is sparse: this errs safe.) */
	struct statvfs sv;
	uint64_t left = (a->size ?: announced) - atomic_load(&a->done);
	if (left && fstatvfs(a->fd, &sv) == 0 && (uint64_t)sv.f_bavail * sv.f_frsize < left) {
		artifact_fail(a, RPC_RESOURCE_EXHAUSTED,
			      "%s: not enough disk: %llu bytes to come, %llu free", a->name,
			      (unsigned long long)left,
			      (unsigned long long)sv.f_bavail * sv.f_frsize);
		return false;
	}
	return true;
}

static size_t on_body(char *data, size_t size, size_t nmemb, void *userdata)
{
	PullArtifact *a = userdata;
	Pull *p;
	size_t n = size * nmemb;
	int r;

	curl_easy_getinfo(a->easy, CURLINFO_PRIVATE, (char **)&p);
	/* A redirect's body is read to its end (curl knows the Location only then) and
	 * dropped; anything else wrong ends the transfer (CURLE_WRITE_ERROR). */
	bool redirect = a->http_status >= 300 && a->http_status < 400;
	if (a->checked && redirect)
		return n;
	if (!a->checked && !artifact_check_response(p, a))
		return a->http_status >= 300 && a->http_status < 400 ? n : 0;
	uint64_t done = atomic_load(&a->done);
	if (a->size && done + n > a->size) {
		artifact_fail(a, RPC_DATA_LOSS, "%s: the download grows past size_bytes %llu",
			      a->name, (unsigned long long)a->size);
		return 0;
	}
	if (done + n > p->e->c->max_artifact_bytes) {
		artifact_fail(a, RPC_RESOURCE_EXHAUSTED,
			      "%s: larger than max_artifact_bytes (%llu)", a->name,
			      (unsigned long long)p->e->c->max_artifact_bytes);
		return 0;
	}
	r = artifact_write(a, data, n, done);
	if (r < 0) {
		artifact_fail(a,
			      r == -ENOSPC || r == -EDQUOT ? RPC_RESOURCE_EXHAUSTED : RPC_INTERNAL,
			      "%s: cannot write: %s", a->name,
			      r == -ENOSPC || r == -EDQUOT ? "not enough disk" : strerror(-r));
		return 0;
	}
	atomic_store(&a->done, done + n);
	atomic_fetch_add(&p->e->bytes, n);
	a->last_rx = now_usec();
	/* a batch more since the last wake-up (the hasher takes everything pending) */
	if ((done + n) / HASH_BATCH != done / HASH_BATCH)
		hasher_kick(p->e, a, false);
	return n;
}

static size_t on_header(char *data, size_t size, size_t nmemb, void *userdata)
{
	PullArtifact *a = userdata;
	size_t n = size * nmemb;

	/* A new response (after a redirect or a 100 Continue) forgets the last one's range. */
	if (n >= 5 && strncmp(data, "HTTP/", 5) == 0)
		a->content_range[0] = 0;
	else if (n > 14 && strncasecmp(data, "Content-Range:", 14) == 0) {
		size_t len = n - 14;
		const char *v = data + 14;
		while (len && (*v == ' ' || *v == '\t'))
			v++, len--;
		while (len && (v[len - 1] == '\r' || v[len - 1] == '\n'))
			len--;
		if (len >= sizeof(a->content_range))
			len = sizeof(a->content_range) - 1;
		memcpy(a->content_range, v, len);
		a->content_range[len] = 0;
	}
	return n;
}

/* A transfer that received nothing for pull_stall_timeout_s is dropped (and retried). curl's
 * own LOW_SPEED_* looks at an average and takes several times as long to notice. */
static int on_progress(void *userdata, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
		       curl_off_t ulnow)
{
	PullArtifact *a = userdata;
	Pull *p = NULL;

	(void)dltotal, (void)dlnow, (void)ultotal, (void)ulnow;
	curl_easy_getinfo(a->easy, CURLINFO_PRIVATE, (char **)&p);
	uint64_t limit = (uint64_t)p->e->c->pull_stall_timeout_s * 1000000ULL;
	if (now_usec() - a->last_rx <= limit)
		return 0;
	msgf(a->why, sizeof(a->why), "no data for %u s", p->e->c->pull_stall_timeout_s);
	return 1;
}

static int artifact_start(Pull *p, PullArtifact *a)
{
	PullEngine *e = p->e;
	const Config *c = e->c;
	CURL *h = curl_easy_init();
	char range[32];

	if (!h)
		return -ENOMEM;
	a->easy = h;
	a->checked = false;
	a->http_status = 0;
	a->fail_code = RPC_OK;
	a->errbuf[0] = a->content_range[0] = a->why[0] = 0;
	a->range_from = atomic_load(&a->done);
	a->last_rx = now_usec();
	curl_easy_setopt(h, CURLOPT_URL, a->cur_url ?: a->url);
	curl_easy_setopt(h, CURLOPT_PRIVATE, p);
	curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
	curl_easy_setopt(h, CURLOPT_WRITEDATA, a);
	curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
	curl_easy_setopt(h, CURLOPT_HEADERDATA, a);
	curl_easy_setopt(h, CURLOPT_ERRORBUFFER, a->errbuf);
	curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
	/* Redirects are followed here (artifact_redirect()), not by curl: its protocol list
	 * cannot say "never back to http once on https" across several hops. */
	curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, 30L);
	curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, on_progress);
	curl_easy_setopt(h, CURLOPT_XFERINFODATA, a);
	curl_easy_setopt(h, CURLOPT_BUFFERSIZE, 512L * 1024);
	curl_easy_setopt(h, CURLOPT_USERAGENT, "emberd/" EMBER_VERSION);
	curl_easy_setopt(h, CURLOPT_ACCEPT_ENCODING, NULL); /* the bytes as stored */
	if (c->pull_ca_file && c->pull_ca_file[0])
		curl_easy_setopt(h, CURLOPT_CAINFO, c->pull_ca_file);
	if (a->range_from > 0) {
		snprintf(range, sizeof(range), "%llu-", (unsigned long long)a->range_from);
		curl_easy_setopt(h, CURLOPT_RANGE, range);
	}
	if (curl_multi_add_handle(e->multi, h) != CURLM_OK) {
		curl_easy_cleanup(h);
		a->easy = NULL;
		return -ENOMEM;
	}
	a->st = ART_RUNNING;
	return 0;
}

/* Opens (or, resuming, takes over) the artifact's file and its digest. */
static int artifact_open(Pull *p, PullArtifact *a, char **ret_error)
{
	int flags = O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW | (p->resume ? 0 : O_TRUNC);
	struct stat st;
	int r;

	a->md = EVP_MD_CTX_new();
	if (!a->md || EVP_DigestInit_ex(a->md, EVP_sha256(), NULL) != 1)
		return -ENOMEM;
	a->fd = openat(p->dir_fd, a->file, flags, 0600);
	if (a->fd < 0)
		return error_set(ret_error, -errno, "cannot create %s/%s: %m", p->dir, a->file);
	r = hasher_add(p->e, a);
	if (r < 0)
		return r;
	if (!p->resume || fstat(a->fd, &st) < 0 || st.st_size == 0)
		return 0;
	if (a->size && (uint64_t)st.st_size > a->size) {
		r = artifact_reset(p->e, a);
		return r < 0 ? error_set(ret_error, r, "cannot truncate %s: %m", a->file) : 0;
	}
	/* The digest covers the whole file: the hasher reads what the last run received while
	 * the rest arrives. */
	atomic_store(&a->done, (uint64_t)st.st_size);
	a->from_disk = true;
	hasher_kick(p->e, a, true);
	log_debug("pull %s: %s: resuming after %llu bytes kept on disk", p->id, a->name,
		  (unsigned long long)st.st_size);
	return 0;
}

/* How an attempt that ended with `res` goes on: RPC_OK to retry, or the pull's failure. */
static RpcCode artifact_classify(PullArtifact *a, CURLcode res, char *msg, size_t size)
{
	const char *why = a->why[0] ? a->why : a->errbuf[0] ? a->errbuf : curl_easy_strerror(res);

	if (a->fail_code != RPC_OK) {
		msgf(msg, size, "%s", a->why);
		return a->fail_code;
	}
	if (a->http_status) {
		long s = a->http_status;
		msgf(msg, size, "%s: HTTP %ld from %.300s", a->name, s, a->url);
		/* 408, 429 and 5xx are worth another try; another 4xx will not change. */
		if (s >= 400 && s < 500 && s != 408 && s != 429)
			return RPC_FAILED_PRECONDITION;
		return RPC_OK;
	}
	switch (res) {
	case CURLE_PEER_FAILED_VERIFICATION:
	case CURLE_SSL_CACERT_BADFILE:
	case CURLE_SSL_CERTPROBLEM:
	case CURLE_SSL_ISSUER_ERROR:
	case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
		msgf(msg, size, "%s: the server's certificate is not trusted: %s", a->name, why);
		return RPC_FAILED_PRECONDITION;
	case CURLE_URL_MALFORMAT:
	case CURLE_UNSUPPORTED_PROTOCOL:
		msgf(msg, size, "%s: bad URL: %s", a->name, why);
		return RPC_FAILED_PRECONDITION;
	default:
		msgf(msg, size, "%s: %s (%.300s)", a->name, why, a->url);
		return RPC_OK;
	}
}

static void pull_fail(Pull *p, RpcCode code, const char *msg);

/* Every byte of the artifact is in: its size and digest decide. */
static void artifact_complete(Pull *p, PullArtifact *a)
{
	uint64_t done = atomic_load(&a->done);
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned len = 0;
	char msg[512], hex[65];

	if (a->size && done != a->size) {
		msgf(msg, sizeof(msg), "%s: %llu bytes received, size_bytes is %llu", a->name,
		     (unsigned long long)done, (unsigned long long)a->size);
		pull_fail(p, RPC_DATA_LOSS, msg);
		return;
	}
	if (a->sparse && (done == 0 || done % 512)) {
		msgf(msg, sizeof(msg),
		     "%s: %llu bytes is not a positive multiple of 512: not a disk image", a->name,
		     (unsigned long long)done);
		pull_fail(p, RPC_INVALID_ARGUMENT, msg);
		return;
	}
	if (a->hash_error) {
		msgf(msg, sizeof(msg), "%s: cannot hash the file: %s", a->name,
		     strerror(-a->hash_error));
		pull_fail(p, RPC_INTERNAL, msg);
		return;
	}
	if (EVP_DigestFinal_ex(a->md, md, &len) != 1 || len != 32) {
		pull_fail(p, RPC_INTERNAL, "sha256 failed");
		return;
	}
	for (unsigned i = 0; i < 32; i++)
		snprintf(hex + 2 * (size_t)i, 3, "%02x", md[i]);
	if (strcmp(hex, a->sha256) != 0) {
		if (a->from_disk) {
			/* Bytes a previous run left may not have reached the disk before a crash:
			 * fetch it all once more before calling it corrupt. */
			log_info("pull %s: %s: sha256 mismatch after resuming from disk; "
				 "downloading it again from the start",
				 p->id, a->name);
			if (artifact_reset(p->e, a) < 0) {
				pull_fail(p, RPC_INTERNAL, "cannot restart the download");
				return;
			}
			a->st = ART_WAITING;
			a->retry_at = 0;
			return;
		}
		msgf(msg, sizeof(msg), "%s: sha256 of the %llu bytes from %.300s is %s, not %s",
		     a->name, (unsigned long long)done, a->url, hex, a->sha256);
		pull_fail(p, RPC_DATA_LOSS, msg);
		return;
	}
	/* Holes the sparse writes left at the end make up the size. */
	if (ftruncate(a->fd, (off_t)done) < 0) {
		int r = -errno;
		msgf(msg, sizeof(msg), "%s: cannot set its size: %s", a->name, strerror(-r));
		pull_fail(p, r == -ENOSPC ? RPC_RESOURCE_EXHAUSTED : RPC_INTERNAL, msg);
		return;
	}
	atomic_store(&a->total, done);
	a->st = ART_DONE;
}

static bool url_https(const char *u)
{
	return strncasecmp(u, "https:", 6) == 0;
}

/* A 3xx: the next request goes to its Location, if that is http(s), and never from an https
 * hop (the first URL or any on the way) to http. */
static void artifact_redirect(Pull *p, PullArtifact *a, const char *location)
{
	const char *from = a->cur_url ?: a->url;
	char msg[640];

	if (!location) {
		msgf(msg, sizeof(msg), "%s: HTTP %ld without a Location from %.300s", a->name,
		     a->http_status, from);
		pull_fail(p, RPC_FAILED_PRECONDITION, msg);
		return;
	}
	if (!url_valid(location)) {
		msgf(msg, sizeof(msg), "%s: redirect to \"%.200s\" refused (only http and https)",
		     a->name, location);
		pull_fail(p, RPC_FAILED_PRECONDITION, msg);
		return;
	}
	if (url_https(from) && !url_https(location)) {
		msgf(msg, sizeof(msg),
		     "%s: redirect from https to \"%.200s\" refused (never back "
		     "to http)",
		     a->name, location);
		pull_fail(p, RPC_FAILED_PRECONDITION, msg);
		return;
	}
	if (++a->redirects > 10) {
		msgf(msg, sizeof(msg), "%s: more than 10 redirects from %.300s", a->name, a->url);
		pull_fail(p, RPC_FAILED_PRECONDITION, msg);
		return;
	}
	char *next = strdup(location);
	if (!next) {
		pull_fail(p, RPC_RESOURCE_EXHAUSTED, "out of memory");
		return;
	}
	free(a->cur_url);
	a->cur_url = next;
	a->st = ART_WAITING;
	a->retry_at = 0;
	log_debug("pull %s: %s: redirected to %s", p->id, a->name, next);
}

/* An attempt ended: done, retried later, or the pull fails. */
static void artifact_ended(Pull *p, PullArtifact *a, CURLcode res)
{
	PullEngine *e = p->e;
	char msg[512];
	bool progressed = atomic_load(&a->done) > a->range_from;

	/* A body-less answer (an error status, an empty file) never reached on_body(). */
	if (res == CURLE_OK && !a->checked)
		(void)artifact_check_response(p, a);
	char *location = NULL;
	long s = a->http_status;
	if ((s == 301 || s == 302 || s == 303 || s == 307 || s == 308) &&
	    curl_easy_getinfo(a->easy, CURLINFO_REDIRECT_URL, &location) == CURLE_OK && location)
		location = strdup(location);
	else
		location = NULL;
	artifact_stop(e, a);
	if (res == CURLE_OK && !a->http_status && a->fail_code == RPC_OK) {
		/* complete once the hasher has caught up (engine_turn) */
		a->st = ART_HASHING;
		hasher_kick(e, a, true);
		return;
	}
	if (location || (s >= 300 && s < 400 && s != 304)) {
		artifact_redirect(p, a, location);
		free(location);
		return;
	}
	unsigned long long whole = 0;
	if (s == 416 && a->range_from > 0 &&
	    sscanf(a->content_range, "bytes */%llu", &whole) == 1 && whole == a->range_from) {
		/* what a previous attempt or run received is the whole file */
		a->st = ART_HASHING;
		hasher_kick(e, a, true);
		return;
	}
	if (s == 416 && a->range_from > 0) {
		/* The range asked for is past the server's file: it changed. Start over. */
		if (artifact_reset(p->e, a) < 0) {
			pull_fail(p, RPC_INTERNAL, "cannot restart the download");
			return;
		}
		a->st = ART_WAITING;
		a->retry_at = 0;
		return;
	}
	RpcCode code = artifact_classify(a, res, msg, sizeof(msg));
	if (code != RPC_OK) {
		pull_fail(p, code, msg);
		return;
	}
	if (progressed)
		a->failures = 0;
	if (++a->failures > e->c->pull_retries) {
		char full[640];
		msgf(full, sizeof(full), "%s; gave up after %u attempts", msg, a->failures);
		pull_fail(p, RPC_UNAVAILABLE, full);
		return;
	}
	unsigned shift = a->failures - 1 > 10 ? 10 : a->failures - 1;
	uint64_t delay = (uint64_t)e->c->pull_retry_delay_ms << shift;
	if (delay > RETRY_MAX_DELAY_MS)
		delay = RETRY_MAX_DELAY_MS;
	a->retry_at = now_usec() + delay * 1000;
	a->st = ART_WAITING;
	/* from the URL asked for: a redirect's target may be short-lived (a signed URL) */
	free(a->cur_url);
	a->cur_url = NULL;
	a->redirects = 0;
	atomic_fetch_add(&e->retries, 1);
	log_info("pull %s: %s; retrying in %llu ms (attempt %u of %u)", p->id, msg,
		 (unsigned long long)delay, a->failures + 1, e->c->pull_retries + 1);
}

/* ---- the pull's end ---- */

static void engine_remove_locked(PullEngine *e, Pull *p)
{
	for (size_t i = 0; i < e->n_pulls; i++)
		if (e->pulls[i] == p) {
			memmove(&e->pulls[i], &e->pulls[i + 1],
				(e->n_pulls - i - 1) * sizeof(Pull *));
			e->n_pulls--;
			return;
		}
}

/* The pull is over: its followers learn how, the engine lets it go. */
static void pull_finish(Pull *p, RpcCode code, const char *msg)
{
	PullEngine *e = p->e;

	/* Off the hasher's and flusher's lists before anyone may free it (their fds stay
	 * open until the pull is freed). */
	for (size_t i = 0; i < N_ARTIFACTS; i++)
		hasher_remove(e, &p->art[i]);
	pthread_mutex_lock(&e->lock);
	if (p->finished) {
		pthread_mutex_unlock(&e->lock);
		return;
	}
	p->finished = true;
	p->code = code;
	p->error = msg ? strdup(msg) : NULL;
	if (code == RPC_OK)
		p->phase = EMBER__V1__PULL_PHASE__PULL_PHASE_DONE;
	bool held = p->in_engine;
	if (held)
		engine_remove_locked(e, p);
	p->in_engine = false;
	pull_wake_locked(p);
	/* under the lock: once the pull is off the list, pull_engine_free() may free e */
	atomic_fetch_add(code == RPC_OK ? &e->done_ok : &e->done_failed, 1);
	pthread_mutex_unlock(&e->lock);
	if (held)
		pull_unref(p); /* the engine's */
}

static bool pull_aborted(Pull *p)
{
	pthread_mutex_lock(&p->e->lock);
	bool aborted = p->aborted;
	pthread_mutex_unlock(&p->e->lock);
	return aborted;
}

/* Fails the pull: transfers stopped, files removed, the template FAILED with the reason. */
static void pull_fail(Pull *p, RpcCode code, const char *msg)
{
	PullEngine *e = p->e;
	Manager *m = e->m;

	for (size_t i = 0; i < N_ARTIFACTS; i++)
		artifact_close(e, &p->art[i]);
	/* Whether a delete came first is decided under the manager's lock, where deletes
	 * happen (a record written into a directory a delete renamed meanwhile goes with it, or
	 * with the next start's clean-up). The record says "failed" before the files go, so that
	 * a crash in between still leaves a FAILED template (whose files the next start
	 * removes). */
	if (p->dir_fd >= 0 && !pull_aborted(p) && pull_record_write(p, "failed", msg) < 0)
		log_debug("pull %s: cannot record its failure", p->id);
	crash_point("pull", "failed-record");
	pthread_mutex_lock(&m->lock);
	Template *t = manager_template_find_locked(m, p->id);
	bool ours = t && t->pull == p;
	if (ours) {
		t->state = EMBER__V1__TEMPLATE_STATE__TEMPLATE_STATE_FAILED;
		free(t->state_reason);
		t->state_reason = strdup(msg);
		t->pull = NULL;
		pull_unref(p); /* the template's */
	}
	pthread_mutex_unlock(&m->lock);
	for (size_t i = 0; ours && i < N_ARTIFACTS; i++)
		if (p->art[i].url && p->dir_fd >= 0)
			(void)unlinkat(p->dir_fd, p->art[i].file, 0);
	if (!ours) {
		pull_finish(p, RPC_ABORTED, "the template was deleted during its pull");
		return;
	}
	log_struct(LOG_WARNING, 0,
		   LOG_FIELDS({"MESSAGE_ID", EMBER_MESSAGE_TEMPLATE_PULL_FAILED}, {"OP", "pull"},
			      {"TEMPLATE_ID", p->id}),
		   "pull of template %s failed (%s): %s", p->id, rpc_code_to_string(code), msg);
	pull_finish(p, code, msg);
}

static int file_info_set(TemplateFileInfo *f, const char *final_dir, PullArtifact *a)
{
	if (asprintf(&f->path, "%s/%s", final_dir, a->file) < 0) {
		f->path = NULL;
		return -ENOMEM;
	}
	f->source = strdup(a->url);
	if (!f->source)
		return -ENOMEM;
	f->size_bytes = atomic_load(&a->done);
	memcpy(f->sha256, a->sha256, 65);
	return 0;
}

/* VERIFYING and INSTALLING, on a thread of its own: syncing a large file takes a while and
 * the engine thread goes on with the other transfers meanwhile. */
static void *install_main(void *userdata)
{
	Pull *p = userdata;
	Manager *m = p->e->m;
	_cleanup_free_ char *final = NULL, *rec = NULL;
	TemplateFileInfo files[N_ARTIFACTS] = {};
	uint64_t t0 = now_usec(), bytes = 0;
	char msg[512] = "";
	RpcCode code = RPC_INTERNAL;
	int r = 0;

	pull_set_phase(p, EMBER__V1__PULL_PHASE__PULL_PHASE_INSTALLING);
	/* The record must never name files a power cut could leave short. */
	for (size_t i = 0; i < N_ARTIFACTS && r >= 0; i++)
		if (p->art[i].url && fsync(p->art[i].fd) < 0)
			r = -errno;
	if (r >= 0 && (asprintf(&final, "%s/%s", m->templates_dir, p->id) < 0 ||
		       pull_path(p, "template.json", &rec) < 0))
		r = -ENOMEM;
	for (size_t i = 0; i < N_ARTIFACTS && r >= 0; i++)
		if (p->art[i].url) {
			r = file_info_set(&files[i], final, &p->art[i]);
			bytes += files[i].size_bytes;
		}
	if (r < 0) {
		msgf(msg, sizeof(msg), "cannot install the files: %s", strerror(-r));
		code = r == -ENOSPC || r == -EDQUOT ? RPC_RESOURCE_EXHAUSTED : RPC_INTERNAL;
		goto fail;
	}
	/* The record as RegisterTemplate writes it, naming the final paths; valid once the
	 * directory is renamed. */
	Template rect = {.id = p->id,
			 .state = EMBER__V1__TEMPLATE_STATE__TEMPLATE_STATE_READY,
			 .kernel = files[0],
			 .rootfs = files[1],
			 .initrd = files[2],
			 .boot_args = p->boot_args,
			 .labels = p->labels,
			 .create_time = p->create_time};
	r = template_record_write(&rect, rec);
	crash_point("pull", "template-record");
	if (r < 0) {
		msgf(msg, sizeof(msg), "cannot write the template record: %s", strerror(-r));
		code = r == -ENOSPC || r == -EDQUOT ? RPC_RESOURCE_EXHAUSTED : RPC_INTERNAL;
		goto fail;
	}

	pthread_mutex_lock(&m->lock);
	Template *t = manager_template_find_locked(m, p->id);
	if (!t || t->pull != p || pull_aborted(p)) {
		pthread_mutex_unlock(&m->lock);
		for (size_t i = 0; i < N_ARTIFACTS; i++)
			free(files[i].path), free(files[i].source);
		pull_finish(p, RPC_ABORTED, "the template was deleted during its pull");
		pull_unref(p);
		return NULL;
	}
	if (rename(p->dir, final) < 0) {
		r = -errno;
		pthread_mutex_unlock(&m->lock);
		msgf(msg, sizeof(msg), "cannot rename %s to %s: %s", p->dir, final, strerror(-r));
		goto fail;
	}
	t->state = EMBER__V1__TEMPLATE_STATE__TEMPLATE_STATE_READY;
	t->kernel = files[0];
	t->rootfs = files[1];
	t->initrd = files[2];
	memset(files, 0, sizeof(files));
	if (storage_usage_file(t->rootfs.path, &t->rootfs_disk_used) < 0)
		t->rootfs_disk_used = 0;
	t->pull = NULL;
	pthread_mutex_unlock(&m->lock);
	pull_unref(p);                      /* the template's */
	(void)fsync_path(m->templates_dir); /* the rename, for a power cut */
	crash_point("pull", "installed");
	(void)unlinkat(p->dir_fd, PULL_RECORD, 0);
	(void)fsync(p->dir_fd);
	for (size_t i = 0; i < N_ARTIFACTS; i++)
		artifact_close(p->e, &p->art[i]);
	uint64_t us = now_usec() - t0;
	struct timespec now;
	clock_gettime(CLOCK_REALTIME, &now);
	double secs = (double)(now.tv_sec - p->create_time.tv_sec) +
		      (double)(now.tv_nsec - p->create_time.tv_nsec) / 1e9;
	char dur[32];
	snprintf(dur, sizeof(dur), "%llu", (unsigned long long)us);
	log_struct(LOG_INFO, 0,
		   LOG_FIELDS({"MESSAGE_ID", EMBER_MESSAGE_TEMPLATE_PULLED}, {"OP", "pull"},
			      {"STEP", "install"}, {"TEMPLATE_ID", p->id}, {"DURATION_US", dur}),
		   "template %s pulled: %llu bytes in %.1f s, READY", p->id,
		   (unsigned long long)bytes, secs);
	pull_finish(p, RPC_OK, NULL);
	pull_unref(p);
	return NULL;
fail:
	for (size_t i = 0; i < N_ARTIFACTS; i++)
		free(files[i].path), free(files[i].source);
	pull_fail(p, code, msg);
	pull_unref(p);
	return NULL;
}

/* Every artifact is in: the rest happens off the engine thread. */
static void pull_downloaded(Pull *p)
{
	pthread_attr_t attr;
	pthread_t t;

	pthread_mutex_lock(&p->e->lock);
	p->installing = true;
	p->phase = EMBER__V1__PULL_PHASE__PULL_PHASE_VERIFYING;
	pull_wake_locked(p);
	pthread_mutex_unlock(&p->e->lock);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	pull_ref(p);
	if (pthread_create(&t, &attr, install_main, p) != 0) {
		pull_unref(p);
		pull_fail(p, RPC_RESOURCE_EXHAUSTED, "cannot start the install thread");
	}
	pthread_attr_destroy(&attr);
}

/* ---- the engine thread ---- */

static void pull_begin(Pull *p)
{
	_cleanup_free_ char *err = NULL;
	int r = 0;

	for (size_t i = 0; i < N_ARTIFACTS && r >= 0; i++)
		if (p->art[i].url)
			r = artifact_open(p, &p->art[i], &err);
	if (r < 0) {
		char msg[512];
		msgf(msg, sizeof(msg), "%s", err ?: strerror(-r));
		pull_fail(p, r == -ENOSPC || r == -EDQUOT ? RPC_RESOURCE_EXHAUSTED : RPC_INTERNAL,
			  msg);
		return;
	}
	p->resume = false;
	log_struct(LOG_INFO, 0,
		   LOG_FIELDS({"MESSAGE_ID", EMBER_MESSAGE_TEMPLATE_PULL_STARTED}, {"OP", "pull"},
			      {"TEMPLATE_ID", p->id}),
		   "pulling template %s (kernel %s, rootfs %s%s%s)", p->id, p->art[0].url,
		   p->art[1].url, p->art[2].url ? ", initrd " : "", p->art[2].url ?: "");
}

/* µs until the next retry is due (UINT64_MAX: none). Engine thread. */
static uint64_t engine_next_retry(PullEngine *e)
{
	uint64_t now = now_usec(), next = UINT64_MAX;

	pthread_mutex_lock(&e->lock);
	for (size_t i = 0; i < e->n_pulls; i++)
		for (size_t k = 0; k < N_ARTIFACTS; k++) {
			PullArtifact *a = &e->pulls[i]->art[k];
			if (!a->url || a->st != ART_WAITING || a->fd < 0)
				continue;
			uint64_t in = a->retry_at > now ? a->retry_at - now : 0;
			if (in < next)
				next = in;
		}
	pthread_mutex_unlock(&e->lock);
	return next;
}

/* True when every artifact of p other than a is in. */
static bool all_done_but(Pull *p, const PullArtifact *a)
{
	for (size_t k = 0; k < N_ARTIFACTS; k++)
		if (&p->art[k] != a && p->art[k].url && p->art[k].st != ART_DONE)
			return false;
	return true;
}

/* One turn over the pulls: aborts, starts, due retries, completions, wake-ups. */
static void engine_turn(PullEngine *e)
{
	uint64_t now = now_usec();
	_cleanup_free_ Pull **list = NULL;
	size_t n, running = 0;

	pthread_mutex_lock(&e->lock);
	n = e->n_pulls;
	list = malloc((n ?: 1) * sizeof(Pull *));
	if (!list) {
		pthread_mutex_unlock(&e->lock);
		return;
	}
	for (size_t i = 0; i < n; i++) {
		list[i] = pull_ref(e->pulls[i]);
		if (list[i]->started && !list[i]->installing)
			running++;
	}
	pthread_mutex_unlock(&e->lock);

	for (size_t i = 0; i < n; i++) {
		Pull *p = list[i];
		pthread_mutex_lock(&e->lock);
		bool aborted = p->aborted, started = p->started, installing = p->installing;
		if (!started && !aborted && running < e->c->max_parallel_pulls) {
			p->started = started = true;
			running++;
		}
		pthread_mutex_unlock(&e->lock);
		if (installing)
			goto next;
		if (aborted) {
			for (size_t k = 0; k < N_ARTIFACTS; k++)
				artifact_close(e, &p->art[k]);
			pull_finish(p, RPC_ABORTED, "the template was deleted during its pull");
			goto next;
		}
		if (!started)
			goto next;
		if (p->art[0].fd < 0) {
			pull_begin(p);
			if (p->art[0].fd < 0)
				goto next; /* failed */
		}
		bool all_done = true, failed = false;
		for (size_t k = 0; k < N_ARTIFACTS && !failed; k++) {
			PullArtifact *a = &p->art[k];
			if (!a->url || a->st == ART_DONE)
				continue;
			all_done = false;
			if (a->st == ART_WAITING && a->from_disk && a->size &&
			    atomic_load(&a->done) == a->size)
				a->st = ART_HASHING; /* a previous run received all of it */
			if (a->st == ART_HASHING) {
				if (!hasher_caught_up(e, a))
					continue;
				artifact_complete(p, a);
				pthread_mutex_lock(&e->lock);
				failed = p->finished;
				pthread_mutex_unlock(&e->lock);
				/* done now: it does not hold the pull back (no other turn comes
				 * while nothing runs) */
				if (a->st == ART_DONE)
					all_done = all_done_but(p, a);
				continue;
			}
			if (a->st == ART_WAITING && a->retry_at <= now) {
				if (artifact_start(p, a) < 0) {
					pull_fail(p, RPC_RESOURCE_EXHAUSTED,
						  "cannot start a transfer");
					failed = true;
				}
			}
		}
		if (failed)
			goto next;
		if (all_done) {
			pull_downloaded(p);
			goto next;
		}
		pthread_mutex_lock(&e->lock);
		if (pull_bytes(p, NULL) != p->last_done && now - p->last_wake >= WAKE_INTERVAL_USEC)
			pull_wake_locked(p);
		pthread_mutex_unlock(&e->lock);
	next:
		pull_unref(p);
	}
}

static void *engine_main(void *userdata)
{
	PullEngine *e = userdata;

	(void)pthread_setname_np(pthread_self(), "emberd-pull");

	for (;;) {
		int running = 0;
		CURLMsg *msg;
		int left;

		pthread_mutex_lock(&e->lock);
		bool stop = e->stop;
		pthread_mutex_unlock(&e->lock);
		if (stop)
			break;
		engine_turn(e);
		curl_multi_perform(e->multi, &running);
		while ((msg = curl_multi_info_read(e->multi, &left))) {
			if (msg->msg != CURLMSG_DONE)
				continue;
			Pull *p = NULL;
			CURL *h = msg->easy_handle;
			CURLcode res = msg->data.result;
			curl_easy_getinfo(h, CURLINFO_PRIVATE, (char **)&p);
			e->again = true;
			for (size_t k = 0; p && k < N_ARTIFACTS; k++)
				if (p->art[k].easy == h) {
					pull_ref(p);
					artifact_ended(p, &p->art[k], res);
					pull_unref(p);
					break;
				}
		}
		/* Wake at the next retry, for the followers' 100 ms, or when curl needs it. */
		uint64_t next_retry = engine_next_retry(e);
		long curl_ms = -1;
		curl_multi_timeout(e->multi, &curl_ms);
		/* Idle (no pull at all): nothing is due until curl_multi_wakeup() says so. */
		pthread_mutex_lock(&e->lock);
		bool idle = e->n_pulls == 0;
		pthread_mutex_unlock(&e->lock);
		uint64_t wait_ms = running ? WAKE_INTERVAL_USEC / 1000 : idle ? 3600 * 1000 : 1000;
		if (curl_ms >= 0 && (uint64_t)curl_ms < wait_ms)
			wait_ms = (uint64_t)curl_ms;
		if (next_retry != UINT64_MAX && next_retry / 1000 < wait_ms)
			wait_ms = next_retry / 1000;
		/* A transfer that ended may complete its pull (its hashing may be done already,
		 * and then nothing else wakes us). */
		if (e->again)
			wait_ms = 0;
		e->again = false;
		curl_multi_poll(e->multi, NULL, 0, (int)wait_ms, NULL);
	}

	/* Stopping: transfers end here and resume at the next start (the records stay). */
	pthread_mutex_lock(&e->lock);
	size_t n = e->n_pulls;
	Pull **list = malloc((n ?: 1) * sizeof(Pull *));
	for (size_t i = 0; list && i < n; i++)
		list[i] = pull_ref(e->pulls[i]);
	pthread_mutex_unlock(&e->lock);
	for (size_t i = 0; list && i < n; i++) {
		for (size_t k = 0; k < N_ARTIFACTS; k++)
			artifact_stop(e, &list[i]->art[k]);
		if (!list[i]->installing)
			pull_finish(list[i], RPC_UNAVAILABLE,
				    "emberd is stopping; the pull goes on at its next start");
		pull_unref(list[i]);
	}
	free(list);
	return NULL;
}

int pull_engine_new(Manager *m, PullEngine **ret)
{
	PullEngine *e = calloc(1, sizeof(*e));

	if (!e)
		return -ENOMEM;
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
		free(e);
		return -ENOMEM;
	}
	e->m = m;
	e->c = m->config;
	pthread_mutex_init(&e->lock, NULL);
	pthread_mutex_init(&e->hlock, NULL);
	pthread_cond_init(&e->hcond, NULL);
	pthread_cond_init(&e->fcond, NULL);
	e->multi = curl_multi_init();
	if (!e->multi) {
		pthread_mutex_destroy(&e->lock);
		pthread_mutex_destroy(&e->hlock);
		pthread_cond_destroy(&e->hcond);
		pthread_cond_destroy(&e->fcond);
		free(e);
		return -ENOMEM;
	}
	*ret = e;
	return 0;
}

int pull_engine_start(PullEngine *e)
{
	if (e->started)
		return 0;
	if (pthread_create(&e->hasher, NULL, hasher_main, e) != 0)
		return -EAGAIN;
	e->hasher_started = true;
	if (pthread_create(&e->flusher, NULL, flusher_main, e) != 0)
		return -EAGAIN;
	e->flusher_started = true;
	if (pthread_create(&e->thread, NULL, engine_main, e) != 0)
		return -EAGAIN;
	e->started = true;
	return 0;
}

void pull_engine_free(PullEngine *e)
{
	if (!e)
		return;
	if (e->started) {
		pthread_mutex_lock(&e->lock);
		e->stop = true;
		pthread_mutex_unlock(&e->lock);
		curl_multi_wakeup(e->multi);
		pthread_join(e->thread, NULL);
	}
	/* Install threads still running hold references to their pulls, not to the engine's
	 * lock or handles after they finish; they finish before the manager is freed because
	 * the manager's free waits for them below. */
	for (;;) {
		pthread_mutex_lock(&e->lock);
		size_t n = e->n_pulls;
		pthread_mutex_unlock(&e->lock);
		if (n == 0 || !e->started)
			break;
		usleep(10000);
	}
	if (e->hasher_started) {
		pthread_mutex_lock(&e->hlock);
		e->hstop = true;
		pthread_cond_broadcast(&e->hcond);
		pthread_cond_broadcast(&e->fcond);
		pthread_mutex_unlock(&e->hlock);
		pthread_join(e->hasher, NULL);
		if (e->flusher_started)
			pthread_join(e->flusher, NULL);
	}
	pthread_mutex_lock(&e->lock);
	for (size_t i = 0; i < e->n_pulls; i++)
		pull_unref(e->pulls[i]);
	free(e->pulls);
	pthread_mutex_unlock(&e->lock);
	/* Pulls that templates still hold close their files when those go; none is hashed
	 * any more. */
	pthread_mutex_lock(&e->hlock);
	for (size_t i = 0; i < e->n_hjobs; i++)
		e->hjobs[i]->hash_listed = false;
	free(e->hjobs);
	pthread_mutex_unlock(&e->hlock);
	curl_multi_cleanup(e->multi);
	pthread_mutex_destroy(&e->lock);
	pthread_mutex_destroy(&e->hlock);
	pthread_cond_destroy(&e->hcond);
	pthread_cond_destroy(&e->fcond);
	free(e);
}

static int engine_add(PullEngine *e, Pull *p)
{
	pthread_mutex_lock(&e->lock);
	Pull **n = realloc(e->pulls, (e->n_pulls + 1) * sizeof(Pull *));
	if (!n) {
		pthread_mutex_unlock(&e->lock);
		return -ENOMEM;
	}
	e->pulls = n;
	n[e->n_pulls++] = pull_ref(p); /* the engine's */
	p->in_engine = true;
	pthread_mutex_unlock(&e->lock);
	curl_multi_wakeup(e->multi);
	return 0;
}

/* (L) DeleteTemplate of a PULLING template: the engine ends the pull (ABORTED). */
void pull_abort_locked(Pull *p)
{
	pthread_mutex_lock(&p->e->lock);
	p->aborted = true;
	pthread_mutex_unlock(&p->e->lock);
	curl_multi_wakeup(p->e->multi);
}

/* ---- start-up ---- */

/* A .pull-<id> directory found at start: a PULLING template whose pull goes on, or a FAILED
 * one. *ret is inserted by the caller. */
int pull_load(Manager *m, const char *dir, Template **ret, char **ret_error)
{
	_cleanup_free_ char *rec = NULL;
	json_object *o = NULL;
	Pull *p = NULL;
	bool failed = false;
	_cleanup_free_ char *reason = NULL;
	int r;

	if (asprintf(&rec, "%s/" PULL_RECORD, dir) < 0)
		return -ENOMEM;
	r = record_read(rec, &o, ret_error);
	if (r < 0)
		return r;
	r = pull_from_json(m->pulls, o, &p, &failed, &reason);
	json_object_put(o);
	if (r < 0)
		return error_set(ret_error, r, "%s: not a pull record", rec);
	if (strcmp(strrchr(dir, '/') + 1 + strlen(PULL_DIR_PREFIX), p->id) != 0) {
		pull_free(p);
		return error_set(ret_error, -EBADMSG, "%s: the record is of another id", rec);
	}
	Template *t = calloc(1, sizeof(*t));
	if (!t || !(t->id = strdup(p->id)) || !(t->boot_args = strdup(p->boot_args))) {
		template_free(t);
		pull_free(p);
		return -ENOMEM;
	}
	t->create_time = p->create_time;
	r = kv_list_copy(&p->labels, &t->labels);
	if (r < 0) {
		template_free(t);
		pull_free(p);
		return r;
	}
	if (failed) {
		/* a crash between the record and the removal of the files leaves them */
		for (size_t i = 0; i < N_ARTIFACTS; i++) {
			_cleanup_free_ char *f = NULL;
			if (asprintf(&f, "%s/%s", dir, p->art[i].file) >= 0)
				(void)unlink(f);
		}
		t->state = EMBER__V1__TEMPLATE_STATE__TEMPLATE_STATE_FAILED;
		t->state_reason = TAKE_PTR(reason);
		pull_free(p);
		*ret = t;
		return 0;
	}
	p->dir_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (p->dir_fd < 0 || (r = engine_add(m->pulls, p)) < 0) {
		r = p->dir_fd < 0 ? -errno : r;
		template_free(t);
		pull_free(p);
		return error_set(ret_error, r, "cannot resume the pull in %s: %m", dir);
	}
	t->state = EMBER__V1__TEMPLATE_STATE__TEMPLATE_STATE_PULLING;
	t->pull = p; /* the reference pull_new gave */
	log_info("template %s: resuming its pull", p->id);
	*ret = t;
	return 0;
}

bool pull_dir_name(const char *name)
{
	return strncmp(name, PULL_DIR_PREFIX, strlen(PULL_DIR_PREFIX)) == 0;
}

/* ---- metrics and status ---- */

void pull_write_metrics(PullEngine *e, FILE *f)
{
	if (!e)
		return;
	pthread_mutex_lock(&e->lock);
	fprintf(f,
		"# HELP ember_template_pulls Template pulls not finished.\n"
		"# TYPE ember_template_pulls gauge\nember_template_pulls %zu\n",
		e->n_pulls);
	fprintf(f, "# HELP ember_template_pull_artifact_bytes Bytes of each artifact of a pull in "
		   "progress: received (done) and expected (total, 0 unknown).\n"
		   "# TYPE ember_template_pull_artifact_bytes gauge\n");
	for (size_t i = 0; i < e->n_pulls; i++) {
		Pull *p = e->pulls[i];
		for (size_t k = 0; k < N_ARTIFACTS; k++) {
			PullArtifact *a = &p->art[k];
			if (!a->url)
				continue;
			fprintf(f,
				"ember_template_pull_artifact_bytes{template=\"%s\",artifact=\"%"
				"s\","
				"kind=\"done\"} %llu\n"
				"ember_template_pull_artifact_bytes{template=\"%s\",artifact=\"%"
				"s\","
				"kind=\"total\"} %llu\n",
				p->id, a->name, (unsigned long long)atomic_load(&a->done), p->id,
				a->name, (unsigned long long)atomic_load(&a->total));
		}
	}
	pthread_mutex_unlock(&e->lock);
	fprintf(f,
		"# HELP ember_template_pull_bytes_total Bytes received by template pulls.\n"
		"# TYPE ember_template_pull_bytes_total counter\n"
		"ember_template_pull_bytes_total %llu\n"
		"# HELP ember_template_pull_retries_total Transfers retried after an error.\n"
		"# TYPE ember_template_pull_retries_total counter\n"
		"ember_template_pull_retries_total %llu\n"
		"# HELP ember_template_pulls_finished_total Pulls ended, by outcome.\n"
		"# TYPE ember_template_pulls_finished_total counter\n"
		"ember_template_pulls_finished_total{outcome=\"ok\"} %llu\n"
		"ember_template_pulls_finished_total{outcome=\"failed\"} %llu\n",
		(unsigned long long)atomic_load(&e->bytes),
		(unsigned long long)atomic_load(&e->retries),
		(unsigned long long)atomic_load(&e->done_ok),
		(unsigned long long)atomic_load(&e->done_failed));
}

int pull_status(PullEngine *e, char *buf, size_t size)
{
	size_t len = 0;

	buf[0] = 0;
	if (!e)
		return 0;
	pthread_mutex_lock(&e->lock);
	size_t n = e->n_pulls;
	for (size_t i = 0; i < n && len + 1 < size; i++) {
		Pull *p = e->pulls[i];
		uint64_t total, done = pull_bytes(p, &total);
		int w = total ? snprintf(buf + len, size - len, "%s%s %llu%%", i ? ", " : "", p->id,
					 (unsigned long long)(done * 100 / total))
			      : snprintf(buf + len, size - len, "%s%s %llu MiB", i ? ", " : "",
					 p->id, (unsigned long long)(done >> 20));
		if (w < 0)
			break;
		len += (size_t)w;
	}
	pthread_mutex_unlock(&e->lock);
	return (int)n;
}

/* ---- PullTemplate ---- */

static RpcCode artifact_from_pb(RpcCall *call, Manager *m, const char *what,
				const Ember__V1__RemoteArtifact *ra, bool required, PullArtifact *a)
{
	if (!ra) {
		if (required)
			return rpc_call_error(call, RPC_INVALID_ARGUMENT, "%s is required", what);
		return RPC_OK;
	}
	if (!ra->url || !url_valid(ra->url))
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "%s.url \"%.200s\" is not an http:// or https:// URL", what,
				      ra->url ?: "");
	if (!sha256_valid(ra->sha256))
		return rpc_call_error(call, RPC_INVALID_ARGUMENT, "%s.sha256 must be 64 hex digits",
				      what);
	if (a->sparse && ra->size_bytes % 512)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "%s.size_bytes %llu is not a multiple of 512 (a disk image)",
				      what, (unsigned long long)ra->size_bytes);
	if (ra->size_bytes > m->config->max_artifact_bytes)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "%s.size_bytes %llu is more than this node's "
				      "max_artifact_bytes (%llu)",
				      what, (unsigned long long)ra->size_bytes,
				      (unsigned long long)m->config->max_artifact_bytes);
	if (artifact_set(a, ra->url, ra->sha256, ra->size_bytes) < 0)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	return RPC_OK;
}

static bool artifact_same(const PullArtifact *a, const PullArtifact *b)
{
	if (!a->url || !b->url)
		return !a->url && !b->url;
	return strcmp(a->sha256, b->sha256) == 0 && a->size == b->size;
}

/* The same request as the pull in progress (URLs aside: the digests name the content). */
static bool pull_same(const Pull *a, const Pull *b)
{
	for (size_t i = 0; i < N_ARTIFACTS; i++)
		if (!artifact_same(&a->art[i], &b->art[i]))
			return false;
	return strcmp(a->boot_args, b->boot_args) == 0 && kv_list_equal(&a->labels, &b->labels);
}

/* A READY template with the content the request asks for. */
static bool template_matches(const Template *t, const Pull *p)
{
	const TemplateFileInfo *f[N_ARTIFACTS] = {&t->kernel, &t->rootfs, &t->initrd};

	for (size_t i = 0; i < N_ARTIFACTS; i++) {
		const PullArtifact *a = &p->art[i];
		if (!a->url != !f[i]->path)
			return false;
		if (a->url && (strcmp(a->sha256, f[i]->sha256) != 0 ||
			       (a->size && a->size != f[i]->size_bytes)))
			return false;
	}
	return strcmp(t->boot_args ?: "", p->boot_args) == 0 &&
	       kv_list_equal(&t->labels, &p->labels);
}

static Ember__V1__ArtifactProgress *progress_to_pb(Arena *a, const PullArtifact *art)
{
	Ember__V1__ArtifactProgress *ap;

	if (!art->url)
		return NULL;
	ap = arena_alloc(a, sizeof(*ap));
	if (!ap)
		return NULL;
	ember__v1__artifact_progress__init(ap);
	ap->bytes_done = atomic_load(&art->done);
	ap->bytes_total = atomic_load(&art->total);
	return ap;
}

static RpcCode send_done(RpcCall *call, Manager *m, const char *id)
{
	_cleanup_(arena_freep) Arena *a = arena_new();
	Ember__V1__PullTemplateProgress msg = EMBER__V1__PULL_TEMPLATE_PROGRESS__INIT;
	Ember__V1__ArtifactProgress ap[N_ARTIFACTS];
	Ember__V1__ArtifactProgress **slots[N_ARTIFACTS] = {&msg.kernel, &msg.rootfs, &msg.initrd};

	if (!a)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	pthread_mutex_lock(&m->lock);
	Template *t = manager_template_find_locked(m, id);
	if (t && t->state == EMBER__V1__TEMPLATE_STATE__TEMPLATE_STATE_READY) {
		msg.template_ = template_to_pb(a, t);
		const TemplateFileInfo *f[N_ARTIFACTS] = {&t->kernel, &t->rootfs, &t->initrd};
		for (size_t i = 0; i < N_ARTIFACTS; i++) {
			if (!f[i]->path)
				continue;
			ember__v1__artifact_progress__init(&ap[i]);
			ap[i].bytes_done = ap[i].bytes_total = f[i]->size_bytes;
			*slots[i] = &ap[i];
		}
	}
	pthread_mutex_unlock(&m->lock);
	if (!t)
		return rpc_call_error(call, RPC_NOT_FOUND, "template %s was deleted", id);
	if (!msg.template_)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	msg.phase = EMBER__V1__PULL_PHASE__PULL_PHASE_DONE;
	return rpc_call_send(call, &msg.base) < 0 ? RPC_CANCELLED : RPC_OK;
}

static int send_progress(RpcCall *call, Pull *p, Ember__V1__PullPhase phase, bool wait)
{
	_cleanup_(arena_freep) Arena *a = arena_new();
	Ember__V1__PullTemplateProgress msg = EMBER__V1__PULL_TEMPLATE_PROGRESS__INIT;

	if (!a)
		return -ENOMEM;
	msg.phase = phase;
	msg.kernel = progress_to_pb(a, &p->art[0]);
	msg.rootfs = progress_to_pb(a, &p->art[1]);
	msg.initrd = progress_to_pb(a, &p->art[2]);
	return wait ? rpc_call_send(call, &msg.base) : rpc_call_send_nowait(call, &msg.base);
}

/* Follows p until it ends: every phase at least once (a follower that looked while the pull
 * went through two phases sends both), bytes while downloading, then DONE or the error. */
static RpcCode follow(RpcCall *call, Manager *m, Pull *p)
{
	PullEngine *e = p->e;
	Ember__V1__PullPhase sent_phase = EMBER__V1__PULL_PHASE__PULL_PHASE_UNSPECIFIED;
	uint64_t sent_at = 0, sent_done = 0;
	RpcCode code;

	pthread_mutex_lock(&e->lock);
	int r = pull_follow_locked(p, call);
	pthread_mutex_unlock(&e->lock);
	if (r < 0)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	rpc_call_end_on_drain(call);
	for (;;) {
		pthread_mutex_lock(&e->lock);
		Ember__V1__PullPhase phase = p->phase;
		bool finished = p->finished;
		code = p->code;
		_cleanup_free_ char *error = p->error ? strdup(p->error) : NULL;
		pthread_mutex_unlock(&e->lock);
		if (finished && code != RPC_OK) {
			code = rpc_call_error(call, code, "pull of template %s: %s", p->id,
					      error ?: "failed");
			break;
		}
		/* The phases not sent yet, in order; DONE last, with the template. */
		Ember__V1__PullPhase upto =
			finished ? EMBER__V1__PULL_PHASE__PULL_PHASE_INSTALLING : phase;
		while (r >= 0 && sent_phase < upto) {
			sent_phase++;
			sent_done = pull_bytes(p, NULL);
			r = send_progress(call, p, sent_phase, true);
			sent_at = now_usec();
		}
		if (r < 0) {
			code = RPC_CANCELLED;
			break;
		}
		if (finished) {
			code = send_done(call, m, p->id);
			break;
		}
		uint64_t total, done = pull_bytes(p, &total), now = now_usec();
		/* Bytes at most every 100 ms and every 1 %, whichever is rarer (without a
		 * total, every 100 ms). A slow reader gets fewer messages, never a blocked
		 * follower. */
		uint64_t moved = done > sent_done ? done - sent_done : sent_done - done;
		if (phase == EMBER__V1__PULL_PHASE__PULL_PHASE_DOWNLOADING &&
		    now - sent_at >= WAKE_INTERVAL_USEC && moved &&
		    (!total || moved * 100 >= total)) {
			r = send_progress(call, p, phase, false);
			if (r == -ECANCELED) {
				code = RPC_CANCELLED;
				break;
			}
			if (r >= 0) {
				sent_at = now;
				sent_done = done;
			}
		}
		r = rpc_call_wait(call, 1000);
		if (r == -ECANCELED) {
			code = RPC_CANCELLED;
			break;
		}
		if (r == -ESHUTDOWN) {
			code = rpc_call_error(call, RPC_UNAVAILABLE,
					      "emberd is shutting down; the pull of %s goes on at "
					      "its next start: call PullTemplate again",
					      p->id);
			break;
		}
	}
	pthread_mutex_lock(&e->lock);
	pull_unfollow_locked(p, call);
	pthread_mutex_unlock(&e->lock);
	return code;
}

RpcCode node_pull_template(RpcCall *call, const ProtobufCMessage *request, Manager *m)
{
	const Ember__V1__PullTemplateRequest *req = (const void *)request;
	_cleanup_free_ char *gone = NULL;
	Pull *p, *follow_p = NULL;
	RpcCode code;
	int r;

	if (!id_is_valid(req->template_id))
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "template_id \"%.100s\" is not a valid id "
				      "([a-z0-9][a-z0-9-]{0,62})",
				      req->template_id);
	p = pull_new(m->pulls, req->template_id);
	if (!p)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	if ((code = artifact_from_pb(call, m, "kernel", req->kernel, true, &p->art[0])) != RPC_OK ||
	    (code = artifact_from_pb(call, m, "rootfs", req->rootfs, true, &p->art[1])) != RPC_OK ||
	    (code = artifact_from_pb(call, m, "initrd", req->initrd, false, &p->art[2])) !=
		    RPC_OK) {
		pull_unref(p);
		return code;
	}
	if (!template_boot_args_valid(req->boot_args)) {
		pull_unref(p);
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "boot_args must not set root= or init= (emberd sets them) "
				      "and must be shorter than 1024 bytes");
	}
	code = kv_from_pb(call, "labels", KV_LABELS, req->labels, req->n_labels, &p->labels);
	p->boot_args = strdup(req->boot_args ?: "");
	if (code != RPC_OK || !p->boot_args) {
		pull_unref(p);
		return code != RPC_OK
			       ? code
			       : rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	}
	clock_gettime(CLOCK_REALTIME, &p->create_time);

	pthread_mutex_lock(&m->lock);
	Template *t = manager_template_find_locked(m, p->id);
	if (t && t->state == EMBER__V1__TEMPLATE_STATE__TEMPLATE_STATE_READY) {
		bool same = template_matches(t, p);
		pthread_mutex_unlock(&m->lock);
		pull_unref(p);
		if (!same)
			return rpc_call_error(
				call, RPC_ALREADY_EXISTS,
				"template %s exists with different content, boot_args "
				"or labels",
				req->template_id);
		return send_done(call, m, req->template_id);
	}
	if (t && t->state == EMBER__V1__TEMPLATE_STATE__TEMPLATE_STATE_PULLING && t->pull) {
		bool same = pull_same(t->pull, p);
		if (same)
			follow_p = pull_ref(t->pull);
		pthread_mutex_unlock(&m->lock);
		pull_unref(p);
		if (!same)
			return rpc_call_error(call, RPC_ALREADY_EXISTS,
					      "template %s is being pulled with different content, "
					      "boot_args or labels",
					      req->template_id);
		code = follow(call, m, follow_p);
		pull_unref(follow_p);
		return code;
	}
	if (t) {
		/* FAILED: pulling it again starts over. */
		if (asprintf(&gone, "%s/.deleted-%s-%llu", m->templates_dir, t->id,
			     (unsigned long long)now_usec()) < 0 ||
		    (rename(p->dir, gone) < 0 && errno != ENOENT)) {
			pthread_mutex_unlock(&m->lock);
			pull_unref(p);
			return rpc_call_error(call, RPC_INTERNAL,
					      "cannot remove the failed pull of %s",
					      req->template_id);
		}
		template_remove_locked(m, t);
		template_free(t);
	}
	/* The id is taken at once, as PULLING; the directory is made after the lock. */
	t = calloc(1, sizeof(*t));
	if (!t || !(t->id = strdup(p->id)) || !(t->boot_args = strdup(p->boot_args)) ||
	    kv_list_copy(&p->labels, &t->labels) < 0 || template_insert_locked(m, t) < 0) {
		pthread_mutex_unlock(&m->lock);
		template_free(t);
		pull_unref(p);
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	}
	t->state = EMBER__V1__TEMPLATE_STATE__TEMPLATE_STATE_PULLING;
	t->create_time = p->create_time;
	t->pull = pull_ref(p);
	pthread_mutex_unlock(&m->lock);
	if (gone)
		(void)rm_rf(gone);

	r = mkdir(p->dir, 0700) < 0 ? -errno : 0;
	bool made = r >= 0;
	if (r >= 0 && (p->dir_fd = open(p->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0)
		r = -errno;
	if (r >= 0)
		r = pull_record_write(p, "pulling", NULL);
	if (r >= 0)
		(void)fsync_path(m->templates_dir);
	/* Still ours? A DeleteTemplate may have come in since the id was taken: it found no
	 * directory to remove yet. Handed to the engine under the lock, a later delete aborts
	 * it as any other. */
	pthread_mutex_lock(&m->lock);
	t = manager_template_find_locked(m, p->id);
	bool ours = t && t->pull == p;
	if (ours && r >= 0)
		r = engine_add(m->pulls, p);
	if (ours && r < 0) {
		template_remove_locked(m, t);
		template_free(t); /* and its reference */
	}
	pthread_mutex_unlock(&m->lock);
	if (!ours || r < 0) {
		if (made)
			pull_dir_remove(p);
		/* followers that joined meanwhile learn it too */
		if (!ours) {
			pull_finish(p, RPC_ABORTED, "the template was deleted as its pull started");
			pull_unref(p);
			return rpc_call_error(call, RPC_ABORTED,
					      "template %s was deleted as its pull started",
					      req->template_id);
		}
		bool full = r == -ENOSPC || r == -EDQUOT;
		char msg[256];
		msgf(msg, sizeof(msg), "cannot start the pull: %s",
		     full ? "not enough disk" : strerror(-r));
		pull_finish(p, full ? RPC_RESOURCE_EXHAUSTED : RPC_INTERNAL, msg);
		pull_unref(p);
		return rpc_call_error(call, full ? RPC_RESOURCE_EXHAUSTED : RPC_INTERNAL,
				      "template %s: %s", req->template_id, msg);
	}
	code = follow(call, m, p);
	pull_unref(p);
	return code;
}
