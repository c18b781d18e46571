//! `broker-bench`: the release `payroc-broker` binary, run as a child process
//! with production logging (default level, JSON, to a file) and metrics on,
//! in front of the simulated Payroc (run in this process), driven over
//! loopback gRPC. See BENCHMARKS.md for the method and the figures.
//!
//! ```sh
//! cargo run --release -p broker-bench -- --json          # everything, ~2 minutes
//! cargo run --release -p broker-bench -- --only bearer,session --rounds 10
//! ```
//!
//! Scenarios (`--only`, comma-separated; default all):
//!
//! | name | what |
//! |---|---|
//! | `bearer` | health Check (`noop`) vs cached GetBearerToken, interleaved rounds at saturation; then GetBearerToken paced at half the noop rate |
//! | `authorize` | the identity endpoint's cached `POST /credentials/{name}/authorize` (HTTP/2, `x-api-key`) vs cached GetBearerToken, interleaved rounds at saturation; then both paced at the same rate for p99 |
//! | `session` | CreateSession, a fixed number in flight, the simulator answering after L |
//! | `session50` | CreateSession at 50 in flight through the broker, then the same load from SDK-per-service peers, side by side against one simulator |
//! | `peer` | the same session workload from N processes that each fetch their own Bearer token (SDK per service) |
//! | `fanin` | N GetBearerToken calls at once across C cold credentials |
//! | `scale` | RSS of a broker with 10,000 terminals under 1,000 warm credentials |
//! | `watch` | N WatchBearerToken streams held open: broker memory per stream, and the time from a new token to the last stream receiving it |
//! | `otlp` | cached GetBearerToken with traces off, and with every call's span exported to a collector that is up, down or slow |
//! | `instructions` | instructions per call under callgrind (`--instructions` runs it alone): each path, the noop, and a stock tonic server as the floor |
//!
//! The last line of stdout with `--json` is one JSON object with every figure.

#![allow(clippy::disallowed_methods)] // a load generator measures real time
#![allow(clippy::cast_precision_loss)]

mod child;
mod instructions;
mod load;
mod otlp;
mod peer;
mod stats;
mod timer;
mod watch;

use std::{
    collections::BTreeSet,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use clap::Parser;
use payroc_broker::clock::{Clock, OsEntropy};
use payroc_sim::{Pause, SimAccount, SimConfig, SimEndpoint, SimPayroc};
use serde_json::{Map, Value, json};

use crate::{
    child::{Broker, Flags, Setup},
    load::{Rpc, Target},
    stats::{Sample, Summary, r3},
};

const SCENARIOS: [&str; 10] = [
    "bearer",
    "authorize",
    "session",
    "peer",
    "session50",
    "fanin",
    "scale",
    "watch",
    "otlp",
    "instructions",
];
const CALLER_TOKEN: &str = "broker-bench-caller-token-7f3a9c2e41d8";
const CALLER_ENV: &str = "BROKER_BENCH_CALLER_TOKEN";
const LIB_VERSION: &str = "1.7.0.261457";

#[derive(Parser, Debug)]
#[command(
    name = "broker-bench",
    about = "Benchmarks the release payroc-broker binary with production logging"
)]
struct Opts {
    /// Print one JSON object with every figure as the last line.
    #[arg(long)]
    json: bool,
    /// Scenarios to run, comma-separated: bearer, session, peer, fanin, scale.
    #[arg(long, value_delimiter = ',', default_values_t = SCENARIOS.map(String::from))]
    only: Vec<String>,
    /// The payroc-broker binary (default: built with `cargo build --release`).
    #[arg(long)]
    broker: Option<PathBuf>,
    /// Keep the work directory (configurations, broker logs).
    #[arg(long)]
    keep: bool,
    /// Short phases and small counts: checks the tool, measures nothing.
    #[arg(long)]
    quick: bool,
    /// Run only the `instructions` scenario (same as `--only instructions`).
    #[arg(long)]
    instructions: bool,

    /// watch: WatchBearerToken streams held open at once.
    #[arg(long, default_value_t = 10_000)]
    watch_streams: usize,
    /// watch: HTTP/2 connections they spread over.
    #[arg(long, default_value_t = 100)]
    watch_connections: usize,
    /// instructions: WatchBearerToken streams a new token is delivered to.
    #[arg(long, default_value_t = 1000)]
    instr_watch_streams: usize,

    /// instructions: measured calls per kind and batch (two batches each).
    #[arg(long, default_value_t = 2000)]
    instr_calls: usize,
    /// instructions: calls before the counters are zeroed.
    #[arg(long, default_value_t = 300)]
    instr_warmup: usize,
    /// instructions: calls in flight (over `--connections`).
    #[arg(long, default_value_t = 16)]
    instr_concurrency: usize,

    /// bearer: seconds per side per round.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// bearer: interleaved rounds (noop then bearer, bearer then noop, ...).
    #[arg(long, default_value_t = 6)]
    rounds: u32,
    /// bearer: HTTP/2 connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// bearer: RPCs in flight at saturation.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// bearer: seconds of the paced run at half the noop rate.
    #[arg(long, default_value_t = 5.0)]
    paced_seconds: f64,
    /// bearer: pace at this many calls per second instead of half the noop
    /// rate (the bearer_p99_ms target is then not judged).
    #[arg(long)]
    paced_rate: Option<f64>,

    /// session: the simulator's latency L, in ms.
    #[arg(long, default_value_t = 50)]
    session_latency_ms: u64,
    /// session: CreateSession calls in flight.
    #[arg(long, default_value_t = 500)]
    session_concurrency: usize,
    /// session: HTTP/2 connections.
    #[arg(long, default_value_t = 4)]
    session_connections: usize,
    /// session (and peer): measured seconds, after 2 s of warm-up.
    #[arg(long, default_value_t = 10.0)]
    session_seconds: f64,

    /// peer: processes, each with its own token and HTTP client.
    #[arg(long, default_value_t = 10)]
    peers: usize,

    /// fanin: calls, all at once.
    #[arg(long, default_value_t = 10_000)]
    fanin_calls: usize,
    /// fanin: cold credentials the calls spread over.
    #[arg(long, default_value_t = 100)]
    fanin_credentials: usize,
    /// fanin: the identity service's latency, in ms (so calls pile up on fetches in flight).
    #[arg(long, default_value_t = 200)]
    fanin_identity_latency_ms: u64,
    /// fanin: HTTP/2 connections. The calls spread evenly over them and each
    /// connection carries at most the broker's default 256 concurrent streams:
    /// more than about 550 unread requests on one connection trip h2's
    /// small-DATA-frame flood guard (GOAWAY ENHANCE_YOUR_CALM), see BENCHMARKS.md.
    #[arg(long, default_value_t = 50)]
    fanin_connections: usize,

    /// scale: terminals, spread evenly over the credentials.
    #[arg(long, default_value_t = 10_000)]
    scale_terminals: usize,
    /// scale: warm credentials.
    #[arg(long, default_value_t = 1_000)]
    scale_credentials: usize,
}

impl Opts {
    fn wants(&self, scenario: &str) -> bool {
        self.only.iter().any(|s| s == scenario)
    }

    fn shrink(&mut self) {
        self.seconds = 0.5;
        self.rounds = 2;
        self.paced_seconds = 1.0;
        self.session_seconds = 1.0;
        self.session_concurrency = self.session_concurrency.min(50);
        self.peers = self.peers.min(3);
        self.fanin_calls = self.fanin_calls.min(1000);
        self.fanin_credentials = self.fanin_credentials.min(10);
        self.scale_terminals = self.scale_terminals.min(200);
        self.scale_credentials = self.scale_credentials.min(20);
        self.instr_calls = self.instr_calls.min(100);
        self.watch_streams = self.watch_streams.min(200);
        self.watch_connections = self.watch_connections.min(10);
        self.instr_watch_streams = self.instr_watch_streams.min(50);
        self.instr_warmup = self.instr_warmup.min(20);
    }
}

