//! Shaping ClientHello bytes (shared by tests and benches; std only).

/// Adds an extension of `len` bytes (type 21, padding) to a single-record hello, fixing all
/// three length fields. Post-quantum key shares make hellos this big.
pub fn with_extension(hello: &[u8], len: usize) -> Vec<u8> {
    let body = &hello[9..];
    let sid = body[34] as usize;
    let suites_at = 35 + sid;
    let suites = u16::from_be_bytes([body[suites_at], body[suites_at + 1]]) as usize;
    let comp_at = suites_at + 2 + suites;
    let ext_at = comp_at + 1 + body[comp_at] as usize;
    let ext_len = u16::from_be_bytes([body[ext_at], body[ext_at + 1]]) as usize;
    let mut out_body = body[..ext_at].to_vec();
    out_body.extend_from_slice(&((ext_len + 4 + len) as u16).to_be_bytes());
    out_body.extend_from_slice(&body[ext_at + 2..]);
    out_body.extend_from_slice(&21u16.to_be_bytes());
    out_body.extend_from_slice(&(len as u16).to_be_bytes());
    out_body.extend(std::iter::repeat_n(0u8, len));
    let hs_len = out_body.len();
    let mut msg = vec![1, (hs_len >> 16) as u8, (hs_len >> 8) as u8, hs_len as u8];
    msg.extend_from_slice(&out_body);
    // Records carry at most 16 KiB; split like a real client would.
    let mut out = Vec::new();
    for chunk in msg.chunks(16384) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}
