//! The rules every binary's `--help` is tested against (each binary's `help_is_complete`
//! test calls [`help_problems`] on its whole command tree).

use clap::Command;

/// Visible long flags that other spellings replaced (they stay as hidden aliases): one
/// vocabulary across the binaries.
const RETIRED: &[&str] = &[
    "cacert",
    "cert",
    "key",
    "tls-root",
    "control-cert",
    "control-key",
    "control-root",
    "spiffe",
];

/// Everything wrong with `cmd`'s help, one line each; empty when it is complete:
/// - every visible argument (flags and positionals) of every command has help text;
/// - every visible command ends its help with `Examples:` and 2 to 4 example lines that start
///   with the binary's name and parse (up to a `>` or `|`);
/// - the binary has `--version`, `--log-format`, and a `completions` subcommand;
/// - no visible flag uses a retired spelling or takes milliseconds as `--*-ms`;
/// - with `env_for_every_flag`, every flag can also be set from an `EASTWEST_*` variable
///   (the daemons, which run in containers).
pub fn help_problems(cmd: Command, env_for_every_flag: bool) -> Vec<String> {
    let mut root = cmd;
    root.build();
    let mut problems = Vec::new();
    if root.get_version().is_none() {
        problems.push("no --version".to_string());
    }
    if !root
        .get_arguments()
        .any(|a| a.get_long() == Some("log-format"))
    {
        problems.push("no --log-format".to_string());
    }
    if root.find_subcommand("completions").is_none() {
        problems.push("no completions subcommand".to_string());
    }
    walk(
        &root,
        &root,
        root.get_name(),
        env_for_every_flag,
        &mut problems,
    );
    problems
}

fn walk(root: &Command, cmd: &Command, path: &str, env: bool, problems: &mut Vec<String>) {
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if arg.is_hide_set()
            || id == "help"
            || id == "version"
            || arg.is_global_set() && cmd.get_name() != root.get_name()
        {
            continue;
        }
        let name = arg
            .get_long()
            .map(|l| format!("--{l}"))
            .unwrap_or_else(|| format!("<{id}>"));
        let help = arg
            .get_help()
            .or(arg.get_long_help())
            .map(|h| h.to_string());
        if help.is_none_or(|h| h.trim().is_empty()) {
            problems.push(format!("{path}: {name} has no help text"));
        }
        if let Some(long) = arg.get_long() {
            if RETIRED.contains(&long) || long.ends_with("-ms") {
                problems.push(format!("{path}: {name} is a retired spelling"));
            }
            if env
                && arg
                    .get_env()
                    .is_none_or(|v| !v.to_string_lossy().starts_with("EASTWEST_"))
            {
                problems.push(format!(
                    "{path}: {name} has no EASTWEST_* environment variable"
                ));
            }
        }
    }
    let after = cmd
        .get_after_help()
        .or(cmd.get_after_long_help())
        .map(|h| h.to_string())
        .unwrap_or_default();
    match after.split_once("Examples:") {
        None => problems.push(format!("{path}: help has no Examples section")),
        Some((_, examples)) => {
            let lines: Vec<&str> = examples
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            if !(2..=4).contains(&lines.len()) {
                problems.push(format!("{path}: {} examples, want 2 to 4", lines.len()));
            }
            for line in lines {
                if let Some(why) = example_problem(root, path, line) {
                    problems.push(format!("{path}: example `{line}`: {why}"));
                }
            }
        }
    }
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        let sub_path = format!("{path} {}", sub.get_name());
        walk(root, sub, &sub_path, env, problems);
    }
}

/// Why an example line is not a real invocation of the command at `path`, if it is not.
fn example_problem(root: &Command, path: &str, line: &str) -> Option<String> {
    if !line.starts_with(path) {
        return Some(format!("does not start with `{path}`"));
    }
    // The shell's part (redirection, pipes, `&&`) is not ours to parse.
    let ours = line.split(['>', '|', '&']).next().unwrap_or_default();
    let words: Vec<String> = ours
        .split_whitespace()
        .map(|w| w.trim_matches(['"', '\'']).to_string())
        .collect();
    root.clone().try_get_matches_from(words).err().map(|err| {
        err.render()
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn tool() -> Command {
        Command::new("tool")
            .version("1")
            .arg(
                Arg::new("log-format")
                    .long("log-format")
                    .help("Log format."),
            )
            .subcommand(
                Command::new("completions")
                    .arg(Arg::new("shell").required(true).help("A shell."))
                    .after_help("Examples:\n  tool completions bash\n  tool completions zsh"),
            )
            .after_help("Examples:\n  tool --log-format json\n  tool completions fish")
    }

    #[test]
    fn a_complete_tool_passes() {
        assert_eq!(help_problems(tool(), false), Vec::<String>::new());
    }

    #[test]
    fn blank_help_missing_examples_and_retired_flags_are_named() {
        let cmd = tool()
            .arg(Arg::new("cacert").long("cacert").action(ArgAction::Set))
            .arg(
                Arg::new("ttl")
                    .long("ttl-ms")
                    .help("TTL.")
                    .action(ArgAction::Set),
            )
            .subcommand(Command::new("run").after_help("Examples:\n  tool run --nope"));
        let problems = help_problems(cmd, true);
        for want in [
            "tool: --cacert has no help text",
            "tool: --cacert is a retired spelling",
            "tool: --ttl-ms is a retired spelling",
            "tool: --log-format has no EASTWEST_* environment variable",
            "tool run: 1 examples, want 2 to 4",
        ] {
            assert!(
                problems.iter().any(|p| p == want),
                "{want:?} not in {problems:#?}"
            );
        }
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("tool run: example `tool run --nope`")),
            "{problems:#?}"
        );
    }
}