/// What every scenario needs.
struct Ctx {
    opts: Opts,
    bin: PathBuf,
    flags: Flags,
    dir: PathBuf,
    sim_rt: tokio::runtime::Runtime,
    /// The simulators' wait for injected latency (one timer thread for all).
    pause: Pause,
    /// How late that timer thread answered.
    lateness: timer::Lateness,
    /// Every figure for the JSON line.
    out: Map<String, Value>,
    /// Human-readable results, printed at the end.
    text: String,
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("peer-worker") {
        return peer::worker(peer::WorkerArgs::parse_from(std::env::args().skip(1)));
    }
    if std::env::args().nth(1).as_deref() == Some("floor-server") {
        let listen = std::env::args().skip_while(|a| a != "--listen").nth(1);
        return instructions::floor_server(&listen.unwrap_or_default());
    }
    let mut opts = Opts::parse();
    if opts.instructions {
        opts.only = vec!["instructions".into()];
    }
    if let Some(bad) = opts.only.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
        eprintln!("broker-bench: unknown scenario `{bad}`; known: {SCENARIOS:?}");
        return ExitCode::from(2);
    }
    if opts.quick {
        opts.shrink();
    }
    if cfg!(debug_assertions) {
        eprintln!("broker-bench: WARNING: a debug build of the load generator; use --release");
    }
    let bin = match child::locate(opts.broker.as_deref()) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("broker-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let dir = std::env::temp_dir().join(format!("broker-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the work directory");
    let flags = Flags::detect(&bin, &dir);
    // The simulator and the load generator each get one worker thread, so
    // neither spreads over both cores; the broker has its own process.
    let sim_rt = runtime("sim");
    let (pause, lateness) = timer::precise_pause();
    let load_rt = runtime("load");
    let mut ctx = Ctx {
        bin,
        flags,
        dir,
        sim_rt,
        pause,
        lateness,
        out: Map::new(),
        text: String::new(),
        opts,
    };
    let load_start = stats::load_average();
    load_rt.block_on(async {
        let session = if ["bearer", "authorize", "session"]
            .iter()
            .any(|s| ctx.opts.wants(s))
        {
            Some(bearer_and_session(&mut ctx).await)
        } else {
            None
        };
        if ctx.opts.wants("peer") {
            peer_comparison(&mut ctx, session.as_ref()).await;
        }
        if ctx.opts.wants("session50") {
            session50(&mut ctx).await;
        }
        if ctx.opts.wants("fanin") {
            fanin(&mut ctx).await;
        }
        if ctx.opts.wants("scale") {
            scale(&mut ctx).await;
        }
        if ctx.opts.wants("watch") {
            watch_scale(&mut ctx).await;
        }
        if ctx.opts.wants("otlp") {
            otlp_collectors(&mut ctx).await;
        }
        if ctx.opts.wants("instructions") {
            instruction_counts(&mut ctx).await;
        }
    });
    let load_end = stats::load_average();
    conditions(&mut ctx, load_start, load_end);
    targets(&mut ctx);
    print!("{}", ctx.text);
    if ctx.opts.keep {
        println!("work directory kept: {}", ctx.dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&ctx.dir);
    }
    if ctx.opts.json {
        println!("{}", Value::Object(ctx.out));
    }
    let _ = std::io::stdout().flush();
    ExitCode::SUCCESS
}

fn runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(format!("bench-{name}"))
        .enable_all()
        .build()
        .expect("runtime")
}

fn note(line: impl AsRef<str>) {
    eprintln!("broker-bench: {}", line.as_ref());
}

/// Starts a simulator on the simulator's runtime.
async fn start_sim(ctx: &Ctx, accounts: Vec<SimAccount>) -> SimPayroc {
    let mut config = SimConfig::new(Clock::system(), Arc::new(OsEntropy), accounts);
    config.pause = Some(Arc::clone(&ctx.pause));
    ctx.sim_rt
        .spawn(SimPayroc::start(config))
        .await
        .expect("simulator task")
        .expect("simulator starts")
}

/// `[payroc]`, `[[credentials]]` (one per key, `terminals[i]` under key i)
/// and the one caller, as TOML.
fn payroc_toml(sim: &SimPayroc, payroc_extra: &str, credentials: &str) -> String {
    format!(
        "[payroc]\nidentity_url = \"{}\"\napi_url = \"{}\"\n{payroc_extra}\n{credentials}\n\
         [[callers]]\nname = \"bench\"\ntoken_env = \"{CALLER_ENV}\"\nterminals = [\"*\"]\nrpcs = [\"*\"]\n",
        sim.identity_url(),
        sim.api_url()
    )
}

/// The API key of the one credential (`bench`) most scenarios configure.
const BENCH_KEY: &str = "broker-bench-api-key-0123456789";

/// `[[credentials]]` for `bench`, its key from the environment
/// ([`bench_env`]), serving `terminals`.
fn bench_credential(terminals: &[String]) -> String {
    format!(
        "[[credentials]]\nname = \"bench\"\napi_key_env = \"BROKER_BENCH_KEY\"\nterminals = {terminals:?}\n"
    )
}

/// The secrets such a broker reads from its environment: `bench`'s key and
/// the caller's token.
fn bench_env() -> Vec<(String, String)> {
    vec![
        ("BROKER_BENCH_KEY".into(), BENCH_KEY.into()),
        (CALLER_ENV.into(), CALLER_TOKEN.into()),
    ]
}

/// A broker with the `bench` credential and caller ([`bench_env`]), run by
/// `launcher` when there is one; `server` is extra `[server]` lines, `rest`
/// the `[payroc]` table and those after it.
async fn bench_broker(
    ctx: &Ctx,
    launcher: &[std::ffi::OsString],
    name: &str,
    server: String,
    rest: String,
) -> Broker {
    let setup = Setup {
        name,
        server,
        rest,
        env: bench_env(),
    };
    Broker::start_under(launcher, &ctx.bin, ctx.flags, &ctx.dir, setup).await
}

