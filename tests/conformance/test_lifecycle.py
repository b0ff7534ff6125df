"""Pause, archive, resize, quotas and request limits, through the official SDK."""
import time

import pytest
from daytona import CreateSandboxFromImageParams, Image, Resources, SessionExecuteRequest
from daytona.common.errors import DaytonaError, DaytonaForbiddenError

from conftest import Sim
from test_sdk import create, raw


def test_pause_freezes_and_start_resumes(daytona):
    sb = create(daytona)
    try:
        sb.process.create_session("tick")
        sb.process.execute_session_command("tick", SessionExecuteRequest(
            command="while :; do date +%s%N >> /tmp/ticks; sleep 0.02; done", run_async=True))
        time.sleep(0.3)
        sb.pause()
        assert sb.state == "paused"
        # The toolbox answers only a started sandbox.
        with pytest.raises(DaytonaError, match="400"):
            sb.fs.download_file("/tmp/ticks")
        time.sleep(0.3)
        sb.start()
        frozen = sb.fs.download_file("/tmp/ticks").splitlines()
        time.sleep(0.3)
        after = sb.fs.download_file("/tmp/ticks").splitlines()
        assert len(after) > len(frozen), "the loop runs again after resume"
        # No tick was written while paused: the largest gap spans the pause.
        stamps = [int(x) for x in after]
        gap = max(b - a for a, b in zip(stamps, stamps[1:]))
        assert gap > 250_000_000, gap
        with pytest.raises(DaytonaError, match="only a started sandbox"):
            sb.stop()
            sb.pause()
    finally:
        daytona.delete(sb)


def test_archive_and_start_again(daytona):
    sb = create(daytona)
    try:
        sb.fs.upload_file(b"kept", "/home/daytona/kept.txt")
        with pytest.raises(DaytonaError, match="stop it first"):
            sb.archive()
        sb.stop()
        sb.archive()
        for _ in range(100):
            sb.refresh_data()
            if sb.state == "archived":
                break
            time.sleep(0.05)
        assert sb.state == "archived"
        sb.start()
        assert sb.state == "started"
        assert sb.fs.download_file("/home/daytona/kept.txt") == b"kept"
    finally:
        daytona.delete(sb)


def test_resize_rules(daytona):
    sb = daytona.create(CreateSandboxFromImageParams(image=Image.debian_slim("3.12"),
                                                     resources=Resources(cpu=1, memory=1, disk=3)), timeout=60)
    try:
        sb.resize(Resources(cpu=2, memory=2))
        assert (sb.cpu, sb.memory) == (2, 2)
        with pytest.raises(DaytonaError, match="only grow"):
            sb.resize(Resources(cpu=1))
        with pytest.raises(DaytonaError, match="stopped sandbox"):
            sb.resize(Resources(disk=10))
        sb.stop()
        sb.resize(Resources(cpu=1, disk=10))
        assert (sb.cpu, sb.disk) == (1, 10)
        with pytest.raises(DaytonaError, match="cannot shrink"):
            sb.resize(Resources(disk=5))
    finally:
        daytona.delete(sb)


