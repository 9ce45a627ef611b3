//! bench_serving flags `run` accepts so that a copied command line works, but that cannot
//! apply here: each one given prints a warning saying why, instead of clap's "unexpected
//! argument".

/// Accepted, warned about, otherwise ignored (hidden from `--help`).
#[derive(Debug, Default, clap::Args)]
pub struct IgnoredFlags {
    #[arg(long, hide = true)]
    pub dataset_path: Option<String>,
    #[arg(long, hide = true)]
    pub dataset_offset: Option<String>,
    #[arg(long, hide = true)]
    pub sharegpt_output_len: Option<String>,
    #[arg(long, hide = true)]
    pub sharegpt_context_len: Option<String>,
    #[arg(long, hide = true)]
    pub disable_stream: bool,
    #[arg(long, hide = true)]
    pub flush_cache: bool,
    #[arg(long, hide = true)]
    pub flush_cache_timeout: Option<String>,
    #[arg(long, hide = true)]
    pub apply_chat_template: bool,
    #[arg(long, hide = true)]
    pub print_requests: bool,
    #[arg(long, hide = true)]
    pub tokenize_prompt: bool,
    #[arg(long, hide = true)]
    pub prompt_suffix: Option<String>,
    #[arg(long, hide = true)]
    pub use_trace_timestamps: bool,
    #[arg(long, hide = true)]
    pub return_logprob: bool,
    #[arg(long, hide = true)]
    pub top_logprobs_num: Option<String>,
    #[arg(long, hide = true)]
    pub cache_report: bool,
    #[arg(long, hide = true)]
    pub plot_throughput: bool,
    #[arg(long, hide = true)]
    pub profile: bool,
    #[arg(long, hide = true, num_args = 0..)]
    pub lora_name: Option<Vec<String>>,
    #[arg(long, hide = true)]
    pub pd_separated: bool,
    #[arg(long, hide = true)]
    pub rust_client: bool,
}

impl IgnoredFlags {
    /// One line per flag given: which flag and why it does nothing here.
    pub fn warnings(&self) -> Vec<String> {
        const NO_TOKENIZER: &str =
            "prompts are sent as text, without a chat template or pre-tokenization";
        let given: [(bool, &str, &str); 20] = [
            (
                self.dataset_path.is_some(),
                "--dataset-path",
                "only the random datasets are supported; their text does not come from a file",
            ),
            (
                self.dataset_offset.is_some(),
                "--dataset-offset",
                "only the random datasets are supported",
            ),
            (
                self.sharegpt_output_len.is_some(),
                "--sharegpt-output-len",
                "only the random datasets are supported",
            ),
            (
                self.sharegpt_context_len.is_some(),
                "--sharegpt-context-len",
                "only the random datasets are supported",
            ),
            (
                self.disable_stream,
                "--disable-stream",
                "run always streams (TTFT/ITL need the stream)",
            ),
            (
                self.flush_cache,
                "--flush-cache",
                "not sent: POST /flush_cache is sglang-specific",
            ),
            (
                self.flush_cache_timeout.is_some(),
                "--flush-cache-timeout",
                "--flush-cache is not supported",
            ),
            (
                self.apply_chat_template,
                "--apply-chat-template",
                NO_TOKENIZER,
            ),
            (self.print_requests, "--print-requests", "not implemented"),
            (self.tokenize_prompt, "--tokenize-prompt", NO_TOKENIZER),
            (
                self.prompt_suffix.is_some(),
                "--prompt-suffix",
                "not implemented",
            ),
            (
                self.use_trace_timestamps,
                "--use-trace-timestamps",
                "only the random datasets are supported (no trace)",
            ),
            (
                self.return_logprob,
                "--return-logprob",
                "logprobs are not requested",
            ),
            (
                self.top_logprobs_num.is_some(),
                "--top-logprobs-num",
                "logprobs are not requested",
            ),
            (self.cache_report, "--cache-report", "not implemented"),
            (
                self.plot_throughput,
                "--plot-throughput",
                "no plots (the demo subcommand draws its own)",
            ),
            (
                self.profile,
                "--profile",
                "there is no server profiler to start",
            ),
            (
                self.lora_name.is_some(),
                "--lora-name",
                "LoRA adapters are not selected",
            ),
            (self.pd_separated, "--pd-separated", "not implemented"),
            (
                self.rust_client,
                "--rust-client",
                "run is itself a Rust client",
            ),
        ];
        given
            .iter()
            .filter(|(set, _, _)| *set)
            .map(|(_, flag, why)| format!("{flag} is ignored: {why}"))
            .collect()
    }
}
