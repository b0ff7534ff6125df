//! The checks of a run's stdin, shared by every provider's tests: the same flags must give
//! the same bytes on `local` and on `daytona` (through daytona-sim).

use std::path::Path;

use tokio::io::AsyncWriteExt;

use super::Daemon;

/// `crabbox <prefix> ARGS` with stdin, stdout and stderr piped.
pub fn piped(d: &Daemon, repo: &Path, prefix: &[&str], args: &[&str]) -> tokio::process::Command {
    let mut c = d.cli(repo);
    c.args(prefix)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    c
}

fn first_word(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .split(' ')
        .next()
        .unwrap_or("")
        .to_string()
}

/// A line then EOF (`read` gets it, `cat` ends); 100 MiB of every byte value streamed
/// through `sha256sum` (the same digest as here); `-n` gives an empty stdin.
pub async fn stdin_is_forwarded_byte_exact_with_eof_unless_n(
    d: &Daemon,
    repo: &Path,
    prefix: &[&str],
) {
    d.run(repo, &[prefix, &["warmup"]].concat()).await.expect(0);
    let mut child = piped(
        d,
        repo,
        prefix,
        &["run", "--", "sh", "-c", "read x; echo got:$x; cat"],
    )
    .spawn()
    .expect("run");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"hello\nrest\n").await.expect("write");
    drop(stdin);
    let out = child.wait_with_output().await.expect("out");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got:hello\nrest\n");

    // A last line without a newline stays without one.
    let mut child = piped(
        d,
        repo,
        prefix,
        &["run", "--no-sync", "--", "od", "-An", "-c"],
    )
    .spawn()
    .expect("run");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"a\0b").await.expect("write");
    drop(stdin);
    let out = child.wait_with_output().await.expect("out");
    let seen: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(
        seen,
        ["a", "\\0", "b"],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let data: Vec<u8> = (0..100u32 * 1024 * 1024)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let here = {
        let mut c = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sha256sum");
        let mut i = c.stdin.take().expect("stdin");
        let d2 = data.clone();
        let w = std::thread::spawn(move || std::io::Write::write_all(&mut i, &d2));
        let o = c.wait_with_output().expect("out");
        w.join().expect("join").expect("write");
        first_word(&o.stdout)
    };
    let mut child = piped(d, repo, prefix, &["run", "--no-sync", "--", "sha256sum"])
        .spawn()
        .expect("run");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = tokio::spawn(async move {
        stdin.write_all(&data).await.expect("write");
    });
    let out = child.wait_with_output().await.expect("out");
    writer.await.expect("writer");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(first_word(&out.stdout), here, "100 MiB arrived intact");

    // -n: the command reads an empty stdin, whatever is piped.
    let mut child = piped(
        d,
        repo,
        prefix,
        &["run", "-n", "--no-sync", "--", "sh", "-c", "cat; echo end"],
    )
    .spawn()
    .expect("run");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"ignored\n").await.expect("write");
    let out = child.wait_with_output().await.expect("out");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "end\n");
}

/// The MCP server of the tests and benches (`tests/fixtures/mcp_echo_server.py`).
pub const MCP_SERVER: &str = include_str!("../fixtures/mcp_echo_server.py");