def test_quotas_are_daytonas_403_and_free_up():
    sim = Sim("--quota-cpu", "2", "--quota-sandboxes", "3", "--quota-memory", "3")
    try:
        client = sim.client()
        a = client.create(CreateSandboxFromImageParams(image=Image.debian_slim("3.12"), resources=Resources(cpu=1, memory=1)), timeout=60)
        b = client.create(CreateSandboxFromImageParams(image=Image.debian_slim("3.12"), resources=Resources(cpu=1, memory=1)), timeout=60)
        with pytest.raises(DaytonaForbiddenError, match="Total CPU limit exceeded. Maximum allowed: 2."):
            client.create(CreateSandboxFromImageParams(image=Image.debian_slim("3.12"), resources=Resources(cpu=1, memory=1)), timeout=60)
        with pytest.raises(DaytonaForbiddenError, match="Total CPU limit exceeded"):
            a.resize(Resources(cpu=2))
        b.stop()  # a stopped sandbox gives its CPUs back
        c = client.create(CreateSandboxFromImageParams(image=Image.debian_slim("3.12"), resources=Resources(cpu=1, memory=1)), timeout=60)
        with pytest.raises(DaytonaForbiddenError, match="Total CPU limit exceeded"):
            b.start()
        with pytest.raises(DaytonaForbiddenError, match="Total sandbox limit exceeded. Maximum allowed: 3."):
            client.create(CreateSandboxFromImageParams(image=Image.debian_slim("3.12"), resources=Resources(cpu=1, memory=1)), timeout=60)
        status, body, _ = raw(sim, "POST", "/api/sandbox", '{"cpu": 1, "memory": 1}')
        assert status == 403 and body["statusCode"] == 403 and body["error"] == "Forbidden", body
        assert "upgrade your organization's Tier" in body["message"], body
        for s in (a, b, c):
            client.delete(s)
    finally:
        sim.stop()
    # Disk: a stopped sandbox keeps its disk, an archived one gives it back.
    sim = Sim("--quota-disk", "8")
    try:
        client = sim.client()
        a = client.create(CreateSandboxFromImageParams(image=Image.debian_slim("3.12"), resources=Resources(disk=5)), timeout=60)
        a.stop()
        with pytest.raises(DaytonaForbiddenError, match="Total disk limit exceeded. Maximum allowed: 8GiB.\nConsider archiving"):
            client.create(CreateSandboxFromImageParams(image=Image.debian_slim("3.12"), resources=Resources(disk=5)), timeout=60)
        a.archive()
        for _ in range(100):
            a.refresh_data()
            if a.state == "archived":
                break
            time.sleep(0.05)
        b = client.create(CreateSandboxFromImageParams(image=Image.debian_slim("3.12"), resources=Resources(disk=5)), timeout=60)
        assert b.state == "started"
    finally:
        sim.stop()


def test_json_bodies_past_the_limit_get_413(sim):
    big = '{"labels": {"k": "' + "x" * (2 * 1024 * 1024) + '"}}'
    status, body, _ = raw(sim, "POST", "/api/sandbox", big)
    assert status == 413 and body["statusCode"] == 413 and "too large" in body["message"], body
    status, _, _ = raw(sim, "GET", "/api/sandbox")
    assert status == 200


def test_a_sandbox_built_from_an_image_streams_its_build(daytona, tmp_path):
    lines = []
    image = Image.debian_slim("3.12").run_commands("echo one", "echo two")
    sb = daytona.create(CreateSandboxFromImageParams(image=image), timeout=60,
                        on_snapshot_create_logs=lines.append)
    try:
        assert sb.state == "started"
        text = "\n".join(lines)
        assert "Step 1/" in text and "echo two" in text and "Successfully built" in text, text
    finally:
        daytona.delete(sb)
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("RUN echo no base image\n")
    with pytest.raises(DaytonaError):
        daytona.create(CreateSandboxFromImageParams(image=Image.from_dockerfile(dockerfile)), timeout=60)
    broken = [s for s in daytona.list() if s.state == "build_failed"]
    assert broken, "the failed build's sandbox is in build_failed"
    for s in broken:
        assert "FROM" in (s.error_reason or "")
        daytona.delete(s)


def test_bad_timing_and_quota_flags_are_refused_with_what_to_use(tmp_path):
    import subprocess
    from conftest import SIM
    for flags, said in ((["--jitter", "2"], "between 0 and 1"), (["--quota-cpu", "0"], "at least 1"),
                        (["--max-json-body", "lots"], "max-json-body")):
        r = subprocess.run([SIM, "--state-dir", str(tmp_path), "--api-key", "k", *flags],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and said in r.stderr, (flags, r.returncode, r.stderr)
