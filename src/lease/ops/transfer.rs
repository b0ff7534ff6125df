//! Files in and out of a lease's sandbox as one tar stream (`crabbox cp`, a run's
//! downloads and artifacts), the same way on every provider: one short `tar` command in
//! the sandbox, and reading or writing one file there. Modes, mtimes and symlinks travel
//! as tar keeps them; remote globs are bash's (`*`, `?`, `[..]`, `**` across folders,
//! dotfiles included).

use std::path::Path;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::error::{ProviderError, ProviderErrorKind};
use crate::provider::{Provider, shell_quote as quote};

/// How long the sandbox's `tar` may take.
const TAR_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// One thing to fetch: a path (a file or a folder, brought whole under its own name), or
/// a glob whose matches keep their paths relative to the base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Path(String),
    Glob(String),
}

impl Source {
    pub fn text(&self) -> &str {
        match self {
            Source::Path(p) | Source::Glob(p) => p,
        }
    }

    /// A glob when it has a glob character.
    pub fn parse(text: &str) -> Source {
        if text.contains(['*', '?', '[']) {
            Source::Glob(text.to_string())
        } else {
            Source::Path(text.to_string())
        }
    }
}

/// What a fetch found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fetched {
    /// What each source brought, as (source number, name): a path's own name, or a glob
    /// match's path relative to the base. In the archive it is `<number>/<name>`.
    pub entries: Vec<(u32, String)>,
    /// The sources that matched nothing.
    pub missing: Vec<String>,
}

