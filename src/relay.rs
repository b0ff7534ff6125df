//! The daemon's own steps for one lease, relayed to a CLI that asks for them (`crabbox -v`
//! over the `Trace` RPC): which provider calls it made, with their status and time, its
//! retries and waits, the image build's progress.
//!
//! A [`Relay`] layer sees every event of crabbox's own code (debug and up) that names a
//! lease, in its fields or in a span around it (`lease = ...`), formats it once as a log
//! line, keeps the last [`RECENT`] of each lease (a CLI that subscribes a moment after
//! the lease was made still sees its create, and only what came after it started: not
//! the steps of the lease's earlier runs), and sends it to the lease's subscribers.
//! Lines are the daemon log's lines: they never hold a secret.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};

use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber, span};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// Lines kept per lease for a late subscriber.
pub const RECENT: usize = 64;
/// Leases whose recent lines are kept (the oldest is forgotten first).
const LEASES: usize = 256;

/// One relayed line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// As the daemon log has it: level, message, fields.
    pub text: String,
    /// Marked `progress = true`: a step a person waits on (an image build's output),
    /// shown even without `-v`.
    pub progress: bool,
    /// When it was logged (unix milliseconds).
    pub at_ms: u64,
}

#[derive(Default)]
struct Lines {
    recent: VecDeque<Line>,
    subscribers: Vec<mpsc::Sender<Line>>,
}

#[derive(Default)]
struct Board {
    leases: HashMap<String, Lines>,
    /// Lease ids in the order they first logged (for forgetting the oldest).
    order: VecDeque<String>,
}

fn board() -> &'static Mutex<Board> {
    static BOARD: OnceLock<Mutex<Board>> = OnceLock::new();
    BOARD.get_or_init(Mutex::default)
}

fn with_board<T>(f: impl FnOnce(&mut Board) -> T) -> T {
    let mut b = board()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    f(&mut b)
}

/// The lines of `lease` logged since `since_ms` (unix milliseconds; 0: all those kept),
/// and a channel of the next ones (until the receiver is dropped). A subscriber that does
/// not keep up loses lines rather than slowing the daemon.
pub fn subscribe(lease: &str, since_ms: u64) -> (Vec<Line>, mpsc::Receiver<Line>) {
    let (tx, rx) = mpsc::channel(256);
    let recent = with_board(|b| {
        let lines = b.lines(lease);
        lines.subscribers.push(tx);
        lines
            .recent
            .iter()
            .filter(|l| l.at_ms >= since_ms)
            .cloned()
            .collect()
    });
    (recent, rx)
}

impl Board {
    /// The lease's lines, made room for when it is new.
    fn lines(&mut self, lease: &str) -> &mut Lines {
        if !self.leases.contains_key(lease) {
            if self.order.len() >= LEASES
                && let Some(old) = self.order.pop_front()
            {
                // Forget the oldest lease's lines, unless someone is listening to it.
                if self
                    .leases
                    .get(&old)
                    .is_some_and(|l| l.subscribers.is_empty())
                {
                    self.leases.remove(&old);
                } else {
                    self.order.push_back(old);
                }
            }
            self.order.push_back(lease.to_string());
        }
        self.leases.entry(lease.to_string()).or_default()
    }
}

fn publish(lease: &str, line: Line) {
    with_board(|b| {
        let lines = b.lines(lease);
        lines.subscribers.retain(|s| {
            !matches!(
                s.try_send(line.clone()),
                Err(mpsc::error::TrySendError::Closed(_))
            )
        });
        if lines.recent.len() == RECENT {
            lines.recent.pop_front();
        }
        lines.recent.push_back(line);
    });
}

/// The lease id a span carries.
struct LeaseTag(String);

/// The tracing layer: install it in the daemon's subscriber with a filter that lets
/// crabbox's debug events through.
pub struct Relay;

