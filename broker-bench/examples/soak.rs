//! Soak: the real broker binary under steady load for a long while, with
//! Payroc faults cycling, reporting errors by code, identity attempts and the
//! broker's RSS. Not part of CI.
//!
//! ```sh
//! cargo build --release
//! cargo run --release -p broker-bench --example soak -- --minutes 10 [--rps 400] [--broker target/release/payroc-broker]
//! ```
//!
//! The broker runs as its own process (so RSS is its own) in front of the
//! simulated Payroc, which runs here with 120 s tokens so that each
//! credential renews several times. Every 20 s the next fault phase starts:
//!
//! | phase | fault | RPC errors expected |
//! |---|---|---|
//! | clean | none | none |
//! | identity-down | identity 503 for 10 s of the phase | none: cached tokens are served |
//! | sessions-503 | every session request 503 | CreateSession UNAVAILABLE |
//! | sessions-429 | sessions 429, Retry-After 1 s, 30 times | CreateSession RESOURCE_EXHAUSTED or OK after a wait |
//! | slow | identity 1.5 s and sessions 300 ms latency | none |
//! | revoked | every Bearer token revoked at the phase start | none: 401, refresh, retry |
//! | broken | sessions: 20 malformed bodies, 20 resets | CreateSession INTERNAL / UNAVAILABLE |
//!
//! An RPC that spans a phase change may meet either phase's fault. Anything
//! else counts as unexpected, and the run exits 1 if there is any.

#![allow(clippy::disallowed_methods)] // a load generator measures real time

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use payroc_broker::{
    clock::{Clock, OsEntropy},
    proto::{
        CreateSessionRequest, GetBearerTokenRequest, Scenario,
        token_broker_client::TokenBrokerClient,
    },
};
use payroc_sim::{Fault, SimAccount, SimConfig, SimEndpoint, SimPayroc};
use tonic::{Code, transport::Channel};

const PHASE: Duration = Duration::from_secs(20);
const PHASES: [&str; 7] = [
    "clean",
    "identity-down",
    "sessions-503",
    "sessions-429",
    "slow",
    "revoked",
    "broken",
];
const ACCOUNTS: [(&str, &str, &[&str]); 3] = [
    ("acme", "SOAK_KEY_ACME", &["1234001", "1234002"]),
    ("globex", "SOAK_KEY_GLOBEX", &["5678001"]),
    ("initech", "SOAK_KEY_INITECH", &["9990001", "9990002"]),
];

struct Args {
    minutes: f64,
    rps: u64,
    broker: PathBuf,
}

