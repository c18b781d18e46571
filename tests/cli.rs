//! The binary as an operator runs it: exit codes, configuration errors on
//! stderr, and graceful shutdown on real signals.

mod common;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, ChildStderr, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use payroc_broker::{
    clock::{Clock, OsEntropy},
    proto::{GetBearerTokenRequest, token_broker_client::TokenBrokerClient},
};
use payroc_sim::{SimAccount, SimConfig, SimPayroc};

const BIN: &str = env!("CARGO_BIN_EXE_payroc-broker");

fn temp_config(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("payroc-broker-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn broker() -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("PAYROC_BROKER_CONFIG").env("RUST_LOG", "info");
    c
}

/// `check-config --config path`, with MINIMAL's API key in the environment
/// (a test may remove it or add more).
fn check_config(path: &std::path::Path) -> Command {
    let mut c = broker();
    c.args(["check-config", "--config"])
        .arg(path)
        .env("PAYROC_API_KEY_ACME", "secret-from-env-123");
    c
}

/// What a finished command said: its exit code and both streams as text.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run(command: &mut Command) -> Ran {
    let out = command.output().unwrap();
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

const MINIMAL: &str = r#"
[payroc]
identity_url = "http://127.0.0.1:9/authorize"
api_url = "http://127.0.0.1:9/v1"
[[credentials]]
name = "acme"
api_key_env = "PAYROC_API_KEY_ACME"
terminals = ["1234001", "1234002"]
"#;

#[test]
fn check_config_names_the_file_the_key_and_the_reason() {
    let path = temp_config("missing-env.toml", MINIMAL);
    let Ran { code, stderr, .. } = run(check_config(&path).env_remove("PAYROC_API_KEY_ACME"));
    assert_eq!(code, Some(2));
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(
        stderr.contains(
            "credentials[0].api_key_env: the environment variable `PAYROC_API_KEY_ACME` is not set"
        ),
        "{stderr}"
    );

    let Ran {
        code,
        stdout,
        stderr,
    } = run(&mut check_config(&path));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("OK (1 credentials, 2 terminals, 0 callers)"),
        "{stdout}"
    );
    assert!(!stdout.contains("secret-from-env-123"));
    assert!(!stderr.contains("secret-from-env-123"));
}

#[test]
fn the_config_path_can_come_from_the_environment() {
    let path = temp_config(
        "from-env.toml",
        &MINIMAL.replace("[payroc]", "[payroc]\nbogus = 1"),
    );
    let Ran { code, stderr, .. } = run(broker()
        .arg("check-config")
        .env("PAYROC_BROKER_CONFIG", &path)
        .env("PAYROC_API_KEY_ACME", "k-123456"));
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("payroc.bogus: unknown field `bogus`"),
        "{stderr}"
    );
}

#[test]
fn an_unreadable_config_is_exit_2() {
    let Ran { code, stderr, .. } = run(&mut check_config("/nonexistent/broker.toml".as_ref()));
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("/nonexistent/broker.toml: cannot read"),
        "{stderr}"
    );
}

#[test]
fn serve_refuses_to_run_open_without_the_flag() {
    let path = temp_config("open.toml", MINIMAL);
    let Ran { code, stderr, .. } = run(broker()
        .args(["serve", "--config"])
        .arg(&path)
        .env("PAYROC_API_KEY_ACME", "k-123456"));
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--allow-unauthenticated"), "{stderr}");
}

