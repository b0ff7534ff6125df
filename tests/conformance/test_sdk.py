"""The official Daytona Python SDK (daytona==0.226.1) against daytona-sim.

Every call must get a well-formed answer: any SDK validation error fails the test.
"""
import asyncio
import json
import os
import subprocess
import tempfile
import time
import urllib.request

import pytest
from daytona import (CreateSandboxFromSnapshotParams, CreateSnapshotParams, DaytonaConfig, Daytona,
                     Image, ListSandboxesQuery, SessionExecuteRequest)
from daytona.common.errors import (DaytonaAuthenticationError, DaytonaBadRequestError, DaytonaConflictError,
                                   DaytonaError, DaytonaForbiddenError, DaytonaNotFoundError,
                                   DaytonaTimeoutError)

from conftest import API_KEY, JWT, LIMITED_KEY, ORG, Sim, wait_exit, wait_gone


def create(daytona, **kw):
    params = dict(snapshot="default", labels={"suite": "conformance"}, env_vars={"GREETING": "hi there"},
                  auto_stop_interval=15, network_allow_list="10.0.0.0/8,192.168.0.0/16")
    params.update(kw)
    return daytona.create(CreateSandboxFromSnapshotParams(**params), timeout=60)


def test_create_from_snapshot_with_labels_env_network_autostop(daytona):
    sb = create(daytona, labels={"suite": "conformance", "case": "create"})
    try:
        assert sb.state.value == "started"
        fresh = daytona.get(sb.id)
        assert fresh.labels["case"] == "create"
        assert fresh.env["GREETING"] == "hi there"
        assert fresh.network_allow_list == "10.0.0.0/8,192.168.0.0/16"
        assert fresh.auto_stop_interval == 15
        assert fresh.snapshot == "default"
        assert daytona.get(sb.name).id == sb.id, "get by name"
        r = sb.process.exec('echo "$GREETING"')
        assert r.result == "hi there\n"
    finally:
        daytona.delete(sb)


def sim_events(sim):
    with urllib.request.urlopen(sim.url + "/_sim/events") as r:
        return json.loads(r.read())


@pytest.mark.parametrize("polling", [False, True], ids=["event-channel", "deprecated-polling"])
def test_wait_for_started_in_both_modes(sim, polling):
    before = sim_events(sim)
    client = Daytona(DaytonaConfig(api_key=API_KEY, api_url=sim.api, target="us", use_deprecated_polling=polling))
    sb = client.create(CreateSandboxFromSnapshotParams(snapshot="default"), timeout=60)
    try:
        assert sb.state.value == "started"
        after = sim_events(sim)
        if polling:
            assert after["connected"] == before["connected"], "polling mode never connects"
        else:
            # The SDK's default mode waited on the events channel: it connected and was told.
            assert after["connected"] > before["connected"], after
            assert after["delivered"] > before["delivered"], after
        sb.stop(timeout=60)
        assert sb.state.value == "stopped"
        sb.start(timeout=60)
        assert sb.state.value == "started"
    finally:
        client.delete(sb)


def test_the_events_channel_refuses_a_wrong_token(sim):
    client = Daytona(DaytonaConfig(api_key="dtn_wrong", api_url=sim.api, target="us"))
    with pytest.raises(DaytonaAuthenticationError):
        client.create(CreateSandboxFromSnapshotParams(snapshot="default"), timeout=60)
    # The channel is not the way in either: a connect with a wrong token is refused.
    import socketio
    sio = socketio.Client(reconnection=False)
    with pytest.raises(socketio.exceptions.ConnectionError):
        sio.connect(sim.url, socketio_path="/api/socket.io/", auth={"token": "dtn_wrong"},
                    transports=["websocket"], wait_timeout=5)


def test_list_by_labels_across_pages(daytona):
    made = [create(daytona, labels={"suite": "conformance", "page": "yes"}) for _ in range(3)]
    try:
        found = list(daytona.list(ListSandboxesQuery(labels={"page": "yes"}, limit=1)))
        assert sorted(s.id for s in found) == sorted(s.id for s in made)
        assert list(daytona.list(ListSandboxesQuery(labels={"page": "no"}))) == []
    finally:
        for sb in made:
            daytona.delete(sb)