/// Cached GetBearerToken on four brokers alike but for `[telemetry]`: off,
/// and every call sampled (ratio 1) with the collector up, down (nothing
/// listening) or slow (5 s per batch). Exporting must change no call's
/// outcome, and its latency only by the cost of making the span: the
/// collector is never waited for. Interleaved rounds at saturation, then
/// each paced at the same rate.
async fn otlp_collectors(ctx: &mut Ctx) {
    use otlp::Mode;
    if !ctx.flags.otlp {
        note("otlp: the broker binary was built without the `otlp` feature; scenario skipped");
        ctx.text.push_str(
            "\n## traces: not measured (the broker binary has no `otlp` feature; the otlp keys are left out)\n",
        );
        return;
    }
    let terminals = terminal_ids("T", 8);
    let refs: Vec<&str> = terminals.iter().map(String::as_str).collect();
    let sim = start_sim(ctx, vec![SimAccount::new(BENCH_KEY, &refs)]).await;
    struct Run {
        mode: Mode,
        broker: Broker,
        target: Target,
        received: Arc<std::sync::atomic::AtomicU64>,
        saturated: Sample,
    }
    let mut runs = Vec::new();
    for mode in Mode::ALL {
        let name = format!("otlp-{}", mode.name());
        let (broker, received) =
            otlp_broker(ctx, &sim, &terminals, mode, &[], &name, String::new()).await;
        let target = Target::connect(
            broker.addr,
            ctx.opts.connections,
            CALLER_TOKEN,
            terminals.clone(),
        )
        .await;
        runs.push(Run {
            mode,
            broker,
            target,
            received,
            saturated: Sample::default(),
        });
    }
    let o = &ctx.opts;
    let (side, warm) = (
        Duration::from_secs_f64(o.seconds),
        Duration::from_millis(300),
    );
    for round in 0..o.rounds as usize {
        for k in 0..runs.len() {
            let run = &mut runs[(k + round) % Mode::ALL.len()];
            let s = load::closed_loop(&run.target, Rpc::Bearer, o.concurrency, warm, side).await;
            note(format!(
                "otlp round {}: collector {} {:.0} rps",
                round + 1,
                run.mode.name(),
                s.rps()
            ));
            let window = run.saturated.window + s.window;
            run.saturated.merge(s);
            run.saturated.window = window;
        }
    }
    let slowest = runs
        .iter()
        .map(|r| r.saturated.rps())
        .fold(f64::INFINITY, f64::min);
    // A quarter of the slowest saturation: latency, not the machine's
    // limit; paced in interleaved rounds too, as the machine's speed drifts.
    let rate = o.paced_rate.unwrap_or(slowest / 4.0);
    let mut paced: Vec<Sample> = runs.iter().map(|_| Sample::default()).collect();
    let slice = Duration::from_secs_f64(o.paced_seconds);
    for round in 0..o.rounds as usize {
        for k in 0..runs.len() {
            let i = (k + round) % runs.len();
            let s = load::paced(
                &runs[i].target,
                Rpc::Bearer,
                rate,
                Duration::from_millis(300),
                slice,
            )
            .await;
            let window = paced[i].window + s.window;
            paced[i].merge(s);
            paced[i].window = window;
        }
    }
    let mut rows = String::new();
    let mut figures = Map::new();
    let mut failures = 0;
    for (run, paced) in runs.iter().zip(&paced) {
        let page = run.broker.scrape_metrics().await.unwrap_or_default();
        let counter = |name: &str| {
            page.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let (exported, dropped) = (
            counter("payroc_broker_trace_spans_exported_total"),
            counter("payroc_broker_trace_spans_dropped_total"),
        );
        let received = run.received.load(std::sync::atomic::Ordering::Relaxed);
        let failed = run.saturated.failures() + paced.failures();
        failures += failed;
        let p = paced.summary();
        rows.push_str(&format!(
            "| {} | {:.0} | {} | {failed} | {exported:.0} | {dropped:.0} | {received} |\n",
            run.mode.name(),
            run.saturated.rps(),
            p.cells(),
        ));
        figures.insert(
            run.mode.name().into(),
            json!({
                "rps": run.saturated.rps().round(),
                "paced": p.json(),
                "failures": failed,
                "spans_exported": exported,
                "spans_dropped": dropped,
                "spans_received": received,
            }),
        );
    }
    ctx.text.push_str(&format!(
        "\n## traces: cached GetBearerToken, every call sampled, collector off / up / down / slow \
         ({} interleaved rounds of {} s at {} in flight; then as many of {} s paced at {rate:.0}/s)\n\n\
         | collector | rps | paced p50 / p90 / p99 / max ms | failed calls | spans exported | spans dropped | spans the collector got |\n\
         |---|---|---|---|---|---|---|\n{rows}",
        o.rounds, o.seconds, o.concurrency, o.paced_seconds
    ));
    figures.insert("paced_rate".into(), json!(rate.round()));
    for run in runs {
        run.broker.stop();
    }
    if let Some((table, per_mode)) = otlp_instructions(ctx, &sim, &terminals).await {
        ctx.text.push_str(&table);
        figures.insert("instructions".into(), Value::Object(per_mode));
    }
    ctx.out.insert("otlp".into(), Value::Object(figures));
    ctx.out.insert("otlp_failures".into(), json!(failures));
}

/// A collector for `mode` (on the simulator's runtime) and a broker with the
/// bench credential that exports every call's span to it (none for
/// [`otlp::Mode::Off`]), run by `launcher`; and the collector's span count.
async fn otlp_broker(
    ctx: &Ctx,
    sim: &SimPayroc,
    terminals: &[String],
    mode: otlp::Mode,
    launcher: &[std::ffi::OsString],
    name: &str,
    server: String,
) -> (Broker, Arc<std::sync::atomic::AtomicU64>) {
    let (endpoint, received) = ctx
        .sim_rt
        .spawn(otlp::collector(mode))
        .await
        .expect("collector task");
    let mut rest = payroc_toml(sim, "", &bench_credential(terminals));
    if let Some(endpoint) = endpoint {
        rest.push_str(&format!(
            "\n[telemetry]\notlp_endpoint = \"{endpoint}\"\nsample_ratio = 1.0\n"
        ));
    }
    let broker = bench_broker(ctx, launcher, name, server, rest).await;
    (broker, received)
}

/// Instructions per cached GetBearerToken with traces off, and with every
/// call's span exported to a collector that is up or down: what a span
/// costs, and that a dead collector costs no more. `None` without valgrind.
async fn otlp_instructions(
    ctx: &Ctx,
    sim: &SimPayroc,
    terminals: &[String],
) -> Option<(String, Map<String, Value>)> {
    use otlp::Mode;
    if let Err(why) = instructions::available() {
        note(format!("otlp: instruction counts skipped, {why}"));
        return None;
    }
    // Past the exporter's 1 s batch delay, so a batch's last spans are sent
    // (or fail to be) inside the batch that made them.
    let settle = Duration::from_millis(1500);
    let o = &ctx.opts;
    let mut rows = String::new();
    let mut per_mode = Map::new();
    let mut off = None;
    for mode in [Mode::Off, Mode::Up, Mode::Down] {
        let name = format!("otlp-instr-{}", mode.name());
        let out = ctx.dir.join(format!("callgrind-{name}.out"));
        let (broker, _) = otlp_broker(
            ctx,
            sim,
            terminals,
            mode,
            &instructions::launcher(&out),
            &name,
            "warm_start_timeout = \"60s\"".into(),
        )
        .await;
        let target =
            Target::connect(broker.addr, o.connections, CALLER_TOKEN, terminals.to_vec()).await;
        let mut counter = instructions::Counter::new(broker.pid, &out);
        let b = count_batches_settled(o, &target, &mut counter, Rpc::Bearer, settle).await;
        broker.stop();
        let mean = (b[0] + b[1]) / 2.0;
        note(format!(
            "otlp: instructions, collector {} {b:?} per call",
            mode.name()
        ));
        let base = *off.get_or_insert(mean);
        rows.push_str(&format!(
            "| {} | {mean:.0} | {:.0} / {:.0} | {:+.0} |\n",
            mode.name(),
            b[0],
            b[1],
            mean - base
        ));
        per_mode.insert(mode.name().into(), json!(mean.round()));
    }
    let table = format!(
        "\nInstructions per cached GetBearerToken (callgrind, {} calls per batch, {} ms settle):\n\n\
         | collector | instructions per call | batch 1 / batch 2 | over off |\n|---|---|---|---|\n{rows}",
        o.instr_calls,
        settle.as_millis()
    );
    Some((table, per_mode))
}

fn terminal_ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:06}")).collect()
}

/// The identity endpoint beside GetBearerToken on the same broker: both
/// answered from the one cache, so the difference is the edge (HTTP and JSON
/// against gRPC and protobuf).
async fn authorize(ctx: &mut Ctx, broker: &Broker, terminals: &[String]) {
    let o = &ctx.opts;
    let target = Target::connect(broker.addr, o.connections, CALLER_TOKEN, terminals.to_vec())
        .await
        .with_identity(broker.identity, "bench");
    let side = Duration::from_secs_f64(o.seconds);
    let warm = Duration::from_millis(300);
    let (mut bearer, mut auth) = (Sample::default(), Sample::default());
    // The broker's CPU per call is the edge's cost alone: the load
    // generators differ (tonic against reqwest), and they share the bench's
    // one client worker, so rps also measures the client.
    let (mut bearer_cpu, mut auth_cpu) = (0.0, 0.0);
    let mut rows = String::new();
    for round in 0..o.rounds {
        let run = async |rpc: Rpc| {
            let cpu = broker.cpu_seconds();
            let s = load::closed_loop(&target, rpc, o.concurrency, warm, side).await;
            // The warm-up's CPU is in the delta too: scale to the window.
            let used =
                (broker.cpu_seconds() - cpu) * side.as_secs_f64() / (side + warm).as_secs_f64();
            (s, used)
        };
        let ((b, bc), (a, ac)) = if round % 2 == 0 {
            let b = run(Rpc::Bearer).await;
            (b, run(Rpc::Authorize).await)
        } else {
            let a = run(Rpc::Authorize).await;
            (run(Rpc::Bearer).await, a)
        };
        bearer_cpu += bc;
        auth_cpu += ac;
        rows.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.3} |\n",
            round + 1,
            b.rps(),
            a.rps(),
            a.rps() / b.rps()
        ));
        note(format!(
            "round {}: bearer {:.0} rps, authorize {:.0} rps",
            round + 1,
            b.rps(),
            a.rps()
        ));
        let (bw, aw) = (bearer.window + b.window, auth.window + a.window);
        bearer.merge(b);
        auth.merge(a);
        bearer.window = bw;
        auth.window = aw;
    }
    let ratio = auth.rps() / bearer.rps();
    let cpu_us = |cpu: f64, s: &Sample| cpu * 1e6 / s.ok().max(1) as f64;
    let (bearer_cpu, auth_cpu) = (cpu_us(bearer_cpu, &bearer), cpu_us(auth_cpu, &auth));
    // Both paced at the same rate, half the slower one's saturation.
    let rate = o.paced_rate.unwrap_or(bearer.rps().min(auth.rps()) / 2.0);
    let paced = async |rpc| {
        load::paced(
            &target,
            rpc,
            rate,
            Duration::from_secs(1),
            Duration::from_secs_f64(o.paced_seconds),
        )
        .await
    };
    let paced_bearer = paced(Rpc::Bearer).await;
    let paced_auth = paced(Rpc::Authorize).await;
    let (bs, as_, pb, pa) = (
        bearer.summary(),
        auth.summary(),
        paced_bearer.summary(),
        paced_auth.summary(),
    );
    ctx.text.push_str(&format!(
        "\n## identity endpoint /authorize vs GetBearerToken (both cached): {} interleaved rounds \
         of {} s per side, {} in flight over {} connections\n\n\
         | round | bearer rps | authorize rps | ratio |\n|---|---|---|---|\n{rows}\n\
         | path | rps | p50 / p90 / p99 / max ms | broker CPU µs per call | failures |\n\
         |---|---|---|---|---|\n\
         | GetBearerToken (gRPC) | {:.0} | {} | {bearer_cpu:.1} | {} |\n\
         | /authorize (HTTP/2 + JSON) | {:.0} | {} | {auth_cpu:.1} | {} |\n\
         | GetBearerToken paced at {rate:.0}/s | {:.0} | {} | | {} |\n\
         | /authorize paced at {rate:.0}/s | {:.0} | {} | | {} |\n\n\
         authorize_over_bearer (ratio of mean rps) = {ratio:.3}\n",
        o.rounds,
        o.seconds,
        o.concurrency,
        o.connections,
        bearer.rps(),
        bs.cells(),
        bearer.failures(),
        auth.rps(),
        as_.cells(),
        auth.failures(),
        paced_bearer.rps(),
        pb.cells(),
        paced_bearer.failures(),
        paced_auth.rps(),
        pa.cells(),
        paced_auth.failures(),
    ));
    let out = &mut ctx.out;
    out.insert("authorize_rps".into(), json!(auth.rps().round()));
    out.insert("authorize_over_bearer".into(), json!(r3(ratio)));
    out.insert("authorize_cpu_us_per_call".into(), json!(r3(auth_cpu)));
    out.insert(
        "authorize_bearer_cpu_us_per_call".into(),
        json!(r3(bearer_cpu)),
    );
    out.insert("authorize_p99_ms".into(), json!(r3(pa.p99)));
    out.insert("authorize_paced_bearer_p99_ms".into(), json!(r3(pb.p99)));
    out.insert("authorize_saturated".into(), as_.json());
    out.insert("authorize_paced".into(), pa.json());
    out.insert(
        "authorize_failures".into(),
        json!(
            auth.failures() + paced_auth.failures() + bearer.failures() + paced_bearer.failures()
        ),
    );
}

