# Server reflection as grpcurl uses it: a client with NO .proto files of ember lists the
# services, fetches the descriptors, builds a GetNode request from them and calls it.
#
# This module deliberately imports nothing generated from ember's protos: only the reflection
# protocol's own stubs (which every reflection client has built in) and the protobuf runtime.

import queue

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from conftest import wait_for  # noqa: F401 (fixtures come from conftest)

from reflection.v1 import reflection_pb2 as v1, reflection_pb2_grpc as v1_grpc
from reflection.v1alpha import reflection_pb2 as v1a, reflection_pb2_grpc as v1a_grpc


class Reflector:
    """One reflection stream; ask() sends a request and returns the response."""

    def __init__(self, ch, mod, grpc_mod):
        self.mod = mod
        self.q = queue.Queue()
        stub = grpc_mod.ServerReflectionStub(ch)
        self.responses = stub.ServerReflectionInfo(iter(self.q.get, None), timeout=30)

    def ask(self, **kw):
        self.q.put(self.mod.ServerReflectionRequest(**kw))
        return next(self.responses)

    def close(self):
        self.q.put(None)


@pytest.mark.parametrize("mod,grpc_mod", [(v1, v1_grpc), (v1a, v1a_grpc)], ids=["v1", "v1alpha"])
def test_reflection_drives_getnode_without_protos(start_emberd, mod, grpc_mod):
    e = start_emberd()
    with e.channel() as ch:
        r = Reflector(ch, mod, grpc_mod)

        names = [s.name for s in r.ask(list_services="").list_services_response.service]
        assert "ember.v1.Node" in names
        assert "grpc.health.v1.Health" in names
        assert "grpc.reflection.v1.ServerReflection" in names
        assert "grpc.reflection.v1alpha.ServerReflection" in names

        resp = r.ask(file_containing_symbol="ember.v1.Node")
        assert resp.original_request.file_containing_symbol == "ember.v1.Node"
        files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                 for b in resp.file_descriptor_response.file_descriptor_proto]
        file_names = [f.name for f in files]
        # the file itself and its transitive dependencies, each once
        assert file_names[0] == "ember/v1/node.proto"
        assert "google/protobuf/timestamp.proto" in file_names
        assert "google/protobuf/duration.proto" in file_names
        assert len(file_names) == len(set(file_names))

        # Build the types from what the server sent, in a pool that knows nothing else.
        pool = descriptor_pool.DescriptorPool()
        pending = list(files)
        while pending:  # add in dependency order
            progress = False
            for f in list(pending):
                if all(d in [x.name for x in files if x not in pending] for d in f.dependency):
                    pool.Add(f)
                    pending.remove(f)
                    progress = True
            assert progress, "dependency cycle or missing dependency in reflection answer"

        svc = pool.FindServiceByName("ember.v1.Node")
        method = svc.methods_by_name["GetNode"]
        kinds = {m.name: (m.client_streaming, m.server_streaming)
                 for m in files[0].service[0].method}
        assert kinds["GetNode"] == (False, False)
        assert kinds["Exec"] == (True, True)
        assert kinds["WatchSandboxes"] == (False, True)
        factory = message_factory.MessageFactory(pool)
        Req = factory.GetPrototype(method.input_type)
        Resp = factory.GetPrototype(method.output_type)

        call = ch.unary_unary(f"/{svc.full_name}/{method.name}",
                              request_serializer=Req.SerializeToString,
                              response_deserializer=Resp.FromString)
        info = call(Req(), timeout=10)
        assert info.agent_version
        assert len(info.node_id) == 36
        assert info.capabilities.userfaultfd.reason
        r.close()


def test_reflection_errors_stay_in_the_stream(start_emberd):
    e = start_emberd()
    with e.channel() as ch:
        r = Reflector(ch, v1, v1_grpc)
        resp = r.ask(file_by_filename="no/such/file.proto")
        assert resp.WhichOneof("message_response") == "error_response"
        assert resp.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
        assert "no/such/file.proto" in resp.error_response.error_message

        resp = r.ask(file_containing_symbol="no.such.Symbol")
        assert resp.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]

        resp = r.ask(file_containing_extension=v1.ExtensionRequest(
            containing_type="ember.v1.NodeInfo", extension_number=100))
        assert resp.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]

        # the stream is still usable after errors
        resp = r.ask(file_by_filename="ember/v1/node.proto")
        protos = resp.file_descriptor_response.file_descriptor_proto
        assert descriptor_pb2.FileDescriptorProto.FromString(protos[0]).name == \
            "ember/v1/node.proto"

        resp = r.ask(all_extension_numbers_of_type="ember.v1.NodeInfo")
        assert resp.all_extension_numbers_response.base_type_name == "ember.v1.NodeInfo"
        assert list(resp.all_extension_numbers_response.extension_number) == []

        # nested symbols and methods resolve to their file
        for sym in ("ember.v1.Node.GetNode", "ember.v1.SandboxState", ".ember.v1.NodeInfo",
                    "grpc.health.v1.HealthCheckResponse.ServingStatus"):
            resp = r.ask(file_containing_symbol=sym)
            assert resp.WhichOneof("message_response") == "file_descriptor_response", sym
        r.close()