def test_filesystem(daytona):
    sb = create(daytona)
    try:
        sb.fs.create_folder("work/sub", "755")
        sb.fs.upload_file(b"hello bytes", "work/sub/a.txt")
        with tempfile.NamedTemporaryFile(delete=False) as f:
            f.write(b"from disk" * 1000)
        sb.fs.upload_file(f.name, "/tmp/b.bin")
        assert sb.fs.download_file("work/sub/a.txt") == b"hello bytes"
        assert sb.fs.download_file("/tmp/b.bin") == b"from disk" * 1000
        names = sorted(i.name for i in sb.fs.list_files("work/sub"))
        assert names == ["a.txt"]
        info = sb.fs.get_file_info("work/sub/a.txt")
        assert info.size == 11 and not info.is_dir
        # Files are real inside the sandbox.
        assert sb.process.exec("cat /home/daytona/work/sub/a.txt").result == "hello bytes"
        sb.fs.delete_file("work/sub/a.txt")
        sb.fs.delete_file("work", recursive=True)
        with pytest.raises(DaytonaNotFoundError):
            sb.fs.get_file_info("work/sub/a.txt")
        with pytest.raises(DaytonaError):
            sb.fs.download_file("/etc/passwd")
    finally:
        daytona.delete(sb)


def test_process_exec_codes_cwd_env_and_timeout(daytona):
    sb = create(daytona)
    try:
        r = sb.process.exec("echo out; echo err >&2; exit 7")
        assert r.exit_code == 7
        assert "out" in r.result and "err" in r.result
        sb.fs.create_folder("proj", "755")
        r = sb.process.exec("pwd; echo $X", cwd="proj", env={"X": "y"})
        assert r.result == "/home/daytona/proj\ny\n"
        with pytest.raises(DaytonaTimeoutError):
            sb.process.exec("sleep 30", timeout=1)
    finally:
        daytona.delete(sb)


def test_session_async_exec_status_logs_follow_input(daytona):
    sb = create(daytona)
    try:
        sb.process.create_session("s1")
        cmd = sb.process.execute_session_command(
            "s1", SessionExecuteRequest(command="echo one; sleep 0.3; echo two >&2; (exit 4)", run_async=True))
        out, err = [], []
        asyncio.run(sb.process.get_session_command_logs_async("s1", cmd.cmd_id, out.append, err.append))
        assert "".join(out) == "one\n" and "".join(err) == "two\n"
        status = sb.process.get_session_command("s1", cmd.cmd_id)
        assert status.exit_code == 4
        logs = sb.process.get_session_command_logs("s1", cmd.cmd_id)
        assert logs.stdout == "one\n" and logs.stderr == "two\n"
        sync = sb.process.execute_session_command("s1", SessionExecuteRequest(command="echo sync"))
        assert sync.exit_code == 0 and sync.stdout == "sync\n"
        # Input: a newline is added when missing (for `read`), and it is echoed into the
        # output unless the command was started with suppressInputEcho (as on Daytona).
        reader = sb.process.execute_session_command("s1", SessionExecuteRequest(command="read line; echo got $line", run_async=True))
        sb.process.send_session_command_input("s1", reader.cmd_id, "typed")
        quiet = sb.process.execute_session_command(
            "s1", SessionExecuteRequest(command="read a; read b; echo got $a $b", run_async=True, suppress_input_echo=True))
        sb.process.send_session_command_input("s1", quiet.cmd_id, "one\n")
        sb.process.send_session_command_input("s1", quiet.cmd_id, "two")
        for c in (reader, quiet):
            wait_exit(sb, "s1", c.cmd_id)
        assert sb.process.get_session_command_logs("s1", reader.cmd_id).stdout == "typed\ngot typed\n"
        assert sb.process.get_session_command_logs("s1", quiet.cmd_id).stdout == "got one two\n"
        with pytest.raises(DaytonaError, match="already completed"):
            sb.process.send_session_command_input("s1", quiet.cmd_id, "late")
        session = sb.process.get_session("s1")
        assert len(session.commands) == 4
        sb.process.delete_session("s1")
        with pytest.raises(DaytonaNotFoundError):
            sb.process.get_session("s1")
    finally:
        daytona.delete(sb)