/// The bash program that packs the sources: positional args are base, archive, then
/// (kind, source) pairs. Source number i's files are under `./<i>/` in the archive (so
/// two sources with one name never collide; GNU tar's --transform, not applied to
/// symlink targets). It prints NUL-separated records: `e` i name (a top-level entry),
/// `m` source (matched nothing), `x` a failure; the archive exists only when something
/// matched. Globs are expanded from a variable (no command substitution, no word
/// splitting).
const PACK: &str = r#"set -u -o pipefail
base=$1; arch=$2; shift 2
cd -- "$base" 2>/dev/null || { printf 'x\0%s\0' "no such folder: $base"; exit 3; }
shopt -s globstar nullglob dotglob
tarf="$arch.part"
mkdir -p -- "$(dirname -- "$arch")" && rm -f -- "$tarf" || exit 4
i=0; any=0
add() { # add DIR NAME...: into ./<i>/ of the archive
  d=$1; shift
  tar rf "$tarf" --transform "s,^\./,./$i/,S" -C "$d" "$@" || { rm -f -- "$tarf"; printf 'x\0%s\0' "tar failed"; exit 4; }
  any=1
}
while [ $# -gt 1 ]; do
  kind=$1; src=$2; shift 2
  if [ "$kind" = g ]; then
    IFS=; m=( $src ); unset IFS
    if [ ${#m[@]} -eq 0 ]; then printf 'm\0%s\0' "$src"; i=$((i+1)); continue; fi
    rel=(); abs=()
    for f in "${m[@]}"; do
      case $f in /*) abs+=( "./${f#/}" ); printf 'e\0%s\0%s\0' "$i" "${f#/}";;
                 *) rel+=( "./$f" ); printf 'e\0%s\0%s\0' "$i" "$f";; esac
    done
    [ ${#rel[@]} -gt 0 ] && add "$PWD" "${rel[@]}"
    [ ${#abs[@]} -gt 0 ] && add / "${abs[@]}"
  elif [ -e "$src" ] || [ -L "$src" ]; then
    d=$(cd -- "$(dirname -- "$src")" && pwd) || { printf 'x\0%s\0' "cannot enter the folder of $src"; exit 3; }
    b=$(basename -- "$src")
    printf 'e\0%s\0%s\0' "$i" "$b"
    add "$d" "./$b"
  else
    printf 'm\0%s\0' "$src"
  fi
  i=$((i+1))
done
[ $any = 0 ] && exit 0
mv -- "$tarf" "$arch" || { rm -f -- "$tarf"; exit 4; }
printf 'a\0'
"#;

/// The bash program that unpacks an archive: args are archive, destination, and the
/// archive's one top-level entry (or ""). With an entry and a destination that is not a
/// folder, the entry is unpacked beside it and takes its name.
const UNPACK: &str = r#"set -u
arch=$1; dest=$2; one=$3
if [ -z "$one" ] || [ -d "$dest" ]; then
  mkdir -p -- "$dest" && tar xpf "$arch" -C "$dest"; rc=$?
else
  parent=$(dirname -- "$dest")
  mkdir -p -- "$parent" && tmp=$(mktemp -d "$parent/.crabbox-cp.XXXXXX") || { rm -f -- "$arch"; exit 4; }
  tar xpf "$arch" -C "$tmp" && rm -rf -- "$dest" && mv -- "$tmp/$one" "$dest"; rc=$?
  rm -rf -- "$tmp"
fi
rm -f -- "$arch"
exit $rc
"#;

fn bash(program: &str, args: &[&str]) -> String {
    let mut cmd = format!("bash -c {} bash", quote(program));
    for a in args {
        cmd.push(' ');
        cmd.push_str(&quote(a));
    }
    cmd
}

fn staging(work_root: &str) -> String {
    format!(
        "{}/.crabbox-transfer/{:016x}.tar",
        work_root.trim_end_matches('/'),
        rand::random::<u64>()
    )
}

fn failed(what: &str, code: i32, output: &str) -> ProviderError {
    let why = output
        .split('\0')
        .collect::<Vec<_>>()
        .windows(2)
        .find(|w| w[0] == "x")
        .map(|w| w[1].to_string())
        .unwrap_or_else(|| output.replace('\0', " ").trim().to_string());
    let why = if why.contains("bash: not found") || why.contains("bash: command not found") {
        "the sandbox has no bash, which copying needs".to_string()
    } else if why.starts_with("no such folder") {
        format!(
            "{why} (is the checkout synced? `crabbox run --sync-only` puts it in the lease; \
             or give an absolute path)"
        )
    } else {
        why
    };
    ProviderError::new(
        ProviderErrorKind::Other,
        format!("{what} failed in the sandbox (exit {code}): {why}"),
    )
}

/// Packs `sources` (relative to `base`, or absolute) into a tar staged in the
/// sandbox under `work_root`; answers what it holds, what was missing, and the staged
/// archive (none when nothing matched) for [`send`].
pub async fn pack(
    provider: &dyn Provider,
    sandbox: &str,
    work_root: &str,
    base: &str,
    sources: &[Source],
) -> Result<(Fetched, Option<String>), ProviderError> {
    let arch = staging(work_root);
    let mut args: Vec<&str> = vec![base, &arch];
    for s in sources {
        args.push(match s {
            Source::Glob(_) => "g",
            Source::Path(_) => "p",
        });
        args.push(s.text());
    }
    let ran = provider
        .execute(sandbox, &bash(PACK, &args), work_root, TAR_TIMEOUT)
        .await?;
    if ran.code != 0 {
        return Err(failed("packing the files", ran.code, &ran.output));
    }
    let mut fetched = Fetched::default();
    let mut archived = false;
    let mut fields = ran.output.split('\0');
    while let Some(tag) = fields.next() {
        match tag.trim_start_matches(['\n', '\r']) {
            "e" => {
                let source = fields.next().and_then(|i| i.parse().ok());
                let name = fields.next().map(str::to_string);
                if let (Some(i), Some(n)) = (source, name) {
                    fetched.entries.push((i, n));
                }
            }
            "m" => fetched.missing.extend(fields.next().map(str::to_string)),
            "a" => archived = true,
            _ => {}
        }
    }
    Ok((fetched, archived.then_some(arch)))
}

/// Streams a staged archive into `out`, then removes it (whatever happened to the
/// read); answers its size.
pub async fn send(
    provider: &dyn Provider,
    sandbox: &str,
    work_root: &str,
    archive: &str,
    out: mpsc::Sender<Vec<u8>>,
) -> Result<u64, ProviderError> {
    let read = provider.read_file(sandbox, archive, out).await;
    let _ = provider
        .execute(
            sandbox,
            &format!("rm -f -- {}", quote(archive)),
            work_root,
            Duration::from_secs(60),
        )
        .await;
    read
}

/// Unpacks the local tar `archive` into the folder `dest` in the sandbox (created
/// if missing), keeping modes, mtimes and symlinks; with `single` (the archive's one
/// top-level entry), a `dest` that is not a folder becomes that entry's name.
pub async fn put(
    provider: &dyn Provider,
    sandbox: &str,
    work_root: &str,
    dest: &str,
    single: Option<&str>,
    archive: &Path,
) -> Result<(), ProviderError> {
    let arch = staging(work_root);
    provider.write_file(sandbox, &arch, archive).await?;
    let ran = provider
        .execute(
            sandbox,
            &bash(UNPACK, &[&arch, dest, single.unwrap_or("")]),
            work_root,
            TAR_TIMEOUT,
        )
        .await?;
    if ran.code != 0 {
        return Err(failed("unpacking the files", ran.code, &ran.output));
    }
    Ok(())
}

/// `path` as a sandbox path: relative ones from `base`; refused when it leaves
/// `work_root` (lexically) unless `any_path`.
pub fn resolve(path: &str, base: &str, work_root: &str, any_path: bool) -> Result<String, String> {
    let joined = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{path}", base.trim_end_matches('/'))
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!("{path} leaves the sandbox's root"));
                }
            }
            p => parts.push(p),
        }
    }
    let normal = format!("/{}", parts.join("/"));
    let root = work_root.trim_end_matches('/');
    let inside = normal == root || normal.starts_with(&format!("{root}/"));
    if !inside && !any_path {
        return Err(format!(
            "{path} is outside the lease's work root ({root}); pass --any-path to copy \
             anywhere in the sandbox"
        ));
    }
    Ok(normal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_paths_stay_in_the_work_root_unless_asked() {
        let (base, root) = ("/w/cbx_1/repo", "/w");
        assert_eq!(
            resolve("target/a.xml", base, root, false),
            Ok("/w/cbx_1/repo/target/a.xml".into())
        );
        assert_eq!(
            resolve("./x/../y", base, root, false),
            Ok("/w/cbx_1/repo/y".into())
        );
        assert_eq!(
            resolve("/w/other", base, root, false),
            Ok("/w/other".into())
        );
        assert!(
            resolve("../../../etc/passwd", base, root, false)
                .unwrap_err()
                .contains("--any-path")
        );
        assert!(resolve("/etc/passwd", base, root, false).is_err());
        assert!(
            resolve("/wx", base, root, false).is_err(),
            "a sibling with the same prefix"
        );
        assert_eq!(
            resolve("/etc/passwd", base, root, true),
            Ok("/etc/passwd".into())
        );
        assert!(resolve("/../../..", base, root, true).is_err());
    }

    #[test]
    fn globs_are_told_from_paths() {
        assert_eq!(
            Source::parse("target/**/*.xml"),
            Source::Glob("target/**/*.xml".into())
        );
        assert_eq!(
            Source::parse("out/report.html"),
            Source::Path("out/report.html".into())
        );
    }

    #[test]
    fn a_failure_says_why() {
        let e = failed("packing", 3, "x\0no such folder: /w/x\0");
        assert!(e.to_string().contains("no such folder: /w/x"), "{e}");
    }
}
