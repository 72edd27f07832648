/* SPDX-License-Identifier: Apache-2.0 */
/*
 * nftables rules through libnftables, in the calling thread's namespace. Every change is one
 * buffer, which libnftables applies as one transaction: a policy update never leaves a slot
 * half-open or half-closed.
 *
 * Everything that goes into a command is either ours or has been parsed first (CIDRs through
 * netns_cidr_parse, interface names against [A-Za-z0-9._-]), so nothing a caller passes can
 * change the command's meaning.
 */
#include <ctype.h>
#include <nftables/libnftables.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/macro.h"
#include "netns-internal.h"

/* Denied unless allowed: private and special-purpose ranges. 169.254.0.0/16 covers the cloud
 * metadata address 169.254.169.254. */
static const char *const denied_by_default[] = {
	"0.0.0.0/8",     "10.0.0.0/8",     "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
	"172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/4",   "240.0.0.0/4",
};

static void nft_ctxp(struct nft_ctx **c)
{
	if (*c)
		nft_ctx_free(*c);
}

int netns_nft_run(const char *commands, char **ret_error)
{
	_cleanup_(nft_ctxp) struct nft_ctx *nft = nft_ctx_new(NFT_CTX_DEFAULT);

	if (!nft)
		return -ENOMEM;
	nft_ctx_buffer_output(nft);
	nft_ctx_buffer_error(nft);
	if (nft_run_cmd_from_buffer(nft, commands) != 0) {
		const char *e = nft_ctx_get_error_buffer(nft);
		log_debug("nft failed: %s\n--- commands:\n%s", e ?: "?", commands);
		return error_set(ret_error, -EIO, "nftables: %s",
				 e && *e ? e : "the ruleset was refused");
	}
	return 0;
}

static bool ifname_valid(const char *s)
{
	size_t n = s ? strlen(s) : 0;
	if (n == 0 || n > 15)
		return false;
	for (size_t i = 0; i < n; i++)
		if (!isalnum((unsigned char)s[i]) && !strchr("._-", s[i]))
			return false;
	return true;
}

/* A growing command buffer; errors stick and show at the end. */
typedef struct Buf {
	char *s;
	size_t len, cap;
	bool failed;
} Buf;

static void bufp(Buf *b)
{
	free(b->s);
}

static void add(Buf *b, const char *format, ...) __attribute__((format(printf, 2, 3)));
static void add(Buf *b, const char *format, ...)
{
	va_list ap;
	int n;

	if (b->failed)
		return;
	for (;;) {
		va_start(ap, format);
		n = vsnprintf(b->s ? b->s + b->len : NULL, b->s ? b->cap - b->len : 0, format, ap);
		va_end(ap);
		if (n < 0) {
			b->failed = true;
			return;
		}
		if (b->s && b->len + (size_t)n < b->cap) {
			b->len += (size_t)n;
			return;
		}
		size_t cap = (b->cap ? b->cap : 1024);
		while (cap <= b->len + (size_t)n)
			cap *= 2;
		char *ns = realloc(b->s, cap);
		if (!ns) {
			b->failed = true;
			return;
		}
		b->s = ns;
		b->cap = cap;
	}
}

/* Appends validated CIDRs as set elements; -EINVAL with the offending entry otherwise. */
static int add_elements(Buf *b, const char *set, const char *const *cidrs, size_t n,
			char **ret_error)
{
	if (n == 0)
		return 0;
	add(b, "add element ip ember %s { ", set);
	for (size_t i = 0; i < n; i++) {
		NetnsCidr c;
		char text[32];
		if (netns_cidr_parse(cidrs[i], &c) < 0)
			return error_set(ret_error, -EINVAL,
					 "\"%s\" is not an IPv4 address or CIDR (like 10.0.0.0/8)",
					 cidrs[i] ? cidrs[i] : "");
		add(b, "%s%s", i ? ", " : "", netns_cidr_format(&c, text, sizeof(text)));
	}
	add(b, " }\n");
	return 0;
}

bool netns_nft_policy_is_default(const NetnsPolicy *policy)
{
	return !policy || (!policy->internet && policy->n_allow == 0 && policy->n_deny == 0);
}

