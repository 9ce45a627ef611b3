//! Reading a config file so that every mistake is reported as `FILE:LINE:COL: field: why`.

use std::fmt;
use std::path::Path;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

use crate::{Invalid, ProxyConfig};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The io::Error is in the message and deliberately not `source()`: reports that print
    /// the chain (`{:#}`) would show it twice.
    #[error("{file}: cannot read: {cause}")]
    Read { file: String, cause: std::io::Error },
    /// YAML syntax or type errors, and every validation failure, each with its place.
    #[error("{}", Problems(.0))]
    Invalid(Vec<Problem>),
}

/// One mistake in a config document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// 1-based; `None` when the document gave no position (e.g. a missing top-level field).
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted field path, e.g. `listeners[0].address`; empty for the document itself.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        if self.field.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": field `{}`: {}", self.field, self.message)
        }
    }
}

struct Problems<'a>(&'a [Problem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Reads, parses and validates `path`.
pub fn load_proxy_config(path: &Path) -> Result<ProxyConfig, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
        file: file.clone(),
        cause,
    })?;
    parse_proxy_config(&text, &file)
}

/// Parses and validates a YAML (or JSON) document; `file` names it in errors.
pub fn parse_proxy_config(text: &str, file: &str) -> Result<ProxyConfig, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    let config: ProxyConfig = serde_path_to_error::deserialize(de).map_err(|err| {
        // serde_yaml reads lazily: a field can fail to deserialize before the parser reaches a
        // syntax error further on (an unclosed `{` turns the rest of the file into one value).
        // So when deserializing fails, a syntax error anywhere is the problem to report.
        let problem = syntax_problem(text, file).unwrap_or_else(|| type_problem(err, file));
        ConfigError::Invalid(vec![problem])
    })?;
    let invalid = config.validate();
    if invalid.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(locate_all(text, file, invalid)))
    }
}

/// The first YAML syntax error in `text`, if it has one.
fn syntax_problem(text: &str, file: &str) -> Option<Problem> {
    struct Ignore;
    impl MarkedEventReceiver for Ignore {
        fn on_event(&mut self, _: Event, _: Marker) {}
    }
    let err = Parser::new_from_str(text).load(&mut Ignore, true).err()?;
    Some(Problem {
        file: file.to_string(),
        line: Some(err.marker().line()),
        column: Some(err.marker().col() + 1),
        field: String::new(),
        message: format!("YAML syntax error: {}", err.info()),
    })
}

/// A value of the wrong type (or an unknown field) that serde refused, with its place.
fn type_problem(err: serde_path_to_error::Error<serde_yaml::Error>, file: &str) -> Problem {
    let field = err.path().to_string();
    let inner = err.into_inner();
    let location = inner.location();
    // serde_yaml appends " at line X column Y"; we print the position up front instead.
    let message = inner.to_string();
    let message = match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message,
    };
    // ...and it may prefix the path, which we print as `field` already.
    let message = match message.split_once(": ") {
        Some((head, rest)) if field.starts_with(head) => rest.to_string(),
        _ => message,
    };
    let field = if field == "." { String::new() } else { field };
    Problem {
        file: file.to_string(),
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        message: expected_form(&field, message),
        field,
    }
}

/// serde's words for a wrong value name Rust types (`expected u16`, `invalid socket address
/// syntax`); an operator needs the form to write instead.
fn expected_form(field: &str, message: String) -> String {
    let last = field.rsplit(['.', ']']).next().unwrap_or(field);
    if message == "invalid socket address syntax" {
        return "expected host:port, e.g. 10.0.0.7:8000".to_string();
    }
    if let Some(value) = message.strip_suffix(", expected a duration") {
        return format!("{value}, expected a duration such as 30s");
    }
    if last == "port" || last.ends_with("_port") {
        if let Some(value) = message.strip_suffix(", expected u16") {
            return format!("{value}, expected a port number 1–65535");
        }
    }
    message
}

fn locate_all(text: &str, file: &str, invalid: Vec<Invalid>) -> Vec<Problem> {
    let marks = FieldMarks::of(text);
    invalid
        .into_iter()
        .map(|inv| {
            let mark = marks.find(&inv.path);
            Problem {
                file: file.to_string(),
                line: mark.map(|m| m.0),
                column: mark.map(|m| m.1),
                field: inv.path,
                message: inv.message,
            }
        })
        .collect()
}

/// Where each field path of a YAML document starts (1-based line and column).
struct FieldMarks {
    marks: Vec<(String, (usize, usize))>,
}

impl FieldMarks {
    fn of(text: &str) -> FieldMarks {
        let mut recorder = Recorder {
            stack: Vec::new(),
            marks: Vec::new(),
        };
        // A document that parsed with serde_yaml parses here too; if not, we simply have no marks.
        let _ = Parser::new_from_str(text).load(&mut recorder, false);
        FieldMarks {
            marks: recorder.marks,
        }
    }

    /// The mark of `path`, or of its nearest recorded ancestor.
    fn find(&self, path: &str) -> Option<(usize, usize)> {
        let mut path = path;
        loop {
            if let Some((_, m)) = self.marks.iter().find(|(p, _)| p == path) {
                return Some(*m);
            }
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }
}

enum Frame {
    Map { key: Option<String> },
    Seq { index: usize },
}

struct Recorder {
    stack: Vec<Frame>,
    marks: Vec<(String, (usize, usize))>,
}

impl Recorder {
    fn path(&self) -> String {
        let mut out = String::new();
        for frame in &self.stack {
            match frame {
                Frame::Map { key: Some(k) } => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(k);
                }
                Frame::Map { key: None } => {}
                Frame::Seq { index } => out.push_str(&format!("[{index}]")),
            }
        }
        out
    }

    fn record(&mut self, mark: Marker) {
        let path = self.path();
        if !self.marks.iter().any(|(p, _)| *p == path) {
            self.marks.push((path, (mark.line(), mark.col() + 1)));
        }
    }

    /// A value (scalar or whole container) has ended: advance the parent.
    fn value_done(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Map { key }) => *key = None,
            Some(Frame::Seq { index }) => *index += 1,
            None => {}
        }
    }

    /// True when the next scalar in the current mapping is a key.
    fn expecting_key(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Map { key: None }))
    }
}

impl MarkedEventReceiver for Recorder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(value, ..) if self.expecting_key() => {
                if let Some(Frame::Map { key }) = self.stack.last_mut() {
                    *key = Some(value);
                }
                // Point at the key: that is the line a user looks for.
                self.record(mark);
            }
            Event::Scalar(..) | Event::Alias(_) => {
                self.record(mark);
                self.value_done();
            }
            Event::MappingStart(..) => {
                self.record(mark);
                self.stack.push(Frame::Map { key: None });
            }
            Event::SequenceStart(..) => {
                self.record(mark);
                self.stack.push(Frame::Seq { index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.value_done();
            }
            _ => {}
        }
    }
}
