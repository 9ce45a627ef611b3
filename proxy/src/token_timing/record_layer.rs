//! The TLS record layer as a relay sees it: 5-byte record headers, followed as bytes pass in
//! one direction, payloads skipped, headers split across reads tolerated. What the records
//! mean for timing is [`super::ConnectionTiming`]'s job.

pub(super) const CHANGE_CIPHER_SPEC: u8 = 20;
pub(super) const ALERT: u8 = 21;
pub(super) const HANDSHAKE: u8 = 22;
pub(super) const APPLICATION_DATA: u8 = 23;
pub(super) const HEARTBEAT: u8 = 24;

/// Where a direction is in the TLS handshake, as its record headers show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Plaintext handshake records; `ccs` once a ChangeCipherSpec passed.
    Handshake { ccs: bool },
    /// Server→client, TLS 1.3: encrypted handshake flight (and 0.5-RTT data) until the client's
    /// encrypted flight, then one read of session tickets to skip.
    ServerFlight,
    /// Application data: records are messages (or control).
    Data,
    /// Not a TLS record stream we understand (or bulk): no longer followed.
    Lost,
}

/// Which way a follower's bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Client → server: message records are requests.
    Up,
    /// Server → client: message records are responses.
    Down,
}

/// One direction's record-header state machine.
#[derive(Debug)]
pub struct RecordFollower {
    pub(super) way: Way,
    pub(super) phase: Phase,
    /// Header bytes collected so far (0..5); 5 means reading the payload.
    have: u8,
    header: [u8; 5],
    /// Payload bytes of the current record still to pass.
    skip: usize,
}

impl RecordFollower {
    pub fn new(way: Way) -> Self {
        RecordFollower {
            way,
            phase: Phase::Handshake { ccs: false },
            have: 0,
            header: [0; 5],
            skip: 0,
        }
    }

    /// Stops following (the direction splices from now on).
    pub fn stop(&mut self) {
        self.phase = Phase::Lost;
    }

    pub fn following(&self) -> bool {
        self.phase != Phase::Lost
    }

    /// Follows `chunk`, the next bytes relayed this way; calls `on_record(content_type,
    /// length)` for each record header completed in it. Any bytes whatsoever are accepted:
    /// a header that is not TLS stops the following, never the relay.
    pub fn feed(&mut self, mut chunk: &[u8], mut on_record: impl FnMut(u8, u16)) {
        while !chunk.is_empty() && self.phase != Phase::Lost {
            if self.skip > 0 {
                let n = self.skip.min(chunk.len());
                self.skip -= n;
                chunk = &chunk[n..];
                continue;
            }
            let header = match (self.have, chunk) {
                // The usual case: a whole header in the chunk, read in place.
                (0, [kind, major, minor, hi, lo, rest @ ..]) => {
                    chunk = rest;
                    [*kind, *major, *minor, *hi, *lo]
                }
                _ => {
                    let want = 5 - self.have as usize;
                    let n = want.min(chunk.len());
                    self.header[self.have as usize..self.have as usize + n]
                        .copy_from_slice(&chunk[..n]);
                    self.have += n as u8;
                    chunk = &chunk[n..];
                    if self.have < 5 {
                        return;
                    }
                    self.have = 0;
                    self.header
                }
            };
            let [kind, major, _, hi, lo] = header;
            let len = u16::from_be_bytes([hi, lo]);
            // TLS 1.0–1.3 all write major version 3 in the record layer.
            if !(CHANGE_CIPHER_SPEC..=HEARTBEAT).contains(&kind) || major != 3 {
                self.phase = Phase::Lost;
                return;
            }
            self.skip = len as usize;
            on_record(kind, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u8, payload: usize) -> Vec<u8> {
        let mut r = vec![kind, 3, 3];
        r.extend_from_slice(&(payload as u16).to_be_bytes());
        r.extend(std::iter::repeat_n(0xAB, payload));
        r
    }

    fn headers_seen(bytes: &[u8], splits: &[usize]) -> Vec<(u8, u16)> {
        let mut f = RecordFollower::new(Way::Down);
        let mut seen = Vec::new();
        let mut from = 0;
        for &at in splits.iter().chain(std::iter::once(&bytes.len())) {
            f.feed(&bytes[from..at], |k, l| seen.push((k, l)));
            from = at;
        }
        seen
    }

    #[test]
    fn headers_split_at_every_offset_are_seen_once_each() {
        let mut stream = Vec::new();
        let records = [(22, 90), (20, 1), (23, 300), (23, 0), (23, 64), (21, 2)];
        for (k, l) in records {
            stream.extend(record(k, l));
        }
        let want: Vec<(u8, u16)> = records.iter().map(|&(k, l)| (k, l as u16)).collect();
        assert_eq!(headers_seen(&stream, &[]), want);
        for a in 0..=stream.len() {
            assert_eq!(headers_seen(&stream, &[a]), want, "split at {a}");
        }
        // Byte by byte.
        let every: Vec<usize> = (1..stream.len()).collect();
        assert_eq!(headers_seen(&stream, &every), want);
    }
}
