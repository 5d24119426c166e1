"""The generated gRPC stubs (CRI, containerd services) serve and call the upstream method paths."""

from concurrent import futures

import grpc
import pytest
from google.protobuf import empty_pb2

from proto.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from proto.containerd.services.version.v1 import version_pb2, version_pb2_grpc
from proto.containerd.types.task import task_pb2
from proto.k8s.cri.runtime.v1 import api_pb2, api_pb2_grpc


class _Runtime(api_pb2_grpc.RuntimeServiceServicer):
    def Version(self, request, context):
        return api_pb2.VersionResponse(version=request.version, runtime_name="fake",
                                       runtime_api_version="v1")

    def ExecSync(self, request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, f"container {request.container_id} not found")


class _Version(version_pb2_grpc.VersionServicer):
    def Version(self, request, context):
        return version_pb2.VersionResponse(version="v9.9.9", revision="abc")


class _Tasks(tasks_pb2_grpc.TasksServicer):
    def Get(self, request, context):
        return tasks_pb2.GetResponse(process=task_pb2.Process(
            container_id=request.container_id, pid=42, status=task_pb2.RUNNING))


@pytest.fixture
def channel(tmp_path):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    api_pb2_grpc.add_RuntimeServiceServicer_to_server(_Runtime(), server)
    version_pb2_grpc.add_VersionServicer_to_server(_Version(), server)
    tasks_pb2_grpc.add_TasksServicer_to_server(_Tasks(), server)
    addr = f"unix://{tmp_path}/grpc.sock"
    server.add_insecure_port(addr)
    server.start()
    with grpc.insecure_channel(addr) as ch:
        yield ch
    server.stop(None)


def test_cri_runtime_service(channel):
    stub = api_pb2_grpc.RuntimeServiceStub(channel)
    resp = stub.Version(api_pb2.VersionRequest(version="v1"), timeout=5)
    assert (resp.version, resp.runtime_name, resp.runtime_api_version) == ("v1", "fake", "v1")
    with pytest.raises(grpc.RpcError) as err:
        stub.ExecSync(api_pb2.ExecSyncRequest(container_id="nope", cmd=["true"]), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # a method we did not implement answers UNIMPLEMENTED rather than being absent from the stub
    with pytest.raises(grpc.RpcError) as err:
        stub.CheckpointContainer(api_pb2.CheckpointContainerRequest(container_id="x"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_method_paths_are_upstream_names(channel):
    # call by raw path, as containerd/kubelet would address them
    call = channel.unary_unary("/containerd.services.version.v1.Version/Version",
                               request_serializer=empty_pb2.Empty.SerializeToString,
                               response_deserializer=version_pb2.VersionResponse.FromString)
    assert call(empty_pb2.Empty(), timeout=5).version == "v9.9.9"
    call = channel.unary_unary("/runtime.v1.RuntimeService/Version",
                               request_serializer=api_pb2.VersionRequest.SerializeToString,
                               response_deserializer=api_pb2.VersionResponse.FromString)
    assert call(api_pb2.VersionRequest(version="v1"), timeout=5).runtime_name == "fake"
    got = tasks_pb2_grpc.TasksStub(channel).Get(tasks_pb2.GetRequest(container_id="c1"), timeout=5)
    assert (got.process.pid, got.process.status) == (42, task_pb2.RUNNING)
