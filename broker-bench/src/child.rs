//! The broker under test: the release `payroc-broker` binary as a child
//! process, configured as in production, its stderr going to a file.

use std::{
    ffi::OsString,
    fs::File,
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client};

use crate::stats;

/// Finds the release `payroc-broker` binary: `--broker` if given, otherwise
/// whatever `cargo build --release -p payroc-broker --bin payroc-broker`
/// produces (a no-op when it is up to date), so a fresh clone needs nothing
/// built beforehand.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return match path.is_file() {
            true => Ok(path.to_owned()),
            false => Err(format!("--broker {}: no such file", path.display())),
        };
    }
    // `cargo run` sets CARGO to the cargo that runs us.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The workspace root, whose package is the broker.
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    // The production feature set, as the Dockerfile builds it: no sandbox,
    // trace export compiled in (and configured only by the `otlp` scenario).
    eprintln!(
        "broker-bench: cargo build --release -p payroc-broker --no-default-features --features otlp --bin payroc-broker"
    );
    let output = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "payroc-broker",
            "--no-default-features",
            "--features",
            "otlp",
            "--bin",
            "payroc-broker",
            "--message-format=json-render-diagnostics",
            "--manifest-path",
            manifest,
        ])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !output.status.success() {
        return Err(format!("cargo build failed ({})", output.status));
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "payroc-broker")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| "cargo built no payroc-broker executable".to_owned())
}

/// What the binary's `serve` accepts beyond the configuration file.
#[derive(Clone, Copy, Debug)]
pub struct Flags {
    /// `--log-format json` exists.
    pub log_format: bool,
    /// Built with the `otlp` feature: `[telemetry] otlp_endpoint` is taken.
    pub otlp: bool,
}

impl Flags {
    pub fn detect(bin: &Path, dir: &Path) -> Flags {
        let help = Command::new(bin)
            .args(["serve", "--help"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        // check-config names the missing feature when the build lacks it
        // (and other problems of this deliberately incomplete file).
        let probe = dir.join("otlp-probe.toml");
        std::fs::write(
            &probe,
            "[telemetry]\notlp_endpoint = \"http://127.0.0.1:4317\"\n",
        )
        .expect("write the probe configuration");
        let check = Command::new(bin)
            .arg("check-config")
            .arg("--config")
            .arg(&probe)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default();
        Flags {
            log_format: help.contains("--log-format"),
            otlp: !check.contains("no OTLP exporter"),
        }
    }
}

/// `program`, run by `launcher` when there is one (valgrind runs its program
/// in its own process, so the child's pid stays the server's).
fn command(launcher: &[OsString], program: &std::ffi::OsStr) -> Command {
    match launcher.split_first() {
        None => Command::new(program),
        Some((first, rest)) => {
            let mut cmd = Command::new(first);
            cmd.args(rest).arg(program);
            cmd
        }
    }
}

/// A free loopback port (bound, read, released: another process could take
/// it in between, which on a bench machine it does not).
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local address")
}

/// One broker process.
pub struct Broker {
    child: Option<Child>,
    pub pid: u32,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    /// The identity endpoint (`[identity_endpoint]`), for `/authorize`.
    pub identity: SocketAddr,
    pub log: PathBuf,
}

/// What the configuration file holds besides the listeners and log format.
pub struct Setup<'a> {
    /// A name for the files in the work directory.
    pub name: &'a str,
    /// Extra `[server]` lines.
    pub server: String,
    /// `[payroc]` and the tables after it (`[[credentials]]`, `[[callers]]`).
    pub rest: String,
    /// Environment variables holding secrets.
    pub env: Vec<(String, String)>,
}

impl Broker {
    /// Starts the broker and waits until its health check says SERVING
    /// (every credential's first token fetched, or the warm-start timeout).
    pub async fn start(bin: &Path, flags: Flags, dir: &Path, setup: Setup<'_>) -> Broker {
        Broker::start_under(&[], bin, flags, dir, setup).await
    }