/// `crabbox run -- python3 server.py` as an MCP client on the host uses it: stdout carries
/// the server's answers and nothing else (crabbox speaks on stderr), each answer arrives as
/// soon as it is sent (1,000 round trips, each waiting for its answer), every byte as sent;
/// closing stdin ends the server, the run and (a fresh lease) the lease.
pub async fn mcp_round_trips_through_a_fresh_run(d: &Daemon, repo: &Path, prefix: &[&str]) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    std::fs::write(repo.join("mcp_server.py"), MCP_SERVER).expect("server");
    let mut child = piped(d, repo, prefix, &["run", "--", "python3", "mcp_server.py"])
        .spawn()
        .expect("run");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    let mut ask = async |msg: serde_json::Value, line: &mut String| {
        let mut bytes = serde_json::to_vec(&msg).expect("json");
        bytes.push(b'\n');
        stdin.write_all(&bytes).await.expect("send");
        stdin.flush().await.expect("flush");
        line.clear();
        let n = tokio::time::timeout(std::time::Duration::from_secs(60), stdout.read_line(line))
            .await
            .expect("an answer within 60 s")
            .expect("read");
        assert!(n > 0, "stdout ended before the answer");
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("stdout carries only JSON-RPC ({e}): {line:?}"))
    };
    let init = ask(
        serde_json::json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "test", "version": "1"}}}),
        &mut line,
    )
    .await;
    assert_eq!(init["result"]["serverInfo"]["name"], "echo", "{init}");
    for i in 1..=1000u32 {
        // Every kind of character JSON carries: quotes, backslashes, non-ASCII, emoji, tabs.
        let text = format!("call {i}: \"q\" \\ ü ✓ 🦀 \t end");
        let answer = ask(
            serde_json::json!({"jsonrpc": "2.0", "id": i, "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": text}}}),
            &mut line,
        )
        .await;
        assert_eq!(answer["id"], i, "answers come in order: {answer}");
        assert_eq!(
            answer["result"]["content"][0]["text"].as_str(),
            Some(text.as_str()),
            "round trip {i} is byte-exact"
        );
    }
    drop(stdin);
    let rest = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the run ends when the client closes stdin")
        .expect("wait");
    assert_eq!(
        rest.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&rest.stderr)
    );
    assert!(
        rest.stdout.is_empty(),
        "nothing after the last answer on stdout: {:?}",
        String::from_utf8_lossy(&rest.stdout)
    );
    // The run's fresh lease went with it.
    let list = d
        .run(repo, &[prefix, &["list", "--json"]].concat())
        .await
        .expect(0);
    let live: Vec<_> = list
        .json()
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|l| l["state"] != "released")
        .collect();
    assert!(live.is_empty(), "the fresh lease was released: {live:?}");
}

/// A run fed an endless stdin (1 GiB, written as it is taken) whose lease is stopped under
/// it: the run ends at once with the lease's word (exit 7), the writer is told (a broken
/// pipe, not a hang), and nothing of the command is left running.
pub async fn a_run_fed_forever_ends_cleanly_when_its_lease_is_stopped(
    d: &Daemon,
    repo: &Path,
    prefix: &[&str],
) {
    let marker = format!("stdin-forever-{}", std::process::id());
    // The command's own process (the CLI's argv holds the marker too).
    let pattern = format!("^sh -c cat > /dev/null; : {marker}");
    let warm = d
        .run(repo, &[prefix, &["warmup", "--json"]].concat())
        .await
        .expect(0);
    let id = warm.json()["id"].as_str().expect("id").to_string();
    let script = format!("cat > /dev/null; : {marker}");
    let mut child = piped(
        d,
        repo,
        prefix,
        &["run", "--no-sync", "--", "sh", "-c", &script],
    )
    .spawn()
    .expect("run");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 1024 * 1024];
        let mut sent = 0usize;
        for _ in 0..1024 {
            if stdin.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    // Let it flow a while, then stop the lease under it.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let running = std::process::Command::new("pgrep")
        .args(["-f", &pattern])
        .output()
        .expect("pgrep");
    assert!(running.status.success(), "the command runs while fed");
    d.run(repo, &[prefix, &["stop", &id]].concat())
        .await
        .expect(0);
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the run ended once its lease was stopped")
        .expect("wait");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("error [not_ready]"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.status.code(),
        Some(125),
        "the run says its lease went: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent = tokio::time::timeout(std::time::Duration::from_secs(30), writer)
        .await
        .expect("the writer is not left blocked")
        .expect("writer");
    assert!(
        sent < 1024 * 1024 * 1024,
        "the writer was cut off, not drained: {sent}"
    );
    super::eventually(30, "the command is gone", || async {
        let left = std::process::Command::new("pgrep")
            .args(["-f", &pattern])
            .output()
            .expect("pgrep");
        (!left.status.success()).then_some(())
    })
    .await;
}