def test_an_async_commands_group_dies_with_its_session(daytona):
    """An async command's process group (its background children included) goes when its
    session is deleted, although it left the shell's group."""
    sb = create(daytona)
    try:
        sb.process.create_session("grp")
        sb.process.execute_session_command("grp", SessionExecuteRequest(
            command="sleep 300 & echo $! > /tmp/bg; wait", run_async=True))
        pid = None
        for _ in range(100):
            try:
                pid = int(sb.fs.download_file("/tmp/bg"))
                break
            except Exception:
                time.sleep(0.05)
        assert pid, "the background sleep said its pid"
        os.kill(pid, 0)
        sb.process.delete_session("grp")
        wait_gone(pid, "(an async command's child) outlived its session")
    finally:
        daytona.delete(sb)


def test_a_session_keeps_one_shell(daytona):
    """As on Daytona, a session's commands run one after another in one shell: the
    directory, exported and plain shell variables and functions carry over; a syntax error
    fails one command only; `exit` ends the shell, and the session says so."""
    sb = create(daytona)
    try:
        sb.process.create_session("shell")
        run = lambda c: sb.process.execute_session_command("shell", SessionExecuteRequest(command=c))
        assert run("mkdir -p /tmp/w && cd /tmp/w && export A=1 && B=2 && f() { echo fn $1; }").exit_code == 0
        r = run('echo "$PWD $A $B"; f x; sh -c \'echo child sees A=$A B=$B\'')
        assert r.exit_code == 0
        assert r.stdout == "/tmp/w 1 2\nfn x\nchild sees A=1 B=\n", r.stdout
        bad = run("if then fi")
        assert bad.exit_code == 2 and "syntax error" in bad.stderr, bad
        assert run("echo still $A").stdout == "still 1\n"
        # An async command runs in a process group of its own (as Daytona's newer daemons
        # run commands, under setsid), in order: what follows waits for it. It sees the
        # session's directory, variables and functions; what it changes stays in it.
        slow = sb.process.execute_session_command(
            "shell", SessionExecuteRequest(
                command='sleep 0.5; echo "$PWD $A $B"; f y; echo "[$#][${__sim_c-}]"; export C=3; cd /', run_async=True))
        after = run("echo C=$C; pwd; echo $$ $(ps -o pgid= -p $$)")
        assert after.stdout.splitlines()[:2] == ["C=", "/tmp/w"], after.stdout
        shell_pid, shell_group = after.stdout.split()[-2:]
        assert sb.process.get_session_command("shell", slow.cmd_id).exit_code == 0
        assert sb.process.get_session_command_logs("shell", slow.cmd_id).stdout == "/tmp/w 1 2\nfn y\n[0][]\n"
        group = sb.process.execute_session_command("shell", SessionExecuteRequest(
            command="echo $$ $(ps -o pgid= -p $$) $PPID", run_async=True))
        wait_exit(sb, "shell", group.cmd_id)
        pid, pgid, parent = sb.process.get_session_command_logs("shell", group.cmd_id).stdout.split()
        assert pid == pgid and pgid != shell_group and parent == shell_pid, (pid, pgid, parent, shell_group)
        # Another session is another shell.
        sb.process.create_session("other")
        other = sb.process.execute_session_command("other", SessionExecuteRequest(command="echo \"[$A]\"; pwd"))
        assert other.stdout == "[]\n/home/daytona\n", other.stdout
        gone = run("exit 7")
        assert gone.exit_code == 7
        with pytest.raises(DaytonaError, match="shell has exited"):
            run("true")
        sb.process.delete_session("shell")
        sb.process.delete_session("other")
    finally:
        daytona.delete(sb)


