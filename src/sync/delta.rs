//! Large files as content-defined chunks, and a changed large file sent as the difference
//! from the version the sandbox holds.
//!
//! A file of [`CHUNKED_MIN`] or more is cut into chunks where its content says so (FastCDC,
//! 16 to 256 KiB, 64 KiB on average), each named by a hash, when it is hashed for the
//! manifest. When it changes, the chunks the previous version also had are copied in the
//! sandbox from the file it holds, and only the others travel: an edit anywhere, even an
//! insertion that shifts the rest, sends about the chunks it touched.

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

use super::{Diff, FileEntry, Manifest};
use crate::sandbox::archive::{DeltaOp, DeltaSource, FileDelta};

/// Files at least this big are chunked.
pub const CHUNKED_MIN: u64 = 1 << 20;
const MIN_CHUNK: usize = 16 * 1024;
const AVG_CHUNK: usize = 64 * 1024;
const MAX_CHUNK: usize = 256 * 1024;
/// A delta with more ranges than this (a file changed all over) is not worth it: the
/// whole file goes.
const MAX_OPS: usize = 512;

/// One chunk of a large file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    #[serde(rename = "l")]
    pub len: u32,
    /// The first 128 bits of the chunk's BLAKE3, hex.
    #[serde(rename = "h")]
    pub hash: String,
}

/// The BLAKE3 of everything `reader` yields (hex), its chunks, and its length.
pub fn hash_chunked(reader: impl Read) -> io::Result<(String, Vec<Chunk>, u64)> {
    let mut whole = blake3::Hasher::new();
    let mut chunks = Vec::new();
    let mut len = 0u64;
    for chunk in fastcdc::v2020::StreamCDC::new(reader, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK) {
        let chunk = chunk.map_err(io::Error::from)?;
        whole.update(&chunk.data);
        len += chunk.length as u64;
        chunks.push(Chunk {
            len: chunk.length as u32,
            hash: chunk_hash(&chunk.data),
        });
    }
    Ok((whole.finalize().to_hex().to_string(), chunks, len))
}

fn chunk_hash(data: &[u8]) -> String {
    let hash = blake3::hash(data);
    hash.to_hex()[..32].to_string()
}

/// A planned delta: what the sandbox does ([`FileDelta`]) and which ranges of the new
/// file are its literal bytes, each with the chunk hash it must still have when read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub delta: FileDelta,
    pub reads: Vec<(u64, u64, String)>,
}

impl Planned {
    /// How many bytes travel (before compression).
    pub fn literal_bytes(&self) -> u64 {
        self.reads.iter().map(|r| r.1).sum()
    }
}

/// The delta turning `old` into `new` at `path` (literal bytes at `literal` in the
/// archive), or `None` when sending the whole file is as good: either is not chunked, one
/// is a link, or more than half of the new file would travel anyway.
pub fn plan(path: &str, literal: &str, old: &FileEntry, new: &FileEntry) -> Option<Planned> {
    if old.chunks.is_empty() || new.chunks.is_empty() || old.link.is_some() || new.link.is_some() {
        return None;
    }
    let mut at = std::collections::HashMap::with_capacity(old.chunks.len());
    let mut offset = 0u64;
    for c in &old.chunks {
        at.entry((c.hash.as_str(), c.len)).or_insert(offset);
        offset += u64::from(c.len);
    }
    let mut ops: Vec<DeltaOp> = Vec::new();
    let mut reads = Vec::new();
    let (mut new_off, mut lit_off) = (0u64, 0u64);
    for c in &new.chunks {
        let len = u64::from(c.len);
        let op = match at.get(&(c.hash.as_str(), c.len)) {
            Some(&old_off) => DeltaOp {
                from: DeltaSource::Old,
                offset: old_off,
                len,
            },
            None => {
                reads.push((new_off, len, c.hash.clone()));
                lit_off += len;
                DeltaOp {
                    from: DeltaSource::Literal,
                    offset: lit_off - len,
                    len,
                }
            }
        };
        match ops.last_mut() {
            Some(last) if last.from == op.from && last.offset + last.len == op.offset => {
                last.len += len;
            }
            _ => ops.push(op),
        }
        new_off += len;
    }
    if new_off != new.size || lit_off * 2 > new.size || ops.len() > MAX_OPS {
        return None;
    }
    Some(Planned {
        delta: FileDelta {
            path: path.to_string(),
            literal: literal.to_string(),
            ops,
            size: new.size,
            mode: new.mode,
            mtime: new.mtime_ns.div_euclid(1_000_000_000),
        },
        reads,
    })
}

/// Takes out of `diff` the changed files better sent as deltas against what `previous`
/// says the sandbox holds, and answers those deltas (their literal bytes under a folder
/// of a random name, so that nothing of the checkout's is in the way).
pub fn plan_all(diff: &mut Diff, previous: &Manifest, current: &Manifest) -> Vec<Planned> {
    let dir = format!(".crabbox-delta-{:016x}", rand::random::<u64>());
    let mut planned = Vec::new();
    for path in &diff.changed {
        let (Some(old), Some(new)) = (previous.files.get(path), current.files.get(path)) else {
            continue;
        };
        if let Some(p) = plan(path, &format!("{dir}/{}", planned.len()), old, new) {
            planned.push(p);
        }
    }
    if !planned.is_empty() {
        let sent: std::collections::HashSet<&str> =
            planned.iter().map(|p| p.delta.path.as_str()).collect();
        diff.changed.retain(|p| !sent.contains(p.as_str()));
        diff.remove.retain(|p| !sent.contains(p.as_str()));
    }
    planned
}

