"""Fixtures: a real daytona-sim process on loopback, and official-SDK clients of it."""
import os
import subprocess
import tempfile
import time

import pytest
from daytona import Daytona, DaytonaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIM = os.environ.get("DAYTONA_SIM_BIN", os.path.join(ROOT, "target", "debug", "daytona-sim"))
API_KEY = "dtn_conformance_key"
LIMITED_KEY = "dtn_limited_key"
JWT = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJzaW0ifQ.sig"
ORG = "org-conformance"


class Sim:
    def __init__(self, *extra, state_dir=None):
        self.dir = state_dir or tempfile.mkdtemp(prefix="daytona-sim-")
        self.proc = subprocess.Popen(
            [SIM, "--listen", "127.0.0.1:0", "--state-dir", self.dir, "--api-key", API_KEY,
             "--jwt", JWT, "--org", ORG, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        assert line.startswith("listening on http://"), line or self.proc.stderr.read()
        self.url = line.split(" ", 2)[2]
        self.api = self.url + "/api"
        self.ssh_port = None
        for extra_line in iter(self.proc.stdout.readline, ""):
            extra_line = extra_line.strip()
            if extra_line.startswith("ssh gateway on "):
                self.ssh_port = int(extra_line.rsplit(":", 1)[1])
            if extra_line == "ready":
                break

    def client(self, **kw):
        return Daytona(DaytonaConfig(api_key=kw.pop("api_key", API_KEY), api_url=self.api, target="us", **kw))

    def kill9(self):
        """SIGKILL: no shutdown, no last save; the state folder stays."""
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        subprocess.run(["rm", "-rf", self.dir], check=False)


@pytest.fixture(scope="session")
def sim():
    # x20: a sim minute lasts 3 s, so auto-stop can be seen without slowing other tests.
    s = Sim("--time-scale", "20")
    yield s
    s.stop()


@pytest.fixture(scope="session", params=[False, True], ids=["events", "polling"])
def daytona(sim, request):
    """Each test that uses the SDK client runs in both of its modes: state changes from the
    events channel (its default), and the deprecated polling."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return sim.client(use_deprecated_polling=request.param)


def wait_gone(pid, why, tries=100):
    """Waits until process `pid` of this machine is gone; fails saying `why` otherwise."""
    for _ in range(tries):
        try:
            os.kill(pid, 0)
            time.sleep(0.05)
        except ProcessLookupError:
            return
    raise AssertionError(f"process {pid} {why}")


def wait_exit(sb, session, cmd_id, tries=100):
    """Waits until a session command has an exit code; answers it."""
    for _ in range(tries):
        code = sb.process.get_session_command(session, cmd_id).exit_code
        if code is not None:
            return code
        time.sleep(0.05)
    raise AssertionError(f"command {cmd_id} of session {session} never ended")