impl<S> Layer<S> for Relay
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut v = Fields::default();
        attrs.record(&mut v);
        if let (Some(lease), Some(span)) = (v.lease, ctx.span(id)) {
            span.extensions_mut().insert(LeaseTag(lease));
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let mut v = Fields::default();
        values.record(&mut v);
        if let (Some(lease), Some(span)) = (v.lease, ctx.span(id)) {
            span.extensions_mut().replace(LeaseTag(lease));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        // crabbox's own lines only, debug and up, whatever filter the layer was given: a
        // dependency's lines at debug or trace can carry request headers.
        let meta = event.metadata();
        if !meta.target().starts_with("crabbox") || *meta.level() == tracing::Level::TRACE {
            return;
        }
        let mut v = Fields::default();
        event.record(&mut v);
        let lease = v.lease.take().or_else(|| {
            ctx.event_scope(event)?
                .find_map(|s| s.extensions().get::<LeaseTag>().map(|t| t.0.clone()))
        });
        let Some(lease) = lease else { return };
        let mut text = format!("{:<5} {}", meta.level(), v.message);
        text.push_str(&v.rest);
        publish(
            &lease,
            Line {
                text,
                progress: v.progress,
                at_ms: crate::clock::now_ms(),
            },
        );
    }
}

/// An event's message, its `lease` and `progress` fields, and the others as ` k=v`.
#[derive(Default)]
struct Fields {
    message: String,
    lease: Option<String>,
    progress: bool,
    rest: String,
}

impl Visit for Fields {
    fn record_bool(&mut self, field: &Field, value: bool) {
        if field.name() == "progress" {
            self.progress = value;
        } else {
            let _ = write!(self.rest, " {}={value}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "lease" => self.lease = Some(value.to_string()),
            "message" => self.message = value.to_string(),
            name => {
                let _ = write!(self.rest, " {name}={value}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "lease" => self.lease = Some(format!("{value:?}")),
            "message" => self.message = format!("{value:?}"),
            name => {
                let _ = write!(self.rest, " {name}={value:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Instrument;
    use tracing_subscriber::layer::SubscriberExt;

    #[tokio::test]
    async fn a_leases_lines_reach_its_subscriber_and_a_late_one_sees_the_recent_ones() {
        let subscriber = tracing_subscriber::registry().with(Relay);
        let _guard = tracing::subscriber::set_default(subscriber);
        tracing::debug!(lease = "cbx_early", status = 200, "created");
        let (recent, mut rx) = subscribe("cbx_early", 0);
        assert_eq!(recent.len(), 1, "{recent:?}");
        assert!(
            recent[0].text.contains("created") && recent[0].text.contains("status=200"),
            "{recent:?}"
        );
        assert!(!recent[0].progress);
        // An event inside a span that names the lease is the lease's too.
        async {
            tracing::info!(route = "/sandbox/{id}", "daytona call");
        }
        .instrument(tracing::info_span!("lease", lease = "cbx_early"))
        .await;
        let next = rx.try_recv().expect("relayed").text;
        assert!(next.starts_with("INFO  daytona call"), "{next}");
        assert!(next.contains("route=/sandbox/{id}"), "{next}");
        tracing::info!(
            lease = "cbx_early",
            progress = true,
            "image build: Step 1/2"
        );
        let next = rx.try_recv().expect("relayed");
        assert!(
            next.progress && next.text == "INFO  image build: Step 1/2",
            "{next:?}"
        );
        // Another lease's lines are not ours; a line naming no lease goes nowhere; nor do
        // a dependency's lines or trace.
        tracing::info!(lease = "cbx_other", "not ours");
        tracing::info!("no lease");
        tracing::info!(target: "hyper::client", lease = "cbx_early", "authorization: x");
        tracing::trace!(lease = "cbx_early", "bytes");
        assert!(rx.try_recv().is_err());
        // Bounded: only the last RECENT lines are kept.
        for i in 0..RECENT + 10 {
            tracing::debug!(lease = "cbx_many", i, "line");
        }
        let (recent, _rx) = subscribe("cbx_many", 0);
        assert_eq!(recent.len(), RECENT);
        assert!(
            recent[RECENT - 1]
                .text
                .contains(&format!("i={}", RECENT + 9))
        );
        // A subscriber that started after them (a later run's -v) is not told them again.
        let later = crate::clock::now_ms() + 1;
        std::thread::sleep(std::time::Duration::from_millis(2));
        let (recent, _rx) = subscribe("cbx_many", later);
        assert!(recent.is_empty(), "{recent:?}");
        tracing::debug!(lease = "cbx_many", "after");
        let (recent, _rx) = subscribe("cbx_many", later);
        assert_eq!(recent.len(), 1, "{recent:?}");
    }
}
