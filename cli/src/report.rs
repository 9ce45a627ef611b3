//! `error: <what>: <cause>` on stderr, the one error style of every binary.

use std::process::ExitCode;

/// The error and its causes joined by `: `, leaving out a cause whose text the message before
/// it already ends with (a library that prints its source in its own message, then also
/// returns it as `source()`, would otherwise show it twice). An error that lists several
/// problems, one a line (a config file's), gets `error: ` on each.
pub fn error_report(err: &anyhow::Error) -> String {
    let mut report = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if report.ends_with(&text) {
            continue;
        }
        if !report.is_empty() {
            report.push_str(": ");
        }
        report.push_str(&text);
    }
    report
        .lines()
        .map(|line| format!("error: {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Prints [`error_report`] to stderr; the exit code to return from `main`.
pub fn exit_failure(err: &anyhow::Error) -> ExitCode {
    eprintln!("{}", error_report(err));
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_printed_twice_shows_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        #[derive(Debug)]
        struct Wraps(std::io::Error);
        impl std::fmt::Display for Wraps {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "reading a.pem: {}", self.0)
            }
        }
        impl std::error::Error for Wraps {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let err = anyhow::Error::new(Wraps(io)).context("loading the CA");
        assert_eq!(
            error_report(&err),
            "error: loading the CA: reading a.pem: No such file"
        );
    }

    #[test]
    fn each_listed_problem_is_its_own_error_line() {
        let err = anyhow::anyhow!("gw.yaml:4:5: listener tls twice\ngw.yaml:5:5: address in use");
        assert_eq!(
            error_report(&err),
            "error: gw.yaml:4:5: listener tls twice\nerror: gw.yaml:5:5: address in use"
        );
    }
}
