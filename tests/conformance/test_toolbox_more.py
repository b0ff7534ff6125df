"""The official SDK's toolbox families beyond files and processes, against daytona-sim:
info, environment, ports, metrics, file search and edits, and git (run for real)."""
import time

import pytest
from daytona import SessionExecuteRequest
from daytona.common.errors import DaytonaError

from conftest import wait_exit
from test_sdk import create


def test_info_env_and_metrics(daytona):
    sb = create(daytona)
    try:
        assert sb.get_user_home_dir() == "/home/daytona"
        assert sb.get_work_dir() == "/home/daytona"
        # update_env: processes started afterwards see the change; running ones do not.
        sb.update_env({"ADDED": "yes", "GREETING": "changed"})
        r = sb.process.exec("echo $ADDED $GREETING")
        assert r.result.strip() == "yes changed", r.result
        sb.update_env({}, unset=["ADDED"])
        assert sb.process.exec("echo [${ADDED:-unset}]").result.strip() == "[unset]"
        sb.fs.upload_file(b"x" * 100_000, "/home/daytona/big.bin")
        m = sb.get_metrics_latest()
        d = vars(m)
        disk_used = next(v for k, v in d.items() if "disk" in k and "used" in k)
        assert disk_used >= 100_000, d
    finally:
        daytona.delete(sb)


def test_ports_in_use(daytona):
    sb = create(daytona)
    try:
        sb.process.create_session("srv")
        sb.process.execute_session_command("srv", SessionExecuteRequest(
            command="exec python3 -m http.server 8765 --bind 127.0.0.1", run_async=True))
        # The SDK has no wrapper for the port routes: its generated client, on the
        # sandbox's own toolbox connection.
        from daytona_toolbox_api_client import InfoApi, PortApi
        port_api = PortApi(sb._toolbox_api)
        assert InfoApi(sb._toolbox_api).get_version()["version"].endswith("-sim")
        for _ in range(100):
            if port_api.is_port_in_use(8765).is_in_use:
                break
            time.sleep(0.05)
        assert port_api.is_port_in_use(8765).is_in_use
        assert 8765 in port_api.get_ports().ports
        assert not port_api.is_port_in_use(8766).is_in_use
        sb.process.delete_session("srv")
        for _ in range(100):
            if not port_api.is_port_in_use(8765).is_in_use:
                break
            time.sleep(0.05)
        assert not port_api.is_port_in_use(8765).is_in_use
    finally:
        daytona.delete(sb)


def test_file_find_search_replace_move_permissions(daytona):
    sb = create(daytona)
    try:
        sb.fs.create_folder("/home/daytona/p/src", "755")
        sb.fs.upload_file(b"fn main() {\n    println!(\"hello\");\n}\n", "/home/daytona/p/src/main.rs")
        sb.fs.upload_file(b"hello again\n", "/home/daytona/p/notes.txt")
        sb.fs.upload_file(b"\x00binary hello", "/home/daytona/p/blob.bin")
        found = sb.fs.find_files("/home/daytona/p", "hello")
        got = sorted((m.file, m.line, m.content) for m in found)
        assert got == [("/home/daytona/p/notes.txt", 1, "hello again"),
                       ("/home/daytona/p/src/main.rs", 2, '    println!("hello");')], got
        names = sb.fs.search_files("/home/daytona/p", "*.rs")
        assert names.files == ["/home/daytona/p/src/main.rs"]
        results = sb.fs.replace_in_files(["/home/daytona/p/notes.txt", "/home/daytona/p/missing.txt"], "hello", "bye")
        assert [r.success for r in results] == [True, False]
        assert sb.fs.download_file("/home/daytona/p/notes.txt") == b"bye again\n"
        sb.fs.move_files("/home/daytona/p/notes.txt", "/home/daytona/p/src/notes.md")
        assert sb.fs.download_file("/home/daytona/p/src/notes.md") == b"bye again\n"
        with pytest.raises(DaytonaError):
            sb.fs.get_file_info("/home/daytona/p/notes.txt")
        sb.fs.set_file_permissions("/home/daytona/p/src/notes.md", mode="600")
        assert sb.fs.get_file_info("/home/daytona/p/src/notes.md").permissions.endswith("600")
        with pytest.raises(DaytonaError, match="not octal"):
            sb.fs.set_file_permissions("/home/daytona/p/src/notes.md", mode="rwx")
        with pytest.raises(DaytonaError, match="outside"):
            sb.fs.move_files("/home/daytona/p/src/notes.md", "/etc/notes.md")
    finally:
        daytona.delete(sb)


def test_git_init_add_commit_branch_checkout_clone_status(daytona):
    sb = create(daytona)
    try:
        repo = "/home/daytona/origin"
        sb.git.init(repo, initial_branch="main")
        sb.fs.upload_file(b"one\n", f"{repo}/a.txt")
        st = sb.git.status(repo)
        assert st.current_branch == "main"
        assert [(f.name, f.worktree) for f in st.file_status] == [("a.txt", "Untracked")]
        sb.git.add(repo, ["."])
        st = sb.git.status(repo)
        assert [(f.name, f.staging) for f in st.file_status] == [("a.txt", "Added")]
        c = sb.git.commit(repo, "first", "Ada", "ada@example.com")
        assert len(c.sha) == 40
        sb.git.create_branch(repo, "feature")
        b = sb.git.branches(repo)
        assert sorted(b.branches) == ["feature", "main"]
        sb.git.checkout_branch(repo, "feature")
        assert sb.git.status(repo).current_branch == "feature"
        sb.git.checkout_branch(repo, "main")
        sb.git.delete_branch(repo, "feature")
        assert sb.git.branches(repo).branches == ["main"]
        sb.git.clone(repo, "/home/daytona/copy")
        assert sb.fs.download_file("/home/daytona/copy/a.txt") == b"one\n"
        st = sb.git.status("/home/daytona/copy")
        assert st.current_branch == "main" and st.file_status == []
        with pytest.raises(DaytonaError, match="already exists"):
            sb.git.clone(repo, "/home/daytona/copy")
        with pytest.raises(DaytonaError):
            sb.git.checkout_branch(repo, "no-such-branch")
    finally:
        daytona.delete(sb)


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0


def test_a_session_commands_output_is_kept_on_disk_not_in_memory(sim, daytona):
    """As Daytona's daemon does: a command's log is a file; the sim's memory does not grow
    with what its commands print, and the file goes with the session."""
    import glob
    import os
    sb = create(daytona)
    try:
        sb.process.create_session("chatty")
        before = rss_mib(sim.proc.pid)
        big = sb.process.execute_session_command("chatty", SessionExecuteRequest(
            command="head -c 300000000 /dev/zero", run_async=True))
        wait_exit(sb, "chatty", big.cmd_id, tries=600)
        logs = glob.glob(os.path.join(sim.dir, "logs", "*.log"))
        assert max(os.path.getsize(p) for p in logs) >= 300_000_000
        after = rss_mib(sim.proc.pid)
        assert after - before < 100, f"the sim grew {after - before:.0f} MiB for 300 MB of output"
        follow = []
        cmd = sb.process.execute_session_command("chatty", SessionExecuteRequest(
            command="seq 1 200000", run_async=True))
        import asyncio
        asyncio.run(sb.process.get_session_command_logs_async("chatty", cmd.cmd_id, follow.append, follow.append))
        assert "".join(follow).split() == [str(i) for i in range(1, 200001)]
        sb.process.delete_session("chatty")
        assert not any(os.path.exists(p) for p in logs), "the session's logs went with it"
    finally:
        daytona.delete(sb)