fn args() -> Args {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/examples/soak -> target/<profile>/payroc-broker
    let default_broker = exe
        .parent()
        .and_then(|p| p.parent())
        .unwrap()
        .join("payroc-broker");
    let mut a = Args {
        minutes: 10.0,
        rps: 400,
        broker: default_broker,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().expect("a value after each flag");
        match flag.as_str() {
            "--minutes" => a.minutes = value.parse().expect("--minutes N"),
            "--rps" => a.rps = value.parse().expect("--rps N"),
            "--broker" => a.broker = value.into(),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// Errors seen, by (phase at the RPC's start, phase at its end, rpc, code):
/// an RPC that spans a phase change may meet either phase's fault.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    errors: Mutex<BTreeMap<ErrorKey, u64>>,
}

type ErrorKey = (&'static str, &'static str, &'static str, String);

fn expected(phase: &str, rpc: &str, code: Code) -> bool {
    match (phase, rpc) {
        ("sessions-503", "CreateSession") => code == Code::Unavailable,
        ("sessions-429", "CreateSession") => code == Code::ResourceExhausted,
        ("broken", "CreateSession") => matches!(code, Code::Internal | Code::Unavailable),
        _ => false,
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let a = args();
    assert!(
        a.broker.exists(),
        "{} not found: run `cargo build --release` first, or pass --broker",
        a.broker.display()
    );
    let keys: Vec<String> = ACCOUNTS
        .iter()
        .map(|(n, _, _)| format!("soak-{n}-key-0123456789"))
        .collect();
    let mut sim_config = SimConfig::new(
        Clock::system(),
        Arc::new(OsEntropy),
        ACCOUNTS
            .iter()
            .zip(&keys)
            .map(|((_, _, terminals), key)| SimAccount::new(key, terminals))
            .collect(),
    );
    sim_config.token_lifetime = Duration::from_secs(120);
    let sim = SimPayroc::start(sim_config).await.unwrap();

    let dir = std::env::temp_dir().join(format!("payroc-broker-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[payroc]\nidentity_url = \"{}\"\napi_url = \"{}\"\n\
         refresh_before_expiry = \"40s\"\nmin_token_validity = \"5s\"\nrequest_timeout = \"2s\"\n\
         identity_backoff = \"500ms\"\nidentity_max_backoff = \"4s\"\nmax_concurrent_sessions = 32\n",
        sim.identity_url(),
        sim.api_url()
    );
    for (name, env, terminals) in ACCOUNTS {
        config.push_str(&format!(
            "[[credentials]]\nname = \"{name}\"\napi_key_env = \"{env}\"\nterminals = {terminals:?}\n"
        ));
    }
    let config_path = dir.join("soak.toml");
    std::fs::write(&config_path, config).unwrap();

    let mut cmd = Command::new(&a.broker);
    cmd.args(["serve", "--allow-unauthenticated", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "warn,payroc_broker::app::server=info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for ((_, env, _), key) in ACCOUNTS.iter().zip(&keys) {
        cmd.env(env, key);
    }
    let mut broker = cmd.spawn().unwrap();
    let pid = broker.id();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let stderr = broker.stderr.take().unwrap();
    let log_path = dir.join("broker.log");
    std::thread::spawn({
        let log_path = log_path.clone();
        move || {
            use std::io::Write;
            let mut log = std::fs::File::create(log_path).unwrap();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line
                    .split("addr=")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                {
                    let _ = addr_tx.send(addr.to_owned());
                }
                let _ = writeln!(log, "{line}");
            }
        }
    });
    let addr: SocketAddr = addr_rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap()
        .parse()
        .unwrap();
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Warm start done before the clock starts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_start = rss_kib(pid);
    println!(
        "soak: {} min, {} rps target, broker pid {pid} on {addr}, RSS at start {rss_start} KiB, log {}",
        a.minutes,
        a.rps,
        log_path.display()
    );

    let tally = Arc::new(Tally::default());
    let phase = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let workers = 16;
    let per_worker = Duration::from_secs_f64(workers as f64 / a.rps as f64);
    let terminals: Vec<&str> = ACCOUNTS
        .iter()
        .flat_map(|(_, _, t)| t.iter().copied())
        .collect();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (tally, phase, stop, channel) = (
            Arc::clone(&tally),
            Arc::clone(&phase),
            Arc::clone(&stop),
            channel.clone(),
        );
        let terminals = terminals.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = TokenBrokerClient::new(channel);
            let mut tick = tokio::time::interval(per_worker);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = w;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                n += workers;
                let terminal = terminals[n % terminals.len()].to_owned();
                let at_phase = PHASES[phase.load(Ordering::Relaxed)];
                let (rpc, result) = if n % 5 == 0 {
                    let mut req = tonic::Request::new(CreateSessionRequest {
                        processing_terminal_id: terminal,
                        scenario: Scenario::Payment as i32,
                        ..Default::default()
                    });
                    req.set_timeout(Duration::from_secs(5));
                    ("CreateSession", client.create_session(req).await.map(drop))
                } else {
                    let mut req = tonic::Request::new(GetBearerTokenRequest {
                        processing_terminal_id: terminal,
                        min_validity: None,
                    });
                    req.set_timeout(Duration::from_secs(5));
                    (
                        "GetBearerToken",
                        client.get_bearer_token(req).await.map(drop),
                    )
                };
                match result {
                    Ok(()) => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        let end_phase = PHASES[phase.load(Ordering::Relaxed)];
                        let key = (at_phase, end_phase, rpc, format!("{:?}", e.code()));
                        *tally.errors.lock().unwrap().entry(key).or_default() += 1;
                    }
                }
            }
        }));
    }

    let started = Instant::now();
    let total = Duration::from_secs_f64(a.minutes * 60.0);
    let mut next_report = Duration::from_secs(60);
    let mut p = 0;
    while started.elapsed() < total {
        let name = PHASES[p % PHASES.len()];
        phase.store(p % PHASES.len(), Ordering::Relaxed);
        let faults = sim.faults();
        faults.clear();
        match name {
            "identity-down" => faults.always(SimEndpoint::Identity, Some(Fault::status(503))),
            "sessions-503" => faults.always(SimEndpoint::Sessions, Some(Fault::status(503))),
            "sessions-429" => faults.push(
                SimEndpoint::Sessions,
                Fault::status(429).with_retry_after("1"),
                30,
            ),
            "slow" => {
                faults.set_latency(SimEndpoint::Identity, Duration::from_millis(1500));
                faults.set_latency(SimEndpoint::Sessions, Duration::from_millis(300));
            }
            "revoked" => sim.revoke_tokens(),
            "broken" => {
                faults.push(SimEndpoint::Sessions, Fault::malformed(), 20);
                faults.push(SimEndpoint::Sessions, Fault::reset(), 20);
            }
            _ => {}
        }
        let phase_end = started.elapsed() + PHASE;
        if name == "identity-down" {
            tokio::time::sleep(Duration::from_secs(10)).await;
            faults.clear();
        }
        while started.elapsed() < phase_end.min(total) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if started.elapsed() >= next_report {
                report(&tally, &sim, &keys, pid, started.elapsed());
                next_report += Duration::from_secs(60);
            }
        }
        p += 1;
    }
    stop.store(true, Ordering::Relaxed);
    sim.faults().clear();
    for t in tasks {
        t.await.unwrap();
    }
    let rss_end = rss_kib(pid);
    println!(
        "\n== summary after {:.1} min ==",
        started.elapsed().as_secs_f64() / 60.0
    );
    report(&tally, &sim, &keys, pid, started.elapsed());
    println!("RSS: start {rss_start} KiB, end {rss_end} KiB");
    let errors = tally.errors.lock().unwrap();
    let mut unexpected = 0;
    println!("errors by phase, RPC and code (expected ones marked):");
    for ((start, end, rpc, code), n) in errors.iter() {
        let code_enum = code_from_debug(code);
        let ok = expected(start, rpc, code_enum) || expected(end, rpc, code_enum);
        if !ok {
            unexpected += n;
        }
        let phases = if start == end {
            start.to_string()
        } else {
            format!("{start}->{end}")
        };
        println!(
            "  {phases:<28} {rpc:<15} {code:<18} {n:>7} {}",
            if ok { "expected" } else { "UNEXPECTED" }
        );
    }
    println!("unexpected errors: {unexpected}");
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = broker.wait().unwrap();
    println!("broker exited after SIGTERM with {status}");
    std::process::exit(if unexpected == 0 && status.success() {
        0
    } else {
        1
    });
}

fn code_from_debug(s: &str) -> Code {
    [
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ]
    .into_iter()
    .find(|c| format!("{c:?}") == s)
    .unwrap_or(Code::Unknown)
}

fn report(tally: &Tally, sim: &SimPayroc, keys: &[String], pid: u32, elapsed: Duration) {
    let ok = tally.ok.load(Ordering::Relaxed);
    let errors: u64 = tally.errors.lock().unwrap().values().sum();
    let identity: Vec<u64> = keys.iter().map(|k| sim.identity_requests(k)).collect();
    let stats = sim.stats();
    println!(
        "[{:>5.1} min] RPCs ok {ok}, errors {errors}, {:.0} rps; identity attempts per credential {identity:?}; \
         session requests {}, sessions created {}; broker RSS {} KiB",
        elapsed.as_secs_f64() / 60.0,
        (ok + errors) as f64 / elapsed.as_secs_f64(),
        stats.session_requests,
        stats.sessions_created,
        rss_kib(pid)
    );
}
