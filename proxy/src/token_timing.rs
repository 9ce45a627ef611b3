//! Token timing without decrypting: the TLS record headers of a relayed connection, followed
//! as the bytes pass, tell when a request went up and when each response record came back.
//!
//! Each direction runs a [`RecordFollower`] (`record_layer.rs`): a 5-byte-header state machine
//! that skips record payloads and tolerates headers split across reads. It only looks at bytes
//! already relayed, keeps no copy of them, allocates nothing and never waits. Both directions
//! share one [`ConnectionTiming`] (atomics, no lock): a client→server message record marks a
//! request pending; the next server→client message record starts its response. That first
//! record is taken for the HTTP response headers, which servers send before the first token:
//! TTFT is measured at the response's second record, and the gaps between the following
//! records are the inter-token latencies. A response of one record only is timed at that
//! record, once the next request or the connection's end shows no second one came. A direction
//! that switches to splice (bulk) is no longer followed: bulk is not token streaming. See
//! docs/token-timing.md for the heuristics and where they are wrong.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::token::StreamMetrics;

mod record_layer;

use record_layer::{Phase, ALERT, APPLICATION_DATA, CHANGE_CIPHER_SPEC, HANDSHAKE, HEARTBEAT};
pub use record_layer::{RecordFollower, Way};

/// Application-data records with a payload this small are taken for protocol control, not a
/// message: HTTP/2 WINDOW_UPDATE, PING, SETTINGS (ack), RST_STREAM frames are 9–17 bytes,
/// 26–41 bytes once sealed (TLS 1.3: +1 content type +16 tag; TLS 1.2 GCM: +24). A request's
/// headers or a streamed token event are larger.
pub const CONTROL_RECORD_MAX: u16 = 47;

/// What one record means for the connection's timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Meaning {
    Nothing,
    /// A request's record (client → server).
    Request,
    /// A response's record (server → client).
    Response,
}

/// One connection's timing, shared by its two directions through atomics.
pub struct ConnectionTiming<'a> {
    start: Instant,
    /// Nanoseconds since `start` (+1, so 0 means none) of the pending request's last record.
    request_at: AtomicU64,
    /// Same, of the last record of the response streaming now; 0 before any response.
    response_at: AtomicU64,
    /// Same, of the current response's first record (its headers) while no second record has
    /// come; taken (set to 0) by whichever comes first of the second record, the next
    /// request and the connection's end, so the response's TTFT is recorded once.
    headers_at: AtomicU64,
    /// The request time of the response `headers_at` belongs to.
    asked_at: AtomicU64,
    /// The client sent its first encrypted record (TLS 1.3: its Finished flight).
    client_encrypted: AtomicBool,
    metrics: &'a StreamMetrics,
    stall: Duration,
    /// `telemetry.token_timing`: off, the followers start stopped.
    on: bool,
}

impl<'a> ConnectionTiming<'a> {
    /// `on: false` (`telemetry.token_timing: false`): nothing is followed or recorded.
    pub fn new(metrics: &'a StreamMetrics, stall: Duration, on: bool) -> Self {
        ConnectionTiming {
            start: Instant::now(),
            request_at: AtomicU64::new(0),
            response_at: AtomicU64::new(0),
            headers_at: AtomicU64::new(0),
            asked_at: AtomicU64::new(0),
            client_encrypted: AtomicBool::new(false),
            metrics,
            stall,
            on,
        }
    }

    /// A follower for one direction of this connection; already stopped when token timing
    /// is off.
    pub fn follower(&self, way: Way) -> RecordFollower {
        let mut follower = RecordFollower::new(way);
        if !self.on {
            follower.stop();
        }
        follower
    }

