//! Progress on a terminal: one spinner line with the current step and how long it has
//! taken (indicatif); each finished step stays above it as a plain line. Elsewhere (a
//! pipe, a file, CI) progress is plain lines, as `Ctx::progress` prints them.

use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

#[derive(Default)]
pub struct Spinner {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    bar: Option<ProgressBar>,
    /// The step being shown.
    step: Option<String>,
    /// Done: later steps are plain lines (after the command's output began).
    finished: bool,
}

impl Spinner {
    /// A spinner, when stderr is a terminal that can redraw a line (not `TERM=dumb`).
    pub fn for_stderr() -> Option<Spinner> {
        use std::io::IsTerminal;
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        (std::io::stderr().is_terminal() && !dumb).then(Spinner::default)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Shows `msg` as the current step; the one before stays as a line above.
    pub fn step(&self, msg: &str) {
        let mut st = self.state();
        if st.finished {
            eprintln!("crabbox: {msg}");
            return;
        }
        let bar = st.bar.get_or_insert_with(|| {
            let bar = ProgressBar::new_spinner();
            let template = if crate::logging::colour_stderr() {
                "{spinner:.cyan} {msg} {elapsed:.dim}"
            } else {
                "{spinner} {msg} {elapsed}"
            };
            let style = ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_spinner());
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        let bar = bar.clone();
        if let Some(prev) = st.step.replace(msg.to_string()) {
            bar.println(format!("crabbox: {prev}"));
        }
        bar.reset_elapsed();
        bar.set_message(msg.to_string());
    }

    /// Changes what the current step says (its counts as it goes), keeping its start.
    pub fn update(&self, msg: &str) {
        let st = self.state();
        match (&st.bar, st.finished) {
            (Some(bar), false) => bar.set_message(msg.to_string()),
            _ => {
                drop(st);
                self.step(msg);
            }
        }
    }

    /// Runs `f` (which prints) with the spinner line out of the way.
    pub fn suspend<T>(&self, f: impl FnOnce() -> T) -> T {
        let bar = self.state().bar.clone();
        match bar {
            Some(bar) => bar.suspend(f),
            None => f(),
        }
    }

    /// Clears the spinner; the last step stays as a line. Before the command's own
    /// output, and at the end.
    pub fn done(&self) {
        let mut st = self.state();
        st.finished = true;
        if let Some(bar) = st.bar.take() {
            bar.finish_and_clear();
            if let Some(step) = st.step.take() {
                eprintln!("crabbox: {step}");
            }
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.done();
    }
}