def test_pty_sessions_create_connect_resize_input_exit(daytona):
    from daytona.common.pty import PtySize
    from daytona_toolbox_api_client import PtyCreateRequest
    sb = create(daytona)
    try:
        # create-connect in one step (the SDK's create_pty_session), env through the
        # subprotocol, input, the exit code from the exit-control message.
        pty = sb.process.create_pty_session(id="p1", envs={"MARK": "m-1"}, pty_size=PtySize(rows=30, cols=100))
        pty.send_input("test -t 0 && echo tty-$MARK; stty size; exit 7\n")
        out = []
        result = pty.wait(on_data=out.append, timeout=30)
        text = b"".join(out).decode(errors="replace")
        assert result.exit_code == 7, (result, text)
        assert "tty-m-1" in text and "30 100" in text, text
        with pytest.raises(DaytonaNotFoundError):
            sb.process.get_pty_session_info("p1")  # an exited session is gone

        # create, then connect; resize; list; kill.
        sb.process._api_client.create_pty_session(PtyCreateRequest(id="p2", cols=80, rows=24))
        handle = sb.process.connect_pty_session("p2")
        info = handle.resize(PtySize(rows=40, cols=120))
        assert (info.rows, info.cols, info.active) == (40, 120, True)
        assert "p2" in [s.id for s in sb.process.list_pty_sessions()]
        handle.send_input("stty size\n")
        seen = b""
        deadline = time.time() + 30
        for data in handle:
            seen += data
            if b"40 120" in seen or time.time() > deadline:
                break
        assert b"40 120" in seen, seen
        sb.process.kill_pty_session("p2")
        result = handle.wait(timeout=30)
        assert result.exit_code == 137, result
        with pytest.raises(DaytonaNotFoundError):
            sb.process.get_pty_session_info("p2")
        with pytest.raises(DaytonaError):
            sb.process.resize_pty_session("p2", PtySize(rows=10, cols=10))
        from daytona_toolbox_api_client.exceptions import BadRequestException
        with pytest.raises(BadRequestException, match="less than 1000"):
            sb.process._api_client.create_pty_session(PtyCreateRequest(id="p3", cols=5000, rows=24))
    finally:
        daytona.delete(sb)


def test_snapshots_active_and_build_failed(daytona, tmp_path):
    snap = daytona.snapshot.create(CreateSnapshotParams(name="conf-py312", image="python:3.12-slim"))
    assert snap.state.value == "active"
    assert daytona.snapshot.get("conf-py312").id == snap.id
    assert any(s.name == "conf-py312" for s in daytona.snapshot.list().items)
    sb = create(daytona, snapshot="conf-py312")
    daytona.delete(sb)
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("RUN echo no base image\n")
    with pytest.raises(DaytonaError) as e:
        daytona.snapshot.create(CreateSnapshotParams(name="conf-broken", image=Image.from_dockerfile(dockerfile)))
    assert "FROM" in str(e.value)
    broken = daytona.snapshot.get("conf-broken")
    assert broken.state.value == "build_failed"
    daytona.snapshot.delete(broken)
    daytona.snapshot.delete(snap)
    with pytest.raises(DaytonaNotFoundError):
        daytona.snapshot.get("conf-py312")


def test_start_stop_delete(daytona):
    sb = create(daytona)
    sb.stop()
    assert sb.state.value == "stopped"
    sb.start()
    assert sb.state.value == "started"
    assert sb.process.exec("echo back").result == "back\n"
    daytona.delete(sb, wait=True)
    with pytest.raises(DaytonaNotFoundError):
        daytona.get(sb.id)


def test_auto_stop_after_idle(daytona):
    # --time-scale 20: one sim minute is 3 s.
    sb = create(daytona, auto_stop_interval=1)
    try:
        assert sb.state.value == "started"
        for _ in range(300):
            if daytona.get(sb.id).state.value == "stopped":
                break
            time.sleep(0.05)
        assert daytona.get(sb.id).state.value == "stopped"
    finally:
        daytona.delete(sb)


SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]


def ssh(access, *args, stdin=None):
    words = access.ssh_command.split()
    assert words[0] == "ssh"
    return subprocess.run([*words, *SSH_OPTS, *args], input=stdin, capture_output=True, text=True, timeout=60)


