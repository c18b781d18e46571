//! Throughput of the cached GetBearerToken path against a no-op tonic RPC.
//!
//! Both servers run in this process on loopback, with the same message types,
//! codec, transport settings and client load; the no-op server returns a
//! prebuilt response of the same shape. The ratio broker/no-op is the figure
//! of merit (target ≥ 0.9): it isolates what the broker adds on a cache hit
//! (validation, the terminal lookup, the lock-free cache read, the response).
//!
//! ```sh
//! cargo bench -p broker-bench --bench cached_path     # defaults: 10 rounds of 2 s, 64 in flight
//! cargo bench -p broker-bench --bench cached_path -- --seconds 5 --rounds 20 --concurrency 128
//! ```

#![allow(clippy::disallowed_methods)] // measuring real time is the point here

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use payroc_broker::{
    app::server,
    clock::{Clock, OsEntropy, SharedEntropy},
    config::Config,
    proto::{
        BearerReply, CreateSessionRequest, CreateSessionResponse, GetBearerTokenRequest,
        GetBearerTokenResponse,
        token_broker_client::TokenBrokerClient,
        token_broker_server::{TokenBroker, TokenBrokerServer},
    },
};
use payroc_sim::{SimAccount, SimConfig, SimPayroc};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, transport::Channel};

/// The baseline: answers with a prebuilt response (encoded once, as the
/// broker sends a cached token's) and does nothing else.
struct Noop(BearerReply);

#[tonic::async_trait]
impl TokenBroker for Noop {
    async fn get_bearer_token(
        &self,
        _: Request<GetBearerTokenRequest>,
    ) -> Result<Response<BearerReply>, Status> {
        Ok(Response::new(self.0.clone()))
    }
    async fn create_session(
        &self,
        _: Request<CreateSessionRequest>,
    ) -> Result<Response<CreateSessionResponse>, Status> {
        Err(Status::unimplemented("noop"))
    }
    type WatchBearerTokenStream = tokio_stream::Empty<Result<BearerReply, Status>>;
    async fn watch_bearer_token(
        &self,
        _: Request<payroc_broker::proto::WatchBearerTokenRequest>,
    ) -> Result<Response<Self::WatchBearerTokenStream>, Status> {
        Err(Status::unimplemented("noop"))
    }
}

struct Args {
    seconds: u64,
    rounds: u32,
    concurrency: usize,
    connections: usize,
}

fn args() -> Args {
    let mut a = Args {
        seconds: 2,
        rounds: 10,
        concurrency: 64,
        connections: 4,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .and_then(|v| v.parse::<u64>().ok())
                .expect("a number after the flag")
        };
        match flag.as_str() {
            "--seconds" => a.seconds = value(),
            "--rounds" => a.rounds = value() as u32,
            "--concurrency" => a.concurrency = value() as usize,
            "--connections" => a.connections = value() as usize,
            _ => {} // cargo bench passes --bench
        }
    }
    a
}

/// Runs on the servers' runtime: everything it spawns stays there.
async fn broker_server() -> (SocketAddr, SimPayroc) {
    let entropy: SharedEntropy = Arc::new(OsEntropy);
    let sim = SimPayroc::start(SimConfig::new(
        Clock::system(),
        Arc::clone(&entropy),
        vec![SimAccount::new("bench-api-key-123456", &["1234001"])],
    ))
    .await
    .unwrap();
    let text = format!(
        "[payroc]\nidentity_url = \"{}\"\napi_url = \"{}\"\n[[credentials]]\nname = \"bench\"\n\
         api_key_env = \"K\"\nterminals = [\"1234001\"]\n",
        sim.identity_url(),
        sim.api_url()
    );
    let config = Config::parse(&text, "bench.toml".as_ref(), ".".as_ref(), &|_| {
        Some("bench-api-key-123456".into())
    })
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        server::serve(
            listener,
            &config,
            Clock::system(),
            entropy,
            std::future::pending(),
            futures_util::stream::pending(),
        )
        .await
    });
    (addr, sim)
}

async fn noop_server(response: GetBearerTokenResponse) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = TokenBrokerServer::new(Noop(BearerReply::from_encoded(
        BearerReply::encode(&response).into(),
    )));
    tokio::spawn(
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .max_concurrent_streams(256)
            .add_service(svc)
            .serve_with_incoming(
                // As the broker's server does (the builder's tcp_nodelay only
                // applies to listeners it binds itself).
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            ),
    );
    addr
}

async fn channels(addr: SocketAddr, n: usize) -> Vec<Channel> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .tcp_nodelay(true)
                .connect()
                .await
                .unwrap(),
        );
    }
    out
}

/// Completed RPCs per second with `concurrency` loops over `channels`.
async fn measure(channels: &[Channel], concurrency: usize, seconds: u64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let mut client = TokenBrokerClient::new(channels[i % channels.len()].clone());
        let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = client
                    .get_bearer_token(GetBearerTokenRequest {
                        processing_terminal_id: "1234001".into(),
                        min_validity: None,
                    })
                    .await;
                r.expect("RPC succeeds");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Warm-up, not counted.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start_count = done.load(Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let count = done.load(Ordering::Relaxed) - start_count;
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    count as f64 / elapsed
}

fn main() {
    let a = args();
    // Servers and load generator on separate single-worker runtimes, so each
    // side gets one of the two cores and the figures stop wandering.
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (broker_addr, sim) = servers.block_on(broker_server());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let broker = channels(broker_addr, a.connections).await;
        // Prime the cache, and give the no-op server the same response to send.
        let response = TokenBrokerClient::new(broker[0].clone())
            .get_bearer_token(GetBearerTokenRequest {
                processing_terminal_id: "1234001".into(),
                min_validity: None,
            })
            .await
            .unwrap()
            .into_inner();
        let noop_addr = servers.spawn(noop_server(response)).await.unwrap();
        let noop = channels(noop_addr, a.connections).await;

        println!(
            "cached GetBearerToken vs no-op RPC: {} rounds of {} s each side, interleaved; \
             {} in flight over {} connections; {} cores",
            a.rounds,
            a.seconds,
            a.concurrency,
            a.connections,
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        );
        println!(
            "{:>5} {:>12} {:>12} {:>7}",
            "round", "no-op rps", "broker rps", "ratio"
        );
        let mut ratios = Vec::new();
        let (mut total_n, mut total_b) = (0.0, 0.0);
        for round in 1..=a.rounds {
            // Alternate which goes first so drift on a shared machine does
            // not favour one side.
            let (n, b) = if round % 2 == 1 {
                let n = measure(&noop, a.concurrency, a.seconds).await;
                (n, measure(&broker, a.concurrency, a.seconds).await)
            } else {
                let b = measure(&broker, a.concurrency, a.seconds).await;
                (measure(&noop, a.concurrency, a.seconds).await, b)
            };
            total_n += n;
            total_b += b;
            ratios.push(b / n);
            println!("{round:>5} {n:>12.0} {b:>12.0} {:>7.3}", b / n);
        }
        ratios.sort_by(f64::total_cmp);
        println!(
            "mean rps: no-op {:.0}, broker {:.0}; ratio of means {:.3}; median round ratio {:.3}",
            total_n / f64::from(a.rounds),
            total_b / f64::from(a.rounds),
            total_b / total_n,
            ratios[ratios.len() / 2]
        );
        println!(
            "identity requests during the run: {}",
            sim.stats().identity_requests
        );
    });
}
