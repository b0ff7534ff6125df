//! The CLI's end of the daemon's socket: what HTTP/2 writes in one turn of the CLI's
//! runtime reaches the socket in one write.
//!
//! h2 writes and flushes each batch of frames as soon as it has it: the preface, the
//! settings, a request's headers and its message come out in four writes, and each one
//! wakes the daemon (which, on the same CPU, runs at once and then hands the CPU back) for
//! a few bytes. Here a flush with something buffered first lets every other task that is
//! ready run (one yield), then writes all that was buffered meanwhile: one wake-up of the
//! daemon per exchange. Large writes (a command's input) go through as they come.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes of at least this size are not copied: what is buffered is written, then they are.
const DIRECT: usize = 16 * 1024;

/// A stream whose small writes are gathered until a flush has let the runtime turn once.
pub struct Coalesced<S> {
    inner: S,
    buf: Vec<u8>,
    /// How much of `buf` is written already.
    at: usize,
    /// A flush yielded once for this buffer: the next one writes it.
    yielded: bool,
}

impl<S> Coalesced<S> {
    pub fn new(inner: S) -> Self {
        Coalesced {
            inner,
            buf: Vec::new(),
            at: 0,
            yielded: false,
        }
    }
}

impl<S: AsyncWrite + Unpin> Coalesced<S> {
    /// Writes out everything buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.at < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.at += n;
        }
        self.buf.clear();
        self.at = 0;
        self.yielded = false;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesced<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesced<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total >= DIRECT || self.buf.len() + total > 4 * DIRECT {
            ready!(self.poll_drain(cx))?;
            if total >= DIRECT {
                return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
            }
        }
        for b in bufs {
            self.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.at < self.buf.len() && !self.yielded {
            // Let what else is ready run first (it may add to this write), then come back.
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Count(AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A flush with something buffered yields once (asking to be polled again); what is
    /// written before it is polled again leaves with it, in one write; writes of
    /// `DIRECT` or more go out as they come, after what was buffered.
    #[tokio::test(flavor = "current_thread")]
    async fn what_one_turn_writes_leaves_in_one_write() {
        let (a, mut b) = tokio::net::UnixStream::pair().expect("pair");
        let mut a = Coalesced::new(a);
        let wakes = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        fn w(a: &mut Coalesced<tokio::net::UnixStream>, cx: &mut Context<'_>, data: &[u8]) {
            let wrote = Pin::new(a).poll_write(cx, data);
            assert!(matches!(wrote, Poll::Ready(Ok(n)) if n == data.len()));
        }
        w(&mut a, &mut cx, b"settings;");
        w(&mut a, &mut cx, b"headers;");
        assert!(
            Pin::new(&mut a).poll_flush(&mut cx).is_pending(),
            "the first flush yields"
        );
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            1,
            "and asks to be polled again"
        );
        let mut probe = [0u8; 64];
        assert!(
            b.try_read(&mut probe).is_err(),
            "nothing written before the second flush"
        );
        w(&mut a, &mut cx, b"data;");
        assert!(matches!(
            Pin::new(&mut a).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        let mut got = [0u8; 64];
        let n = b.read(&mut got).await.expect("read");
        assert_eq!(
            &got[..n],
            b"settings;headers;data;",
            "one write for the three"
        );
        // Nothing buffered: a flush does not yield.
        assert!(matches!(
            Pin::new(&mut a).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);

        let big = vec![b'x'; 3 * DIRECT];
        let writer = tokio::spawn(async move {
            a.write_all(b"before-big;").await.expect("write");
            a.write_all(&big).await.expect("write");
            a.flush().await.expect("flush");
            a
        });
        let want = "before-big;".len() + 3 * DIRECT;
        let mut rest = Vec::new();
        while rest.len() < want {
            let mut chunk = vec![0u8; 64 * 1024];
            let n = b.read(&mut chunk).await.expect("read");
            assert!(n > 0, "ended early");
            rest.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(&rest[..11], b"before-big;");
        assert!(rest[11..].iter().all(|&c| c == b'x'));
        let a = writer.await.expect("join");
        assert!(a.buf.is_empty() && !a.yielded);
    }
}
