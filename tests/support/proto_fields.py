"""Prints every message field, enum value and RPC of the ``inference`` protos as JSON: the
server's (``python tests/support/proto_fields.py service``) or tritonclient's (``... triton``).

Two processes, since both sets register ``inference.*`` in protobuf's default pool
(tests/unit/test_proto_compat.py compares them).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from google.protobuf import descriptor_pb2


def fields(modules: list[Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def walk(message: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        name = prefix + message.name
        found[name] = {f.name: [f.number, f.type, f.label, f.type_name.rsplit(".", 1)[-1]]
                       for f in message.field}  # fmt: skip
        for enum in message.enum_type:
            found[f"enum {name}.{enum.name}"] = {v.name: v.number for v in enum.value}
        for nested in message.nested_type:
            walk(nested, name + ".")

    for module in modules:
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        for message in proto.message_type:
            walk(message, "")
        for enum in proto.enum_type:
            found[f"enum {enum.name}"] = {v.name: v.number for v in enum.value}
        for service in proto.service:
            for method in service.method:
                found[f"rpc {method.name}"] = [method.input_type, method.output_type,
                                               method.server_streaming]  # fmt: skip
    return found


if __name__ == "__main__":
    if sys.argv[1] == "triton":
        from tritonclient.grpc import model_config_pb2, service_pb2

        modules = [service_pb2, model_config_pb2]
    else:
        from service.gen.inference import grpc_service_pb2, model_config_pb2

        modules = [grpc_service_pb2, model_config_pb2]
    json.dump(fields(modules), sys.stdout)