    /// Follows `chunk`, just relayed by `follower`'s direction. The clock is read once per
    /// chunk, and only when it holds a message record; records after the first in one chunk
    /// share its time, so their gaps (0) are counted once per chunk, not one by one.
    pub fn relayed(&self, follower: &mut RecordFollower, chunk: &[u8]) {
        if !follower.following() {
            return;
        }
        let mut at = ChunkTime {
            now: 0,
            zero_gaps: 0,
        };
        // TLS 1.3 session tickets come as one read right after the client's encrypted flight.
        let skip_chunk =
            follower.phase == Phase::ServerFlight && self.client_encrypted.load(Ordering::Relaxed);
        let way = follower.way;
        let mut phase = follower.phase;
        follower.feed(chunk, |kind, len| {
            let meaning = self.classify(way, &mut phase, kind, len);
            if meaning == Meaning::Nothing {
                return;
            }
            if at.now == 0 {
                at.now = self.start.elapsed().as_nanos() as u64 + 1;
            }
            match meaning {
                Meaning::Request => self.request(at.now),
                Meaning::Response => self.response(&mut at),
                Meaning::Nothing => {}
            }
        });
        if at.zero_gaps > 0 {
            self.metrics.zero_gaps(at.zero_gaps);
        }
        if skip_chunk {
            phase = Phase::Data;
        }
        // A follower that lost the stream keeps Lost; otherwise take the new phase.
        if follower.phase != Phase::Lost {
            follower.phase = phase;
        }
    }

    fn classify(&self, way: Way, phase: &mut Phase, kind: u8, len: u16) -> Meaning {
        match (*phase, kind) {
            (_, ALERT | HEARTBEAT) => Meaning::Nothing,
            (Phase::Handshake { .. }, CHANGE_CIPHER_SPEC) => {
                *phase = Phase::Handshake { ccs: true };
                Meaning::Nothing
            }
            // TLS 1.2: the encrypted Finished after ChangeCipherSpec ends the handshake.
            (Phase::Handshake { ccs: true }, HANDSHAKE) => {
                *phase = Phase::Data;
                Meaning::Nothing
            }
            (Phase::Handshake { .. }, HANDSHAKE) => Meaning::Nothing,
            // TLS 1.3: encrypted records from the start of the encrypted handshake.
            (Phase::Handshake { .. }, APPLICATION_DATA) => match way {
                Way::Up => {
                    self.client_encrypted.store(true, Ordering::Relaxed);
                    *phase = Phase::Data;
                    self.message(way, len)
                }
                Way::Down => {
                    *phase = Phase::ServerFlight;
                    Meaning::Nothing
                }
            },
            (Phase::ServerFlight, _) => Meaning::Nothing,
            (Phase::Data, APPLICATION_DATA) => self.message(way, len),
            // Renegotiation, post-handshake plaintext: not a message.
            _ => Meaning::Nothing,
        }
    }

    fn message(&self, way: Way, len: u16) -> Meaning {
        if len <= CONTROL_RECORD_MAX {
            return Meaning::Nothing;
        }
        match way {
            Way::Up => {
                if !self.client_encrypted.load(Ordering::Relaxed) {
                    self.client_encrypted.store(true, Ordering::Relaxed);
                }
                Meaning::Request
            }
            Way::Down => Meaning::Response,
        }
    }

    // The state below is only ever touched by the connection's one task (both directions are
    // polled by the relay's future, never at once): plain loads and stores, no read-modify-write
    // atomics. They are atomics only so that the relay future may move between threads.

    fn request(&self, now: u64) {
        self.one_record_response();
        self.request_at.store(now, Ordering::Relaxed);
    }

    /// The response whose first record came has no second: that record was all of it, and
    /// its TTFT.
    fn one_record_response(&self) {
        let headers = self.take(&self.headers_at);
        if headers != 0 {
            let asked = self.asked_at.load(Ordering::Relaxed);
            self.metrics
                .first_response(Duration::from_nanos(headers.saturating_sub(asked)));
        }
    }

    /// The value of `slot`, leaving 0.
    fn take(&self, slot: &AtomicU64) -> u64 {
        let v = slot.load(Ordering::Relaxed);
        if v != 0 {
            slot.store(0, Ordering::Relaxed);
        }
        v
    }

