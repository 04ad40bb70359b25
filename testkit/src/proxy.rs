//! A fault-injecting TCP proxy for HTTP/1.1 on loopback: it lets each request reach the server, then
//! loses some of the responses, the failure that only an idempotency key makes safe to retry.
//!
//! The proxy forwards bytes both ways and does not parse HTTP. It counts a *response* as starting
//! when the server sends bytes after the client last did, which is exact for HTTP/1.1 without
//! pipelining (what reqwest, hyper and curl send). At that moment the server has received the
//! whole request and answered it, and the proxy applies one [`Fault`] to that response:
//!
//! - [`Fault::Pass`]: forward it;
//! - [`Fault::Drop`]: close both connections (FIN) without forwarding a byte of it;
//! - [`Fault::Reset`]: close the client's connection with `SO_LINGER` 0 (RST), and the server's;
//! - [`Fault::Delay`]: hold the response that long, then forward it (a client with a shorter
//!   timeout has given up by then);
//! - [`Fault::Blackhole`]: forward nothing more on that connection, and keep it open.
//!
//! Faults are drawn from a seeded generator ([`FaultPlan::Random`]), taken in order from a list
//! ([`FaultPlan::Schedule`]), or given to the responses of the requests that contain some bytes
//! ([`FaultPlan::Matching`]: a Postgres `BEGIN`, say, since the proxy relays any request-response
//! protocol). With concurrent connections the order in which responses start is up to the
//! scheduler, so a seed fixes the sequence of faults, not which request gets which.

use std::{
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use rand::{rngs::StdRng, Rng, SeedableRng};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// What happens to one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forwarded.
    Pass,
    /// Both connections closed with FIN; nothing of the response forwarded.
    Drop,
    /// The client's connection reset (RST), the server's closed; nothing forwarded.
    Reset,
    /// Forwarded after this long.
    Delay(Duration),
    /// Nothing more forwarded on this connection, either way, and the connection left open (a
    /// network partition neither end is told of). Under [`FaultPlan::Matching`] the request that
    /// matched is not forwarded either.
    Blackhole,
}

/// How the proxy picks each response's fault.
#[derive(Debug, Clone)]
pub enum FaultPlan {
    /// Each response independently: [`Fault::Drop`] with probability `drop`, [`Fault::Reset`]
    /// with `reset`, [`Fault::Delay`]`(delay_for)` with `delay`, otherwise [`Fault::Pass`].
    Random {
        /// Seeds the generator.
        seed: u64,
        /// Probability of [`Fault::Drop`].
        drop: f64,
        /// Probability of [`Fault::Reset`].
        reset: f64,
        /// Probability of [`Fault::Delay`].
        delay: f64,
        /// How long a delayed response is held.
        delay_for: Duration,
    },
    /// The faults in this order, one per response, starting over at the end (an empty list
    /// passes everything).
    Schedule(Vec<Fault>),
    /// `fault` for each response to a request that contains `needle` (the bytes the client sent
    /// since the previous response, the first 64 KiB of them), [`Fault::Pass`] for the others.
    Matching {
        /// The bytes to look for.
        needle: Vec<u8>,
        /// What happens to the response of a request that contains them.
        fault: Fault,
    },
}

/// The most bytes of one request that [`FaultPlan::Matching`] looks at.
const MATCH_WINDOW: usize = 64 * 1024;

/// What the proxy did, counted per response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Responses that started (every one of them got a fault, `Pass` included).
    pub responses: u64,
    /// Responses forwarded at once.
    pub passed: u64,
    /// Responses dropped with FIN.
    pub dropped: u64,
    /// Responses dropped with RST.
    pub reset: u64,
    /// Responses forwarded late.
    pub delayed: u64,
    /// Connections blackholed.
    pub blackholed: u64,
}

#[derive(Default)]
struct Counters {
    responses: AtomicU64,
    passed: AtomicU64,
    dropped: AtomicU64,
    reset: AtomicU64,
    delayed: AtomicU64,
    blackholed: AtomicU64,
}

enum Picker {
    Random {
        // Boxed: the generator's state is large beside the schedule's two words.
        rng: Box<Mutex<StdRng>>,
        drop: f64,
        reset: f64,
        delay: f64,
        delay_for: Duration,
    },
    Schedule {
        faults: Vec<Fault>,
        next: AtomicUsize,
    },
    Matching {
        needle: Vec<u8>,
        fault: Fault,
    },
}

