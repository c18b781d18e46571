//! The `payroc-broker` command line. All logic lives in the library; this file
//! parses arguments, sets up logging and maps failures to exit codes
//! (2: configuration or usage, 1: runtime).

use std::{
    io::Write, net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration,
};

use clap::{Parser, Subcommand, ValueEnum};
use futures_util::StreamExt;
use payroc_broker::{
    app::probe::{self, Probe},
    app::reload,
    app::server,
    clock::{Clock, OsEntropy, SharedEntropy},
    config::{self, CONFIG_ENV, CapturedEnv, Config, LogFormat},
    obs::logging,
    transport,
};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "payroc-broker",
    version,
    about = "gRPC credentials broker for Payroc's Bearer and Hosted Fields session tokens"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the TokenBroker gRPC API.
    Serve {
        /// Configuration file (TOML).
        #[arg(long, env = CONFIG_ENV)]
        config: PathBuf,
        /// Listen address, overriding `server.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Serve without `[[callers]]`: anyone who can reach the port gets tokens.
        #[arg(long)]
        allow_unauthenticated: bool,
        /// Log line format, overriding `server.log_format`.
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
        /// How often to look for changes to the configuration file, the
        /// `api_key_file`s and the `[server.tls]` files (a change reloads, as
        /// SIGHUP does); 0s: only on SIGHUP.
        #[arg(long, default_value = "5s", value_name = "DUR", value_parser = humantime::parse_duration)]
        watch_interval: Duration,
    },
    /// Serve against a built-in simulated Payroc with demo terminals (not in
    /// builds without the `sandbox` feature).
    Sandbox {
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Where the Payroc-compatible identity endpoint (for the official
        /// SDKs) listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        identity_listen: SocketAddr,
        /// Serve Prometheus `/metrics` here too (as `server.metrics_listen`);
        /// off by default.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<SocketAddr>,
        /// Serve TLS with a throwaway CA made at start-up; the one caller is
        /// the client certificate written next to it (paths are printed).
        #[arg(long)]
        tls: bool,
        /// Where `--tls` writes its certificates and keys (default: a new
        /// directory under the system's temporary directory).
        #[arg(long, value_name = "DIR", requires = "tls")]
        tls_dir: Option<PathBuf>,
        /// Log line format.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormatArg,
    },
    /// Validate a configuration (secrets readable, URLs allowed) without contacting Payroc.
    CheckConfig {
        #[arg(long, env = CONFIG_ENV)]
        config: PathBuf,
    },
    /// Check a running broker once (grpc.health.v1): exit 0 when SERVING, 1 otherwise.
    Health {
        /// The broker's address: HOST:PORT, or an http:// or https:// URL.
        #[arg(long, default_value = probe::DEFAULT_ADDR)]
        addr: String,
        /// Health service name: "" (overall), "payroc.broker.v1.TokenBroker",
        /// or "payroc.broker.v1.TokenBroker/<credential>".
        #[arg(long, default_value = "")]
        service: String,
        /// Connect with TLS, trusting only the CA certificates in this PEM file.
        #[arg(long, value_name = "FILE")]
        tls_ca: Option<PathBuf>,
        /// The name the server certificate must carry, when it is not the
        /// address's host (e.g. probing 127.0.0.1 inside a pod).
        #[arg(long, value_name = "NAME")]
        tls_server_name: Option<String>,
        /// Time limit for the whole check, connecting included (e.g. 500ms, 3s).
        #[arg(long, default_value = "5s", value_name = "DUR", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

/// `--log-format`.
#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(f: LogFormatArg) -> Self {
        match f {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

fn main() -> ExitCode {
    let dumps_off = disable_core_dumps();
    let cli = Cli::parse();
    // `serve` reads the secret variables its file names now, while this is
    // the only thread (no logging worker, no runtime yet), and removes them
    // from the environment. Problems are reported by the load below, once
    // logging is up; this first load only captures (and finds the log
    // format).
    let env = CapturedEnv::new();
    let mut log_format = LogFormat::Text;
    if let Command::Serve {
        config,
        log_format: flag,
        ..
    } = &cli.command
    {
        let first = Config::load_with(config, &env);
        log_format = match (flag, &first) {
            (Some(f), _) => (*f).into(),
            (None, Ok(c)) => c.server.log_format,
            (None, Err(_)) => LogFormat::Text,
        };
        let block = initial_env_block();
        for name in env.names() {
            // SAFETY: no other thread exists: `main` has spawned nothing
            // (logging and the tokio runtime start below), and neither clap
            // nor the configuration parser starts threads.
            unsafe { remove_secret_var(&name, block.clone()) };
        }
    }
    if let Command::Sandbox { log_format: f, .. } = &cli.command {
        log_format = (*f).into();
    }
    // Flushes queued log lines when main returns.
    let _log_guard = logging::init(log_format);
    if !dumps_off {
        tracing::warn!("could not turn off core dumps (prctl PR_SET_DUMPABLE)");
    }
    match cli.command {
        Command::Health {
            addr,
            service,
            tls_ca,
            tls_server_name,
            timeout,
        } => health(Probe::new(
            &addr,
            &service,
            tls_ca.as_deref(),
            tls_server_name.as_deref(),
            timeout,
        )),
        Command::CheckConfig { config } => match Config::load(&config, &config::process_env) {
            Ok(c) => {
                if let Err(e) = check_tls(&config, &c) {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
                // Warnings do not fail the check (exit status stays 0).
                for w in c.warnings() {
                    eprintln!("warning: {}: {w}", config.display());
                }
                let terminals: usize = c.credentials.iter().map(|c| c.terminals.len()).sum();
                println!(
                    "{}: OK ({} credentials, {terminals} terminals, {} callers)",
                    config.display(),
                    c.credentials.len(),
                    c.callers.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&e),
        },
        Command::Serve {
            config: path,
            listen,
            allow_unauthenticated,
            log_format: _,
            watch_interval,
        } => {
            let policy = ServePolicy {
                path,
                listen,
                allow_unauthenticated,
                env,
                watch_interval,
            };
            let c = match policy.load() {
                Ok(c) => c,
                Err(lines) => {
                    for l in lines {
                        eprintln!("error: {l}");
                    }
                    return ExitCode::from(2);
                }
            };
            run(async move { Ok((c, None, Some(policy))) })
        }
        Command::Sandbox {
            listen,
            identity_listen,
            metrics_listen,
            tls,
            tls_dir,
            ..
        } => sandbox(
            listen,
            identity_listen,
            metrics_listen,
            tls.then(|| tls_dir.unwrap_or_else(default_tls_dir)),
        ),
    }
}

/// The running simulator of `sandbox`, kept alive while serving.
#[cfg(feature = "sandbox")]
type SandboxHandle = payroc_broker::app::sandbox::Sandbox;
/// Built without the simulator: there never is one.
#[cfg(not(feature = "sandbox"))]
type SandboxHandle = std::convert::Infallible;

/// Per process, so two sandboxes never share (or overwrite) their keys.
fn default_tls_dir() -> PathBuf {
    std::env::temp_dir().join(format!("payroc-broker-sandbox-{}", std::process::id()))
}

#[cfg(feature = "sandbox")]
fn sandbox(
    listen: SocketAddr,
    identity_listen: SocketAddr,
    metrics_listen: Option<SocketAddr>,
    tls_dir: Option<PathBuf>,
) -> ExitCode {
    run(async move {
        let entropy: SharedEntropy = Arc::new(OsEntropy);
        let sandbox = SandboxHandle::start_with(
            listen,
            identity_listen,
            metrics_listen,
            Clock::system(),
            entropy,
            tls_dir.as_deref(),
        )
        .await?;
        Ok((sandbox.config.clone(), Some(sandbox), None))
    })
}

/// Production builds (`--no-default-features`) carry no simulated Payroc.
#[cfg(not(feature = "sandbox"))]
fn sandbox(
    _listen: SocketAddr,
    _identity: SocketAddr,
    _metrics: Option<SocketAddr>,
    _tls_dir: Option<PathBuf>,
) -> ExitCode {
    eprintln!(
        "error: this payroc-broker was built without the `sandbox` feature, so it has no \
         simulated Payroc; use a build with default features to try it out"
    );
    ExitCode::from(2)
}

#[cfg(feature = "sandbox")]
fn instructions(sandbox: &SandboxHandle, addr: SocketAddr, identity: SocketAddr) -> String {
    sandbox.instructions(addr, identity)
}

#[cfg(not(feature = "sandbox"))]
fn instructions(sandbox: &SandboxHandle, _addr: SocketAddr, _identity: SocketAddr) -> String {
    match *sandbox {}
}

/// How `serve` turns the configuration file into a running configuration,
/// at start-up and again on each reload (SIGHUP, or a changed file).
struct ServePolicy {
    path: PathBuf,
    listen: Option<SocketAddr>,
    allow_unauthenticated: bool,
    /// The secret variables as read at start-up: they are no longer in the
    /// environment when a SIGHUP reload needs them again.
    env: CapturedEnv,
    /// How often the configuration's files are looked at (zero: never).
    watch_interval: Duration,
}

impl ServePolicy {
    /// The validated configuration, or the lines explaining why not.
    fn load(&self) -> Result<Config, Vec<String>> {
        let mut c = Config::load_with(&self.path, &self.env)
            .map_err(|e| e.to_string().lines().map(str::to_owned).collect::<Vec<_>>())?;
        check_tls(&self.path, &c).map_err(|e| vec![e])?;
        if c.callers.is_empty() && !self.allow_unauthenticated {
            return Err(vec![format!(
                "{}: no [[callers]] are configured, so anyone who can reach the port would get \
                 Payroc tokens; add [[callers]] or pass --allow-unauthenticated",
                self.path.display()
            )]);
        }
        if let Some(addr) = self.listen {
            c.server.listen = addr;
        }
        for warning in c.warnings() {
            tracing::warn!(file = %self.path.display(), %warning, "configuration warning");
        }
        Ok(c)
    }

    /// Re-reads the file on every SIGHUP and whenever one of its files
    /// changes; valid configurations flow out, an invalid one is logged and
    /// dropped (the running one keeps serving).
    fn reloads(
        self,
        current: &Config,
    ) -> std::io::Result<impl futures_util::Stream<Item = Config> + use<>> {
        use tokio::signal::unix::{SignalKind, signal};
        // Installed before serving starts: SIGHUP's default action is to exit.
        let hangups = signal(SignalKind::hangup())?;
        let hangups = futures_util::stream::unfold(hangups, |mut s| async move {
            s.recv().await.map(|()| ((), s))
        });
        let (path, poll) = (self.path.clone(), Some(self.watch_interval));
        Ok(reload::reloads(
            path,
            current,
            move || self.load(),
            hangups,
            poll,
        ))
    }
}

/// Builds the runtime, binds, serves until SIGTERM/SIGINT.
type Prepared = (Config, Option<SandboxHandle>, Option<ServePolicy>);

fn run(prepare: impl Future<Output = Result<Prepared, String>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let (config, sandbox, policy) = match prepare.await {
            Ok(v) => v,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        // Every port is bound before anything is printed, so the printed
        // addresses are the real ones (port 0 included).
        let bind = async |addr: SocketAddr, key: &str| {
            TcpListener::bind(addr).await.map_err(|e| {
                eprintln!("error: cannot listen on {addr} ({key}): {e}");
                ExitCode::FAILURE
            })
        };
        let listener = match bind(config.server.listen, "server.listen").await {
            Ok(l) => l,
            Err(code) => return code,
        };
        let metrics = match config.server.metrics_listen {
            None => None,
            Some(addr) => match bind(addr, "server.metrics_listen").await {
                Ok(l) => Some(l),
                Err(code) => return code,
            },
        };
        let identity = match &config.identity_endpoint {
            None => None,
            Some(endpoint) => match bind(endpoint.listen, "identity_endpoint.listen").await {
                Ok(l) => Some(l),
                Err(code) => return code,
            },
        };
        if let Some(sandbox) = &sandbox {
            let addr = listener.local_addr().unwrap_or(config.server.listen);
            let identity_addr = identity
                .as_ref()
                .and_then(|l| l.local_addr().ok())
                .unwrap_or(addr);
            // Not println!: it panics if stdout is already closed.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", instructions(sandbox, addr, identity_addr))
                .and_then(
                    |()| match metrics.as_ref().and_then(|l| l.local_addr().ok()) {
                        // After the instructions, so their first line stays the
                        // one naming the gRPC address.
                        Some(m) => writeln!(out, "Prometheus metrics URL http://{m}/metrics"),
                        None => Ok(()),
                    },
                )
                .and_then(|()| out.flush());
        }
        let reloads = match policy.map(|p| p.reloads(&config)).transpose() {
            Ok(Some(r)) => r.left_stream(),
            Ok(None) => futures_util::stream::pending().right_stream(),
            Err(e) => {
                eprintln!("error: cannot install the SIGHUP handler: {e}");
                return ExitCode::FAILURE;
            }
        };
        let entropy: SharedEntropy = Arc::new(OsEntropy);
        let listeners = server::Listeners {
            grpc: listener,
            metrics,
            identity,
        };
        match server::serve_on(
            listeners,
            &config,
            Clock::system(),
            entropy,
            server::shutdown_signal(),
            reloads,
        )
        .await
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Runs one health check; prints the status on stdout, or why there is
/// none on stderr.
fn health(probe: Result<Probe, probe::UsageError>) -> ExitCode {
    let probe = match probe {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(probe.check());
    match &outcome {
        probe::Outcome::Failed(_) => eprintln!("error: {outcome}"),
        _ => {
            // Not println!: it panics if stdout is already closed.
            let _ = writeln!(std::io::stdout(), "status: {outcome}");
        }
    }
    ExitCode::from(outcome.exit_code())
}

/// The `[server.tls]` files parse and fit together; a configuration error
/// (exit 2) naming the key and file otherwise.
fn check_tls(path: &std::path::Path, c: &Config) -> Result<(), String> {
    match &c.server.tls {
        None => Ok(()),
        Some(tls) => transport::tls::load(tls).map(drop).map_err(|e| {
            format!(
                "{}: {}: {}: {}",
                path.display(),
                e.key,
                e.file.display(),
                e.reason
            )
        }),
    }
}

fn config_error(e: &config::ConfigError) -> ExitCode {
    for line in e.to_string().lines() {
        eprintln!("error: {line}");
    }
    ExitCode::from(2)
}

/// Where the kernel put the environment at exec (`env_start`..`env_end` of
/// `/proc/self/stat`): what `/proc/PID/environ` shows for the whole life of
/// the process, whatever `environ` points to later.
fn initial_env_block() -> Option<std::ops::Range<usize>> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces and parentheses)
    // start at field 3; env_start and env_end are fields 50 and 51.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(47);
    let start = fields.next()?.parse().ok()?;
    let end = fields.next()?.parse().ok()?;
    (start < end).then_some(start..end)
}

/// Removes `name` from the environment and, when its `NAME=value` string is
/// in the initial environment block, overwrites it with zeros: unsetting
/// only unlinks it from `environ`, while `/proc/PID/environ` reads the block.
///
/// # Safety
///
/// No other thread may exist (none may read or write the environment).
unsafe fn remove_secret_var(name: &str, block: Option<std::ops::Range<usize>>) {
    let Ok(c_name) = std::ffi::CString::new(name) else {
        return;
    };
    // SAFETY: `c_name` is NUL-terminated; single-threaded per the contract.
    let value = unsafe { libc::getenv(c_name.as_ptr()) }.cast::<u8>();
    let entry = (!value.is_null()).then(|| {
        // SAFETY: `value` points to a NUL-terminated string (getenv).
        let len = unsafe { libc::strlen(value.cast()) };
        (value.wrapping_sub(name.len() + 1), name.len() + 1 + len)
    });
    // SAFETY: single-threaded per the contract.
    unsafe { std::env::remove_var(name) };
    let (Some((start, len)), Some(block)) = (entry, block) else {
        return;
    };
    let (first, end) = (start as usize, start as usize + len);
    if first < block.start || end > block.end {
        return; // set by the process itself, not from the block: leave it
    }
    // SAFETY: `start..start + len` lies inside the initial environment block,
    // which is ordinary writable memory of this process (the top of the main
    // thread's stack), and nothing refers to this entry any more: it was just
    // unlinked from `environ`, and Rust's `std::env` holds no copies. This is
    // how setproctitle(3) implementations reuse the same area.
    unsafe {
        let entry = std::slice::from_raw_parts_mut(start, len);
        if entry.starts_with(name.as_bytes()) && entry[name.len()] == b'=' {
            entry.fill(0);
        }
    }
}

/// Marks the process non-dumpable: no core dump (which would hold API keys
/// and tokens), and no ptrace or `/proc/PID/{mem,environ}` for other users
/// of the same uid. Returns whether it worked.
#[cfg(target_os = "linux")]
fn disable_core_dumps() -> bool {
    // SAFETY: PR_SET_DUMPABLE takes one integer argument and touches no
    // memory of ours; the unused arguments are zero as the man page asks.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn disable_core_dumps() -> bool {
    true
}
