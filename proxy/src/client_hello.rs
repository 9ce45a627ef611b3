//! Reads the server name (SNI) and ALPN offer from a TLS ClientHello without terminating TLS.
//!
//! The parser works on the bytes received so far and says whether it needs more. It accepts
//! what real clients send: a hello split over many TCP segments (the caller keeps reading),
//! fragmented over TLS records in any way (reassembled here; even one byte per record is
//! legal TLS), and large post-quantum hellos up to [`MAX_HELLO_BYTES`]. TLS 1.2 and 1.3 hellos
//! share this format. [`HelloReader`] remembers how far it walked, so a hello trickling in
//! costs O(bytes) in total however it is fragmented.

use std::borrow::Cow;

/// Largest ClientHello handshake message we accept; a bigger one is [`HelloError::TooLarge`].
pub const MAX_HELLO_BYTES: usize = 64 * 1024;

const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;

/// What a complete ClientHello told us.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHello<'a> {
    /// The host_name from the server_name extension, if any.
    pub sni: Option<&'a str>,
    /// The raw ALPN protocol list (each entry length-prefixed), if offered.
    pub alpn: Option<&'a [u8]>,
    /// True when the client offers TLS 1.3 (supported_versions contains 0x0304).
    pub offers_tls13: bool,
}

impl<'a> ClientHello<'a> {
    /// ALPN protocols in the client's order of preference.
    pub fn alpn_protocols(&self) -> impl Iterator<Item = &'a [u8]> {
        let mut rest = self.alpn.unwrap_or(&[]);
        std::iter::from_fn(move || {
            let (&len, tail) = rest.split_first()?;
            let proto = tail.get(..len as usize)?;
            rest = &tail[len as usize..];
            Some(proto)
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// The first byte is not a TLS handshake record: not TLS at all.
    #[error("not a TLS handshake")]
    NotTls,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("ClientHello larger than {MAX_HELLO_BYTES} bytes")]
    TooLarge,
}

/// The outcome of looking at the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse<T> {
    /// Read more bytes and call again with all of them.
    NeedMore,
    Done(T),
}

/// Parses `buf` (everything received from the client so far, from the first byte) from
/// scratch. A caller that reads more and calls again should keep a [`HelloReader`] instead.
pub fn parse(buf: &[u8]) -> Result<Parse<HelloInfo<'_>>, HelloError> {
    HelloReader::default().parse(buf)
}

/// Parses a ClientHello as its bytes arrive, walking each record header once.
#[derive(Debug, Default, Clone)]
pub struct HelloReader {
    /// Offset of the first record not walked yet.
    at: usize,
    /// Handshake bytes in the records walked so far.
    have: usize,
    /// The handshake header (type and length), as far as it has arrived.
    head: [u8; 4],
    head_len: usize,
}

impl HelloReader {
    /// Parses `buf`: everything received so far, from the first byte, a prefix of which was
    /// given to the previous calls. Only records this reader has not walked are looked at.
    pub fn parse<'b>(&mut self, buf: &'b [u8]) -> Result<Parse<HelloInfo<'b>>, HelloError> {
        if self.at == 0 {
            // Fast path: the whole handshake message sits in the first record.
            let Some(first) = record(buf, 0)? else {
                return Ok(Parse::NeedMore);
            };
            if let Some(total) = handshake_len(first)? {
                if first.len() >= total {
                    let parsed = parse_client_hello(&first[4..total])?;
                    return Ok(Parse::Done(HelloInfo {
                        message: Cow::Borrowed(&first[..total]),
                        parsed,
                    }));
                }
            }
        }
        // The message continues in further records. Walk the headers of those that arrived
        // since the last call, and copy the payloads only once all are there.
        let total = loop {
            let Some(payload) = record(buf, self.at)? else {
                return Ok(Parse::NeedMore);
            };
            let n = payload.len().min(self.head.len() - self.head_len);
            self.head[self.head_len..self.head_len + n].copy_from_slice(&payload[..n]);
            self.head_len += n;
            self.have += payload.len();
            self.at += RECORD_HEADER + payload.len();
            if self.have > MAX_HELLO_BYTES {
                return Err(HelloError::TooLarge);
            }
            if let Some(total) = handshake_len(&self.head[..self.head_len])? {
                if self.have >= total {
                    break total;
                }
            }
        };
        let mut message = Vec::with_capacity(self.have);
        let mut next = 0;
        while next < self.at {
            let Some(payload) = record(buf, next)? else {
                break;
            };
            message.extend_from_slice(payload);
            next += RECORD_HEADER + payload.len();
        }
        message.truncate(total);
        let parsed = parse_client_hello(&message[4..])?;
        Ok(Parse::Done(HelloInfo {
            message: Cow::Owned(message),
            parsed,
        }))
    }
}

