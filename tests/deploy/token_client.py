"""A plaintext grpcio client that checks a bearer token against memgate: an
upload and a read with it, and the same upload without a token and with a
wrong one. Run with the interop venv's python (scripts/interop-venv.sh) by
test_runtime.py; prints one JSON line of what it saw.

The ByteStream stubs come from tests/interop/grpcio_client.py, which generates
them from the repository's proto/ at run time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import uuid
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "interop"))
from grpcio_client import bytestream_stubs  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True, help="host:port of the plaintext gRPC listener")
    ap.add_argument("--token", required=True)
    args = ap.parse_args()
    pb, pb_grpc = bytestream_stubs()
    data = b"memgate chart-generated token\n"
    digest = hashlib.sha256(data).hexdigest()

    def write(metadata):
        name = f"uploads/{uuid.uuid4()}/blobs/{digest}/{len(data)}"
        req = pb.WriteRequest(resource_name=name, write_offset=0, finish_write=True, data=data)
        try:
            return stub.Write(iter([req]), metadata=metadata, timeout=30).committed_size
        except grpc.RpcError as e:
            return e.code().name

    seen: dict[str, object] = {}
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.ByteStreamStub(channel)
        good = [("authorization", f"Bearer {args.token}")]
        seen["with_token"] = write(good)
        read = stub.Read(pb.ReadRequest(resource_name=f"blobs/{digest}/{len(data)}"), metadata=good, timeout=30)
        seen["read_back_equal"] = b"".join(r.data for r in read) == data
        seen["without"] = write([])
        seen["wrong"] = write([("authorization", f"Bearer {args.token}x")])
    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
