//! What the command lines of eastwest-proxy, eastwest-control, eastwest-certs and
//! eastwest-bench share, so they read like one tool: `--version` with the git commit,
//! `--log-format` and `EASTWEST_LOG`, humantime durations, a `completions <shell>` subcommand,
//! `error: <what>: <cause>` reports, and the rules every `--help` is tested against.

mod duration;
mod help;
mod logging;
mod report;

use clap::{CommandFactory, Parser};

pub use duration::{duration, duration_or_millis, duration_or_secs};
pub use help::help_problems;
pub use logging::{LogArgs, LogFormat};
pub use report::{error_report, exit_failure};

/// The workspace version, e.g. `0.1.0`.
pub const PKG_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit the binaries were built from (short hash), or `unknown` (see build.rs).
pub const GIT_COMMIT: &str = env!("EASTWEST_GIT_COMMIT");

/// `0.1.0 (commit 1a2b3c4)`: the workspace version and the commit built from (see build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("EASTWEST_GIT_COMMIT"),
    ")"
);

/// The `completions` subcommand every binary has.
#[derive(Debug, clap::Args)]
pub struct Completions {
    /// The shell to write a completion script for: bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

impl Completions {
    /// Writes the completion script of `C`'s command line to stdout.
    pub fn print<C: CommandFactory>(&self) {
        let mut cmd = command::<C>();
        let name = cmd.get_name().to_string();
        clap_complete::generate(self.shell, &mut cmd, name, &mut std::io::stdout());
    }
}

/// The subcommands of a binary that has no others (eastwest-proxy, eastwest-control): it
/// stays usable as `BINARY --flags`, with `BINARY completions <shell>` beside it.
#[derive(Debug, clap::Subcommand)]
pub enum OnlyCompletions {
    Completions(Completions),
}

/// Panics with every [`help_problems`] of `C`'s command line: each binary's
/// `help_is_complete` test.
pub fn assert_help_complete<C: CommandFactory>(env_for_every_flag: bool) {
    let problems = help_problems(command::<C>(), env_for_every_flag);
    assert!(problems.is_empty(), "{problems:#?}");
}

/// `C`'s command tree with what all binaries share filled in: the version and the
/// `completions` subcommand's examples (they name the binary).
pub fn command<C: CommandFactory>() -> clap::Command {
    let cmd = C::command().version(VERSION);
    let name = cmd.get_name().to_string();
    cmd.mut_subcommand("completions", |sub| {
        sub.about("Print a shell completion script")
            .after_help(format!(
                "Examples:\n  {name} completions bash > /etc/bash_completion.d/{name}\n  \
                 {name} completions zsh > \"${{fpath[1]}}/_{name}\"\n  \
                 {name} completions fish > ~/.config/fish/completions/{name}.fish"
            ))
    })
}

/// Parses the process's arguments with [`command`]; exits with clap's message on a mistake.
pub fn parse<C: Parser>() -> C {
    let matches = command::<C>().get_matches();
    C::from_arg_matches(&matches).unwrap_or_else(|err| err.exit())
}
