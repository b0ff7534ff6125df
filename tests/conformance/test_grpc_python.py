"""The README's Python gRPC example, run for real: stubs generated from the proto with
grpcio-tools, a grpcio client over crabboxd's Unix socket with `grpc.default_authority`."""
import os
import subprocess
import sys
import tempfile
import time

import grpc
import pytest
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CRABBOXD = os.path.join(ROOT, "target", "debug", "crabboxd")


@pytest.fixture(scope="module")
def daemon():
    work = tempfile.mkdtemp(prefix="crabbox-grpc-py-")
    sock = os.path.join(work, "run", "crabboxd.sock")
    env = dict(os.environ, CRABBOX_CONFIG="/dev/null", RUST_LOG="warn")
    proc = subprocess.Popen([CRABBOXD, "--socket", sock, "--state-dir", os.path.join(work, "state")], env=env)
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    out = os.path.join(work, "stubs")
    os.makedirs(out)
    import grpc_tools
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    assert protoc.main(["protoc", f"-I{ROOT}/proto", f"-I{include}", f"--python_out={out}",
                        f"--grpc_python_out={out}", f"{ROOT}/proto/crabbox/v1/crabbox.proto"]) == 0
    sys.path.insert(0, out)
    yield sock
    proc.terminate()
    proc.wait(timeout=30)
    subprocess.run(["rm", "-rf", work], check=False)


def test_the_readme_python_example(daemon):
    from crabbox.v1 import crabbox_pb2, crabbox_pb2_grpc
    ch = grpc.insecure_channel(f"unix://{daemon}", options=[("grpc.default_authority", "localhost")])
    info = crabbox_pb2_grpc.DaemonServiceStub(ch).Info(crabbox_pb2.InfoRequest(), timeout=10)
    assert info.version and info.pid > 0 and "local" in info.providers
    leases = crabbox_pb2_grpc.LeaseServiceStub(ch)
    lease = leases.Warmup(crabbox_pb2.WarmupRequest(slug="from-python"), timeout=10)
    assert lease.id.startswith("cbx_") and lease.slug == "from-python"
    events = leases.Watch(crabbox_pb2.WatchRequest(name=lease.id, until_settled=True), timeout=30)
    states = [ev.lease.state for ev in events]
    assert states[-1] == crabbox_pb2.LEASE_STATE_READY
    listed = leases.List(crabbox_pb2.ListRequest(), timeout=10).leases
    assert [l.id for l in listed] == [lease.id]
    with pytest.raises(grpc.RpcError) as e:
        leases.Get(crabbox_pb2.LeaseRef(name="nope"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    stopped = leases.Stop(crabbox_pb2.LeaseRef(name="from-python"), timeout=10)
    assert stopped.id == lease.id