/// A parsed hello, holding (or borrowing) the handshake message it came from.
#[derive(Debug, PartialEq, Eq)]
pub struct HelloInfo<'a> {
    message: Cow<'a, [u8]>,
    parsed: Parsed,
}

/// Offsets into the hello body, so [`HelloInfo`] can own or borrow the message alike.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Parsed {
    sni: Option<(usize, usize)>,
    alpn: Option<(usize, usize)>,
    tls13: bool,
}

impl HelloInfo<'_> {
    pub fn client_hello(&self) -> ClientHello<'_> {
        let body = &self.message[4..];
        let p = self.parsed;
        ClientHello {
            // The parser checked the name is printable ASCII, so this never fails.
            sni: p
                .sni
                .and_then(|(s, e)| std::str::from_utf8(&body[s..e]).ok()),
            alpn: p.alpn.map(|(s, e)| &body[s..e]),
            offers_tls13: p.tls13,
        }
    }
}

/// The payload of the TLS record starting at `at`, if it has fully arrived.
fn record(buf: &[u8], at: usize) -> Result<Option<&[u8]>, HelloError> {
    let Some(header) = buf.get(at..at + RECORD_HEADER) else {
        // Reject non-TLS as early as the first byte, without waiting for five.
        if at == 0 && !buf.is_empty() && buf[0] != CONTENT_HANDSHAKE {
            return Err(HelloError::NotTls);
        }
        return Ok(None);
    };
    if header[0] != CONTENT_HANDSHAKE {
        return Err(if at == 0 {
            HelloError::NotTls
        } else {
            HelloError::Malformed("non-handshake record inside ClientHello")
        });
    }
    if header[1] != 3 {
        return Err(HelloError::Malformed("record version is not TLS"));
    }
    let len = u16::from_be_bytes([header[3], header[4]]) as usize;
    if len == 0 {
        return Err(HelloError::Malformed("empty handshake record"));
    }
    if len > (1 << 14) + 2048 {
        return Err(HelloError::Malformed("record longer than TLS allows"));
    }
    Ok(buf.get(at + RECORD_HEADER..at + RECORD_HEADER + len))
}

/// Total length (header included) of the handshake message at the start of `msg`, once its
/// 4-byte header is there.
fn handshake_len(msg: &[u8]) -> Result<Option<usize>, HelloError> {
    let Some(h) = msg.get(..4) else {
        return Ok(None);
    };
    if h[0] != HANDSHAKE_CLIENT_HELLO {
        return Err(HelloError::Malformed(
            "first handshake message is not a ClientHello",
        ));
    }
    let len = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
    if len + 4 > MAX_HELLO_BYTES {
        return Err(HelloError::TooLarge);
    }
    Ok(Some(len + 4))
}

/// A cursor over the hello body that fails with a reason instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        let out = self
            .buf
            .get(self.at..self.at + n)
            .ok_or(HelloError::Malformed(what))?;
        self.at += n;
        Ok(out)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }
}