/// The `[server]` lines a broker holding `streams` watchers over
/// `connections` connections from one address needs (both limits count
/// streams and connections from the bench as from any peer).
fn watch_server(streams: usize, connections: usize) -> String {
    format!(
        "warm_start_timeout = \"60s\"\nmax_connections_per_peer = {}\nmax_in_flight_requests = {}\n",
        connections + 16,
        streams * 2 + 1024
    )
}

/// A new token for every watcher: one CreateSession is answered 401 (Payroc
/// rejecting the cached token), so the broker fetches the next one and
/// retries. Returns when the simulator issued it.
async fn replace_token(sim: &SimPayroc, target: &Target) -> Option<std::time::Instant> {
    sim.faults()
        .push(SimEndpoint::Sessions, payroc_sim::Fault::status(401), 1);
    let outcome = target.caller(0).call(Rpc::Session, 0).await;
    if let Err(code) = outcome {
        note(format!(
            "watch: the CreateSession that replaces the token failed: {code}"
        ));
    }
    sim.stats().last_token_issued_at.map(|t| t.into_std())
}

/// Watchers at scale: memory per stream, and the time from a new token to
/// the last of them receiving it.
async fn watch_scale(ctx: &mut Ctx) {
    let o = &ctx.opts;
    let (streams, connections) = (o.watch_streams, o.watch_connections);
    let key = BENCH_KEY;
    let terminals = terminal_ids("W", 4);
    let refs: Vec<&str> = terminals.iter().map(String::as_str).collect();
    let sim = start_sim(ctx, vec![SimAccount::new(key, &refs)]).await;
    let rest = payroc_toml(&sim, "", &bench_credential(&terminals));
    let broker = bench_broker(ctx, &[], "watch", watch_server(streams, connections), rest).await;
    let channels = watch::connect(broker.addr, connections).await;
    let target = Target::connect(broker.addr, 1, CALLER_TOKEN, terminals.clone()).await;
    // Connections, and one call through every path the trigger takes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, before_kib) = broker.rss_kib();
    let mut opened_kib = 0;
    let started = std::time::Instant::now();
    let watched = watch::watchers(
        &channels,
        streams,
        CALLER_TOKEN,
        &terminals[0],
        Duration::from_secs(60),
        async || {
            note(format!(
                "watch: {streams} streams open after {:.1} s",
                started.elapsed().as_secs_f64()
            ));
            tokio::time::sleep(Duration::from_millis(300)).await;
            opened_kib = broker.rss_kib().1;
        },
        async || replace_token(&sim, &target).await,
    )
    .await;
    let (peak_kib, _) = broker.rss_kib();
    drop(watched.held);
    broker.stop();
    let per_stream = opened_kib.saturating_sub(before_kib) as f64 / streams.max(1) as f64;
    let delivery = Summary::of(&watched.delivery_ns);
    ctx.text.push_str(&format!(
        "\n## watch: {streams} WatchBearerToken streams over {connections} connections\n\n\
         broker RSS {before_kib} KiB with the connections open, {opened_kib} KiB with every stream \
         holding its first token: {per_stream:.2} KiB per stream (peak {peak_kib} KiB)\n\
         new token to each stream (ms, from when the simulator issued it): p50 / p90 / p99 / max \
         {}; {} of {streams} streams received it; failures {}\n",
        delivery.cells(),
        watched.delivery_ns.len(),
        watched.failures,
    ));
    let out = &mut ctx.out;
    out.insert("watch_streams".into(), json!(watched.streams));
    out.insert("watch_kib_per_stream".into(), json!(r3(per_stream)));
    out.insert("watch_delivery_p99_ms".into(), json!(r3(delivery.p99)));
    out.insert("watch_delivery".into(), delivery.json());
    out.insert("watch_failures".into(), json!(watched.failures));
}

/// The kinds of call counted, in the order measured, with their JSON names.
const COUNTED: [(Rpc, &str); 5] = [
    (Rpc::Noop, "noop"),
    (Rpc::Bearer, "bearer"),
    (Rpc::Session, "session"),
    (Rpc::ExtAuthz, "ext_authz"),
    (Rpc::Authorize, "authorize"),
];

