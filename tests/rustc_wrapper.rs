//! scripts/rustc-wrapper (every rustc of this project passes through it): only the `crabbox`
//! CLI binary is linked statically, and only where this machine can; everything else, and
//! every case it cannot be sure of, runs the compiler unchanged. Run here with `echo` as
//! the compiler and a stand-in C compiler that says where (or whether) libc.a is.

use std::path::Path;
use std::process::Command;

const STATIC: &str = "-C target-feature=+crt-static -C relocation-model=static";

/// What the wrapper runs for these rustc arguments, with `cc` as the C compiler.
fn wrapped(cc: &Path, args: &[&str]) -> String {
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/rustc-wrapper"
    ))
    .arg("echo")
    .args(args)
    .env("CC", cc)
    .output()
    .expect("the wrapper runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

/// A C compiler that answers `libc` to `-print-file-name=libc.a`.
fn cc_saying(dir: &Path, libc: &str) -> std::path::PathBuf {
    let cc = dir.join("cc");
    std::fs::write(&cc, format!("#!/bin/sh\necho '{libc}'\n")).expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cc, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    cc
}

#[test]
fn only_the_cli_binary_is_linked_statically_and_only_where_it_can_be() {
    let dir = tempfile::tempdir().expect("tempdir");
    let libc = dir.path().join("libc.a");
    std::fs::write(&libc, "").expect("write");
    let has = cc_saying(dir.path(), &libc.display().to_string());
    let cli = [
        "--crate-name",
        "crabbox",
        "--crate-type",
        "bin",
        "src/bin/crabbox.rs",
    ];

    // The CLI binary, with libc.a there: static.
    let out = wrapped(&has, &cli);
    assert!(out.ends_with(STATIC), "{out}");
    assert!(
        out.starts_with("--crate-name crabbox --crate-type bin"),
        "{out}"
    );

    // The library, the daemon: unchanged.
    for args in [
        &[
            "--crate-name",
            "crabbox",
            "--crate-type",
            "lib",
            "src/lib.rs",
        ][..],
        &[
            "--crate-name",
            "crabboxd",
            "--crate-type",
            "bin",
            "src/bin/crabboxd.rs",
        ][..],
    ] {
        assert_eq!(wrapped(&has, args), args.join(" "));
    }

    // A cross build (--target): unchanged, it links with that target's toolchain.
    let mut cross = cli.to_vec();
    cross.extend(["--target", "aarch64-unknown-linux-gnu"]);
    assert_eq!(wrapped(&has, &cross), cross.join(" "));

    // No libc.a (glibc's static part not installed): the usual dynamic link.
    let missing = cc_saying(
        dir.path(),
        &dir.path().join("nope/libc.a").display().to_string(),
    );
    assert_eq!(wrapped(&missing, &cli), cli.join(" "));
    // A compiler that does not know (prints the bare name back, as gcc does).
    let bare = cc_saying(dir.path(), "libc.a");
    assert_eq!(wrapped(&bare, &cli), cli.join(" "));
}
