/* SPDX-License-Identifier: Apache-2.0 */
/* The ember.v1.Node service: handlers and the node-wide facts they report. */
#pragma once

#include "common/macro.h"
#include "config.h"
#include "rpc.h"

typedef struct NodeService NodeService;

/* Loads the node id from <state_dir>/node-id, creating it on first start. */
int node_service_new(const Config *config, NodeService **ret, char **ret_error);
void node_service_free(NodeService *n);
DEFINE_POINTER_CLEANUP(NodeService, node_service_free)

int node_service_register(NodeService *n, RpcServer *s);
/* The manager serves the template and sandbox calls once set (after recovery); until then
 * they answer UNAVAILABLE. Not owned. */
typedef struct Manager Manager;
void node_service_set_manager(NodeService *n, Manager *m);
/* The KVM probe's answer, for choosing the VMM. */
bool node_service_kvm_usable(NodeService *n);
const char *node_service_id(const NodeService *n);
/* Probes the host facilities now and logs what is (not) available and why. */
void node_service_probe(NodeService *n);