/// Reads a planned delta's literal bytes from the new file, checking each chunk against
/// the hash the manifest has for it: a file rewritten since it was hashed fails the read
/// (the sync stops with a retryable error) instead of sending a mix of two versions.
pub struct LiteralReader<R> {
    file: R,
    reads: std::vec::IntoIter<(u64, u64, String)>,
    chunk: Vec<u8>,
    pos: usize,
    path: String,
}

impl<R: Read + io::Seek> LiteralReader<R> {
    pub fn new(file: R, planned: &Planned) -> Self {
        LiteralReader {
            file,
            reads: planned.reads.clone().into_iter(),
            chunk: Vec::new(),
            pos: 0,
            path: planned.delta.path.clone(),
        }
    }
}

impl<R: Read + io::Seek> Read for LiteralReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            let Some((offset, len, hash)) = self.reads.next() else {
                return Ok(0);
            };
            self.file.seek(io::SeekFrom::Start(offset))?;
            self.chunk.clear();
            self.pos = 0;
            (&mut self.file).take(len).read_to_end(&mut self.chunk)?;
            if self.chunk.len() as u64 != len || chunk_hash(&self.chunk) != hash {
                return Err(io::Error::other(format!(
                    "{} changed while it was being synced; run again",
                    self.path
                )));
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn entry(data: &[u8]) -> FileEntry {
        let (hash, chunks, size) = hash_chunked(data).expect("hash");
        FileEntry {
            hash,
            size,
            mode: 0o644,
            link: None,
            mtime_ns: 0,
            ino: 0,
            chunks,
        }
    }

    /// What the sandbox does with a delta, in memory.
    fn apply(old: &[u8], planned: &Planned, literal: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for op in &planned.delta.ops {
            let src = match op.from {
                DeltaSource::Old => old,
                DeltaSource::Literal => literal,
            };
            out.extend_from_slice(&src[op.offset as usize..(op.offset + op.len) as usize]);
        }
        out
    }

    fn literal(new: &[u8], planned: &Planned) -> Vec<u8> {
        let mut buf = Vec::new();
        LiteralReader::new(io::Cursor::new(new), planned)
            .read_to_end(&mut buf)
            .expect("literal");
        buf
    }

    #[test]
    fn whole_hash_is_the_plain_blake3_and_chunks_cover_the_file() {
        let data = noise(3 << 20, 7);
        let (hash, chunks, len) = hash_chunked(&data[..]).expect("hash");
        assert_eq!(hash, blake3::hash(&data).to_hex().to_string());
        assert_eq!(len, data.len() as u64);
        let total: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
        assert_eq!(total, len);
        assert!(chunks.len() > 20 && chunks.len() < 200, "{}", chunks.len());
    }

    #[test]
    fn a_changed_byte_an_insertion_and_a_deletion_send_about_one_chunk() {
        let old = noise(8 << 20, 3);
        let mut flipped = old.clone();
        flipped[5_000_000] ^= 0xff;
        let mut inserted = old.clone();
        inserted.splice(1_000_000..1_000_000, b"hello".iter().copied());
        let mut deleted = old.clone();
        deleted.drain(7_000_000..7_000_100);
        let mut appended = old.clone();
        appended.extend_from_slice(&noise(1000, 9));
        for (what, new) in [
            ("flip", flipped),
            ("insert", inserted),
            ("delete", deleted),
            ("append", appended),
        ] {
            let planned = plan("f", ".d/0", &entry(&old), &entry(&new)).expect(what);
            let lit = literal(&new, &planned);
            assert_eq!(lit.len() as u64, planned.literal_bytes());
            assert!(
                planned.literal_bytes() <= 2 * MAX_CHUNK as u64,
                "{what}: {} literal bytes",
                planned.literal_bytes()
            );
            assert!(
                planned.delta.ops.len() <= 4,
                "{what}: {:?}",
                planned.delta.ops
            );
            assert_eq!(apply(&old, &planned, &lit), new, "{what}");
        }
    }

    #[test]
    fn unrelated_contents_small_files_and_links_go_whole() {
        let a = noise(2 << 20, 1);
        let b = noise(2 << 20, 2);
        assert_eq!(plan("f", ".d/0", &entry(&a), &entry(&b)), None);
        let mut small = entry(b"tiny");
        small.chunks.clear();
        assert_eq!(plan("f", ".d/0", &small, &entry(&a)), None);
        let mut link = entry(&a);
        link.link = Some("x".into());
        assert_eq!(plan("f", ".d/0", &link, &entry(&a)), None);
    }

    #[test]
    fn a_file_rewritten_after_hashing_fails_the_read() {
        let old = noise(4 << 20, 5);
        let mut new = old.clone();
        new[100] ^= 1;
        let planned = plan("f", ".d/0", &entry(&old), &entry(&new)).expect("plan");
        let mut later = new.clone();
        later[101] ^= 1;
        let mut buf = Vec::new();
        let err = LiteralReader::new(io::Cursor::new(&later), &planned)
            .read_to_end(&mut buf)
            .expect_err("changed");
        assert!(
            err.to_string()
                .contains("changed while it was being synced")
        );
    }
}