impl Picker {
    fn new(plan: FaultPlan) -> Self {
        match plan {
            FaultPlan::Random {
                seed,
                drop,
                reset,
                delay,
                delay_for,
            } => Self::Random {
                rng: Box::new(Mutex::new(StdRng::seed_from_u64(seed))),
                drop,
                reset,
                delay,
                delay_for,
            },
            FaultPlan::Schedule(faults) => Self::Schedule {
                faults,
                next: AtomicUsize::new(0),
            },
            FaultPlan::Matching { needle, fault } => Self::Matching { needle, fault },
        }
    }

    /// Whether the plan looks at the requests' bytes.
    fn reads_requests(&self) -> bool {
        matches!(self, Self::Matching { .. })
    }

    /// Whether `request` is to be swallowed, with its connection: a matching blackhole.
    fn swallows(&self, request: &[u8]) -> bool {
        matches!(
            self,
            Self::Matching {
                fault: Fault::Blackhole,
                ..
            }
        ) && self.pick(request) == Fault::Blackhole
    }

    /// The fault of the response to `request` (empty unless [`Picker::reads_requests`]).
    fn pick(&self, request: &[u8]) -> Fault {
        match self {
            Self::Random {
                rng,
                drop,
                reset,
                delay,
                delay_for,
            } => {
                let x: f64 = rng.lock().unwrap_or_else(PoisonError::into_inner).random();
                if x < *drop {
                    Fault::Drop
                } else if x < drop + reset {
                    Fault::Reset
                } else if x < drop + reset + delay {
                    Fault::Delay(*delay_for)
                } else {
                    Fault::Pass
                }
            }
            Self::Schedule { faults, next } => {
                if faults.is_empty() {
                    return Fault::Pass;
                }
                faults[next.fetch_add(1, Ordering::Relaxed) % faults.len()]
            }
            Self::Matching { needle, fault } => {
                if !needle.is_empty() && request.windows(needle.len()).any(|w| w == &needle[..]) {
                    *fault
                } else {
                    Fault::Pass
                }
            }
        }
    }
}

/// A running proxy on a free 127.0.0.1 port, forwarding to one upstream address. Stopped (with
/// every connection it holds) when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Counters")
    }
}