int netns_nft_policy_check(const NetnsPolicy *policy, char **ret_error)
{
	const char *const *lists[] = {policy ? policy->allow : NULL, policy ? policy->deny : NULL};
	size_t sizes[] = {policy ? policy->n_allow : 0, policy ? policy->n_deny : 0};

	for (size_t l = 0; l < ELEMENTSOF(lists); l++)
		for (size_t i = 0; i < sizes[l]; i++) {
			NetnsCidr c;
			if (!lists[l] || netns_cidr_parse(lists[l][i], &c) < 0)
				return error_set(
					ret_error, -EINVAL,
					"\"%s\" is not an IPv4 address or CIDR (like 10.0.0.0/8)",
					lists[l] && lists[l][i] ? lists[l][i] : "");
		}
	return 0;
}

int netns_nft_slot_setup(const char *sandbox_ip, char **ret_error)
{
	_cleanup_(bufp) Buf b = {};
	NetnsCidr check;

	if (netns_cidr_parse(sandbox_ip, &check) < 0 || check.prefix != 32)
		return error_set(ret_error, -EINVAL, "bad sandbox IP %s", sandbox_ip);
	add(&b, "add table ip ember\n");
	add(&b,
	    "add set ip ember denied_default { type ipv4_addr; flags interval; auto-merge; }\n");
	add(&b, "add set ip ember host { type ipv4_addr; flags interval; auto-merge; }\n");
	add(&b, "add set ip ember allow { type ipv4_addr; flags interval; auto-merge; }\n");
	add(&b, "add set ip ember deny { type ipv4_addr; flags interval; auto-merge; }\n");
	add(&b, "add element ip ember denied_default { ");
	for (size_t i = 0; i < ELEMENTSOF(denied_by_default); i++)
		add(&b, "%s%s", i ? ", " : "", denied_by_default[i]);
	add(&b, " }\n");
	/* The sandbox IP is fixed for the slot: connections to it from the host reach the
	 * guest, and what the guest sends leaves as it. */
	add(&b, "add chain ip ember prerouting { type nat hook prerouting priority dstnat; }\n");
	add(&b, "add rule ip ember prerouting iifname \"%s\" ip daddr %s dnat to %s\n",
	    NETNS_SLOT_IF, sandbox_ip, NETNS_GUEST_IP);
	add(&b, "add chain ip ember postrouting { type nat hook postrouting priority srcnat; }\n");
	add(&b, "add rule ip ember postrouting oifname \"%s\" ip saddr %s snat to %s\n",
	    NETNS_SLOT_IF, NETNS_GUEST_IP, sandbox_ip);
	add(&b, "add chain ip ember forward { type filter hook forward priority filter; "
		"policy drop; }\n");
	add(&b, "add rule ip ember forward ct state established,related accept\n");
	add(&b, "add rule ip ember forward ct state invalid drop\n");
	add(&b,
	    "add rule ip ember forward iifname \"%s\" oifname \"%s\" ip daddr %s ct status dnat "
	    "accept\n",
	    NETNS_SLOT_IF, NETNS_TAP_NAME, NETNS_GUEST_IP);
	add(&b, "add chain ip ember egress\n");
	add(&b, "add chain ip ember internet\n");
	add(&b, "add rule ip ember forward iifname \"%s\" oifname \"%s\" ip saddr %s jump egress\n",
	    NETNS_TAP_NAME, NETNS_SLOT_IF, NETNS_GUEST_IP);
	add(&b, "add rule ip ember egress ip daddr @deny drop\n");
	add(&b, "add rule ip ember egress ip daddr @allow accept\n");
	add(&b, "add rule ip ember egress ip daddr @denied_default drop\n");
	add(&b, "add rule ip ember egress ip daddr @host drop\n");
	/* The default policy is in place from here on: empty lists, and an empty internet chain
	 * that falls through to the drop below. A policy only ever adds to what a new slot has,
	 * and adding costs the kernel little, while removing a rule or an element waits for an
	 * RCU grace period (~10 ms measured): a ready slot is handed out with its first policy
	 * in one quick transaction. */
	add(&b, "add rule ip ember egress jump internet\n");
	add(&b, "add rule ip ember egress drop\n");
	/* The slot itself offers the guest nothing but an answer to ping. */
	add(&b, "add chain ip ember input { type filter hook input priority filter; }\n");
	add(&b, "add rule ip ember input iifname \"%s\" ct state established,related accept\n",
	    NETNS_TAP_NAME);
	add(&b, "add rule ip ember input iifname \"%s\" icmp type echo-request accept\n",
	    NETNS_TAP_NAME);
	add(&b, "add rule ip ember input iifname \"%s\" drop\n", NETNS_TAP_NAME);
	/* No IPv6 in a slot: nothing is routed, nothing reaches the slot. */
	add(&b, "add table ip6 ember\n");
	add(&b, "add chain ip6 ember forward { type filter hook forward priority filter; "
		"policy drop; }\n");
	add(&b, "add chain ip6 ember input { type filter hook input priority filter; "
		"policy drop; }\n");
	if (b.failed)
		return -ENOMEM;
	return netns_nft_run(b.s, ret_error);
}