def test_ssh_access_and_a_real_openssh_client(daytona, sim):
    sb = create(daytona)
    try:
        access = sb.create_ssh_access(expires_in_minutes=5)
        assert access.ssh_command == f"ssh -p {sim.ssh_port} {access.token}@127.0.0.1"
        assert sb.validate_ssh_access(access.token).valid
        sb.fs.upload_file(b"over ssh\n", "note.txt")
        r = ssh(access, "cat note.txt; pwd; echo oops >&2; exit 6")
        assert r.returncode == 6, r.stderr
        assert r.stdout == "over ssh\n/home/daytona\n"
        assert "oops" in r.stderr
        r = ssh(access, stdin="echo from a shell; exit 3\n")
        assert r.returncode == 3 and "from a shell" in r.stdout
        # A PTY: a real terminal for the command, its size, TERM, and the exit code.
        r = ssh(access, "-tt", "stty size; echo TERM=$TERM; test -t 0 && echo on-a-tty; exit 4")
        assert r.returncode == 4, r.stderr
        assert r.stdout.replace("\r", "").splitlines() == ["24 80", "TERM=xterm", "on-a-tty"], r.stdout
        r = ssh(access, "-tt", stdin="echo typed-$((6*7))\nexit 5\n")
        assert r.returncode == 5 and "typed-42" in r.stdout
        sb.revoke_ssh_access(access.token)
        assert not sb.validate_ssh_access(access.token).valid
        r = ssh(access, "true")
        assert r.returncode == 255 and "Permission denied" in r.stderr
    finally:
        daytona.delete(sb)


def raw(sim, method, path, body=None, headers=None):
    req = urllib.request.Request(sim.url + path, method=method, data=None if body is None else body.encode(),
                                 headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read() or b"null"), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), {k.lower(): v for k, v in e.headers.items()}


def test_one_error_per_status_family(sim, daytona):
    # 400: resources with a snapshot; malformed JSON gets Daytona's error body.
    status, body, _ = raw(sim, "POST", "/api/sandbox", '{"snapshot": "default", "cpu": 4}')
    assert status == 400 and "Cannot specify Sandbox resources" in body["message"]
    status, body, _ = raw(sim, "POST", "/api/sandbox", "{not json")
    assert status == 400 and body["statusCode"] == 400 and body["path"] == "/api/sandbox" and body["timestamp"]
    # 401: a bad key.
    bad = Daytona(DaytonaConfig(api_key="dtn_wrong", api_url=sim.api, target="us"))
    with pytest.raises(DaytonaAuthenticationError):
        bad.get("anything")
    # 403: a JWT without its organisation, and a key without a permission.
    status, body, _ = raw(sim, "GET", "/api/sandbox", headers={"Authorization": f"Bearer {JWT}"})
    assert status == 403
    status, _, _ = raw(sim, "GET", "/api/sandbox", headers={"Authorization": f"Bearer {JWT}", "X-Daytona-Organization-ID": ORG})
    assert status == 200
    limited = Sim("--api-key", LIMITED_KEY, "--permissions", "write:sandboxes")
    try:
        client = limited.client(api_key=LIMITED_KEY)
        sb = client.create(CreateSandboxFromSnapshotParams(snapshot="default"), timeout=60)
        with pytest.raises(DaytonaForbiddenError):
            client.delete(sb)
        status, key, _ = raw(limited, "GET", "/api/api-keys/current", headers={"Authorization": f"Bearer {LIMITED_KEY}"})
        assert status == 200 and key["permissions"] == ["write:sandboxes"] and LIMITED_KEY not in key["value"]
    finally:
        limited.stop()
    # 404, 409.
    with pytest.raises(DaytonaNotFoundError):
        daytona.get("no-such-sandbox")
    sb = create(daytona, name="conf-dup")
    try:
        with pytest.raises(DaytonaConflictError):
            create(daytona, name="conf-dup")
    finally:
        daytona.delete(sb)
    # 429 with Retry-After, then 503: faults set at runtime.
    raw(sim, "POST", "/_sim/faults", '{"rate_limit_count": 1, "retry_after_secs": 2}')
    status, body, headers = raw(sim, "GET", "/api/sandbox")
    assert status == 429 and headers.get("retry-after") == "2"
    # The SDK's HTTP layer (urllib3's default Retry) honours Retry-After on a 429 and
    # retries: the call goes through to the real answer.
    raw(sim, "POST", "/_sim/faults", '{"rate_limit_count": 1, "retry_after_secs": 1}')
    with pytest.raises(DaytonaNotFoundError):
        daytona.get("whatever")
    assert raw(sim, "GET", "/_sim/faults")[1]["rate_limit_count"] == 0, "the 429 was served"
    raw(sim, "POST", "/_sim/faults", '{"error_rate": 1.0}')
    status, body, _ = raw(sim, "GET", "/api/sandbox")
    try:
        assert status == 503 and body["statusCode"] == 503
        with pytest.raises(DaytonaError) as e:
            daytona.get("whatever")
        assert e.value.status_code == 503
    finally:
        raw(sim, "POST", "/_sim/faults", '{"error_rate": 0.0}')