/// Parses a ClientHello body (after the 4-byte handshake header), returning offsets into it.
fn parse_client_hello(body: &[u8]) -> Result<Parsed, HelloError> {
    let mut r = Reader { buf: body, at: 0 };
    let version = r.take(2, "truncated version")?;
    if version[0] != 3 {
        return Err(HelloError::Malformed("client version is not TLS"));
    }
    r.take(32, "truncated random")?;
    let sid = r.u8("truncated session id")? as usize;
    if sid > 32 {
        return Err(HelloError::Malformed("session id longer than 32 bytes"));
    }
    r.take(sid, "truncated session id")?;
    let suites = r.u16("truncated cipher suites")? as usize;
    if suites < 2 || !suites.is_multiple_of(2) {
        return Err(HelloError::Malformed("bad cipher suite list"));
    }
    r.take(suites, "truncated cipher suites")?;
    let comp = r.u8("truncated compression methods")? as usize;
    if comp < 1 {
        return Err(HelloError::Malformed("no compression method"));
    }
    r.take(comp, "truncated compression methods")?;
    let mut parsed = Parsed::default();
    if r.remaining() == 0 {
        // A TLS 1.2 hello may omit extensions entirely.
        return Ok(parsed);
    }
    let ext_len = r.u16("truncated extensions")? as usize;
    if ext_len != r.remaining() {
        return Err(HelloError::Malformed(
            "extensions length does not match the hello",
        ));
    }
    let mut seen_sni = false;
    let mut seen_alpn = false;
    let mut seen_versions = false;
    while r.remaining() > 0 {
        let ty = r.u16("truncated extension")?;
        let len = r.u16("truncated extension")? as usize;
        let start = r.at;
        let data = r.take(len, "truncated extension data")?;
        match ty {
            EXT_SERVER_NAME => {
                if std::mem::replace(&mut seen_sni, true) {
                    return Err(HelloError::Malformed("duplicate server_name extension"));
                }
                parsed.sni = server_name(data)?.map(|(s, e)| (start + s, start + e));
            }
            EXT_ALPN => {
                if std::mem::replace(&mut seen_alpn, true) {
                    return Err(HelloError::Malformed("duplicate ALPN extension"));
                }
                let (s, e) = alpn_list(data)?;
                parsed.alpn = Some((start + s, start + e));
            }
            EXT_SUPPORTED_VERSIONS => {
                if std::mem::replace(&mut seen_versions, true) {
                    return Err(HelloError::Malformed(
                        "duplicate supported_versions extension",
                    ));
                }
                parsed.tls13 = supported_versions_has_tls13(data)?;
            }
            _ => {}
        }
    }
    Ok(parsed)
}

/// Offsets of the host_name within the server_name extension data (RFC 6066 §3).
fn server_name(data: &[u8]) -> Result<Option<(usize, usize)>, HelloError> {
    let mut r = Reader { buf: data, at: 0 };
    let list = r.u16("truncated server_name list")? as usize;
    if list != r.remaining() {
        return Err(HelloError::Malformed("server_name list length mismatch"));
    }
    let mut found = None;
    while r.remaining() > 0 {
        let kind = r.u8("truncated server_name entry")?;
        let len = r.u16("truncated server_name entry")? as usize;
        let start = r.at;
        let name = r.take(len, "truncated server name")?;
        if kind == 0 {
            if found.is_some() {
                return Err(HelloError::Malformed("more than one host_name"));
            }
            if name.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) {
                return Err(HelloError::Malformed("host_name is not printable ASCII"));
            }
            found = Some((start, start + len));
        }
    }
    Ok(found)
}

/// Offsets of the protocol list within the ALPN extension data (RFC 7301 §3.1).
fn alpn_list(data: &[u8]) -> Result<(usize, usize), HelloError> {
    let mut r = Reader { buf: data, at: 0 };
    let list = r.u16("truncated ALPN list")? as usize;
    if list != r.remaining() || list == 0 {
        return Err(HelloError::Malformed("bad ALPN list length"));
    }
    while r.remaining() > 0 {
        let len = r.u8("truncated ALPN protocol")? as usize;
        if len == 0 {
            return Err(HelloError::Malformed("empty ALPN protocol"));
        }
        r.take(len, "truncated ALPN protocol")?;
    }
    Ok((2, data.len()))
}

fn supported_versions_has_tls13(data: &[u8]) -> Result<bool, HelloError> {
    let mut r = Reader { buf: data, at: 0 };
    let len = r.u8("truncated supported_versions")? as usize;
    if len != r.remaining() || !len.is_multiple_of(2) {
        return Err(HelloError::Malformed("bad supported_versions length"));
    }
    let versions = r.take(len, "truncated supported_versions")?;
    Ok(versions.chunks_exact(2).any(|v| v == [3, 4]))
}