int netns_nft_slot_policy(const NetnsPolicy *policy, char *const *host_addrs,
			  const NetnsCidr *extra_denied, size_t n_extra, char **ret_error)
{
	_cleanup_(bufp) Buf b = {};
	bool internet = policy && policy->internet;
	int r;

	/* Flushing what is empty costs nothing; what the lists had goes in the same
	 * transaction as what replaces it. */
	add(&b, "flush set ip ember allow\nflush set ip ember deny\n");
	r = add_elements(&b, "allow", policy ? policy->allow : NULL, policy ? policy->n_allow : 0,
			 ret_error);
	if (r >= 0)
		r = add_elements(&b, "deny", policy ? policy->deny : NULL,
				 policy ? policy->n_deny : 0, ret_error);
	if (r < 0)
		return r;
	/* The host's addresses and the slot ranges matter only with internet on: with it off,
	 * whatever the allow list does not accept is dropped anyway. Left as they are otherwise
	 * (no removal, see netns_nft_slot_setup()). */
	if (internet) {
		size_t n_host = 0;
		while (host_addrs && host_addrs[n_host])
			n_host++;
		add(&b, "flush set ip ember host\n");
		if (n_host > 0 || n_extra > 0) {
			add(&b, "add element ip ember host { ");
			for (size_t i = 0; i < n_host; i++)
				add(&b, "%s%s", i ? ", " : "", host_addrs[i]);
			for (size_t i = 0; i < n_extra; i++) {
				char text[32];
				add(&b, "%s%s", n_host + i ? ", " : "",
				    netns_cidr_format(&extra_denied[i], text, sizeof(text)));
			}
			add(&b, " }\n");
		}
	}
	add(&b, "flush chain ip ember internet\n");
	if (internet)
		add(&b, "add rule ip ember internet accept\n");
	if (b.failed)
		return -ENOMEM;
	return netns_nft_run(b.s, ret_error);
}

int netns_nft_host_setup(const char *uplink, const NetnsCidr *sandbox_range, char **ret_error)
{
	_cleanup_(bufp) Buf b = {};
	char range[32];

	if (!ifname_valid(uplink))
		return error_set(ret_error, -EINVAL, "\"%s\" is not an interface name",
				 uplink ?: "");
	/* Replace whatever is there: delete and re-add in one transaction. */
	add(&b, "add table ip ember\ndelete table ip ember\nadd table ip ember\n");
	add(&b, "add chain ip ember postrouting { type nat hook postrouting priority srcnat; }\n");
	add(&b, "add rule ip ember postrouting oifname \"%s\" ip saddr %s masquerade\n", uplink,
	    netns_cidr_format(sandbox_range, range, sizeof(range)));
	if (b.failed)
		return -ENOMEM;
	return netns_nft_run(b.s, ret_error);
}

int netns_nft_host_remove(void)
{
	return netns_nft_run("add table ip ember\ndelete table ip ember\n", NULL);
}