/// Instructions per call under callgrind: every kind on one broker
/// configured as in the other scenarios (JSON audit line per call, the
/// caller check, metrics; `[ext_authz]` and the identity endpoint on), then
/// the health Check on a stock tonic server, the floor.
async fn instruction_counts(ctx: &mut Ctx) {
    if let Err(why) = instructions::available() {
        note(format!("instructions: skipped, {why}"));
        ctx.text.push_str(&format!(
            "
## instructions per call

not measured: {why}; the instruction keys are left out
"
        ));
        return;
    }
    let key = BENCH_KEY;
    let terminals = terminal_ids("T", 8);
    let refs: Vec<&str> = terminals.iter().map(String::as_str).collect();
    let sim = start_sim(ctx, vec![SimAccount::new(key, &refs)]).await;
    let rest = payroc_toml(
        &sim,
        "",
        &format!(
            "{}[ext_authz]\nenabled = true\n",
            bench_credential(&terminals)
        ),
    );
    let out = ctx.dir.join("callgrind-broker.out");
    let broker = bench_broker(
        ctx,
        &instructions::launcher(&out),
        "instructions",
        "warm_start_timeout = \"60s\"".into(),
        rest,
    )
    .await;
    note(format!(
        "instructions: broker pid {} under callgrind",
        broker.pid
    ));
    let o = &ctx.opts;
    let target = Target::connect(broker.addr, o.connections, CALLER_TOKEN, terminals.clone())
        .await
        .with_identity(broker.identity, "bench")
        .with_ext_authz(&sim.addr().to_string());
    let mut counter = instructions::Counter::new(broker.pid, &out);
    let mut rows = Vec::new();
    for (rpc, name) in COUNTED {
        let batches = count_batches(o, &target, &mut counter, rpc).await;
        note(format!("instructions: {name} {batches:?} per call"));
        rows.push((name, batches));
    }
    // WatchBearerToken: a new token delivered to every open stream.
    let streams = o.instr_watch_streams;
    let channels = watch::connect(broker.addr, 10).await;
    let counter_ref = &counter;
    let watched = watch::watchers(
        &channels,
        streams,
        CALLER_TOKEN,
        &terminals[0],
        Duration::from_secs(300),
        async || counter_ref.zero(),
        async || replace_token(&sim, &target).await,
    )
    .await;
    let delivered = counter.take(SETTLE).await;
    assert_eq!(
        watched.failures, 0,
        "watchers missed the new token under callgrind"
    );
    // Closed after the count: closing streams is not delivering to them.
    drop(watched.held);
    let per_delivery = delivered as f64 / streams.max(1) as f64;
    note(format!(
        "instructions: watch delivery {per_delivery:.0} per stream"
    ));
    drop(channels);
    // Let the broker close those streams before the idle window.
    tokio::time::sleep(SETTLE).await;
    // The same window with no calls: what an idle broker costs meanwhile.
    counter.zero();
    let idle = counter.take(SETTLE).await;
    broker.stop();

    let out = ctx.dir.join("callgrind-floor.out");
    let floor = Broker::floor(&instructions::launcher(&out), &ctx.dir).await;
    let target = Target::connect(floor.addr, o.connections, CALLER_TOKEN, terminals).await;
    let mut counter = instructions::Counter::new(floor.pid, &out);
    let floor_batches = count_batches(o, &target, &mut counter, Rpc::Noop).await;
    note(format!("instructions: floor {floor_batches:?} per call"));
    floor.stop();
    rows.insert(0, ("floor", floor_batches));

    let mean = |b: &[f64; 2]| (b[0] + b[1]) / 2.0;
    let noop = mean(&rows[1].1);
    let mut table = String::new();
    let mut per_kind = Map::new();
    let mut spread: f64 = 0.0;
    for (name, b) in &rows {
        let m = mean(b);
        spread = spread.max((b[0] - b[1]).abs() / m * 100.0);
        table.push_str(&format!(
            "| {name} | {:.0} | {:.0} / {:.0} | {:.2} |\n",
            m,
            b[0],
            b[1],
            m / noop
        ));
        per_kind.insert((*name).into(), json!(m.round()));
    }
    table.push_str(&format!(
        "| watch delivery (one new token to each of {streams} streams, the CreateSession that replaces it included) | {per_delivery:.0} | | {:.2} |\n",
        per_delivery / noop
    ));
    per_kind.insert("watch_delivery".into(), json!(per_delivery.round()));
    let bearer = mean(&rows[2].1);
    ctx.text.push_str(&format!(
        "\n## instructions per call (callgrind; {} calls per batch after {} warm-up, {} in flight over {} connections)\n\n\
         | kind | instructions per call | batch 1 / batch 2 | ratio to noop |\n|---|---|---|---|\n{table}\n\
         bearer_instr_over_noop = {:.3}; largest difference between batches {spread:.2} %; \
         an idle broker over the same {} ms settle: {idle} instructions\n",
        o.instr_calls,
        o.instr_warmup,
        o.instr_concurrency,
        o.connections,
        bearer / noop,
        SETTLE.as_millis(),
    ));
    let out = &mut ctx.out;
    out.insert("instructions".into(), Value::Object(per_kind));
    out.insert("bearer_instr_over_noop".into(), json!(r3(bearer / noop)));
    out.insert("instructions_batch_spread_pct".into(), json!(r3(spread)));
}

/// How long a server under callgrind is left to finish a batch's work (the
/// log writer gathers lines before writing) before the counters are read.
const SETTLE: Duration = Duration::from_millis(500);

/// Instructions per call of `rpc`, two batches (the second shows how
/// repeatable the first is).
async fn count_batches(
    o: &Opts,
    target: &Target,
    counter: &mut instructions::Counter,
    rpc: Rpc,
) -> [f64; 2] {
    count_batches_settled(o, target, counter, rpc, SETTLE).await
}

/// [`count_batches`], leaving the server `settle` after each batch.
async fn count_batches_settled(
    o: &Opts,
    target: &Target,
    counter: &mut instructions::Counter,
    rpc: Rpc,
    settle: Duration,
) -> [f64; 2] {
    let mut batches = [0.0; 2];
    for b in &mut batches {
        let warm = load::sweep(target, rpc, o.instr_warmup, o.instr_concurrency).await;
        assert_eq!(
            warm.failures(),
            0,
            "{rpc:?} failed while warming up: {:?}",
            warm.errors
        );
        counter.zero();
        let s = load::sweep(target, rpc, o.instr_calls, o.instr_concurrency).await;
        let instructions = counter.take(settle).await;
        assert_eq!(
            s.failures(),
            0,
            "{rpc:?} failed while counted: {:?}",
            s.errors
        );
        *b = instructions as f64 / o.instr_calls as f64;
    }
    batches
}

