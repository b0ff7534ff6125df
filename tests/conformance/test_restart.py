"""daytona-sim keeps its state across a restart, kill -9 included: every sandbox comes
back once (running ones `stopped`, their processes gone, as after a machine reboot), with
labels, env, resources, snapshots, SSH tokens and sessions' metadata (commands, exit codes,
output); nothing is lost or duplicated."""
import os
import time

import pytest

from daytona import (CreateSandboxFromImageParams, DaytonaError, CreateSandboxFromSnapshotParams, CreateSnapshotParams,
                     Image, Resources, SessionExecuteRequest)

from conftest import Sim, wait_gone


def test_state_survives_kill9_and_running_sandboxes_come_back_stopped():
    sim = Sim()
    state_dir = sim.dir
    client = sim.client()
    running = client.create(CreateSandboxFromSnapshotParams(snapshot="default", labels={"keep": "me"},
                                                            env_vars={"K": "v"}), timeout=60)
    running.fs.upload_file(b"survives", "/home/daytona/file.txt")
    running.process.create_session("s")
    said = running.process.execute_session_command("s", SessionExecuteRequest(command="echo before; echo e >&2"))
    failed = running.process.execute_session_command("s", SessionExecuteRequest(command="(exit 3)"))
    cut = running.process.execute_session_command("s", SessionExecuteRequest(
        command="echo $$ > /tmp/pid; exec sleep 300", run_async=True))
    for _ in range(100):
        try:
            pid = int(running.fs.download_file("/tmp/pid"))
            break
        except Exception:
            time.sleep(0.05)
    stopped = client.create(CreateSandboxFromImageParams(image=Image.debian_slim("3.12"),
                                                         resources=Resources(cpu=2, memory=2, disk=5)), timeout=60)
    stopped.stop()
    client.snapshot.create(CreateSnapshotParams(name="kept-snap", image=Image.debian_slim("3.12")))
    ssh = running.create_ssh_access(60)
    # A create answered just before the kill is on disk too.
    last = client.create(CreateSandboxFromSnapshotParams(snapshot="default", name="the-last-one"), timeout=60)
    sim.kill9()
    # The sandbox's processes die with the sim (their jail's --die-with-parent), as a
    # machine's do when it goes down.
    wait_gone(pid, "(the sandbox's) outlived the killed sim")
    sim = Sim(state_dir=state_dir)
    try:
        client = sim.client()
        listed = list(client.list())
        ids = sorted(s.id for s in listed)
        assert ids == sorted({running.id, stopped.id, last.id}), ids
        by_id = {s.id: s for s in listed}
        assert by_id[running.id].state == "stopped"
        assert by_id[running.id].labels.get("keep") == "me"
        assert (by_id[stopped.id].cpu, by_id[stopped.id].memory, by_id[stopped.id].disk) == (2, 2, 5)
        assert by_id[last.id].name == "the-last-one"
        assert client.snapshot.get("kept-snap").name == "kept-snap"
        again = client.get(running.id)
        assert again.validate_ssh_access(ssh.token).valid
        again.start()
        assert again.state == "started"
        assert again.fs.download_file("/home/daytona/file.txt") == b"survives"
        assert again.process.exec("echo $K").result.strip() == "v"
        # Sessions' metadata is kept: the commands, their exit codes (the one the restart
        # cut off ended killed, 137) and their output; the shell is gone with the sim.
        session = again.process.get_session("s")
        assert [(c.id, c.exit_code) for c in session.commands] == [
            (said.cmd_id, 0), (failed.cmd_id, 3), (cut.cmd_id, 137)], session.commands
        assert session.commands[0].command == "echo before; echo e >&2"
        logs = again.process.get_session_command_logs("s", said.cmd_id)
        assert (logs.stdout, logs.stderr) == ("before\n", "e\n")
        assert again.process.get_session_command("s", cut.cmd_id).exit_code == 137
        with pytest.raises(DaytonaError, match="restarted"):
            again.process.execute_session_command("s", SessionExecuteRequest(command="true"))
        again.process.create_session("new")
        assert again.process.execute_session_command("new", SessionExecuteRequest(command="echo fresh")).stdout == "fresh\n"
        # A clean restart (SIGTERM) keeps everything too, and nothing is duplicated.
        sim.proc.terminate()
        sim.proc.wait(timeout=30)
        sim = Sim(state_dir=state_dir)
        client = sim.client()
        assert sorted(s.id for s in list(client.list())) == ids
        again = client.get(running.id)
        again.start()
        assert {x.session_id for x in again.process.list_sessions()} == {"s", "new"}
        assert again.process.get_session_command_logs("s", said.cmd_id).stdout == "before\n"
        logs_dir = os.path.join(state_dir, "logs")
        before = len(os.listdir(logs_dir))
        again.process.delete_session("s")
        assert len(os.listdir(logs_dir)) == before - 3, "a deleted session's logs go with it"
        for s in list(client.list()):
            client.delete(s)
    finally:
        try:
            os.kill(pid, 9)
        except (ProcessLookupError, NameError):
            pass
        sim.stop()
