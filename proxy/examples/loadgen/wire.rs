//! The request/response protocol inside TLS.
//!
//! A request is an 8-byte header — request body length and wanted response length, both u32
//! big-endian — followed by the body. The backend answers with exactly the wanted number of
//! bytes; [`STREAM`] as the response length means "stream until the connection closes".

pub const HEADER_LEN: usize = 8;

/// Response length meaning "write until the client goes away" (bulk mode).
pub const STREAM: u32 = u32::MAX;

/// What the backend writes from; responses are this buffer repeated.
pub const CHUNK: usize = 64 * 1024;

pub fn header(request_len: u32, response_len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&request_len.to_be_bytes());
    h[4..].copy_from_slice(&response_len.to_be_bytes());
    h
}

/// (request body length, response length).
pub fn parse_header(h: &[u8; HEADER_LEN]) -> (u32, u32) {
    let request = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    let response = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    (request, response)
}

/// A whole request: header then `request_len` bytes of body.
pub fn request(request_len: u32, response_len: u32) -> Vec<u8> {
    let mut r = header(request_len, response_len).to_vec();
    r.resize(HEADER_LEN + request_len as usize, b'q');
    r
}