/// The address in the broker's "payroc-broker serving addr=..." log line.
fn serving_addr(line: &str) -> SocketAddr {
    let addr = line
        .split("addr=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next());
    addr.and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
}

/// Kills the child if a test fails half-way.
struct Running(Child);

impl Running {
    /// Starts `command` with its stdout to read (the sandbox's instructions)
    /// and stderr discarded.
    #[cfg(feature = "sandbox")]
    fn with_stdout(command: &mut Command) -> (Running, std::process::ChildStdout) {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        (Running(child), stdout)
    }

    /// Starts `command` with its stderr to read (the log) and stdout
    /// discarded.
    fn with_stderr(command: &mut Command) -> (Running, ChildStderr) {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        (Running(child), stderr)
    }
}
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Waits for the child to exit (bounded) and returns its code.
async fn exit_code(mut child: Running) -> Option<i32> {
    tokio::task::spawn_blocking(move || {
        for _ in 0..200 {
            if let Some(status) = child.0.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the broker did not exit within 10 s of the signal");
    })
    .await
    .unwrap()
}

/// Reads lines from a child's pipe until one contains `needle`, then closes
/// the pipe: the broker must carry on when its log reader goes away.
async fn line_with(pipe: impl std::io::Read + Send + 'static, needle: &'static str) -> String {
    lines_through(pipe, needle).await.pop().unwrap()
}

/// Every line up to and including the first that contains `needle`; then
/// the pipe is closed, as for [`line_with`].
async fn lines_through(
    pipe: impl std::io::Read + Send + 'static,
    needle: &'static str,
) -> Vec<String> {
    tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(pipe).lines() {
            match line {
                Ok(l) => {
                    let done = l.contains(needle);
                    seen.push(l);
                    if done {
                        return seen;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("the broker never printed `{needle}`")
    })
    .await
    .unwrap()
}

/// The URL after `label` in the sandbox's start-up text.
#[cfg(feature = "sandbox")]
fn printed_after<'a>(lines: &'a [String], label: &str) -> &'a str {
    lines
        .iter()
        .find_map(|l| l.trim().strip_prefix(label))
        .unwrap_or_else(|| panic!("no `{label}` line in {lines:?}"))
        .trim()
}

async fn call(addr: SocketAddr) -> String {
    let mut c = TokenBrokerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    c.get_bearer_token(GetBearerTokenRequest {
        processing_terminal_id: "1234001".into(),
        min_validity: None,
    })
    .await
    .unwrap()
    .into_inner()
    .credential
}

#[cfg(feature = "sandbox")]
#[tokio::test]
async fn sandbox_serves_and_stops_cleanly_on_sigterm() {
    let (child, stdout) = Running::with_stdout(
        broker()
            .args(["sandbox", "--listen", "127.0.0.1:0"])
            .args(["--identity-listen", "127.0.0.1:0"]),
    );
    let lines = lines_through(stdout, "identity URL").await;
    let first = &lines[0];
    // The identity endpoint answers at the printed URL, as an SDK calls it.
    let identity = printed_after(&lines, "identity URL");
    let answer: serde_json::Value = reqwest::Client::new()
        .post(format!("{identity}/authorize"))
        .header("x-api-key", "anything")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(answer["access_token"].is_string(), "{answer}");
    let addr: SocketAddr = first
        .split("gRPC on ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(call(addr).await, "demo");
    signal(&child.0, "-TERM");
    assert_eq!(exit_code(child).await, Some(0));
}

/// `sandbox --metrics-listen` serves the same `/metrics` as `serve` with
/// `server.metrics_listen`, at the URL it prints: what CI scrapes to check
/// the dashboard's and the alert rules' metric names.
#[cfg(feature = "sandbox")]
#[tokio::test]
async fn sandbox_serves_metrics_where_it_says() {
    let (child, stdout) = Running::with_stdout(broker().args([
        "sandbox",
        "--listen",
        "127.0.0.1:0",
        "--identity-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ]));
    let lines = lines_through(stdout, "metrics URL").await;
    let url = printed_after(&lines, "Prometheus metrics URL");
    let body = reqwest::get(url).await.unwrap().text().await.unwrap();
    assert!(
        body.contains("# TYPE payroc_broker_rpcs_total counter\n"),
        "{body}"
    );
    assert!(
        body.contains("payroc_broker_token_expiry_seconds{credential=\"demo\"}"),
        "{body}"
    );
    signal(&child.0, "-TERM");
    assert_eq!(exit_code(child).await, Some(0));
}

#[cfg(feature = "sandbox")]
#[tokio::test]
async fn sandbox_tls_serves_the_client_certificate_it_wrote_and_refuses_others() {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let dir = std::env::temp_dir().join(format!("payroc-broker-cli-tls-{}", std::process::id()));
    let (child, stdout) = Running::with_stdout(
        broker()
            .args(["sandbox", "--tls", "--listen", "127.0.0.1:0"])
            .args(["--identity-listen", "127.0.0.1:0", "--tls-dir"])
            .arg(&dir),
    );
    let lines = lines_through(stdout, "identity URL").await;
    let identity = printed_after(&lines, "identity URL").to_owned();
    let first = &lines[0];
    let addr: SocketAddr = (first.split("gRPC over TLS on ").nth(1).unwrap())
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    // Keys are the owner's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("client.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "client.key mode {mode:o}");
    let ca = Certificate::from_pem(read("ca.crt"));
    let channel = |tls: ClientTlsConfig| async move {
        let endpoint = Endpoint::from_shared(format!("https://{addr}")).unwrap();
        endpoint.tls_config(tls).unwrap().connect().await.unwrap()
    };
    let request = || GetBearerTokenRequest {
        processing_terminal_id: "1234001".into(),
        min_validity: None,
    };

    // The printed client certificate is the sandbox's caller.
    let with_cert = ClientTlsConfig::new()
        .ca_certificate(ca.clone())
        .domain_name("localhost")
        .identity(Identity::from_pem(read("client.crt"), read("client.key")));
    let mut c = TokenBrokerClient::new(channel(with_cert).await);
    let token = c.get_bearer_token(request()).await.unwrap().into_inner();
    assert_eq!(token.credential, "demo");

    // Without it: the TLS handshake succeeds (certificates are optional, so
    // health probes need none), but nothing identifies the caller.
    let without = ClientTlsConfig::new()
        .ca_certificate(ca)
        .domain_name("localhost");
    let mut c = TokenBrokerClient::new(channel(without).await);
    let err = c.get_bearer_token(request()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    // The identity endpoint over the same TLS: the certificate is the
    // caller, whatever `x-api-key` says; without it, 401.
    let https = |with_cert: bool| {
        let mut b = reqwest::Client::builder().add_root_certificate(
            reqwest::Certificate::from_pem(read("ca.crt").as_bytes()).unwrap(),
        );
        if with_cert {
            let pem = read("client.crt") + &read("client.key");
            b = b.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
        }
        b.build().unwrap()
    };
    assert!(identity.starts_with("https://"), "{identity}");
    let url = format!("{identity}/authorize").replace("127.0.0.1", "localhost");
    for (client, status) in [(https(true), 200), (https(false), 401)] {
        let r = client
            .post(&url)
            .header("x-api-key", "whatever")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status);
    }

    signal(&child.0, "-TERM");
    assert_eq!(exit_code(child).await, Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn serve_runs_a_real_config_and_stops_cleanly_on_sigint() {
    let sim = SimPayroc::start(SimConfig::new(
        Clock::system(),
        Arc::new(OsEntropy),
        vec![SimAccount::new("cli-test-key-123456", &["1234001"])],
    ))
    .await
    .unwrap();
    let text = format!(
        "[payroc]\nidentity_url = \"{}\"\napi_url = \"{}\"\n[[credentials]]\nname = \"acme\"\n\
         api_key_file = \"acme.key\"\nterminals = [\"1234001\"]\n",
        sim.identity_url(),
        sim.api_url()
    );
    let path = temp_config("serve.toml", &text);
    std::fs::write(path.with_file_name("acme.key"), "cli-test-key-123456\n").unwrap();
    let (child, stderr) = Running::with_stderr(
        broker()
            .args([
                "serve",
                "--allow-unauthenticated",
                "--listen",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(&path)
            .env("NO_COLOR", "1"),
    );
    let line = line_with(stderr, "payroc-broker serving").await;
    let addr = serving_addr(&line);
    assert_eq!(call(addr).await, "acme");
    assert_eq!(sim.stats().identity_requests, 1);
    signal(&child.0, "-INT");
    assert_eq!(exit_code(child).await, Some(0));
}

/// Every line of a child's pipe, as it comes.
fn lines_of(
    pipe: impl std::io::Read + Send + 'static,
) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

async fn next_with(
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    needle: &str,
) -> String {
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(l) = lines.recv().await {
            if l.contains(needle) {
                return Some(l);
            }
        }
        None
    })
    .await;
    found
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("the broker never logged `{needle}`"))
}

#[tokio::test]
async fn sighup_reloads_a_valid_config_and_refuses_a_broken_one() {
    let sim = SimPayroc::start(SimConfig::new(
        Clock::system(),
        Arc::new(OsEntropy),
        vec![
            SimAccount::new("hup-key-acme-123456", &["1234001"]),
            SimAccount::new("hup-key-globex-123456", &["5678001"]),
        ],
    ))
    .await
    .unwrap();
    let base = format!(
        "[payroc]\nidentity_url = \"{}\"\napi_url = \"{}\"\n[[credentials]]\nname = \"acme\"\n\
         api_key_env = \"HUP_ACME\"\nterminals = [\"1234001\"]\n",
        sim.identity_url(),
        sim.api_url()
    );
    let path = temp_config("hup.toml", &base);
    let (child, stderr) = Running::with_stderr(
        broker()
            .args([
                "serve",
                "--allow-unauthenticated",
                "--listen",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(&path)
            .env("HUP_ACME", "hup-key-acme-123456")
            .env("HUP_GLOBEX", "hup-key-globex-123456")
            .env("NO_COLOR", "1"),
    );
    let mut lines = lines_of(stderr);
    let line = next_with(&mut lines, "payroc-broker serving").await;
    let addr = serving_addr(&line);
    let mut c = TokenBrokerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let ask = |t: &str| GetBearerTokenRequest {
        processing_terminal_id: t.into(),
        min_validity: None,
    };
    let acme = c
        .get_bearer_token(ask("1234001"))
        .await
        .unwrap()
        .into_inner()
        .access_token;
    assert_eq!(
        c.get_bearer_token(ask("5678001")).await.unwrap_err().code(),
        tonic::Code::NotFound
    );

    // A new credential.
    std::fs::write(
        &path,
        format!("{base}[[credentials]]\nname = \"globex\"\napi_key_env = \"HUP_GLOBEX\"\nterminals = [\"5678001\"]\n"),
    )
    .unwrap();
    signal(&child.0, "-HUP");
    next_with(&mut lines, "configuration reloaded").await;
    assert_eq!(
        c.get_bearer_token(ask("5678001"))
            .await
            .unwrap()
            .into_inner()
            .credential,
        "globex"
    );
    assert_eq!(
        c.get_bearer_token(ask("1234001"))
            .await
            .unwrap()
            .into_inner()
            .access_token,
        acme,
        "token kept"
    );

    // A broken file: refused, named, and the running configuration stays.
    std::fs::write(&path, base.replace("HUP_ACME", "HUP_MISSING")).unwrap();
    signal(&child.0, "-HUP");
    let refused = next_with(&mut lines, "reload refused").await;
    assert!(refused.contains("credentials[0].api_key_env"), "{refused}");
    assert!(refused.contains("HUP_MISSING"), "{refused}");
    assert_eq!(
        c.get_bearer_token(ask("5678001"))
            .await
            .unwrap()
            .into_inner()
            .credential,
        "globex"
    );

    signal(&child.0, "-TERM");
    assert_eq!(exit_code(child).await, Some(0));
}

/// Kubernetes updates a Secret volume in place: new files in a new
/// directory, the `..data` link renamed over to point at it, the old
/// directory removed. `serve` notices by looking at its files and reloads as
/// SIGHUP would: Payroc sees the new key on the next identity request, and no
/// signal was sent.
#[tokio::test]
async fn a_key_rotated_in_a_secret_volume_is_used_without_a_signal() {
    use std::os::unix::fs::symlink;
    let sim = SimPayroc::start(SimConfig::new(
        Clock::system(),
        Arc::new(OsEntropy),
        vec![
            SimAccount::new("watch-key-one-123456", &["1234001"]),
            SimAccount::new("watch-key-two-123456", &["1234002"]),
        ],
    ))
    .await
    .unwrap();
    let dir = std::env::temp_dir().join(format!("payroc-broker-cli-watch-{}", std::process::id()));
    let keys = dir.join("keys");
    let _ = std::fs::remove_dir_all(&dir);
    // What the kubelet writes: `acme -> ..data/acme`, `..data -> ..<version>`.
    let publish = |version: &str, key: &str| {
        std::fs::create_dir_all(keys.join(version)).unwrap();
        std::fs::write(keys.join(version).join("acme"), key).unwrap();
        symlink(version, keys.join("..data_tmp")).unwrap();
        std::fs::rename(keys.join("..data_tmp"), keys.join("..data")).unwrap();
    };
    publish("..v1", "watch-key-one-123456");
    symlink("..data/acme", keys.join("acme")).unwrap();
    let path = dir.join("broker.toml");
    std::fs::write(
        &path,
        format!(
            "[payroc]\nidentity_url = \"{}\"\napi_url = \"{}\"\n[[credentials]]\nname = \"acme\"\n\
             api_key_file = \"keys/acme\"\nterminals = [\"1234001\"]\n",
            sim.identity_url(),
            sim.api_url()
        ),
    )
    .unwrap();
    let (child, stderr) = Running::with_stderr(
        broker()
            .args([
                "serve",
                "--allow-unauthenticated",
                "--listen",
                "127.0.0.1:0",
                "--watch-interval",
                "50ms",
                "--config",
            ])
            .arg(&path)
            .env("NO_COLOR", "1"),
    );
    let mut lines = lines_of(stderr);
    let line = next_with(&mut lines, "payroc-broker serving").await;
    let addr = serving_addr(&line);
    let mut c = TokenBrokerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let ask = || GetBearerTokenRequest {
        processing_terminal_id: "1234001".into(),
        min_validity: None,
    };
    let first = c.get_bearer_token(ask()).await.unwrap().into_inner();
    assert_eq!(sim.identity_requests("watch-key-one-123456"), 1);
    assert_eq!(sim.identity_requests("watch-key-two-123456"), 0);

    publish("..v2", "watch-key-two-123456");
    std::fs::remove_dir_all(keys.join("..v1")).unwrap();
    let why = next_with(&mut lines, "files of the configuration changed").await;
    assert!(why.contains("keys/acme"), "{why}");
    next_with(&mut lines, "configuration reloaded").await;
    let second = c.get_bearer_token(ask()).await.unwrap().into_inner();
    assert_ne!(second.access_token, first.access_token);
    assert_eq!(second.credential, "acme");
    assert_eq!(sim.identity_requests("watch-key-two-123456"), 1);

    signal(&child.0, "-TERM");
    assert_eq!(exit_code(child).await, Some(0));
    // Nothing changed after the rotation: no second reload, however many
    // looks there were until the exit.
    let mut more = 0;
    while let Some(l) = lines.recv().await {
        more += usize::from(l.contains("configuration reloaded"));
    }
    assert_eq!(more, 0, "a second reload nobody asked for");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `serve` removes the secret variables it read from its environment (so
/// `/proc/PID/environ` no longer shows them), a SIGHUP reload still finds
/// them, and the process is not dumpable.
#[tokio::test]
async fn secret_variables_leave_the_environment_and_reloads_still_find_them() {
    const KEY: &str = "env-key-acme-0123456789";
    const TOKEN: &str = "env-caller-token-0123456789ab";
    let sim = SimPayroc::start(SimConfig::new(
        Clock::system(),
        Arc::new(OsEntropy),
        vec![SimAccount::new(KEY, &["1234001"])],
    ))
    .await
    .unwrap();
    let text = format!(
        "[payroc]\nidentity_url = \"{}\"\napi_url = \"{}\"\n[[credentials]]\nname = \"acme\"\n\
         api_key_env = \"ENV_ACME\"\nterminals = [\"1234001\"]\n[[callers]]\nname = \"web\"\n\
         token_env = \"ENV_CALLER\"\nterminals = [\"*\"]\nrpcs = [\"*\"]\n",
        sim.identity_url(),
        sim.api_url()
    );
    let path = temp_config("environ.toml", &text);
    let (child, stderr) = Running::with_stderr(
        broker()
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&path)
            .env("ENV_ACME", KEY)
            .env("ENV_CALLER", TOKEN)
            .env("PAYROC_BROKER_TEST_KEPT", "kept")
            .env("NO_COLOR", "1"),
    );
    let mut lines = lines_of(stderr);
    let addr = serving_addr(&next_with(&mut lines, "payroc-broker serving").await);

    let environ = format!("/proc/{}/environ", child.0.id());
    match std::fs::read(&environ) {
        // Root (or a dumpable process) may read it: the secrets are gone,
        // the rest of the environment is still there.
        Ok(bytes) => {
            let env = String::from_utf8_lossy(&bytes);
            assert!(env.contains("PAYROC_BROKER_TEST_KEPT=kept"), "{env}");
            for gone in ["ENV_ACME=", "ENV_CALLER=", KEY, TOKEN] {
                assert!(!env.contains(gone), "{gone} still in {env}");
            }
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied),
    }
    // Not dumpable: /proc/PID belongs to root, whoever runs the broker.
    {
        use std::os::unix::fs::MetadataExt;
        let me = std::fs::metadata("/proc/self").unwrap().uid();
        let broker = std::fs::metadata(format!("/proc/{}", child.0.id()))
            .unwrap()
            .uid();
        assert!(me == 0 || broker == 0, "the broker is dumpable");
    }

    let ask = || {
        let mut req = tonic::Request::new(GetBearerTokenRequest {
            processing_terminal_id: "1234001".into(),
            min_validity: None,
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        req
    };
    let mut c = TokenBrokerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    assert_eq!(
        c.get_bearer_token(ask())
            .await
            .unwrap()
            .into_inner()
            .credential,
        "acme"
    );

    // The reload reads both variables again: from what was captured.
    std::fs::write(&path, text.replace("name = \"web\"", "name = \"web2\"")).unwrap();
    signal(&child.0, "-HUP");
    next_with(&mut lines, "configuration reloaded").await;
    assert_eq!(
        c.get_bearer_token(ask())
            .await
            .unwrap()
            .into_inner()
            .credential,
        "acme"
    );

    signal(&child.0, "-TERM");
    assert_eq!(exit_code(child).await, Some(0));
}

#[test]
fn check_config_warns_about_bearer_tokens_for_part_of_a_credential() {
    let text = format!(
        "{MINIMAL}[[callers]]\nname = \"web\"\ntoken_env = \"WEB_TOKEN\"\n\
         terminals = [\"1234001\"]\nrpcs = [\"GetBearerToken\"]\n"
    );
    let path = temp_config("partial.toml", &text);
    let Ran { code, stderr, .. } =
        run(check_config(&path).env("WEB_TOKEN", "web-token-0123456789abcdef"));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "warning: {}: callers[0]: caller `web` may call GetBearerToken for 1 of the 2 \
             terminals of credential `acme`",
            path.display()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("give each trust boundary its own credential"),
        "{stderr}"
    );
}

#[test]
fn check_config_parses_the_tls_files_and_names_the_bad_one() {
    let self_signed = || {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (cert, key) = self_signed();
    let (_, other_key) = self_signed();
    let cert_path = temp_config("tls.crt", &cert);
    let config = format!(
        "[server.tls]\ncert_file = \"{}\"\nkey_file = \"tls.key\"\n{MINIMAL}",
        cert_path.display()
    );
    let path = temp_config("tls.toml", &config);
    let check = |key_text: &str| {
        temp_config("tls.key", key_text);
        run(&mut check_config(&path))
    };
    for bad in [
        other_key.as_str(),
        "-----BEGIN PRIVATE KEY-----\nnot base64 !!\n",
    ] {
        let Ran { code, stderr, .. } = check(bad);
        assert_eq!(code, Some(2));
        assert!(stderr.contains("server.tls.key_file"), "{stderr}");
        assert!(stderr.contains(&path.display().to_string()), "{stderr}");
        let body = bad.lines().nth(1).unwrap();
        assert!(!stderr.contains(body), "key material in: {stderr}");
    }
    let Ran { code, stderr, .. } = check(&key);
    assert_eq!(code, Some(0), "{stderr}");
}
