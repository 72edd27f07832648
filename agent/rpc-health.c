/* SPDX-License-Identifier: Apache-2.0 */
/*
 * grpc.health.v1.Health: Check and Watch. The status follows the server state: NOT_SERVING
 * while starting and draining, SERVING otherwise. Known services are "" (the whole server) and
 * every registered service.
 */
#include <errno.h>
#include <string.h>

#include "common/macro.h"
#include "grpc/health/v1/health.pb-c.h"
#include "rpc-internal.h"

typedef Grpc__Health__V1__HealthCheckResponse__ServingStatus HealthStatus;

static bool service_known(RpcServer *s, const char *name)
{
	if (!name || !*name)
		return true;
	for (size_t i = 0; i < rpc_server_n_services(s); i++)
		if (strcmp(rpc_server_service_name(s, i), name) == 0)
			return true;
	return false;
}

static HealthStatus current_status(RpcServer *s, const char *service)
{
	if (!service_known(s, service))
		return GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN;
	return rpc_server_get_state(s) == RPC_SERVER_SERVING
		       ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
		       : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
}

static int send_status(RpcCall *call, HealthStatus st)
{
	Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
	resp.status = st;
	return rpc_call_send(call, &resp.base);
}

static RpcCode health_check(RpcCall *call, const ProtobufCMessage *request, void *userdata)
{
	const Grpc__Health__V1__HealthCheckRequest *req = (const void *)request;
	RpcServer *s = rpc_call_server(call);
	HealthStatus st = current_status(s, req->service);
	(void)userdata;

	if (st == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN)
		return rpc_call_error(call, RPC_NOT_FOUND, "unknown service \"%s\"", req->service);
	if (send_status(call, st) < 0)
		return RPC_CANCELLED;
	return RPC_OK;
}

static RpcCode health_watch(RpcCall *call, const ProtobufCMessage *request, void *userdata)
{
	const Grpc__Health__V1__HealthCheckRequest *req = (const void *)request;
	RpcServer *s = rpc_call_server(call);
	HealthStatus last = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__UNKNOWN;
	(void)userdata;

	for (;;) {
		HealthStatus st = current_status(s, req->service);
		if (st != last) {
			if (send_status(call, st) < 0)
				return RPC_CANCELLED;
			last = st;
		}
		int r = rpc_call_wait(call, -1);
		if (r == -ECANCELED)
			return RPC_CANCELLED;
		if (r == -ESHUTDOWN) {
			/* Tell the watcher first, then end the stream: a watch never finishes on
			 * its own, so holding it open would only delay the shutdown. */
			st = current_status(s, req->service);
			if (st != last && send_status(call, st) < 0)
				return RPC_CANCELLED;
			return rpc_call_error(call, RPC_UNAVAILABLE, "emberd is shutting down");
		}
	}
}

int rpc_health_register(RpcServer *s)
{
	static const RpcMethodHandler handlers[] = {
		{"Check", health_check},
		{"Watch", health_watch},
	};
	return rpc_server_add_service(s, &grpc__health__v1__health__descriptor, handlers,
				      ELEMENTSOF(handlers), NULL);
}
