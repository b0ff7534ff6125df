//! Splits Daytona's log stream into stdout and stderr: the 3-byte markers `\x01\x01\x01`
//! (stdout) and `\x02\x02\x02` (stderr) switch the current stream. A marker may be split
//! across frames, so a partial one at the end of a frame is held back.

use crate::provider::ExecOutput;

const STDOUT: u8 = 0x01;
const STDERR: u8 = 0x02;

/// The demultiplexer's state between frames.
#[derive(Debug, Default)]
pub struct Demux {
    /// Bytes held back: a possible marker start at the end of the last frame.
    pending: Vec<u8>,
    /// The current stream (stdout until a marker says otherwise).
    stderr: bool,
}

impl Demux {
    /// Feeds one frame; answers the output it completes.
    pub fn push(&mut self, frame: &[u8]) -> Vec<ExecOutput> {
        // Only a frame that follows a held-back partial marker is copied to join it.
        let joined;
        let buf: &[u8] = if self.pending.is_empty() {
            frame
        } else {
            let mut b = std::mem::take(&mut self.pending);
            b.extend_from_slice(frame);
            joined = b;
            &joined
        };
        let mut out = Vec::new();
        let mut start = 0;
        let mut i = 0;
        // Jump from one candidate marker byte to the next (SIMD), not byte by byte.
        while let Some(at) = memchr::memchr2(STDOUT, STDERR, &buf[i..]) {
            i += at;
            let b = buf[i];
            let have = buf.len() - i;
            if have < 3 {
                // Might be a marker cut by the frame boundary.
                if buf[i..].iter().all(|x| *x == b) {
                    self.emit(&buf[start..i], &mut out);
                    self.pending = buf[i..].to_vec();
                    return out;
                }
            } else if buf[i + 1] == b && buf[i + 2] == b {
                self.emit(&buf[start..i], &mut out);
                self.stderr = b == STDERR;
                i += 3;
                start = i;
                continue;
            }
            i += 1;
        }
        self.emit(&buf[start..], &mut out);
        out
    }

    /// Flushes what was held back at the end of the stream.
    pub fn finish(&mut self) -> Vec<ExecOutput> {
        let rest = std::mem::take(&mut self.pending);
        let mut out = Vec::new();
        self.emit(&rest, &mut out);
        out
    }

    fn emit(&self, data: &[u8], out: &mut Vec<ExecOutput>) {
        if data.is_empty() {
            return;
        }
        out.push(if self.stderr {
            ExecOutput::Stderr(data.to_vec())
        } else {
            ExecOutput::Stdout(data.to_vec())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(frames: &[&[u8]]) -> (String, String) {
        let mut d = Demux::default();
        let (mut o, mut e) = (Vec::new(), Vec::new());
        let mut all: Vec<ExecOutput> = frames.iter().flat_map(|f| d.push(f)).collect();
        all.extend(d.finish());
        for x in all {
            match x {
                ExecOutput::Stdout(b) => o.extend(b),
                ExecOutput::Stderr(b) => e.extend(b),
            }
        }
        (
            String::from_utf8(o).expect("utf8"),
            String::from_utf8(e).expect("utf8"),
        )
    }

    #[test]
    fn markers_switch_streams_even_when_split() {
        assert_eq!(
            collect(&[b"\x01\x01\x01out\x02\x02\x02err"]),
            ("out".into(), "err".into())
        );
        assert_eq!(
            collect(&[b"\x01\x01\x01a\x02", b"\x02\x02b\x01\x01", b"\x01c"]),
            ("ac".into(), "b".into())
        );
        assert_eq!(
            collect(&[b"no marker"]),
            ("no marker".into(), String::new())
        );
        // A lone control byte that is not a marker is data.
        assert_eq!(collect(&[b"x\x01y"]), ("x\x01y".into(), String::new()));
        assert_eq!(collect(&[b"tail\x01"]), ("tail\x01".into(), String::new()));
    }
}
