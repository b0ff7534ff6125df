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