def test_a_log_that_lost_output_is_refused_not_passed_off_as_whole(daytona, sim):
    sb = create(daytona)
    try:
        sb.process.create_session("full")
        # The sandbox's disk fills up: the command's log keeps 1,000 bytes of 5,000.
        raw(sim, "POST", "/_sim/faults", '{"log_limit_bytes": 1000}')
        try:
            cmd = sb.process.execute_session_command(
                "full", SessionExecuteRequest(command="head -c 5000 /dev/zero | tr '\\0' a", run_async=True))
            wait_exit(sb, "full", cmd.cmd_id)
            assert sb.process.get_session_command("full", cmd.cmd_id).exit_code == 0
            with pytest.raises(DaytonaError, match="incomplete: the log is full") as e:
                sb.process.get_session_command_logs("full", cmd.cmd_id)
            assert e.value.status_code == 500
            # A synchronous exec answers its logs too: the same refusal.
            with pytest.raises(DaytonaError, match="incomplete"):
                sb.process.execute_session_command(
                    "full", SessionExecuteRequest(command="head -c 5000 /dev/zero | tr '\\0' b"))
        finally:
            raw(sim, "POST", "/_sim/faults", '{"log_limit_bytes": 0}')
        # With room again, a log is whole.
        whole = sb.process.execute_session_command(
            "full", SessionExecuteRequest(command="head -c 5000 /dev/zero | tr '\\0' c"))
        assert whole.exit_code == 0 and whole.stdout == "c" * 5000
    finally:
        daytona.delete(sb)


def test_a_sandbox_pushed_into_error(daytona, sim):
    sb = create(daytona)
    try:
        raw(sim, "POST", "/_sim/faults", json.dumps({"sandbox_error": sb.id, "error_reason": "disk on fire"}))
        got = daytona.get(sb.id)
        assert got.state.value == "error" and got.error_reason == "disk on fire"
    finally:
        daytona.delete(sb)


def test_preview_links_plain_and_signed_reach_a_server_in_the_sandbox(daytona):
    sb = create(daytona)
    try:
        sb.fs.upload_file(b"served by the sandbox\n", "index.txt")
        port = 18000 + os.getpid() % 1000
        sb.process.create_session("web")
        sb.process.execute_session_command(
            "web", SessionExecuteRequest(command=f"python3 -m http.server {port} --bind 127.0.0.1", run_async=True))
        link = sb.get_preview_link(port)
        assert link.url and link.token and link.sandbox_id == sb.id

        def fetch(url, headers=None):
            req = urllib.request.Request(url, headers=headers or {})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, ""
            except OSError:
                return 0, ""

        for _ in range(100):
            status, body = fetch(f"{link.url}/index.txt", {"X-Daytona-Preview-Token": link.token})
            if status == 200:
                break
            time.sleep(0.1)
        assert (status, body) == (200, "served by the sandbox\n")
        assert fetch(f"{link.url}/index.txt")[0] == 401
        assert fetch(f"{link.url}/index.txt", {"X-Daytona-Preview-Token": "wrong"})[0] == 401
        signed = sb.create_signed_preview_url(port, expires_in_seconds=120)
        assert signed.port == port and signed.token and signed.sandbox_id == sb.id
        assert fetch(f"{signed.url}/index.txt") == (200, "served by the sandbox\n")
        sb.expire_signed_preview_url(port, signed.token)
        assert fetch(f"{signed.url}/index.txt")[0] == 401
        with pytest.raises(DaytonaError):
            sb.create_signed_preview_url(port, expires_in_seconds=10 ** 7)
        sb.process.delete_session("web")
    finally:
        daytona.delete(sb)