    fn response(&self, at: &mut ChunkTime) {
        let now = at.now;
        let request = self.take(&self.request_at);
        if request != 0 {
            // A new response: its first record, taken for the headers.
            self.one_record_response();
            self.asked_at.store(request, Ordering::Relaxed);
            self.response_at.store(0, Ordering::Relaxed);
            self.headers_at.store(now, Ordering::Relaxed);
            return;
        }
        let headers = self.take(&self.headers_at);
        if headers != 0 {
            // The second record: the first token.
            let asked = self.asked_at.load(Ordering::Relaxed);
            self.response_at.store(now, Ordering::Relaxed);
            self.metrics
                .first_response(Duration::from_nanos(now.saturating_sub(asked)));
            return;
        }
        let last = self.response_at.load(Ordering::Relaxed);
        if last == now {
            // Another record of this chunk: a gap of 0, counted with the others at its end.
            at.zero_gaps += 1;
            return;
        }
        self.response_at.store(now, Ordering::Relaxed);
        if last != 0 {
            let gap = Duration::from_nanos(now.saturating_sub(last));
            self.metrics.gap(gap, gap > self.stall);
        }
    }
}

/// One chunk's clock: read at its first message record (0 before), and the response records
/// after the first that came in it.
struct ChunkTime {
    now: u64,
    zero_gaps: u64,
}

