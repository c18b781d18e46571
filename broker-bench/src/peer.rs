//! The side-by-side peer: what services do without a broker. Each of N
//! processes holds the API key, fetches its own Bearer token with its own
//! reqwest client (as an SDK per service does) and creates sessions directly
//! against the simulated Payroc.
//!
//! The parent starts the processes (`broker-bench peer-worker ...`, hidden),
//! which all measure in the same wall-clock window and write their latencies
//! to a file each.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use clap::Parser;
use serde_json::{Value, json};

use crate::stats::Sample;

/// The API key reaches workers in the environment, never on the command line.
const KEY_ENV: &str = "BROKER_BENCH_PEER_API_KEY";

#[derive(Parser, Debug)]
#[command(name = "broker-bench peer-worker")]
pub struct WorkerArgs {
    #[arg(long)]
    identity_url: String,
    /// Base URL ending in `/v1`.
    #[arg(long)]
    api_url: String,
    /// Comma-separated terminal ids, used in turn.
    #[arg(long)]
    terminals: String,
    #[arg(long)]
    lib_version: String,
    /// Sessions in flight in this process.
    #[arg(long)]
    concurrency: usize,
    /// Start of the measuring window, in ms since the Unix epoch.
    #[arg(long)]
    start_unix_ms: u64,
    #[arg(long)]
    window_ms: u64,
    /// Where to write the latencies (little-endian u64 nanoseconds).
    #[arg(long)]
    out: PathBuf,
}

/// The worker process: one token, then sessions back to back until the
/// window ends. Prints one JSON line: `{"ok": n, "errors": {...}}`.
pub fn worker(args: WorkerArgs) -> ExitCode {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(work(args)) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("peer-worker: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn work(args: WorkerArgs) -> Result<Value, String> {
    let key = std::env::var(KEY_ENV).map_err(|_| format!("{KEY_ENV} is not set"))?;
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?;
    // As an SDK does: one token per process, kept until it expires.
    let answer = http
        .post(&args.identity_url)
        .header("x-api-key", key)
        .send()
        .await
        .map_err(|e| format!("identity: {e}"))?;
    let body: Value = answer.json().await.map_err(|e| format!("identity: {e}"))?;
    let token = body["access_token"]
        .as_str()
        .ok_or("identity: no access_token")?
        .to_owned();
    let start = SystemTime::UNIX_EPOCH + Duration::from_millis(args.start_unix_ms);
    let end = start + Duration::from_millis(args.window_ms);
    let terminals: Arc<[String]> = args.terminals.split(',').map(str::to_owned).collect();
    let mut tasks = Vec::new();
    for i in 0..args.concurrency {
        let (http, token, terminals) = (http.clone(), token.clone(), Arc::clone(&terminals));
        let (api_url, lib_version) = (args.api_url.clone(), args.lib_version.clone());
        tasks.push(tokio::spawn(async move {
            let mut sample = Sample::default();
            let mut n = i;
            loop {
                let started = SystemTime::now();
                if started >= end {
                    break;
                }
                let terminal = &terminals[n % terminals.len()];
                n += 1;
                let t0 = Instant::now();
                let outcome = session(&http, &api_url, terminal, &token, &lib_version).await;
                let elapsed = t0.elapsed();
                if started >= start && SystemTime::now() <= end {
                    match outcome {
                        Ok(()) => sample.latencies_ns.push(elapsed.as_nanos() as u64),
                        Err(e) => *sample.errors.entry(e).or_default() += 1,
                    }
                }
            }
            sample
        }));
    }
    let mut total = Sample::default();
    for t in tasks {
        total.merge(t.await.map_err(|e| e.to_string())?);
    }
    let bytes: Vec<u8> = (total.latencies_ns.iter())
        .flat_map(|ns| ns.to_le_bytes())
        .collect();
    std::fs::write(&args.out, bytes).map_err(|e| e.to_string())?;
    Ok(json!({"ok": total.ok(), "errors": total.errors}))
}

/// One Hosted Fields session, the way an SDK sends it.
async fn session(
    http: &reqwest::Client,
    api_url: &str,
    terminal: &str,
    token: &str,
    lib_version: &str,
) -> Result<(), String> {
    let answer = http
        .post(format!(
            "{api_url}/processing-terminals/{terminal}/hosted-fields-sessions"
        ))
        .bearer_auth(token)
        .header(
            "Idempotency-Key",
            uuid::Uuid::new_v4().hyphenated().to_string(),
        )
        .header("Accept", "application/json")
        .json(&json!({"libVersion": lib_version, "scenario": "payment"}))
        .send()
        .await
        .map_err(|_| "transport".to_owned())?;
    let status = answer.status().as_u16();
    let body: Value = answer.json().await.map_err(|_| "body".to_owned())?;
    match (status, body["token"].is_string()) {
        (201, true) => Ok(()),
        _ => Err(format!("HTTP {status}")),
    }
}

/// What the peer processes are asked to do.
pub struct PeerRun<'a> {
    pub processes: usize,
    /// Sessions in flight across all processes.
    pub concurrency: usize,
    pub identity_url: String,
    pub api_url: String,
    pub api_key: &'a str,
    pub terminals: &'a [String],
    pub lib_version: &'a str,
    pub warmup: Duration,
    pub window: Duration,
    pub dir: &'a Path,
}

/// Runs the peer processes and merges their samples.
pub async fn run(p: PeerRun<'_>) -> Sample {
    let exe = std::env::current_exe().expect("own executable");
    // Processes start, fetch their tokens and warm their pools before the window.
    let start = SystemTime::now() + Duration::from_secs(1) + p.warmup;
    let start_ms = start
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64;
    let mut children = Vec::new();
    for i in 0..p.processes {
        // Spread the concurrency as evenly as it divides.
        let share = p.concurrency / p.processes + usize::from(i < p.concurrency % p.processes);
        let out = p.dir.join(format!("peer-{i}.lat"));
        let child = Command::new(&exe)
            .arg("peer-worker")
            .args(["--identity-url", &p.identity_url, "--api-url", &p.api_url])
            .args(["--terminals", &p.terminals.join(",")])
            .args(["--lib-version", p.lib_version])
            .args(["--concurrency", &share.max(1).to_string()])
            .args(["--start-unix-ms", &start_ms.to_string()])
            .args(["--window-ms", &p.window.as_millis().to_string()])
            .arg("--out")
            .arg(&out)
            .env(KEY_ENV, p.api_key)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a peer process");
        children.push((child, out));
    }
    tokio::task::spawn_blocking(move || {
        let mut total = Sample::default();
        for (child, out) in children {
            let output = child.wait_with_output().expect("peer process");
            let line = String::from_utf8_lossy(&output.stdout);
            let summary: Value = serde_json::from_str(line.trim()).unwrap_or_else(|_| {
                panic!("peer process failed ({}): {line}", output.status);
            });
            let bytes = std::fs::read(&out).expect("peer latencies");
            let mut sample = Sample {
                latencies_ns: (bytes.chunks_exact(8))
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
                ..Sample::default()
            };
            if let Some(errors) = summary["errors"].as_object() {
                for (code, n) in errors {
                    sample.errors.insert(code.clone(), n.as_u64().unwrap_or(0));
                }
            }
            total.merge(sample);
        }
        total
    })
    .await
    .expect("peer processes")
}