    /// [`Broker::start`], the binary run by `launcher` (a command and its
    /// arguments, such as valgrind's) when that is not empty.
    pub async fn start_under(
        launcher: &[OsString],
        bin: &Path,
        flags: Flags,
        dir: &Path,
        setup: Setup<'_>,
    ) -> Broker {
        let (addr, metrics, identity) = (free_addr(), free_addr(), free_addr());
        let config = format!(
            "[server]\nlisten = \"{addr}\"\nlog_format = \"json\"\nmetrics_listen = \"{metrics}\"\n{}\n\
             [identity_endpoint]\nlisten = \"{identity}\"\n{}",
            setup.server, setup.rest
        );
        let config_path = dir.join(format!("{}.toml", setup.name));
        std::fs::write(&config_path, config).expect("write the configuration");
        let log = dir.join(format!("{}.log", setup.name));
        let mut cmd = command(launcher, bin.as_os_str());
        cmd.arg("serve").arg("--config").arg(&config_path);
        if flags.log_format {
            cmd.args(["--log-format", "json"]);
        }
        // Production logging: the default level, to a file.
        cmd.env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create the log file"));
        for (k, v) in &setup.env {
            cmd.env(k, v);
        }
        Broker::launch(cmd, addr, metrics, identity, log).await
    }

    /// The stock tonic health server (`broker-bench floor-server`), run by
    /// `launcher`, as a [`Broker`] with only `addr` and `log` meaningful.
    pub async fn floor(launcher: &[OsString], dir: &Path) -> Broker {
        let addr = free_addr();
        let log = dir.join("floor.log");
        let exe = std::env::current_exe().expect("the bench's own executable");
        let mut cmd = command(launcher, exe.as_os_str());
        cmd.arg("floor-server")
            .arg("--listen")
            .arg(addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create the log file"));
        Broker::launch(cmd, addr, addr, addr, log).await
    }

    async fn launch(
        mut cmd: Command,
        addr: SocketAddr,
        metrics: SocketAddr,
        identity: SocketAddr,
        log: PathBuf,
    ) -> Broker {
        let child = cmd.spawn().expect("start the server");
        let pid = child.id();
        let broker = Broker {
            child: Some(child),
            pid,
            addr,
            metrics,
            identity,
            log,
        };
        broker.wait_serving(Duration::from_secs(180)).await;
        broker
    }

    async fn wait_serving(&self, bound: Duration) {
        let start = Instant::now();
        let url = format!("http://{}", self.addr);
        while start.elapsed() < bound {
            if let Ok(channel) = Channel::from_shared(url.clone()).unwrap().connect().await {
                let mut health = health_client::HealthClient::new(channel);
                let check = health.check(HealthCheckRequest {
                    service: String::new(),
                });
                if let Ok(answer) = check.await
                    && answer.get_ref().status == ServingStatus::Serving as i32
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "the broker did not report SERVING within {bound:?}; see {}",
            self.log.display()
        );
    }

    /// Peak and current RSS, in KiB.
    pub fn rss_kib(&self) -> (u64, u64) {
        stats::rss_kib(self.pid)
    }

    pub fn cpu_seconds(&self) -> f64 {
        stats::cpu_seconds(self.pid)
    }

    /// SIGTERM, then waits (10 s at most, then SIGKILL).
    pub fn stop(mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: `pid` is our own child, not yet reaped.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Lines and bytes the broker has logged so far, and whether they are JSON.
    pub fn log_figures(&self) -> LogFigures {
        let bytes = std::fs::metadata(&self.log).map_or(0, |m| m.len());
        let (mut lines, mut json) = (0, 0);
        if let Ok(f) = File::open(&self.log) {
            for line in BufReader::new(f).lines().map_while(Result::ok) {
                lines += 1;
                json += u64::from(line.starts_with('{'));
            }
        }
        LogFigures { lines, json, bytes }
    }

    /// Fetches `/metrics`; `None` when nothing answers there.
    pub async fn scrape_metrics(&self) -> Option<String> {
        let client = reqwest::Client::builder().no_proxy().build().ok()?;
        let answer = client
            .get(format!("http://{}/metrics", self.metrics))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        if !answer.status().is_success() {
            return None;
        }
        answer.text().await.ok()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // Never leave a broker behind when the bench panics.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub struct LogFigures {
    pub lines: u64,
    pub json: u64,
    pub bytes: u64,
}
