//! Instructions per call, counted by valgrind's callgrind: the steering
//! figure on a shared machine, where time moves by half from run to run and
//! instruction counts do not.
//!
//! A server runs under `valgrind --tool=callgrind` (its whole process: every
//! thread, the log writer included). For each kind of call the bench sends a
//! warm-up, zeroes the counters (`callgrind_control --zero`), sends N calls,
//! lets the server go idle, and dumps (`callgrind_control --dump`): the
//! dump's total divided by N is the cost per call, everything the server does
//! for it included (h2, tonic, the handler, the audit line and its write,
//! metrics, timers that fire meanwhile).

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

/// Whether valgrind (with callgrind_control) can be run here.
pub fn available() -> Result<(), String> {
    for tool in ["valgrind", "callgrind_control"] {
        let ok = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(format!("`{tool}` is not installed (Debian: valgrind)"));
        }
    }
    Ok(())
}

/// The command prefix that runs a program under callgrind, its profile
/// written to `out` (and `out.1`, `out.2`, ... at each dump).
pub fn launcher(out: &Path) -> Vec<OsString> {
    let mut file = OsString::from("--callgrind-out-file=");
    file.push(out);
    vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        // Counts only: no per-instruction or jump data, less to write.
        "--dump-instr=no".into(),
        "--collect-jumps=no".into(),
        // The dumps are read, not valgrind's chatter.
        "--quiet".into(),
        file,
    ]
}

/// A process under callgrind.
pub struct Counter {
    pid: u32,
    out: PathBuf,
    dumps: u32,
}

impl Counter {
    pub fn new(pid: u32, out: &Path) -> Counter {
        Counter {
            pid,
            out: out.to_owned(),
            dumps: 0,
        }
    }

    fn control(&self, arg: &str) {
        let status = Command::new("callgrind_control")
            .arg(arg)
            .arg(self.pid.to_string())
            .stdout(Stdio::null())
            // vgdb's "sending command ..." on every call.
            .stderr(Stdio::null())
            .status()
            .expect("run callgrind_control");
        assert!(status.success(), "callgrind_control {arg} failed");
    }

    /// Zeroes the counters: what runs from now on is measured.
    pub fn zero(&self) {
        self.control("--zero");
    }

    /// Instructions since the last [`Self::zero`] (or dump), after `settle`
    /// for the server to finish what the calls left (log lines still
    /// gathering in the writer, for one).
    pub async fn take(&mut self, settle: Duration) -> u64 {
        tokio::time::sleep(settle).await;
        self.control("--dump");
        self.dumps += 1;
        let path = PathBuf::from(format!("{}.{}", self.out.display(), self.dumps));
        // callgrind writes the dump before it answers; wait for the file all
        // the same, a slow machine is no reason to fail.
        for _ in 0..200 {
            if let Some(n) = std::fs::read_to_string(&path).ok().and_then(|t| totals(&t)) {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no callgrind dump at {}", path.display());
    }
}

/// The `totals:` (or `summary:`) line of a callgrind profile: instructions.
fn totals(profile: &str) -> Option<u64> {
    profile
        .lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The stock tonic server the broker's own cost is compared with: tonic's
/// `Server` serving only `tonic-health` (SERVING), on the runtime
/// `#[tokio::main]` gives, as the broker's. No broker code. It runs until
/// killed (the bench sends SIGTERM).
pub fn floor_server(listen: &str) -> std::process::ExitCode {
    let addr: std::net::SocketAddr = match listen.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("broker-bench floor-server: --listen {listen}: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(service)
            .serve(addr)
            .await
            .expect("serve");
    });
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_are_read_from_a_dump() {
        let dump = "version: 1\ncreator: callgrind-3.19.0\npid: 7\ncmd: x\npart: 1\n\n\
                    events: Ir\nsummary: 123456\n\nfl=(1) a\nfn=(1) b\n0 5\n\ntotals: 123456\n";
        assert_eq!(totals(dump), Some(123_456));
        assert_eq!(totals("events: Ir\n"), None);
    }
}
