//! A fake card processor on a free loopback port, outside the app under test: it counts charges
//! per `Idempotency-Key` and deduplicates by key as real processors (Stripe, Adyen) do.
//!
//! It speaks the contract of the `payments` example: `POST /charges` with the JSON body
//! `{"amount": <int>, "currency": "<str>", "destination": "<str>"}` and an optional
//! `Idempotency-Key` header. It answers:
//!
//! - **201** `{"id": "ch_..."}` for a new charge; the money moves when the request arrives,
//!   before the answer (which waits for the configured latency): a caller killed while the
//!   processor answers leaves a charge behind, as with a real processor;
//! - **200** with the same body again for a key it has answered before (a replay, counted);
//! - **402** `{"error": "card_declined"}` for the destination `decline` (no charge; the answer is
//!   kept for the key like any other);
//! - **409** while a request with the same key is still being answered;
//! - **500** without charging while it is told to fail ([`FakeProcessor::set_failing`]);
//! - **400** for a key sent again with another body (the processor refuses to guess), a body that
//!   is not such JSON, or a request that is not `POST /charges`.
//!
//! A request without `Idempotency-Key` is a new charge every time. Every connection gets one
//! answer and is closed (`Connection: close`).

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
    thread,
    time::{Duration, Instant},
};

use rand::{rngs::StdRng, Rng as _, SeedableRng as _};

/// The largest request head and body the processor reads.
const MAX_REQUEST: usize = 64 * 1024;

/// A charge the processor made: money moved once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// The processor's id (`ch_000001`, ...).
    pub id: String,
    /// The `Idempotency-Key` it was made under, if the request had one.
    pub key: Option<String>,
    /// Minor units.
    pub amount: u64,
    /// As sent.
    pub currency: String,
    /// As sent.
    pub destination: String,
    /// When the request that made it arrived.
    pub at: Instant,
}

/// One `POST /charges` request the processor received, whatever it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Its `Idempotency-Key`, if any.
    pub key: Option<String>,
    /// The destination of its body (empty when the body was not a charge).
    pub destination: String,
    /// When it arrived.
    pub received: Instant,
    /// When the processor had its answer ready (after the latency), whether or not the caller was
    /// still there to read it. `None` while it is being answered.
    pub answered: Option<Instant>,
    /// The status of the answer (0 while it is being answered).
    pub status: u16,
}

/// Counts over every request so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessorStats {
    /// `POST /charges` requests received.
    pub requests: u64,
    /// Charges made (money moved).
    pub charges: u64,
    /// Requests answered from an earlier request with the same key (no new charge).
    pub replays: u64,
    /// Requests answered 409 because the same key was in flight.
    pub conflicts: u64,
    /// Requests declined (402), first answers only.
    pub declines: u64,
}

enum Entry {
    InFlight {
        body: Body,
    },
    Answered {
        body: Body,
        status: u16,
        response: String,
    },
}

#[derive(Clone, PartialEq, Eq)]
struct Body {
    amount: u64,
    currency: String,
    destination: String,
}

struct State {
    by_key: HashMap<String, Entry>,
    charges: Vec<Charge>,
    requests: Vec<Request>,
    stats: ProcessorStats,
    latency: (Duration, Duration),
    failing: bool,
    rng: StdRng,
}

