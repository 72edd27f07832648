/* SPDX-License-Identifier: Apache-2.0 */
/* Shared between the netns module's .c files only. */
#pragma once

#include "common/error.h"
#include "netns.h"

/* link.c: rtnetlink through libnl-route-3, in the calling thread's namespace */
typedef struct NlSock NlSock;
int netns_nlsock_open(NlSock **ret);
void netns_nlsock_close(NlSock *s);
/* libnl's NLE_* codes as -errno, and their message. */
int netns_nlsock_errno(int nle);
const char *netns_nlsock_message(int nle);
int netns_link_up(NlSock *s, const char *name, char **ret_error);
int netns_link_delete(NlSock *s, const char *name);
/* veth `host_name` here, its peer `peer_name` created directly in the namespace `ns_fd`. */
int netns_link_add_veth(NlSock *s, const char *host_name, const char *peer_name, int ns_fd,
			char **ret_error);
int netns_addr_add(NlSock *s, const char *link, const char *cidr, char **ret_error);
/* dst "a.b.c.d/len" (or "default") via gateway (may be NULL) on link. */
int netns_route_add(NlSock *s, const char *dst, const char *gateway, const char *link,
		    char **ret_error);
/* Names of links starting with prefix; a NULL-terminated array (free each and the array). */
int netns_link_list(NlSock *s, const char *prefix, char ***ret);
/* The namespace's IPv4 addresses as CIDRs "a.b.c.d/32", NULL-terminated. */
int netns_addr_list_ipv4(NlSock *s, char ***ret);
void netns_strv_free(char **v);

/* ns.c */
int netns_sysctl_write(const char *path, const char *value);
/* Makes `dir` a shared mount point (as iproute2 does for /run/netns), so that namespaces
 * bind-mounted there show in mount namespaces created later. */
int netns_dir_prepare(const char *dir);

/* nft.c: libnftables, in the calling thread's namespace */
int netns_nft_run(const char *commands, char **ret_error);
/* The slot's table: NAT between sandbox IP and guest, filter with the default policy
 * (nothing outbound) in place. */
int netns_nft_slot_setup(const char *sandbox_ip, char **ret_error);
/* NULL, or internet off with both lists empty: what netns_nft_slot_setup() leaves. */
bool netns_nft_policy_is_default(const NetnsPolicy *policy);
/* -EINVAL with a message when a list holds something that is not a CIDR. */
int netns_nft_policy_check(const NetnsPolicy *policy, char **ret_error);
/* Replaces the allow/deny sets and the internet verdict at once; with internet on also the
 * set of denied host addresses (host_addrs, NULL-terminated, and extra_denied). */
int netns_nft_slot_policy(const NetnsPolicy *policy, char *const *host_addrs,
			  const NetnsCidr *extra_denied, size_t n_extra, char **ret_error);
/* Host side: masquerade the sandbox range on the uplink. Idempotent. */
int netns_nft_host_setup(const char *uplink, const NetnsCidr *sandbox_range, char **ret_error);
int netns_nft_host_remove(void);