/// Noop vs cached bearer, paced bearer, /authorize vs bearer, then sessions,
/// on one broker process.
/// Returns the session sample for the peer comparison.
async fn bearer_and_session(ctx: &mut Ctx) -> Sample {
    let o = &ctx.opts;
    let key = BENCH_KEY;
    let terminals = terminal_ids("T", 8);
    let refs: Vec<&str> = terminals.iter().map(String::as_str).collect();
    let sim = start_sim(ctx, vec![SimAccount::new(key, &refs)]).await;
    let sessions = (2 * o.session_concurrency).max(64);
    let rest = payroc_toml(
        &sim,
        &format!(
            "max_concurrent_sessions = {sessions}\nmax_concurrent_sessions_per_caller = {sessions}"
        ),
        &bench_credential(&terminals),
    );
    let broker = bench_broker(
        ctx,
        &[],
        "main",
        "warm_start_timeout = \"30s\"".into(),
        rest,
    )
    .await;
    note(format!("broker pid {} on {}", broker.pid, broker.addr));
    let mut session_sample = Sample::default();

    if o.wants("bearer") {
        let target =
            Target::connect(broker.addr, o.connections, CALLER_TOKEN, terminals.clone()).await;
        let side = Duration::from_secs_f64(o.seconds);
        let warm = Duration::from_millis(300);
        let (mut noop, mut bearer) = (Sample::default(), Sample::default());
        let (mut noop_cpu, mut bearer_cpu) = (0.0, 0.0);
        let mut rows = String::new();
        for round in 0..o.rounds {
            let run = async |rpc: Rpc| {
                let cpu = broker.cpu_seconds();
                let s = load::closed_loop(&target, rpc, o.concurrency, warm, side).await;
                // The warm-up's CPU is in the delta too: scale to the window.
                let used =
                    (broker.cpu_seconds() - cpu) * side.as_secs_f64() / (side + warm).as_secs_f64();
                (s, used)
            };
            let ((n, nc), (b, bc)) = if round % 2 == 0 {
                let n = run(Rpc::Noop).await;
                (n, run(Rpc::Bearer).await)
            } else {
                let b = run(Rpc::Bearer).await;
                (run(Rpc::Noop).await, b)
            };
            rows.push_str(&format!(
                "| {} | {:.0} | {:.0} | {:.3} |\n",
                round + 1,
                n.rps(),
                b.rps(),
                b.rps() / n.rps()
            ));
            note(format!(
                "round {}: noop {:.0} rps, bearer {:.0} rps",
                round + 1,
                n.rps(),
                b.rps()
            ));
            noop_cpu += nc;
            bearer_cpu += bc;
            // Windows add up: merged rps is the mean over rounds.
            let (nw, bw) = (noop.window + n.window, bearer.window + b.window);
            noop.merge(n);
            bearer.merge(b);
            noop.window = nw;
            bearer.window = bw;
        }
        let ratio = bearer.rps() / noop.rps();
        let cpu_us = |cpu: f64, s: &Sample| cpu * 1e6 / s.ok().max(1) as f64;
        let rate = o.paced_rate.unwrap_or(noop.rps() / 2.0);
        note(format!("bearer paced at {rate:.0}/s"));
        let paced = load::paced(
            &target,
            Rpc::Bearer,
            rate,
            Duration::from_secs(1),
            Duration::from_secs_f64(o.paced_seconds),
        )
        .await;
        let (ns, bs, ps) = (noop.summary(), bearer.summary(), paced.summary());
        ctx.text.push_str(&format!(
            "\n## noop vs cached GetBearerToken: {} interleaved rounds of {} s per side, \
             {} in flight over {} connections\n\n\
             | round | noop rps | bearer rps | ratio |\n|---|---|---|---|\n{rows}\n\
             | path | rps | p50 / p90 / p99 / max ms | broker CPU µs per call | failures |\n|---|---|---|---|---|\n\
             | noop (health Check) | {:.0} | {} | {:.1} | {} |\n\
             | bearer (cache hit) | {:.0} | {} | {:.1} | {} |\n\
             | bearer paced at {rate:.0}/s | {:.0} | {} | | {} |\n\n\
             bearer_over_noop (ratio of mean rps) = {ratio:.3}\n",
            o.rounds,
            o.seconds,
            o.concurrency,
            o.connections,
            noop.rps(),
            ns.cells(),
            cpu_us(noop_cpu, &noop),
            noop.failures(),
            bearer.rps(),
            bs.cells(),
            cpu_us(bearer_cpu, &bearer),
            bearer.failures(),
            paced.rps(),
            ps.cells(),
            paced.failures(),
        ));
        let out = &mut ctx.out;
        out.insert("noop_rps".into(), json!(noop.rps().round()));
        out.insert("bearer_rps".into(), json!(bearer.rps().round()));
        out.insert("bearer_over_noop".into(), json!(r3(ratio)));
        out.insert("bearer_p99_ms".into(), json!(r3(ps.p99)));
        out.insert("bearer_paced_rps".into(), json!(paced.rps().round()));
        out.insert("bearer_paced".into(), ps.json());
        out.insert("noop_saturated".into(), ns.json());
        out.insert("bearer_saturated".into(), bs.json());
        out.insert(
            "noop_cpu_us_per_call".into(),
            json!(r3(cpu_us(noop_cpu, &noop))),
        );
        out.insert(
            "bearer_cpu_us_per_call".into(),
            json!(r3(cpu_us(bearer_cpu, &bearer))),
        );
        out.insert(
            "bearer_failures".into(),
            json!(noop.failures() + bearer.failures() + paced.failures()),
        );
    }

    if o.wants("authorize") {
        authorize(ctx, &broker, &terminals).await;
    }
    let o = &ctx.opts;

    if o.wants("session") || o.wants("peer") {
        let latency = Duration::from_millis(o.session_latency_ms);
        sim.faults().set_latency(SimEndpoint::Sessions, latency);
        let target = Target::connect(
            broker.addr,
            o.session_connections,
            CALLER_TOKEN,
            terminals.clone(),
        )
        .await;
        // Warm-up: the broker's upstream pool grows to what the load needs.
        load::closed_loop(
            &target,
            Rpc::Session,
            o.session_concurrency,
            Duration::ZERO,
            Duration::from_secs(2),
        )
        .await;
        let connections_before = sim.connections_accepted();
        ctx.lateness.take();
        let before = sim.stats();
        let cpu = broker.cpu_seconds();
        // This process: the load generator and the simulator.
        let own_cpu = stats::cpu_seconds(std::process::id());
        let s = load::closed_loop(
            &target,
            Rpc::Session,
            o.session_concurrency,
            Duration::ZERO,
            Duration::from_secs_f64(o.session_seconds),
        )
        .await;
        let new_connections = sim.connections_accepted() - connections_before;
        let cpu = broker.cpu_seconds() - cpu;
        let own_cpu = stats::cpu_seconds(std::process::id()) - own_cpu;
        let late = Summary::of(&ctx.lateness.take());
        let after = sim.stats();
        let sum = s.summary();
        let l = o.session_latency_ms as f64;
        let connections = sim.connections_accepted();
        let sessions = (after.session_requests - before.session_requests).max(1) as f64;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        ctx.text.push_str(&format!(
            "\n## CreateSession: {} in flight over {} connections, simulator latency L = {l} ms, {} s\n\n\
             | sessions/s | p50 / p90 / p99 / max ms | p50 − L | p99 − L | failures | upstream TCP connections (opened while measuring) | broker CPU µs per session | client + simulator CPU µs per session |\n\
             |---|---|---|---|---|---|---|---|\n\
             | {:.0} | {} | {:.3} | {:.3} | {} | {connections} ({new_connections}) | {:.1} | {:.1} |\n\n\
             At that CPU cost the {cores} cores carry at most {:.0} sessions/s; {} in flight at L = {l} ms offer {:.0}/s. \
             The simulator's timer answered L late by p50 {:.3} / p99 {:.3} ms (counted above as the broker's).\n",
            o.session_concurrency,
            o.session_connections,
            o.session_seconds,
            s.rps(),
            sum.cells(),
            sum.p50 - l,
            sum.p99 - l,
            s.failures(),
            cpu * 1e6 / sessions,
            own_cpu * 1e6 / sessions,
            cores as f64 / ((cpu + own_cpu) / sessions),
            o.session_concurrency,
            o.session_concurrency as f64 * 1000.0 / l,
            late.p50,
            late.p99,
        ));
        let out = &mut ctx.out;
        out.insert("session_latency_ms".into(), json!(o.session_latency_ms));
        out.insert("session_concurrency".into(), json!(o.session_concurrency));
        out.insert("session_rps".into(), json!(s.rps().round()));
        out.insert("session".into(), sum.json());
        out.insert("session_added_p50_ms".into(), json!(r3(sum.p50 - l)));
        out.insert("session_added_p99_ms".into(), json!(r3(sum.p99 - l)));
        out.insert("session_upstream_connections".into(), json!(connections));
        out.insert(
            "session_upstream_connections_opened_while_measuring".into(),
            json!(new_connections),
        );
        out.insert("session_cpu_us".into(), json!(r3(cpu * 1e6 / sessions)));
        out.insert("session_sim_timer_late".into(), late.json());
        out.insert(
            "session_client_and_sim_cpu_us".into(),
            json!(r3(own_cpu * 1e6 / sessions)),
        );
        out.insert("session_failures".into(), json!(s.failures()));
        out.insert("session_errors".into(), json!(s.errors));
        out.insert(
            "session_identity_requests".into(),
            json!(sim.stats().identity_requests),
        );
        session_sample = s;
    }

    let logs = broker.log_figures();
    let metrics = broker.scrape_metrics().await;
    let (hwm, rss) = broker.rss_kib();
    let status = broker.stop();
    ctx.text.push_str(&format!(
        "\nbroker log: {} lines ({} JSON), {} bytes; /metrics {}; RSS peak {} KiB, at the end {} KiB; exit {:?}\n",
        logs.lines,
        logs.json,
        logs.bytes,
        match &metrics {
            Some(m) => format!("answered ({} lines)", m.lines().count()),
            None => "did not answer".into(),
        },
        hwm,
        rss,
        status.map(|s| s.to_string()),
    ));
    let out = &mut ctx.out;
    out.insert("log_lines".into(), json!(logs.lines));
    out.insert("log_json_lines".into(), json!(logs.json));
    out.insert("log_bytes".into(), json!(logs.bytes));
    out.insert("metrics_scraped".into(), json!(metrics.is_some()));
    out.insert("main_peak_rss_mb".into(), json!(r3(hwm as f64 / 1024.0)));
    session_sample
}

/// The session workload without the broker: N processes, own tokens.
async fn peer_comparison(ctx: &mut Ctx, broker_side: Option<&Sample>) {
    let o = &ctx.opts;
    let key = "broker-bench-peer-api-key-0123456789";
    let terminals = terminal_ids("T", 8);
    let refs: Vec<&str> = terminals.iter().map(String::as_str).collect();
    let sim = start_sim(ctx, vec![SimAccount::new(key, &refs)]).await;
    sim.faults().set_latency(
        SimEndpoint::Sessions,
        Duration::from_millis(o.session_latency_ms),
    );
    note(format!("{} peer processes", o.peers));
    let mut s = peer::run(peer::PeerRun {
        processes: o.peers,
        concurrency: o.session_concurrency,
        identity_url: sim.identity_url(),
        api_url: sim.api_url(),
        api_key: key,
        terminals: &terminals,
        lib_version: LIB_VERSION,
        warmup: Duration::from_secs(2),
        window: Duration::from_secs_f64(o.session_seconds),
        dir: &ctx.dir,
    })
    .await;
    s.window = o.session_seconds;
    let l = o.session_latency_ms as f64;
    let identity = sim.stats().identity_requests;
    let connections = sim.connections_accepted();
    let sum = s.summary();
    let mut rows = String::new();
    if let Some(b) = broker_side {
        let bs = b.summary();
        rows.push_str(&format!(
            "| one broker | 1 broker + 1 client | {} | {:.0} | {} | {:.3} | {:.3} | {} |\n",
            ctx.out
                .get("session_identity_requests")
                .cloned()
                .unwrap_or(json!("?")),
            b.rps(),
            bs.cells(),
            bs.p50 - l,
            bs.p99 - l,
            b.failures(),
        ));
    }
    rows.push_str(&format!(
        "| SDK per service | {} processes | {identity} | {:.0} | {} | {:.3} | {:.3} | {} |\n",
        o.peers,
        s.rps(),
        sum.cells(),
        sum.p50 - l,
        sum.p99 - l,
        s.failures(),
    ));
    ctx.text.push_str(&format!(
        "\n## Side by side: {} sessions in flight, L = {l} ms, {} s\n\n\
         | path | processes | identity requests | sessions/s | p50 / p90 / p99 / max ms | p50 − L | p99 − L | failures |\n\
         |---|---|---|---|---|---|---|---|\n{rows}\
         (SDK per service: {connections} TCP connections to the simulator)\n",
        o.session_concurrency, o.session_seconds,
    ));
    let out = &mut ctx.out;
    out.insert("peer_processes".into(), json!(o.peers));
    out.insert("peer_identity_requests".into(), json!(identity));
    out.insert("peer_rps".into(), json!(s.rps().round()));
    out.insert("peer_session".into(), sum.json());
    out.insert("peer_added_p50_ms".into(), json!(r3(sum.p50 - l)));
    out.insert("peer_added_p99_ms".into(), json!(r3(sum.p99 - l)));
    out.insert("peer_failures".into(), json!(s.failures()));
    out.insert("peer_upstream_connections".into(), json!(connections));
}