/// A running fake processor on a free 127.0.0.1 port. Stopped when dropped (requests being
/// answered finish on their own threads).
pub struct FakeProcessor {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for FakeProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeProcessor")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeProcessor {
    /// Starts a processor that answers at once, on its own threads.
    ///
    /// # Panics
    ///
    /// When no loopback port can be bound.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().expect("the listener's address");
        let state = Arc::new(Mutex::new(State {
            by_key: HashMap::new(),
            charges: Vec::new(),
            requests: Vec::new(),
            stats: ProcessorStats::default(),
            latency: (Duration::ZERO, Duration::ZERO),
            failing: false,
            rng: StdRng::seed_from_u64(0x0c4a_46e5),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let state = Arc::clone(&state);
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let state = Arc::clone(&state);
                    thread::spawn(move || serve(stream, &state));
                }
            })
        };
        Self {
            addr,
            state,
            stop,
            accept: Some(accept),
        }
    }

    /// The address to send charges to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, the value of the example's `PROCESSOR_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Makes every answer wait a time drawn uniformly from `min..=max` after the charge is made
    /// (a slow processor; the draws are seeded, their order follows the requests').
    pub fn set_latency(&self, min: Duration, max: Duration) {
        assert!(min <= max, "latency {min:?} > {max:?}");
        self.lock().latency = (min, max);
    }

    /// While `failing`, every charge request is answered 500 and charges nothing (an outage).
    pub fn set_failing(&self, failing: bool) {
        self.lock().failing = failing;
    }

    /// Every charge made so far, in order.
    pub fn charges(&self) -> Vec<Charge> {
        self.lock().charges.clone()
    }

    /// Every `POST /charges` request received so far, in order of arrival.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    /// The charges made under `key`: at most one, since the processor deduplicates by key.
    pub fn charges_for_key(&self, key: &str) -> usize {
        self.lock()
            .charges
            .iter()
            .filter(|c| c.key.as_deref() == Some(key))
            .count()
    }

    /// The requests that carried `key`.
    pub fn requests_for_key(&self, key: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.key.as_deref() == Some(key))
            .count()
    }

    /// The counts so far.
    pub fn stats(&self) -> ProcessorStats {
        self.lock().stats
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for FakeProcessor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn serve(mut stream: TcpStream, state: &Mutex<State>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let (status, body) = match read_request(&mut stream) {
        Ok(Some((head, body))) => answer(state, &head, &body),
        Ok(None) => return,
        Err(e) => (400, format!(r#"{{"error":"bad_request","detail":"{e}"}}"#)),
    };
    let reason = match status {
        200 => "OK",
        201 => "Created",
        402 => "Payment Required",
        409 => "Conflict",
        500 => "Internal Server Error",
        404 => "Not Found",
        _ => "Bad Request",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Reads one request: its head (request line and headers) and its body. `None` when the peer
/// closed without sending anything (the accept loop's wake-up, a probe).
fn read_request(stream: &mut TcpStream) -> Result<Option<(String, Vec<u8>)>, String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if buf.len() > MAX_REQUEST {
            return Err("request head too large".to_owned());
        }
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err("connection closed mid-request".to_owned()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = header(&head, "content-length")
        .map(|v| v.parse().map_err(|_| "bad content-length".to_owned()))
        .transpose()?
        .unwrap_or(0);
    if length > MAX_REQUEST {
        return Err("body too large".to_owned());
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        match stream.read(&mut chunk) {
            Ok(0) => return Err("connection closed mid-body".to_owned()),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    body.truncate(length);
    Ok(Some((head, body)))
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn parse_body(body: &[u8]) -> Option<Body> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(Body {
        amount: v.get("amount")?.as_u64()?,
        currency: v.get("currency")?.as_str()?.to_owned(),
        destination: v.get("destination")?.as_str()?.to_owned(),
    })
}

/// The status and body of the answer to one request, after the latency.
fn answer(state: &Mutex<State>, head: &str, body: &[u8]) -> (u16, String) {
    let lock = || state.lock().unwrap_or_else(PoisonError::into_inner);
    if !head.starts_with("POST /charges ") {
        return (404, r#"{"error":"not_found"}"#.to_owned());
    }
    let key = header(head, "idempotency-key").map(str::to_owned);
    let parsed = parse_body(body);
    let received = Instant::now();
    let (index, body, delay) = {
        let mut s = lock();
        s.stats.requests += 1;
        let index = s.requests.len();
        s.requests.push(Request {
            key: key.clone(),
            destination: parsed
                .as_ref()
                .map(|b| b.destination.clone())
                .unwrap_or_default(),
            received,
            answered: None,
            status: 0,
        });
        let finish = |s: &mut State, status: u16, response: String| {
            s.requests[index].answered = Some(Instant::now());
            s.requests[index].status = status;
            (status, response)
        };
        let Some(body) = parsed else {
            return finish(
                &mut s,
                400,
                r#"{"error":"invalid_request","detail":"expected amount, currency, destination"}"#
                    .to_owned(),
            );
        };
        if s.failing {
            return finish(&mut s, 500, r#"{"error":"processor_failure"}"#.to_owned());
        }
        if let Some(k) = &key {
            match s.by_key.get(k) {
                Some(Entry::InFlight { .. }) => {
                    s.stats.conflicts += 1;
                    return finish(&mut s, 409, r#"{"error":"in_flight"}"#.to_owned());
                }
                Some(Entry::Answered { body: first, .. }) if *first != body => {
                    return finish(
                        &mut s,
                        400,
                        r#"{"error":"idempotency_key_reused","detail":"this key was used with another body"}"#
                            .to_owned(),
                    );
                }
                Some(Entry::Answered {
                    status, response, ..
                }) => {
                    let (status, response) = (*status, response.clone());
                    s.stats.replays += 1;
                    let status = if status == 201 { 200 } else { status };
                    return finish(&mut s, status, response);
                }
                None => {
                    s.by_key
                        .insert(k.clone(), Entry::InFlight { body: body.clone() });
                }
            }
        }
        let (min, max) = s.latency;
        let delay = if max > min {
            s.rng.random_range(min..=max)
        } else {
            min
        };
        (index, body, delay)
    };
    // The money moves now, before the answer.
    let (status, response) = {
        let mut s = lock();
        if body.destination == "decline" {
            s.stats.declines += 1;
            (402, r#"{"error":"card_declined"}"#.to_owned())
        } else {
            s.stats.charges += 1;
            let id = format!("ch_{:06}", s.stats.charges);
            s.charges.push(Charge {
                id: id.clone(),
                key: key.clone(),
                amount: body.amount,
                currency: body.currency.clone(),
                destination: body.destination.clone(),
                at: received,
            });
            (201, format!(r#"{{"id":"{id}"}}"#))
        }
    };
    if !delay.is_zero() {
        thread::sleep(delay);
    }
    let mut s = lock();
    if let Some(k) = key {
        if let Some(Entry::InFlight { body }) = s.by_key.remove(&k) {
            s.by_key.insert(
                k,
                Entry::Answered {
                    body,
                    status,
                    response: response.clone(),
                },
            );
        }
    }
    s.requests[index].answered = Some(Instant::now());
    s.requests[index].status = status;
    (status, response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(addr: SocketAddr, key: Option<&str>, destination: &str) -> (u16, String) {
        let body = format!(r#"{{"amount":1000,"currency":"EUR","destination":"{destination}"}}"#);
        let mut req = format!(
            "POST /charges HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n",
            body.len()
        );
        if let Some(k) = key {
            req.push_str(&format!("Idempotency-Key: {k}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(&body);
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(req.as_bytes()).expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        let status = out[9..12].parse().expect("status");
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        (status, body)
    }

    #[test]
    fn charges_once_per_key_and_declines() {
        let p = FakeProcessor::start();
        let (s1, b1) = charge(p.addr(), Some("k1"), "acct_1");
        let (s2, b2) = charge(p.addr(), Some("k1"), "acct_1");
        assert_eq!((s1, s2), (201, 200));
        assert_eq!(b1, b2);
        assert_eq!(p.charges_for_key("k1"), 1);
        assert_eq!(p.requests_for_key("k1"), 2);
        assert_eq!(charge(p.addr(), Some("k1"), "acct_2").0, 400);
        assert_eq!(charge(p.addr(), Some("k2"), "decline").0, 402);
        assert_eq!(charge(p.addr(), Some("k2"), "decline").0, 402);
        assert_eq!(charge(p.addr(), None, "acct_1").0, 201);
        assert_eq!(charge(p.addr(), None, "acct_1").0, 201);
        p.set_failing(true);
        assert_eq!(charge(p.addr(), Some("k3"), "acct_1").0, 500);
        p.set_failing(false);
        assert_eq!(charge(p.addr(), Some("k3"), "acct_1").0, 201);
        let stats = p.stats();
        assert_eq!(stats.charges, 4);
        assert_eq!(stats.replays, 2);
        assert_eq!(stats.declines, 1);
        assert_eq!(p.charges().len(), 4);
    }

    #[test]
    fn a_key_in_flight_gets_409_and_its_charge_is_made_before_the_answer() {
        let p = FakeProcessor::start();
        p.set_latency(Duration::from_millis(300), Duration::from_millis(300));
        let addr = p.addr();
        let first = thread::spawn(move || charge(addr, Some("k"), "acct_1"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while p.stats().charges == 0 {
            assert!(Instant::now() < deadline, "the first request never arrived");
            thread::sleep(Duration::from_millis(5));
        }
        // Charged, not answered yet.
        assert!(p.requests()[0].answered.is_none());
        assert_eq!(charge(addr, Some("k"), "acct_1").0, 409);
        assert_eq!(first.join().expect("client").0, 201);
        assert_eq!(charge(addr, Some("k"), "acct_1").0, 200);
        assert_eq!(p.stats().conflicts, 1);
        assert_eq!(p.charges_for_key("k"), 1);
    }
}
