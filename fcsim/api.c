/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The HTTP side: libmicrohttpd on the API unix socket. Requests are taken one at a time on
 * libmicrohttpd's own thread, as Firecracker's single API thread does; the body is collected,
 * size-limited like Firecracker's (51200 bytes), parsed with json-c and handed to vmm.c.
 */
#include <microhttpd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>

#include "common/macro.h"
#include "fcsim.h"

#define MAX_PAYLOAD 51200

static struct MHD_Daemon *daemon_;

typedef struct Request {
	char *body;
	size_t size;
	bool too_large;
} Request;

static enum MHD_Result respond(struct MHD_Connection *c, int status, const char *json)
{
	struct MHD_Response *r;
	enum MHD_Result ret;

	r = MHD_create_response_from_buffer(json ? strlen(json) : 0, (void *)(json ? json : ""),
					    MHD_RESPMEM_MUST_COPY);
	if (!r)
		return MHD_NO;
	if (json)
		MHD_add_response_header(r, "Content-Type", "application/json");
	MHD_add_response_header(r, "Server", "Firecracker API");
	ret = MHD_queue_response(c, (unsigned)status, r);
	MHD_destroy_response(r);
	return ret;
}

static enum MHD_Result fault(struct MHD_Connection *c, const char *message)
{
	json_object *o = json_object_new_object();
	enum MHD_Result ret;

	json_object_object_add(o, "fault_message", json_object_new_string(message));
	ret = respond(c, 400, json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN));
	json_object_put(o);
	return ret;
}

/* serde_json's wording for the two ways a body fails before any field is looked at. */
static char *parse_error(const char *body, size_t size, json_object **ret)
{
	struct json_tokener *tok = json_tokener_new();
	enum json_tokener_error err;
	char *msg = NULL;

	*ret = NULL;
	if (!tok)
		return strdup("out of memory");
	*ret = json_tokener_parse_ex(tok, body, (int)size);
	err = json_tokener_get_error(tok);
	if (*ret && err == json_tokener_success && json_tokener_get_parse_end(tok) < size) {
		/* Trailing bytes after the value: only whitespace is fine. */
		for (size_t i = json_tokener_get_parse_end(tok); i < size; i++)
			if (!strchr(" \t\r\n", body[i])) {
				err = json_tokener_error_parse_unexpected;
				break;
			}
	}
	if (!*ret || err != json_tokener_success) {
		json_object_put(*ret);
		*ret = NULL;
		if (size == 0 || err == json_tokener_continue)
			(void)!asprintf(&msg,
					"An error occurred when deserializing the json body of a "
					"request: EOF while parsing a value at line 1 column %zu.",
					size);
		else
			(void)!asprintf(&msg,
					"An error occurred when deserializing the json body of a "
					"request: %s at line 1 column %zu.",
					json_tokener_error_desc(err),
					json_tokener_get_parse_end(tok) + 1);
	}
	json_tokener_free(tok);
	return msg;
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *c, const char *url,
			      const char *method, const char *version, const char *upload_data,
			      size_t *upload_data_size, void **con_cls)
{
	Vm *vm = cls;
	Request *req = *con_cls;
	json_object *body = NULL, *reply = NULL;
	char *fault_msg = NULL;
	enum MHD_Result ret;
	int status;
	(void)version;

	if (!req) {
		/* Firecracker's API thread is "fc_api": log lines name it. */
		(void)prctl(PR_SET_NAME, "fc_api");
		req = calloc(1, sizeof(*req));
		if (!req)
			return MHD_NO;
		*con_cls = req;
		return MHD_YES;
	}
	if (*upload_data_size > 0) {
		if (!req->too_large && req->size + *upload_data_size <= MAX_PAYLOAD) {
			char *n = realloc(req->body, req->size + *upload_data_size + 1);
			if (!n)
				return MHD_NO;
			memcpy(n + req->size, upload_data, *upload_data_size);
			req->body = n;
			req->size += *upload_data_size;
			req->body[req->size] = 0;
		} else {
			req->too_large = true;
			req->size += *upload_data_size;
		}
		*upload_data_size = 0;
		return MHD_YES;
	}

	fcmetrics_count("api_server.requests");
	if (req->too_large) {
		char msg[160];
		snprintf(msg, sizeof(msg),
			 "Request payload with size %zu is larger than the limit of %d allowed by "
			 "server.",
			 req->size, MAX_PAYLOAD);
		return fault(c, msg);
	}
	bool wants_body = strcmp(method, "PUT") == 0 || strcmp(method, "PATCH") == 0;
	if (wants_body) {
		fault_msg = parse_error(req->body ? req->body : "", req->size, &body);
		if (fault_msg) {
			FCLOG(FC_ERROR, "Received Error. Status code: 400 Bad Request. Message: %s",
			      fault_msg);
			ret = fault(c, fault_msg);
			free(fault_msg);
			return ret;
		}
	}

	FCLOG(FC_DEBUG, "The API server received a %s request on \"%s\".", method, url);
	status = vmm_request(vm, method, url, body, &reply, &fault_msg);
	json_object_put(body);
	if (status == 204)
		ret = respond(c, 204, NULL);
	else if (status == 200)
		ret = respond(c, 200,
			      json_object_to_json_string_ext(reply, JSON_C_TO_STRING_PLAIN));
	else {
		FCLOG(FC_ERROR, "Received Error. Status code: 400 Bad Request. Message: %s",
		      fault_msg ?: "");
		ret = fault(c, fault_msg ? fault_msg : "Internal error");
	}
	json_object_put(reply);
	free(fault_msg);
	return ret;
}

static void completed(void *cls, struct MHD_Connection *c, void **con_cls,
		      enum MHD_RequestTerminationCode toe)
{
	Request *req = *con_cls;
	(void)cls;
	(void)c;
	(void)toe;
	if (req) {
		free(req->body);
		free(req);
	}
	*con_cls = NULL;
}

int api_start(Vm *vm, int listen_fd)
{
	/* One internal thread, one request at a time; libmicrohttpd owns the socket now. */
	daemon_ = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL, 0, NULL, NULL,
				   handle, vm, MHD_OPTION_LISTEN_SOCKET, listen_fd,
				   MHD_OPTION_NOTIFY_COMPLETED, completed, NULL,
				   MHD_OPTION_CONNECTION_TIMEOUT, 0u, MHD_OPTION_END);
	return daemon_ ? 0 : -EIO;
}

void api_stop(void)
{
	if (daemon_)
		MHD_stop_daemon(daemon_);
	daemon_ = NULL;
}
