"""Health, reflection and the metrics endpoint of the running server."""

from __future__ import annotations

import re
import urllib.request

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from mcdropout_client import Client, InvalidArgumentError, NotFoundError
from tests.integration.conftest import RunningServer

SERVICE = "mcdropout.v1.MCDropoutService"


@pytest.mark.parametrize("service", ["", SERVICE, "tiny_cls", "tiny_reg", "tiny_d2"])
def test_health_is_serving_overall_and_per_model(client: Client, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(client.channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert client.health(service) == "SERVING"


def test_health_of_an_unknown_model_is_not_found(client: Client) -> None:
    stub = health_pb2_grpc.HealthStub(client.channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Check(health_pb2.HealthCheckRequest(service="no_such_model"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(NotFoundError, match="no health status for 'no_such_model'"):
        client.health("no_such_model")


def test_health_of_a_model_that_failed_to_load_is_not_serving(client: Client) -> None:
    stub = health_pb2_grpc.HealthStub(client.channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service="deterministic"), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert client.health("deterministic") == "NOT_SERVING"


def test_reflection_lists_and_describes_the_api(client: Client) -> None:
    database = ProtoReflectionDescriptorDatabase(client.channel)
    services = set(database.get_services())
    assert {SERVICE, "grpc.health.v1.Health"} <= services
    from google.protobuf.descriptor_pool import DescriptorPool

    pool = DescriptorPool(database)
    predict = pool.FindServiceByName(SERVICE).FindMethodByName("Predict")
    assert predict.input_type.full_name == "mcdropout.v1.PredictRequest"
    assert "num_samples" in predict.input_type.fields_by_name


def test_reflection_v1_answers_like_v1alpha(client: Client) -> None:
    """grpc.reflection.v1 (what newer tools ask first): v1alpha's messages on the wire."""
    from grpc_reflection.v1alpha import reflection_pb2 as messages

    call = client.channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=messages.ServerReflectionRequest.SerializeToString,
        response_deserializer=messages.ServerReflectionResponse.FromString,
    )
    requests = [
        messages.ServerReflectionRequest(list_services=""),
        messages.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
        messages.ServerReflectionRequest(
            file_containing_symbol="grpc.reflection.v1.ServerReflection"
        ),
    ]
    listing, inference, reflection = list(call(iter(requests), timeout=10))
    names = {s.name for s in listing.list_services_response.service}
    assert {SERVICE, "inference.GRPCInferenceService", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names  # fmt: skip
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw).name
        for raw in inference.file_descriptor_response.file_descriptor_proto
    ]
    assert set(files) == {"inference/grpc_service.proto", "inference/model_config.proto"}
    [v1] = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reflection.file_descriptor_response.file_descriptor_proto
    ]
    assert (v1.name, v1.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")


def scrape(server: RunningServer) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as r:
        body: bytes = r.read()
    return body.decode()


def sample_value(text: str, name: str, **labels: str) -> float:
    """The value of one series, 0 when absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_errors_rows_and_samples(
    client: Client, server: RunningServer
) -> None:
    before = scrape(server)
    x = np.zeros((3, 5), np.float32)
    for _ in range(3):
        client.predict("tiny_reg", {"features": x}, num_samples=7)
    with pytest.raises(InvalidArgumentError):
        client.predict("tiny_reg", {"features": np.zeros((3, 4), np.float32)})
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return sample_value(after, name, **labels) - sample_value(before, name, **labels)

    # The latency carries the version that answered (the newest, 2); a failure has none.
    ok = {"model": "tiny_reg", "version": "2", "method": "Predict", "code": "OK"}
    bad = {"model": "tiny_reg", "version": "", "method": "Predict", "code": "INVALID_ARGUMENT"}
    assert delta("mcd_request_duration_seconds_count", **ok) == 3
    assert delta("mcd_request_duration_seconds_count", **bad) == 1
    assert delta("mcd_request_errors_total", model="tiny_reg", method="Predict",
                 code="INVALID_ARGUMENT") == 1  # fmt: skip
    assert delta("mcd_request_rows_sum", model="tiny_reg") == 9
    assert delta("mcd_request_samples_sum", model="tiny_reg") == 21
    assert delta("mcd_compute_duration_seconds_count", model="tiny_reg", version="2") == 3
    assert delta("mcd_request_duration_seconds_sum", **ok) > 0
    assert sample_value(after, "mcd_model_info", model="tiny_cls", version="1", opset="18") == 1
    assert "# HELP mcd_request_duration_seconds" in after
    assert sample_value(after, "mcd_requests_in_flight", method="Predict") == 0


def test_unknown_model_names_do_not_create_label_values(
    client: Client, server: RunningServer
) -> None:
    for name in ("a1", "a2"):  # the client asks for the metadata first: NOT_FOUND there
        with pytest.raises(NotFoundError):
            client.predict(name, {"x": np.zeros((1, 6), np.float32)})
    text = scrape(server)
    assert 'model="a1"' not in text
    errors = sample_value(
        text, "mcd_request_errors_total", model="_unknown", method="GetModelMetadata",
        code="NOT_FOUND",
    )  # fmt: skip
    assert errors >= 2
