//! `--log-format` and the log filter, the same for every binary.

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per event, for log collectors.
    Json,
}

/// The logging flags every binary takes.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format on stderr: text or json. Which events: EASTWEST_LOG (or RUST_LOG), e.g.
    /// `info`, `eastwest_proxy=debug`.
    #[arg(
        long,
        value_enum,
        default_value_t = LogFormat::Text,
        env = "EASTWEST_LOG_FORMAT",
        global = true
    )]
    pub log_format: LogFormat,
}

impl LogArgs {
    /// Installs the global tracing subscriber, writing to stderr; `default_filter` applies
    /// when neither EASTWEST_LOG nor RUST_LOG is set (or parses).
    pub fn init(&self, default_filter: &str) {
        let filter = ["EASTWEST_LOG", "RUST_LOG"]
            .iter()
            .filter_map(|var| std::env::var(var).ok())
            .find_map(|spec| tracing_subscriber::EnvFilter::try_new(spec).ok())
            .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(default_filter));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            // Colour codes only for a person at a terminal, never into `kubectl logs` or a file.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        match self.log_format {
            LogFormat::Text => builder.init(),
            LogFormat::Json => builder.json().init(),
        }
    }
}
