//! `payroc-broker health` as Docker HEALTHCHECK and exec probes run it: the
//! binary against a real broker (and a real TLS server), judged by its exit
//! status and what it prints.

mod common;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Output},
};

use common::{
    Harness,
    pki::{Ca, Dir, Leaf},
    wait_for_health,
};
use rcgen::CertificateParams;
use tokio::net::TcpListener;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic_health::pb::health_check_response::ServingStatus;

const BIN: &str = env!("CARGO_BIN_EXE_payroc-broker");

/// Runs `payroc-broker health ARGS` off the async runtime (it blocks).
async fn health(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|&a| a.to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .arg("health")
            .args(&args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[tokio::test]
async fn serving_is_exit_0_for_the_overall_and_the_service_status() {
    let h = Harness::start().await;
    let addr = h.addr.to_string();
    for service in ["", "payroc.broker.v1.TokenBroker"] {
        let out = health(&["--addr", &addr, "--service", service]).await;
        assert_exit(&out, 0);
        assert_eq!(text(&out.stdout), "status: SERVING\n");
    }
    // The URL form and the default time limit.
    let out = health(&["--addr", &format!("http://{addr}")]).await;
    assert_exit(&out, 0);
}

#[tokio::test]
async fn not_serving_is_exit_1() {
    let h = Harness::start().await;
    // Payroc refuses the `revoked` credential's key: its entry is NOT_SERVING
    // while the broker as a whole serves.
    let service = "payroc.broker.v1.TokenBroker/revoked";
    wait_for_health(&h.channel, service, ServingStatus::NotServing).await;
    let out = health(&["--addr", &h.addr.to_string(), "--service", service]).await;
    assert_exit(&out, 1);
    assert_eq!(text(&out.stdout), "status: NOT_SERVING\n");
}

#[tokio::test]
async fn an_unknown_service_is_exit_1() {
    let h = Harness::start().await;
    let out = health(&[
        "--addr",
        &h.addr.to_string(),
        "--service",
        "no.such.Service",
    ])
    .await;
    assert_exit(&out, 1);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("NotFound"), "{stderr}");
    assert!(stderr.contains("no.such.Service"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn nothing_listening_is_exit_1() {
    // A port that was free a moment ago: bound, then released.
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let out = health(&["--addr", &addr.to_string(), "--timeout", "2s"]).await;
    assert_exit(&out, 1);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot connect to http://{addr}")),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_server_that_never_answers_is_exit_1_within_the_timeout() {
    // Accepts TCP connections (the kernel's backlog does) but never speaks
    // HTTP/2: only the time limit ends the check.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let out = health(&["--addr", &addr.to_string(), "--timeout", "300ms"]).await;
    assert_exit(&out, 1);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("300ms") || stderr.contains("timed out"),
        "{stderr}"
    );
    drop(silent);
}

#[tokio::test]
async fn usage_errors_are_exit_2() {
    for args in [
        &["--no-such-flag"][..],
        &["--timeout", "soon"],
        &["--timeout", "0s"],
        &["--addr", "localhost"],
        &["--addr", "https://127.0.0.1:50051"],
        &["--tls-ca", "/nonexistent/ca.pem"],
        &["--tls-server-name", "broker.svc"],
    ] {
        let out = health(args).await;
        assert_exit(&out, 2);
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
}

/// A CA, a server certificate for `localhost` it signed, and the CA's PEM
/// file (removed with the `Pki`).
struct Pki {
    _dir: Dir,
    ca_file: PathBuf,
    server: Leaf,
}

fn pki(name: &str) -> Pki {
    let ca = Ca::new(&format!("{name} test CA"));
    // `localhost` only, not 127.0.0.1: the test checks that an address the
    // certificate does not cover fails without `--tls-server-name`.
    let server = ca.sign(CertificateParams::new(vec!["localhost".to_owned()]).unwrap());
    let dir = Dir::new();
    let ca_file = dir.write(&format!("{name}-ca.pem"), &ca.pem());
    Pki {
        _dir: dir,
        ca_file,
        server,
    }
}

/// A gRPC health service behind TLS with `pki`'s server certificate.
async fn tls_health_server(pki: &Pki) -> SocketAddr {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(
        &pki.server.cert_pem,
        &pki.server.key_pem,
    ));
    let router = Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(service);
    tokio::spawn(async move {
        // Keep the reporter alive with the server.
        let _reporter = reporter;
        router
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    addr
}

#[tokio::test]
async fn tls_ca_checks_over_tls_and_trusts_only_that_ca() {
    let ours = pki("ours");
    let theirs = pki("theirs");
    let addr = tls_health_server(&ours).await;
    let ca = ours.ca_file.to_str().unwrap();
    let by_name = format!("localhost:{}", addr.port());

    let out = health(&["--addr", &by_name, "--tls-ca", ca]).await;
    assert_exit(&out, 0);
    assert_eq!(text(&out.stdout), "status: SERVING\n");

    // By IP, naming the host the certificate is for.
    let by_ip = addr.to_string();
    let out = health(&[
        "--addr",
        &by_ip,
        "--tls-ca",
        ca,
        "--tls-server-name",
        "localhost",
    ])
    .await;
    assert_exit(&out, 0);

    // By IP without that name: the certificate does not cover 127.0.0.1.
    let out = health(&["--addr", &by_ip, "--tls-ca", ca]).await;
    assert_exit(&out, 1);

    // Another CA: the handshake fails.
    let other = theirs.ca_file.to_str().unwrap();
    let out = health(&["--addr", &by_name, "--tls-ca", other]).await;
    assert_exit(&out, 1);

    // Plaintext against a TLS port is no answer either.
    let out = health(&["--addr", &by_name, "--timeout", "2s"]).await;
    assert_exit(&out, 1);
}