/// Sessions in flight for the side-by-side at the load this machine carries.
const SESSION50: usize = 50;

/// CreateSession at 50 in flight (1,000/s offered at L = 50 ms), through the
/// broker and then from SDK-per-service peers, against one simulator: the
/// broker's extra hop, where the cores are not the limit.
async fn session50(ctx: &mut Ctx) {
    let o = &ctx.opts;
    let (key, peer_key) = (BENCH_KEY, "broker-bench-peer-api-key-0123456789");
    let terminals = terminal_ids("T", 8);
    let refs: Vec<&str> = terminals.iter().map(String::as_str).collect();
    let sim = start_sim(
        ctx,
        vec![
            SimAccount::new(key, &refs),
            SimAccount::new(peer_key, &refs),
        ],
    )
    .await;
    let l = o.session_latency_ms as f64;
    sim.faults().set_latency(
        SimEndpoint::Sessions,
        Duration::from_millis(o.session_latency_ms),
    );
    let rest = payroc_toml(
        &sim,
        "max_concurrent_sessions = 128\nmax_concurrent_sessions_per_caller = 128",
        &bench_credential(&terminals),
    );
    let broker = bench_broker(
        ctx,
        &[],
        "session50",
        "warm_start_timeout = \"30s\"".into(),
        rest,
    )
    .await;
    let target = Target::connect(
        broker.addr,
        o.session_connections,
        CALLER_TOKEN,
        terminals.clone(),
    )
    .await;
    let window = Duration::from_secs_f64(o.session_seconds);
    ctx.lateness.take();
    let via_broker = load::closed_loop(
        &target,
        Rpc::Session,
        SESSION50,
        Duration::from_secs(2),
        window,
    )
    .await;
    let late = Summary::of(&ctx.lateness.take());
    // The same rate as an open loop: arrivals spread evenly instead of the
    // closed loop's waves (with a fixed L its 50 calls tend to complete
    // together).
    let paced = load::paced(
        &target,
        Rpc::Session,
        via_broker.rps(),
        Duration::from_secs(1),
        window,
    )
    .await;
    broker.stop();
    let mut direct = peer::run(peer::PeerRun {
        processes: o.peers,
        concurrency: SESSION50,
        identity_url: sim.identity_url(),
        api_url: sim.api_url(),
        api_key: peer_key,
        terminals: &terminals,
        lib_version: LIB_VERSION,
        warmup: Duration::from_secs(2),
        window,
        dir: &ctx.dir,
    })
    .await;
    direct.window = o.session_seconds;
    let (b, p, bp) = (via_broker.summary(), direct.summary(), paced.summary());
    ctx.text.push_str(&format!(
        "\n## Side by side at {SESSION50} sessions in flight, L = {l} ms, {} s each, one simulator\n\n\
         | path | sessions/s | p50 / p90 / p99 / max ms | p50 − L | p99 − L | failures |\n|---|---|---|---|---|---|\n\
         | one broker, 1 client process | {:.0} | {} | {:.3} | {:.3} | {} |\n\
         | SDK per service, {} processes | {:.0} | {} | {:.3} | {:.3} | {} |\n\
         | one broker, paced (open loop) at the broker's closed-loop rate | {:.0} | {} | {:.3} | {:.3} | {} |\n\n\
         the broker's hop over the direct peer: p50 {:+.3} ms, p99 {:+.3} ms; \
         the simulator's timer answered L late by p50 {:.3} / p99 {:.3} ms during the broker's run\n",
        o.session_seconds,
        via_broker.rps(),
        b.cells(),
        b.p50 - l,
        b.p99 - l,
        via_broker.failures(),
        o.peers,
        direct.rps(),
        p.cells(),
        p.p50 - l,
        p.p99 - l,
        direct.failures(),
        paced.rps(),
        bp.cells(),
        bp.p50 - l,
        bp.p99 - l,
        paced.failures(),
        b.p50 - p.p50,
        b.p99 - p.p99,
        late.p50,
        late.p99,
    ));
    let out = &mut ctx.out;
    out.insert("session50_added_p50_ms".into(), json!(r3(b.p50 - l)));
    out.insert("session50_added_p99_ms".into(), json!(r3(b.p99 - l)));
    out.insert("session50_peer_added_p50_ms".into(), json!(r3(p.p50 - l)));
    out.insert("session50_peer_added_p99_ms".into(), json!(r3(p.p99 - l)));
    out.insert(
        "session50_over_peer_p50_ms".into(),
        json!(r3(b.p50 - p.p50)),
    );
    out.insert(
        "session50_over_peer_p99_ms".into(),
        json!(r3(b.p99 - p.p99)),
    );
    out.insert("session50_paced_added_p50_ms".into(), json!(r3(bp.p50 - l)));
    out.insert("session50_paced_added_p99_ms".into(), json!(r3(bp.p99 - l)));
    out.insert(
        "session50_failures".into(),
        json!(via_broker.failures() + direct.failures() + paced.failures()),
    );
}

/// Writes `secret` to a 0600 file in the work directory.
fn key_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .expect("write a key file");
    f.write_all(secret.as_bytes()).expect("write a key file");
    path
}

/// `credentials` keys in files, `per` terminals each, as sim accounts and TOML.
fn many_credentials(
    dir: &Path,
    tag: &str,
    credentials: usize,
    per: usize,
) -> (Vec<SimAccount>, String, Vec<String>) {
    let keys_dir = dir.join(format!("{tag}-keys"));
    std::fs::create_dir_all(&keys_dir).expect("key directory");
    let (mut accounts, mut toml, mut all) = (Vec::new(), String::new(), Vec::new());
    for c in 0..credentials {
        let key = format!("{tag}-api-key-{c:06}-0123456789");
        let terminals: Vec<String> = (0..per).map(|t| format!("{tag}{c:05}x{t:03}")).collect();
        let refs: Vec<&str> = terminals.iter().map(String::as_str).collect();
        accounts.push(SimAccount::new(&key, &refs));
        let file = key_file(&keys_dir, &format!("c{c}"), &key);
        toml.push_str(&format!(
            "[[credentials]]\nname = \"c{c}\"\napi_key_file = \"{}\"\nterminals = {terminals:?}\n",
            file.display()
        ));
        all.extend(terminals);
    }
    (accounts, toml, all)
}

