//! The request/response protocol inside TLS.
//!
//! A request is a 16-byte header — request body length, wanted response length, response
//! record size and the pause between records in microseconds, all u32 big-endian — followed by
//! the body. The backend answers with exactly the wanted number of bytes; [`STREAM`] as the
//! response length means "stream until the connection closes". A record size of 0 lets the
//! backend write as much at once as it likes; otherwise each `record size` bytes are written
//! and flushed alone (one TLS record each, like a model server's token events), with the
//! pause before each but the first.

pub const HEADER_LEN: usize = 16;

/// Response length meaning "write until the client goes away" (bulk mode).
pub const STREAM: u32 = u32::MAX;

/// What the backend writes from; responses are this buffer repeated.
pub const CHUNK: usize = 64 * 1024;

/// How the backend writes a response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Records {
    /// Bytes per record; 0: as the backend likes.
    pub size: u32,
    /// Microseconds between records.
    pub gap_us: u32,
}

pub fn header(request_len: u32, response_len: u32) -> [u8; HEADER_LEN] {
    header_in_records(request_len, response_len, Records::default())
}

pub fn header_in_records(
    request_len: u32,
    response_len: u32,
    records: Records,
) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    for (i, v) in [request_len, response_len, records.size, records.gap_us]
        .into_iter()
        .enumerate()
    {
        h[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
    }
    h
}

/// (request body length, response length, how to write it).
pub fn parse_header(h: &[u8; HEADER_LEN]) -> (u32, u32, Records) {
    let field = |i: usize| u32::from_be_bytes([h[i * 4], h[i * 4 + 1], h[i * 4 + 2], h[i * 4 + 3]]);
    let records = Records {
        size: field(2),
        gap_us: field(3),
    };
    (field(0), field(1), records)
}

/// A whole request: header then `request_len` bytes of body.
pub fn request(request_len: u32, response_len: u32, records: Records) -> Vec<u8> {
    let mut r = header_in_records(request_len, response_len, records).to_vec();
    r.resize(HEADER_LEN + request_len as usize, b'q');
    r
}
