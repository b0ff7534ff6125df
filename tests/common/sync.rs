//! Sync checks shared by every provider's tests: the same tree must arrive the same way on
//! `local` and on `daytona` (through daytona-sim).

use std::path::Path;

use super::Daemon;

/// Deterministic bytes that do not compress (so a whole file would show in the figures).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
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
