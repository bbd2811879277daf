"""gRPC server reflection, version 1 beside v1alpha.

grpcio-reflection 1.81.1 serves only ``grpc.reflection.v1alpha.ServerReflection``; tools now ask
for ``grpc.reflection.v1.ServerReflection`` first (grpcurl 1.9+, buf curl, Postman), and some
never fall back. The two versions have the same messages under another package, so one servicer
answers both: v1's requests and answers are v1alpha's bytes. v1's file descriptor is made from
v1alpha's (package renamed) and added to the default pool, so that a client can also describe
the v1 service itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

__all__ = ["V1ALPHA_SERVICE_NAME", "V1_SERVICE_NAME", "enable_reflection"]

V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"
_OLD, _NEW = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."


def _renamed(type_name: str) -> str:
    return _NEW + type_name.removeprefix(_OLD) if type_name.startswith(_OLD) else type_name


def _rename_fields(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        if field.type_name:  # setting "" on a scalar field would mark it as a message field
            field.type_name = _renamed(field.type_name)
    for nested in message.nested_type:
        _rename_fields(nested)


def register_v1_descriptor(pool: Any = None) -> None:
    """Add ``grpc/reflection/v1/reflection.proto`` to ``pool`` (the default pool) unless it is
    there: v1alpha's file with the package renamed."""
    pool = pool or descriptor_pool.Default()  # type: ignore[no-untyped-call]
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha.DESCRIPTOR.CopyToProto(proto)
    proto.name = _V1_FILE
    proto.package = "grpc.reflection.v1"
    proto.ClearField("options")  # v1alpha's Java and Go packages
    for message in proto.message_type:
        _rename_fields(message)
    for service in proto.service:
        for method in service.method:
            method.input_type = _renamed(method.input_type)
            method.output_type = _renamed(method.output_type)
    pool.AddSerializedFile(proto.SerializeToString())


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection v1alpha and v1 on ``server``, listing ``service_names`` and both
    reflection services."""
    register_v1_descriptor()
    names = (*service_names, V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.method_handlers_generic_handler(
        V1_SERVICE_NAME,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=v1alpha.ServerReflectionRequest.FromString,
                response_serializer=v1alpha.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1,))