/// `calls` GetBearerToken at once across cold credentials.
async fn fanin(ctx: &mut Ctx) {
    let o = &ctx.opts;
    let (accounts, credentials, terminals) =
        many_credentials(&ctx.dir, "F", o.fanin_credentials, 2);
    let sim = start_sim(ctx, accounts).await;
    sim.faults().set_latency(
        SimEndpoint::Identity,
        Duration::from_millis(o.fanin_identity_latency_ms),
    );
    let broker = Broker::start(
        &ctx.bin,
        ctx.flags,
        &ctx.dir,
        Setup {
            name: "fanin",
            // Cold: no warm start (first fetches put off by up to a day),
            // serving at once. The server-wide bound is raised so every call
            // is in flight at once (streams per connection stay at the default).
            server: format!(
                "warm_start_timeout = \"0s\"\nmax_in_flight_requests = {}",
                2 * o.fanin_calls
            ),
            rest: payroc_toml(&sim, "warm_start_spread = \"24h\"", &credentials),
            env: vec![(CALLER_ENV.into(), CALLER_TOKEN.into())],
        },
    )
    .await;
    let before = sim.stats().identity_requests;
    let target = Target::connect(broker.addr, o.fanin_connections, CALLER_TOKEN, terminals).await;
    note(format!(
        "fanin: {} calls across {} cold credentials",
        o.fanin_calls, o.fanin_credentials
    ));
    let (s, took) = load::burst(&target, Rpc::Bearer, o.fanin_calls).await;
    let identity = sim.stats().identity_requests;
    let sum = s.summary();
    let (hwm, _) = broker.rss_kib();
    let _ = broker.stop();
    ctx.text.push_str(&format!(
        "\n## Fan-in: {} GetBearerToken at once across {} cold credentials, identity latency {} ms, {} connections\n\n\
         | identity requests | failures | all answered after | p50 / p90 / p99 / max ms | broker peak RSS |\n\
         |---|---|---|---|---|\n| {identity} (before: {before}) | {} {:?} | {:.1} ms | {} | {} KiB |\n",
        o.fanin_calls,
        o.fanin_credentials,
        o.fanin_identity_latency_ms,
        o.fanin_connections,
        s.failures(),
        s.errors,
        took.as_secs_f64() * 1e3,
        sum.cells(),
        hwm,
    ));
    let out = &mut ctx.out;
    out.insert("fanin_calls".into(), json!(o.fanin_calls));
    out.insert("fanin_credentials".into(), json!(o.fanin_credentials));
    out.insert("fanin_identity_requests".into(), json!(identity));
    out.insert("fanin_failures".into(), json!(s.failures()));
    out.insert("fanin_errors".into(), json!(s.errors));
    out.insert("fanin_ms".into(), json!(r3(took.as_secs_f64() * 1e3)));
    out.insert("fanin_latency".into(), sum.json());
}

/// RSS with many terminals under many warm credentials, after traffic.
async fn scale(ctx: &mut Ctx) {
    let o = &ctx.opts;
    let per = o.scale_terminals.div_ceil(o.scale_credentials.max(1));
    let (accounts, credentials, terminals) =
        many_credentials(&ctx.dir, "S", o.scale_credentials, per);
    let sim = start_sim(ctx, accounts).await;
    note(format!(
        "scale: {} terminals under {} credentials: warm start",
        terminals.len(),
        o.scale_credentials
    ));
    let sessions = 256;
    let broker = Broker::start(
        &ctx.bin,
        ctx.flags,
        &ctx.dir,
        Setup {
            name: "scale",
            // SERVING once every credential has its first token.
            server: "warm_start_timeout = \"170s\"".into(),
            rest: payroc_toml(
                &sim,
                &format!(
                    "max_concurrent_sessions = {sessions}\nmax_concurrent_sessions_per_caller = {sessions}"
                ),
                &credentials,
            ),
            env: vec![(CALLER_ENV.into(), CALLER_TOKEN.into())],
        },
    )
    .await;
    let warm = broker.rss_kib();
    let warm_identity = sim.stats().identity_requests;
    let target = Target::connect(broker.addr, 4, CALLER_TOKEN, terminals.clone()).await;
    // Every terminal twice, then one session per credential.
    let bearer = load::sweep(&target, Rpc::Bearer, 2 * terminals.len(), 256).await;
    let one_per_credential: Vec<String> = terminals.iter().step_by(per).cloned().collect();
    let target = Target::connect(broker.addr, 4, CALLER_TOKEN, one_per_credential.clone()).await;
    let session = load::sweep(&target, Rpc::Session, one_per_credential.len(), 64).await;
    let (hwm, rss) = broker.rss_kib();
    let _ = broker.stop();
    let distinct: BTreeSet<&String> = terminals.iter().collect();
    ctx.text.push_str(&format!(
        "\n## Scale: {} terminals under {} warm credentials\n\n\
         | identity requests at warm start | RSS when warm | GetBearerToken calls (failures) | CreateSession calls (failures) | RSS after | peak RSS |\n\
         |---|---|---|---|---|---|\n| {warm_identity} | {} KiB | {} ({}) | {} ({}) | {rss} KiB | {hwm} KiB |\n",
        distinct.len(),
        o.scale_credentials,
        warm.1,
        bearer.ok() + bearer.failures(),
        bearer.failures(),
        session.ok() + session.failures(),
        session.failures(),
    ));
    let out = &mut ctx.out;
    out.insert("scale_terminals".into(), json!(distinct.len()));
    out.insert("scale_credentials".into(), json!(o.scale_credentials));
    out.insert(
        "scale_failures".into(),
        json!(bearer.failures() + session.failures()),
    );
    out.insert(
        "scale_warm_rss_mb".into(),
        json!(r3(warm.1 as f64 / 1024.0)),
    );
    out.insert("peak_rss_mb".into(), json!(r3(hwm as f64 / 1024.0)));
}

fn conditions(ctx: &mut Ctx, load_start: f64, load_end: f64) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let out = &mut ctx.out;
    out.insert("cores".into(), json!(cores));
    out.insert("load_avg_start".into(), json!(load_start));
    out.insert("load_avg_end".into(), json!(load_end));
    out.insert("log_format_flag".into(), json!(ctx.flags.log_format));
    out.insert("quick".into(), json!(ctx.opts.quick));
    ctx.text.push_str(&format!(
        "\nconditions: {cores} cores; 1-minute load average {load_start:.2} at the start, {load_end:.2} at the end; \
         broker {}; --log-format json {}\n",
        ctx.bin.display(),
        if ctx.flags.log_format { "passed" } else { "not supported by this build (config log_format = \"json\" set)" },
    ));
}

/// The issue's targets, checked against this run.
fn targets(ctx: &mut Ctx) {
    let get = |k: &str| ctx.out.get(k).and_then(Value::as_f64);
    let o = &ctx.opts;
    let mut t = Map::new();
    let mut check = |name: &str, ok: Option<bool>| {
        if let Some(ok) = ok {
            t.insert(name.into(), json!(ok));
        }
    };
    // A collector that is down or slow must not fail a call.
    check("otlp_failures", get("otlp_failures").map(|n| n == 0.0));
    check(
        "bearer_over_noop",
        get("bearer_over_noop").map(|r| r >= 0.85),
    );
    check(
        "bearer_instr_over_noop",
        get("bearer_instr_over_noop").map(|r| r <= 1.2),
    );
    check(
        "bearer_p99_ms",
        get("bearer_p99_ms").map(|p| p <= 1.0 && o.paced_rate.is_none()),
    );
    // At 500 in flight the two cores are the limit (BENCHMARKS.md): the
    // session figures there are reported, not judged. At 50 in flight the
    // broker's hop over the direct peer is.
    let at_spec = o.session_latency_ms == 50;
    check(
        "session50_over_peer_p50_ms",
        get("session50_over_peer_p50_ms").map(|p| p <= 0.3 && at_spec),
    );
    check(
        "session50_over_peer_p99_ms",
        get("session50_over_peer_p99_ms").map(|p| p <= 1.5 && at_spec),
    );
    let watch_spec = o.watch_streams == 10_000 && get("watch_failures") == Some(0.0);
    check(
        "watch_kib_per_stream",
        get("watch_kib_per_stream").map(|k| k <= 8.0 && watch_spec),
    );
    check(
        "watch_delivery_p99_ms",
        get("watch_delivery_p99_ms").map(|p| p <= 100.0 && watch_spec),
    );
    check(
        "session_upstream_connections",
        get("session_upstream_connections").map(|c| {
            c <= (o.session_concurrency + 1) as f64 && get("session_failures") == Some(0.0)
        }),
    );
    let fanin_spec = o.fanin_calls == 10_000 && o.fanin_credentials == 100;
    check(
        "fanin",
        get("fanin_identity_requests").map(|n| {
            n == o.fanin_credentials as f64 && get("fanin_failures") == Some(0.0) && fanin_spec
        }),
    );
    let scale_spec = o.scale_terminals == 10_000 && o.scale_credentials == 1_000;
    check(
        "peak_rss_mb",
        get("peak_rss_mb").map(|m| m <= 32.0 && scale_spec && get("scale_failures") == Some(0.0)),
    );
    let all = t.values().all(|v| v == &json!(true));
    ctx.text
        .push_str(&format!("\ntargets: {}\n", Value::Object(t.clone())));
    ctx.out.insert("targets".into(), Value::Object(t));
    ctx.out.insert("all_targets_met".into(), json!(all));
}
