//! Incremental Server-Sent Events parser.
//!
//! Fed with body frames as they arrive; calls back once per complete event (at its blank
//! line), so every event can be timestamped with the instant its last byte arrived. Follows
//! the WHATWG rules the OpenAI-compatible servers rely on: `data:` with or without a space,
//! `:` comments and keep-alives ignored, LF, CRLF or CR line ends, multi-line data joined
//! with `\n`. Buffers are reused across events, so steady-state parsing does not allocate.

#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the current, not yet terminated line.
    line: Vec<u8>,
    /// `data` field of the event being built.
    data: Vec<u8>,
    /// The event has at least one `data` line (an empty `data:` still counts).
    has_data: bool,
    /// Last byte fed was a CR, so an LF right after it is part of the same line end.
    after_cr: bool,
    /// Events dispatched so far.
    events: u64,
}

impl SseParser {
    pub fn new() -> SseParser {
        SseParser::default()
    }

    /// Number of events dispatched so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Feeds bytes; calls `on_event` with each complete event's data.
    pub fn feed(&mut self, mut bytes: &[u8], on_event: &mut impl FnMut(&[u8])) {
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = bytes.strip_prefix(b"\n") {
                bytes = rest;
            }
        }
        while let Some(pos) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
            let end = bytes[pos];
            self.line.extend_from_slice(&bytes[..pos]);
            bytes = &bytes[pos + 1..];
            if end == b'\r' {
                match bytes.first() {
                    Some(b'\n') => bytes = &bytes[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            self.end_line(on_event);
        }
        self.line.extend_from_slice(bytes);
    }

    /// End of stream: a final event not followed by a blank line is still delivered
    /// (lenient; the spec would drop it).
    pub fn finish(&mut self, on_event: &mut impl FnMut(&[u8])) {
        if !self.line.is_empty() {
            self.end_line(on_event);
        }
        self.dispatch(on_event);
    }

    fn end_line(&mut self, on_event: &mut impl FnMut(&[u8])) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            self.dispatch(on_event);
        } else if line[0] != b':' {
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(colon) => {
                    let value = &line[colon + 1..];
                    (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (&line[..], &b""[..]),
            };
            // Only `data` matters for OpenAI streams; `event`, `id`, `retry` are ignored.
            if field == b"data" {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
        }
        // Give the (cleared) allocation back for the next line.
        self.line = line;
        self.line.clear();
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(&[u8])) {
        if self.has_data {
            self.events += 1;
            on_event(&self.data);
        }
        self.data.clear();
        self.has_data = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(input: &[u8], piece: usize) -> Vec<String> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        let mut cb = |d: &[u8]| out.push(String::from_utf8(d.to_vec()).unwrap());
        for chunk in input.chunks(piece) {
            p.feed(chunk, &mut cb);
        }
        p.finish(&mut cb);
        out
    }

    #[test]
    fn events_split_at_any_byte_boundary() {
        let input = b": keep-alive\n\ndata: {\"a\":1}\n\ndata:{\"b\":2}\r\n\r\nevent: x\r\ndata: l1\rdata: l2\r\r\ndata: [DONE]\n\n";
        for piece in 1..input.len() {
            assert_eq!(
                parse_in_pieces(input, piece),
                ["{\"a\":1}", "{\"b\":2}", "l1\nl2", "[DONE]"],
                "piece size {piece}"
            );
        }
    }

    #[test]
    fn trailing_event_without_blank_line_is_delivered() {
        assert_eq!(parse_in_pieces(b"data: x\n\ndata: y", 4), ["x", "y"]);
    }

    #[test]
    fn comments_and_empty_lines_alone_make_no_event() {
        assert!(parse_in_pieces(b":ping\n\n\n\n: more\n\n", 3).is_empty());
    }
}
