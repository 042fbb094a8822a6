"""A grpcio (gRPC C core) client for memgate, run by tests/security.rs.

Over TLS (trusting --ca, presenting --cert/--key when given) it checks health,
uploads a blob with ByteStream/Write using a bearer token, reads it back and
compares, and checks that a wrong token is UNAUTHENTICATED. Prints one JSON
line with what it saw; exits non-zero on any surprise.

Stubs for google.bytestream are generated at run time from the repository's
proto/ with grpc_tools.protoc into a temporary directory.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def bytestream_stubs():
    out = tempfile.mkdtemp(prefix="memgate-grpcio-")
    proto_dir = REPO / "proto"
    rc = protoc.main([
        "protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}",
        str(proto_dir / "google" / "bytestream" / "bytestream.proto"),
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed: {rc}")
    sys.path.insert(0, out)
    return (
        importlib.import_module("google.bytestream.bytestream_pb2"),
        importlib.import_module("google.bytestream.bytestream_pb2_grpc"),
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True, help="host:port of the TLS gRPC listener")
    ap.add_argument("--ca", required=True)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--token", required=True)
    args = ap.parse_args()

    pb, pb_grpc = bytestream_stubs()
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(args.ca).read_bytes(),
        private_key=Path(args.key).read_bytes() if args.key else None,
        certificate_chain=Path(args.cert).read_bytes() if args.cert else None,
    )
    options = [
        ("grpc.ssl_target_name_override", "localhost"),
        ("grpc.max_receive_message_length", 64 * MIB),
    ]
    seen: dict[str, object] = {}
    with grpc.secure_channel(args.target, creds, options=options) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        seen["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(
            health.Check(health_pb2.HealthCheckRequest(service=""), timeout=20).status
        )

        data = os.urandom(5 * MIB + 3)
        digest = hashlib.sha256(data).hexdigest()
        name = f"uploads/{uuid.uuid4()}/blobs/{digest}/{len(data)}"

        def requests():
            for off in range(0, len(data), MIB):
                chunk = data[off : off + MIB]
                yield pb.WriteRequest(
                    resource_name=name if off == 0 else "",
                    write_offset=off,
                    finish_write=off + len(chunk) == len(data),
                    data=chunk,
                )

        stub = pb_grpc.ByteStreamStub(channel)
        good = [("authorization", f"Bearer {args.token}")]
        resp = stub.Write(requests(), metadata=good, timeout=60)
        seen["committed"] = resp.committed_size
        got = b"".join(
            r.data
            for r in stub.Read(
                pb.ReadRequest(resource_name=f"blobs/{digest}/{len(data)}"), metadata=good, timeout=60
            )
        )
        seen["read_back_equal"] = got == data
        try:
            stub.Write(requests(), metadata=[("authorization", "Bearer wrong")], timeout=60)
            seen["wrong_token"] = "OK"
        except grpc.RpcError as e:
            seen["wrong_token"] = e.code().name
    print(json.dumps(seen))
    ok = (
        seen["health"] == "SERVING"
        and seen["committed"] == len(data)
        and seen["read_back_equal"]
        and seen["wrong_token"] == "UNAUTHENTICATED"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
