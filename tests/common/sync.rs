//! Sync checks shared by every provider's tests: the same tree must arrive the same way on
//! `local` and on `daytona` (through daytona-sim).

use std::path::Path;

use super::Daemon;

/// Deterministic bytes that do not compress (so a whole file would show in the figures);
/// each seed its own.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split(' ')
        .next()
        .unwrap_or("")
        .to_string()
}

/// The sandbox's sha256 of `file`, its mode and what else the workdir's top holds.
async fn remote(d: &Daemon, repo: &Path, prefix: &[&str], file: &str) -> (String, String, u64) {
    let script = format!(
        "sha256sum {file} | cut -d' ' -f1; stat -c %a {file}; ls -A | grep -c crabbox-delta || true"
    );
    let doc = d
        .run(
            repo,
            &[prefix, &["run", "--json", "--", "sh", "-c", &script]].concat(),
        )
        .await
        .expect(0)
        .json();
    let out = doc["stdout"].as_str().unwrap_or("").to_string();
    let mut lines = out.lines();
    let hash = lines.next().unwrap_or("").to_string();
    let mode = lines.next().unwrap_or("").to_string();
    let leftovers = lines.next().and_then(|l| l.parse().ok()).unwrap_or(99);
    let sent = doc["sync"]["bytes_uploaded"].as_u64().unwrap_or(u64::MAX);
    assert_eq!(leftovers, 0, "the deltas' folder is gone: {out}");
    (format!("{hash} {mode}"), out, sent)
}

/// A 24 MiB file that does not compress, changed by one byte, then by an insertion near
/// its start, then by a cut: each time the sandbox holds exactly the new bytes (and the
/// file's mode), and the sync sends a small part of the file.
pub async fn a_large_file_change_sends_about_the_chunks_it_touched(
    d: &Daemon,
    repo: &Path,
    prefix: &[&str],
) {
    use std::os::unix::fs::PermissionsExt;
    let big = repo.join("big.bin");
    let mut data = noise(24 << 20, 11);
    std::fs::write(&big, &data).expect("write");
    std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // A claimed lease (a run without one would make a fresh lease each time).
    d.run(repo, &[prefix, &["warmup"]].concat()).await.expect(0);
    let (got, _, first) = remote(d, repo, prefix, "big.bin").await;
    assert_eq!(got, format!("{} 755", sha256(&big)));
    assert!(
        first > 20 << 20,
        "the first sync sends it all: {first} bytes"
    );

    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let mut edits: Vec<(&str, Edit)> = vec![
        ("one byte", Box::new(|d: &mut Vec<u8>| d[12 << 20] ^= 0x5a)),
        (
            "an insertion",
            Box::new(|d: &mut Vec<u8>| {
                d.splice(3000..3000, *b"inserted");
            }),
        ),
        (
            "a cut",
            Box::new(|d: &mut Vec<u8>| {
                d.drain(20_000_000..20_000_500);
            }),
        ),
    ];
    for (what, edit) in edits.drain(..) {
        edit(&mut data);
        std::fs::write(&big, &data).expect("write");
        let plan = d
            .run(repo, &[prefix, &["sync-plan", "--json"]].concat())
            .await
            .expect(0)
            .json();
        assert_eq!(plan["files_to_send"], 1, "{what}: {plan}");
        let planned = plan["bytes_to_send"].as_u64().unwrap_or(u64::MAX);
        assert!(
            planned < 1 << 20,
            "{what}: the plan counts the delta: {plan}"
        );
        let (got, out, sent) = remote(d, repo, prefix, "big.bin").await;
        assert_eq!(got, format!("{} 755", sha256(&big)), "{what}: {out}");
        assert!(
            sent < 1 << 20,
            "{what}: {sent} bytes sent for a change in a 24 MiB file"
        );
    }
    // A mode change alone moves no content.
    std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (got, _, sent) = remote(d, repo, prefix, "big.bin").await;
    assert_eq!(got, format!("{} 644", sha256(&big)));
    assert!(sent < 4096, "{sent} bytes for a mode change");
}

/// A sync's upload is told as it goes (`--output ndjson`: `sync_progress` events): its
/// files and size, bytes that only grow, and an end with every byte sent that matches the
/// sync's own figure. With `slow` (the provider reads uploads slowly) the middle of the
/// upload is seen too, and a run that is not on a terminal says it in a plain line.
pub async fn an_upload_is_told_as_it_goes(d: &Daemon, repo: &Path, prefix: &[&str], slow: bool) {
    d.run(repo, &[prefix, &["warmup"]].concat()).await.expect(0);
    std::fs::write(repo.join("big.bin"), noise(24 << 20, 7)).expect("write");
    let out = d
        .run(
            repo,
            &[prefix, &["run", "--output", "ndjson", "--", "true"]].concat(),
        )
        .await
        .expect(0);
    let events: Vec<serde_json::Value> = out
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let told: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["event"] == "sync_progress")
        .collect();
    let sync = events
        .iter()
        .find(|e| e["event"] == "sync")
        .expect("a sync event");
    let last = told.last().expect("at least the upload's end is told");
    let total = sync["bytes_uploaded"].as_u64().expect("bytes");
    assert!(total > 24 << 20, "the file does not compress: {total}");
    assert_eq!(last["bytes_total"].as_u64(), Some(total), "{last}");
    assert_eq!(last["bytes_sent"].as_u64(), Some(total), "{last}");
    assert_eq!(last["files"], sync["files_uploaded"], "{last} {sync}");
    assert_eq!(last["done"], true, "{last}");
    assert_eq!(
        told.iter().filter(|e| e["done"] == true).count(),
        1,
        "{told:?}"
    );
    let sent: Vec<u64> = told
        .iter()
        .map(|e| e["bytes_sent"].as_u64().expect("sent"))
        .collect();
    assert!(sent.windows(2).all(|w| w[0] <= w[1]), "{sent:?}");
    let sync_at = events.iter().position(|e| e["event"] == "sync");
    let last_at = events.iter().position(|e| std::ptr::eq(e, *last));
    assert!(last_at < sync_at, "told before the sync's own event");
    if !slow {
        return;
    }
    assert!(
        sent.iter().any(|&s| s > 0 && s < total),
        "the middle of a slow upload is told: {sent:?}"
    );
    // Not on a terminal: a plain line once the upload has taken a while (then at most every
    // few seconds), none for a short one.
    std::fs::write(repo.join("big.bin"), noise(24 << 20, 11)).expect("write");
    let out = d
        .run(repo, &[prefix, &["run", "--", "true"]].concat())
        .await
        .expect(0);
    let stderr = out.stderr();
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("crabbox: syncing: sending 1 file: "))
        .filter(|l| l.contains(" of 24.0 MiB (") || l.contains("24.0 MiB sent, unpacking"))
        .collect();
    assert!(!lines.is_empty() && lines.len() <= 2, "{stderr}");
    // On a terminal: the spinner's line shows the counts as they change.
    std::fs::write(repo.join("big.bin"), noise(24 << 20, 13)).expect("write");
    let mut t = super::tty::Term::spawn(d, repo, prefix, &["run", "--", "true"], (24, 120));
    assert_eq!(t.exit_code().await, 0);
    let screen = t.screen();
    let shown = screen.matches("syncing: sending 1 file: ").count();
    assert!(shown >= 2, "the spinner line counts the bytes: {screen:?}");
    assert!(screen.contains(" of 24.0 MiB ("), "{screen:?}");
}
