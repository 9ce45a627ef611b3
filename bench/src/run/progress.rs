//! Progress of a run: a tqdm-like bar, as bench_serving shows.

/// Progress reporting for [`run_benchmark`](super::run_benchmark): a tqdm-like bar on stderr, hidden when stderr
/// is not a terminal.
#[derive(Clone)]
pub struct ProgressSink {
    bar: indicatif::ProgressBar,
}

impl ProgressSink {
    /// A bar on stderr (drawn only on a TTY).
    pub fn stderr(label: &str) -> ProgressSink {
        ProgressSink::from_bar(indicatif::ProgressBar::new(0), label)
    }

    /// Wraps an existing bar, e.g. one inside an `indicatif::MultiProgress`.
    pub fn from_bar(bar: indicatif::ProgressBar, label: &str) -> ProgressSink {
        let style = indicatif::ProgressStyle::with_template(
            "{prefix:>24} {percent:>3}%|{bar:40}| {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("█▉▊▋▌▍▎▏ ");
        bar.set_style(style);
        bar.set_prefix(label.to_string());
        ProgressSink { bar }
    }

    pub(super) fn start(&self, total: usize) {
        self.bar.set_length(total as u64);
        self.bar.set_position(0);
        self.bar.reset_elapsed();
    }

    pub(super) fn inc(&self, failed: bool) {
        self.bar.inc(1);
        if failed {
            self.bar.set_message("(failures)");
        }
    }

    pub fn finish(&self) {
        self.bar.finish();
    }
}