impl FaultProxy {
    /// Starts a proxy to `upstream` on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// When no loopback port can be bound.
    pub async fn start(upstream: SocketAddr, plan: FaultPlan) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let picker = Arc::new(Picker::new(plan));
        let task = tokio::spawn(accept(listener, upstream, picker, counters.clone()));
        Ok(Self {
            addr,
            counters,
            task,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counts so far.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.counters;
        ProxyStats {
            responses: c.responses.load(Ordering::SeqCst),
            passed: c.passed.load(Ordering::SeqCst),
            dropped: c.dropped.load(Ordering::SeqCst),
            reset: c.reset.load(Ordering::SeqCst),
            delayed: c.delayed.load(Ordering::SeqCst),
            blackholed: c.blackholed.load(Ordering::SeqCst),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    picker: Arc<Picker>,
    counters: Arc<Counters>,
) {
    // Held here so that aborting this task aborts every connection too.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                let (picker, counters) = (picker.clone(), counters.clone());
                connections.spawn(async move {
                    // A connection that fails is a connection closed: nothing to report.
                    let _ = relay(client, upstream, &picker, &counters).await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    picker: &Picker,
    counters: &Counters,
) -> io::Result<()> {
    let mut server = TcpStream::connect(upstream).await?;
    // The bytes of the current request, for a plan that reads them.
    let mut request = Vec::new();
    // Whether a blackhole swallowed this connection.
    let mut swallowed = false;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut from_client = vec![0u8; 16 * 1024];
    let mut from_server = vec![0u8; 16 * 1024];
    // Whether the server is in the middle of a response (it spoke after the client last did).
    let mut responding = false;
    loop {
        tokio::select! {
            read = client.read(&mut from_client) => {
                let n = read?;
                if n == 0 {
                    return Ok(());
                }
                if swallowed {
                    continue;
                }
                if picker.reads_requests() {
                    if responding {
                        request.clear();
                    }
                    let room = MATCH_WINDOW.saturating_sub(request.len());
                    request.extend_from_slice(&from_client[..n.min(room)]);
                    if picker.swallows(&request) {
                        counters.blackholed.fetch_add(1, Ordering::SeqCst);
                        swallowed = true;
                        continue;
                    }
                }
                server.write_all(&from_client[..n]).await?;
                responding = false;
            }
            read = server.read(&mut from_server) => {
                let n = read?;
                if n == 0 {
                    return Ok(());
                }
                if swallowed {
                    continue;
                }
                if !responding {
                    responding = true;
                    counters.responses.fetch_add(1, Ordering::SeqCst);
                    match picker.pick(&request) {
                        Fault::Pass => {
                            counters.passed.fetch_add(1, Ordering::SeqCst);
                        }
                        Fault::Drop => {
                            counters.dropped.fetch_add(1, Ordering::SeqCst);
                            return Ok(());
                        }
                        Fault::Reset => {
                            counters.reset.fetch_add(1, Ordering::SeqCst);
                            client.set_zero_linger()?;
                            return Ok(());
                        }
                        Fault::Delay(d) => {
                            counters.delayed.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(d).await;
                        }
                        Fault::Blackhole => {
                            counters.blackholed.fetch_add(1, Ordering::SeqCst);
                            swallowed = true;
                            continue;
                        }
                    }
                }
                client.write_all(&from_server[..n]).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that answers each line it reads with `ok\n`.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let addr = listener.local_addr().expect("its address");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(b"ok\n").await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn exchange(s: &mut TcpStream) -> io::Result<usize> {
        s.write_all(b"ping\n").await?;
        let mut buf = [0u8; 16];
        s.read(&mut buf).await
    }

    #[tokio::test]
    async fn a_schedule_applies_one_fault_per_response() {
        let upstream = echo_server().await;
        let proxy = FaultProxy::start(
            upstream,
            FaultPlan::Schedule(vec![
                Fault::Pass,
                Fault::Delay(Duration::from_millis(50)),
                Fault::Drop,
                Fault::Reset,
            ]),
        )
        .await
        .expect("a proxy");
        let mut s = TcpStream::connect(proxy.addr()).await.expect("connects");
        assert_eq!(exchange(&mut s).await.expect("passed"), 3);
        let started = std::time::Instant::now();
        assert_eq!(exchange(&mut s).await.expect("delayed"), 3);
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(exchange(&mut s).await.expect("dropped: EOF"), 0);
        let mut s = TcpStream::connect(proxy.addr()).await.expect("connects");
        let reset = exchange(&mut s).await.expect_err("reset");
        assert_eq!(reset.kind(), io::ErrorKind::ConnectionReset, "{reset:?}");
        let stats = proxy.stats();
        assert_eq!(
            stats,
            ProxyStats {
                responses: 4,
                passed: 1,
                dropped: 1,
                reset: 1,
                delayed: 1,
                blackholed: 0,
            }
        );
    }

    #[tokio::test]
    async fn a_matching_plan_faults_the_requests_that_contain_the_needle() {
        let upstream = echo_server().await;
        let proxy = FaultProxy::start(
            upstream,
            FaultPlan::Matching {
                needle: b"BEGIN".to_vec(),
                fault: Fault::Drop,
            },
        )
        .await
        .expect("a proxy");
        let mut s = TcpStream::connect(proxy.addr()).await.expect("connects");
        assert_eq!(exchange(&mut s).await.expect("passed"), 3);
        s.write_all(b"BEGIN\n").await.expect("sent");
        let mut buf = [0u8; 16];
        assert_eq!(s.read(&mut buf).await.expect("dropped: EOF"), 0);
        assert_eq!((proxy.stats().passed, proxy.stats().dropped), (1, 1));
    }

    #[tokio::test]
    async fn a_matching_blackhole_swallows_the_request_and_keeps_the_connection_open() {
        let upstream = echo_server().await;
        let proxy = FaultProxy::start(
            upstream,
            FaultPlan::Matching {
                needle: b"COMMIT".to_vec(),
                fault: Fault::Blackhole,
            },
        )
        .await
        .expect("a proxy");
        let mut s = TcpStream::connect(proxy.addr()).await.expect("connects");
        assert_eq!(exchange(&mut s).await.expect("passed"), 3);
        s.write_all(b"COMMIT\n").await.expect("sent");
        let mut buf = [0u8; 16];
        let silent = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await;
        assert!(
            silent.is_err(),
            "a swallowed request was answered: {silent:?}"
        );
        assert_eq!(proxy.stats().blackholed, 1);
    }

    #[tokio::test]
    async fn a_seed_fixes_the_proportions() {
        let plan = FaultPlan::Random {
            seed: 7,
            drop: 0.2,
            reset: 0.1,
            delay: 0.1,
            delay_for: Duration::ZERO,
        };
        let picker = Picker::new(plan.clone());
        let faults: Vec<Fault> = (0..10_000).map(|_| picker.pick(&[])).collect();
        let again = Picker::new(plan);
        assert!(
            faults.iter().all(|f| *f == again.pick(&[])),
            "same seed, same faults"
        );
        let share = |fault: Fault| faults.iter().filter(|f| **f == fault).count();
        assert!((1800..2200).contains(&share(Fault::Drop)));
        assert!((800..1200).contains(&share(Fault::Reset)));
        assert!((800..1200).contains(&share(Fault::Delay(Duration::ZERO))));
    }
}