impl Drop for ConnectionTiming<'_> {
    /// The connection ended: a response still at one record was a one-record response.
    fn drop(&mut self) {
        self.one_record_response();
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

    /// Events this thread's relays observed (the observer is per process; tests run in
    /// parallel threads).
    fn events_of_this_thread() -> Vec<crate::metrics::token::StreamEvent> {
        use crate::metrics::token::{observe_streams, StreamEvent};
        use std::sync::Mutex;
        use std::thread::ThreadId;
        static EVENTS: Mutex<Vec<(ThreadId, StreamEvent)>> = Mutex::new(Vec::new());
        observe_streams(|e| {
            EVENTS
                .lock()
                .unwrap()
                .push((std::thread::current().id(), e))
        });
        let me = std::thread::current().id();
        let mut all = EVENTS.lock().unwrap();
        let mine = all
            .iter()
            .filter(|(t, _)| *t == me)
            .map(|(_, e)| *e)
            .collect();
        all.retain(|(t, _)| *t != me);
        mine
    }

    fn kinds(events: &[crate::metrics::token::StreamEvent]) -> Vec<&'static str> {
        use crate::metrics::token::StreamEvent;
        events
            .iter()
            .map(|e| match e {
                StreamEvent::FirstResponse(_) => "first",
                StreamEvent::Gap(_) => "gap",
            })
            .collect()
    }

    fn cat(records: &[(u8, usize)]) -> Vec<u8> {
        records.iter().flat_map(|&(k, l)| record(k, l)).collect()
    }

    #[test]
    fn tls12_after_ccs_and_finished_requests_and_responses_are_timed() {
        events_of_this_thread();
        let metrics = StreamMetrics::noop();
        let t = ConnectionTiming::new(&metrics, Duration::from_secs(1), true);
        let (mut up, mut down) = (RecordFollower::new(Way::Up), RecordFollower::new(Way::Down));
        // ServerHello..Done; the client's key exchange, CCS, Finished; the server's ticket,
        // CCS, Finished: all handshake.
        t.relayed(&mut down, &cat(&[(22, 2000)]));
        t.relayed(&mut up, &cat(&[(22, 70), (20, 1), (22, 40)]));
        t.relayed(&mut down, &cat(&[(22, 200), (20, 1), (22, 40)]));
        assert_eq!(events_of_this_thread(), []);
        t.relayed(&mut up, &cat(&[(23, 300)]));
        for _ in 0..3 {
            t.relayed(&mut down, &cat(&[(23, 120)]));
        }
        // A WINDOW_UPDATE-sized record mid-stream is control, not a new request.
        t.relayed(&mut up, &cat(&[(23, 37)]));
        t.relayed(&mut down, &cat(&[(23, 120)]));
        // Headers, first token, two gaps.
        assert_eq!(kinds(&events_of_this_thread()), ["first", "gap", "gap"]);
        // The next request starts a new response.
        t.relayed(&mut up, &cat(&[(23, 300)]));
        t.relayed(&mut down, &cat(&[(23, 120), (23, 120), (23, 120)]));
        assert_eq!(kinds(&events_of_this_thread()), ["first", "gap"]);
    }

    /// Past the handshake of a TLS 1.3 connection: the client's Finished, the tickets.
    fn tls13_established<'m>(
        metrics: &'m StreamMetrics,
    ) -> (ConnectionTiming<'m>, RecordFollower, RecordFollower) {
        let t = ConnectionTiming::new(metrics, Duration::from_secs(1), true);
        let (mut up, mut down) = (RecordFollower::new(Way::Up), RecordFollower::new(Way::Down));
        t.relayed(&mut down, &cat(&[(22, 90), (20, 1), (23, 1500)]));
        t.relayed(&mut up, &cat(&[(20, 1), (23, 60)]));
        t.relayed(&mut down, &cat(&[(23, 90)]));
        (t, up, down)
    }

    /// Waits (bounded, on the clock itself) until `t`'s clock has passed `at`, so the next
    /// record is stamped later than one stamped `at`.
    fn clock_past(t: &ConnectionTiming<'_>, at: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while (t.start.elapsed().as_nanos() as u64 + 1) <= at {
            assert!(std::time::Instant::now() < deadline, "clock stuck");
            std::hint::spin_loop();
        }
    }

    #[test]
    fn ttft_is_the_second_record_of_a_streaming_response_the_first_being_its_headers() {
        use crate::metrics::token::StreamEvent;
        events_of_this_thread();
        let metrics = StreamMetrics::noop();
        let (t, mut up, mut down) = tls13_established(&metrics);
        t.relayed(&mut up, &cat(&[(23, 300)]));
        let asked = t.request_at.load(Ordering::Relaxed);
        // The headers record alone: nothing yet (it may be the whole response, or not).
        t.relayed(&mut down, &cat(&[(23, 150)]));
        assert_eq!(events_of_this_thread(), []);
        let headers = t.headers_at.load(Ordering::Relaxed);
        clock_past(&t, headers);
        // The first token record is the TTFT, from the request to this record.
        t.relayed(&mut down, &cat(&[(23, 120)]));
        let events = events_of_this_thread();
        let [StreamEvent::FirstResponse(ttft)] = events[..] else {
            panic!("{events:?}")
        };
        assert!(
            asked + ttft.as_nanos() as u64 > headers,
            "measured at the token record, after the headers record"
        );
        // Gaps from the first token on, not from the headers.
        t.relayed(&mut down, &cat(&[(23, 120)]));
        assert_eq!(kinds(&events_of_this_thread()), ["gap"]);
    }

    #[test]
    fn a_one_record_response_is_timed_at_its_record_once_the_next_request_or_the_end_shows_it() {
        use crate::metrics::token::StreamEvent;
        events_of_this_thread();
        let metrics = StreamMetrics::noop();
        let (t, mut up, mut down) = tls13_established(&metrics);
        t.relayed(&mut up, &cat(&[(23, 300)]));
        let asked = t.request_at.load(Ordering::Relaxed);
        t.relayed(&mut down, &cat(&[(23, 400)]));
        let only = t.headers_at.load(Ordering::Relaxed);
        assert_eq!(events_of_this_thread(), []);
        clock_past(&t, only);
        // The next request shows the last response had one record: its TTFT is that record's.
        t.relayed(&mut up, &cat(&[(23, 300)]));
        let events = events_of_this_thread();
        assert_eq!(
            events,
            [StreamEvent::FirstResponse(Duration::from_nanos(
                only - asked
            ))]
        );
        // A one-record response, then the connection ends.
        t.relayed(&mut down, &cat(&[(23, 400)]));
        assert_eq!(events_of_this_thread(), []);
        drop(t);
        assert_eq!(kinds(&events_of_this_thread()), ["first"]);
    }

    #[test]
    fn records_in_one_read_are_each_a_gap_of_zero() {
        use crate::metrics::token::StreamEvent;
        events_of_this_thread();
        let metrics = StreamMetrics::noop();
        let (t, mut up, mut down) = tls13_established(&metrics);
        t.relayed(&mut up, &cat(&[(23, 300)]));
        // Headers, first token and three more tokens in one read.
        t.relayed(
            &mut down,
            &cat(&[(23, 150), (23, 120), (23, 120), (23, 120), (23, 120)]),
        );
        let events = events_of_this_thread();
        assert_eq!(kinds(&events), ["first", "gap", "gap", "gap"]);
        assert!(events[1..]
            .iter()
            .all(|e| *e == StreamEvent::Gap(Duration::ZERO)));
        // The next read's first record: a gap from the last one.
        let last = t.response_at.load(Ordering::Relaxed);
        clock_past(&t, last);
        t.relayed(&mut down, &cat(&[(23, 120)]));
        let events = events_of_this_thread();
        let [StreamEvent::Gap(gap)] = events[..] else {
            panic!("{events:?}")
        };
        assert!(gap > Duration::ZERO);
    }

    #[test]
    fn tls13_server_flight_and_session_tickets_are_not_responses() {
        events_of_this_thread();
        let metrics = StreamMetrics::noop();
        let t = ConnectionTiming::new(&metrics, Duration::from_secs(1), true);
        let (mut up, mut down) = (RecordFollower::new(Way::Up), RecordFollower::new(Way::Down));
        // ServerHello, CCS, then the encrypted flight (EncryptedExtensions .. Finished).
        t.relayed(&mut down, &cat(&[(22, 90), (20, 1), (23, 40), (23, 1500)]));
        t.relayed(&mut down, &cat(&[(23, 300), (23, 60)]));
        // The client's CCS, encrypted Finished, and its request.
        t.relayed(&mut up, &cat(&[(20, 1), (23, 60), (23, 300)]));
        // Two session tickets in one read: skipped.
        t.relayed(&mut down, &cat(&[(23, 90), (23, 90)]));
        assert_eq!(events_of_this_thread(), []);
        for _ in 0..4 {
            t.relayed(&mut down, &cat(&[(23, 120)]));
        }
        assert_eq!(kinds(&events_of_this_thread()), ["first", "gap", "gap"]);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_garbage_stops_following() {
        let mut f = RecordFollower::new(Way::Up);
        f.feed(b"GET / HTTP/1.1\r\n", |_, _| panic!("not a record"));
        assert!(!f.following());
        // A deterministic pseudo-random sweep of chunks and split points.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let metrics = StreamMetrics::noop();
        for _ in 0..2000 {
            let timing = ConnectionTiming::new(&metrics, Duration::from_secs(1), true);
            let mut up = RecordFollower::new(Way::Up);
            let mut down = RecordFollower::new(Way::Down);
            for _ in 0..8 {
                let mut chunk = [0u8; 64];
                for b in &mut chunk {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Mostly plausible record bytes, so the machine goes deep.
                    *b = match x % 4 {
                        0 => 20 + (x >> 8) as u8 % 5,
                        1 => 3,
                        _ => (x >> 16) as u8 % 64,
                    };
                }
                let n = (x >> 32) as usize % 65;
                timing.relayed(&mut up, &chunk[..n]);
                timing.relayed(&mut down, &chunk[n..]);
            }
        }
    }
}
