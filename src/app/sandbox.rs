//! `payroc-broker sandbox`: the real broker in front of the simulated Payroc,
//! with demo credentials and terminals, so it runs on a fresh machine with no
//! Payroc account. The configuration goes through the same parser and
//! validation as a real file.
//!
//! `sandbox --tls` adds a throwaway CA ([`pki`]): the port speaks only TLS,
//! and the one caller is the workload named in the client certificate, so a
//! client without it gets nothing (as in production with `[[callers]]`).

pub mod pki;

use std::{net::SocketAddr, path::Path};

pub use pki::{CLIENT_SPIFFE_ID, SandboxPki};

use payroc_sim::{SimAccount, SimConfig, SimPayroc};

use crate::{
    clock::{Clock, SharedEntropy},
    config::Config,
};

/// Demo credentials: (name, terminals).
pub const DEMO_CREDENTIALS: &[(&str, &[&str])] =
    &[("demo", &["1234001", "1234002"]), ("demo-eu", &["5678001"])];

/// A running simulator and a broker configuration pointing at it.
pub struct Sandbox {
    pub sim: SimPayroc,
    pub config: Config,
    /// The certificates of `sandbox --tls`.
    pub pki: Option<SandboxPki>,
}

impl Sandbox {
    /// Starts the simulator on a loopback port and builds the broker's
    /// configuration for `listen` (the identity endpoint on any free
    /// loopback port).
    pub async fn start(
        listen: SocketAddr,
        clock: Clock,
        entropy: SharedEntropy,
    ) -> Result<Sandbox, String> {
        let identity = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_with(listen, identity, None, clock, entropy, None).await
    }

    /// [`Sandbox::start`] with the identity endpoint on `identity_listen`,
    /// Prometheus `/metrics` on `metrics_listen` when given (as
    /// `server.metrics_listen`), serving TLS with certificates made into
    /// `tls_dir` when given: client certificates are verified against the
    /// sandbox CA, and the caller [`CLIENT_SPIFFE_ID`] may call everything.
    pub async fn start_with(
        listen: SocketAddr,
        identity_listen: SocketAddr,
        metrics_listen: Option<SocketAddr>,
        clock: Clock,
        entropy: SharedEntropy,
        tls_dir: Option<&Path>,
    ) -> Result<Sandbox, String> {
        let pki = tls_dir.map(SandboxPki::create).transpose()?;
        // Fresh random API keys each run: nothing to leak, nothing to reuse.
        let keys: Vec<String> = DEMO_CREDENTIALS
            .iter()
            .map(|_| format!("sandbox-key-{}", entropy.uuid_v4().simple()))
            .collect();
        let accounts = DEMO_CREDENTIALS
            .iter()
            .zip(&keys)
            .map(|((_, terminals), key)| SimAccount {
                api_key: key.clone(),
                terminals: terminals.iter().map(|t| t.to_string()).collect(),
            })
            .collect();
        let sim = SimPayroc::start(SimConfig::new(clock, entropy, accounts))
            .await
            .map_err(|e| format!("cannot start the simulated Payroc: {e}"))?;

        let metrics = metrics_listen
            .map(|addr| format!("metrics_listen = \"{addr}\"\n"))
            .unwrap_or_default();
        let mut text = format!(
            "[server]\nlisten = \"{listen}\"\nshutdown_grace = \"5s\"\n{metrics}\
             [payroc]\nidentity_url = \"{}\"\napi_url = \"{}\"\n\
             [ext_authz]\nenabled = true\n\
             [identity_endpoint]\nlisten = \"{identity_listen}\"\n",
            sim.identity_url(),
            sim.api_url()
        );
        if let Some(pki) = &pki {
            // Paths as TOML strings (Debug quotes and escapes them).
            text.push_str(&format!(
                "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n\
                 [[callers]]\nname = \"example-client\"\nspiffe_id = \"{CLIENT_SPIFFE_ID}\"\n\
                 terminals = [\"*\"]\nrpcs = [\"*\"]\n",
                pki.server_cert.display().to_string(),
                pki.server_key.display().to_string(),
                pki.ca_cert.display().to_string(),
            ));
        }
        for (i, (name, terminals)) in DEMO_CREDENTIALS.iter().enumerate() {
            text.push_str(&format!(
                "[[credentials]]\nname = \"{name}\"\napi_key_env = \"SANDBOX_KEY_{i}\"\nterminals = {terminals:?}\n"
            ));
        }
        let env = |var: &str| {
            var.strip_prefix("SANDBOX_KEY_")
                .and_then(|i| i.parse::<usize>().ok())
                .and_then(|i| keys.get(i).cloned())
        };
        let config = Config::parse(&text, Path::new("<sandbox>"), Path::new("."), &env)
            .map_err(|e| e.to_string())?;
        Ok(Sandbox { sim, config, pki })
    }

    /// How to call the sandbox at `addr` (and its identity endpoint at
    /// `identity`), printed at start-up.
    pub fn instructions(&self, addr: SocketAddr, identity: SocketAddr) -> String {
        let mut terminals = String::new();
        for (name, ts) in DEMO_CREDENTIALS {
            terminals.push_str(&format!(
                "  credential {name:<8} terminals {}\n",
                ts.join(", ")
            ));
        }
        let conn = self.grpcurl_flags();
        let (transport, tls_files, python_tls, health_tls) = match &self.pki {
            None => ("gRPC", String::new(), String::new(), String::new()),
            Some(pki) => (
                "gRPC over TLS",
                format!(
                    "TLS: a throwaway CA made for this run, in {dir}\n  \
                     ca.crt      trust it for the server; client certificates are verified against it\n  \
                     client.crt  client.key: the caller {CLIENT_SPIFFE_ID}\n\
                     A client without this certificate is refused (UNAUTHENTICATED).\n\n",
                    dir = pki.dir.display()
                ),
                format!(
                    " \\\n      --ca {} --cert {} --key {}",
                    pki.ca_cert.display(),
                    pki.client_cert.display(),
                    pki.client_key.display()
                ),
                format!(" --tls-ca {}", pki.ca_cert.display()),
            ),
        };
        let health_addr = match &self.pki {
            None => addr.to_string(),
            Some(_) => format!("https://{addr}"),
        };
        format!(
            "payroc-broker sandbox: {transport} on {addr}, simulated Payroc on {sim}\n\
             {terminals}\n\
             {tls_files}\
             Call it with grpcurl (server reflection is on):\n  \
             grpcurl {conn} -d '{{\"processing_terminal_id\": \"1234001\"}}' {addr} payroc.broker.v1.TokenBroker/GetBearerToken\n  \
             grpcurl {conn} -d '{{\"processing_terminal_id\": \"1234001\", \"scenario\": \"SCENARIO_PAYMENT\"}}' {addr} payroc.broker.v1.TokenBroker/CreateSession\n  \
             grpcurl {conn} {addr} grpc.health.v1.Health/Check\n  \
             payroc-broker health --addr {health_addr}{health_tls}\n\
             \n\
             Envoy's ext_authz Check, as an egress proxy in front of Payroc asks it (the answer\n\
             sets `authorization: Bearer ...` and removes `x-api-key`; another host gets a 403):\n  \
             {check}\n\
             \n\
             Or with an example client (Python, Node, Go: README.md, \"Clients\"):\n  \
             python3 -m pip install -r examples/clients/python/requirements.txt\n  \
             python3 examples/clients/python/client.py --target {addr} --terminal 1234001{python_tls}\n\
             \n\
             {sdk}\
             \n\
             Ctrl-C stops it.",
            sim = self.sim.api_url(),
            check = self.check_example(addr),
            sdk = self.sdk_instructions(identity),
        )
    }

    /// The identity endpoint's base URL for credential `name`: what an SDK
    /// takes as its identity URL.
    pub fn identity_base(&self, identity: SocketAddr, name: &str) -> String {
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        // The sandbox certificate names `localhost` and 127.0.0.1.
        format!("{scheme}://{identity}/credentials/{name}")
    }

    /// The curl line that fetches a Bearer token as an SDK does.
    pub fn curl_example(&self, identity: SocketAddr) -> String {
        let tls = match &self.pki {
            None => String::new(),
            Some(pki) => format!(
                "--cacert {} --cert {} --key {} ",
                pki.ca_cert.display(),
                pki.client_cert.display(),
                pki.client_key.display()
            ),
        };
        format!(
            "curl -s {tls}-X POST -H 'x-api-key: any-value-here' {}/authorize",
            self.identity_base(identity, DEMO_CREDENTIALS[0].0)
        )
    }

    /// The identity endpoint's part of the start-up text.
    fn sdk_instructions(&self, identity: SocketAddr) -> String {
        let key = match &self.pki {
            None => {
                "any value (the sandbox has no [[callers]]; in production, the service's caller token)"
            }
            Some(_) => {
                "any value (the client certificate identifies the caller; in production without one, the service's caller token)"
            }
        };
        let tls = match &self.pki {
            None => String::new(),
            Some(pki) => format!(
                "  and, as for gRPC, trust {} and present the client certificate\n",
                pki.ca_cert.display()
            ),
        };
        format!(
            "Payroc's identity API for the official SDKs and plain HTTP, on {identity}\n\
             (POST /credentials/{{credential}}/authorize answers as Payroc's POST /authorize):\n  \
             {curl}\n\
             An SDK needs two settings (README.md, \"Using the official SDKs\"):\n  \
             identity URL  {base}\n  \
             API key       {key}\n\
             {tls}\
             and its API URL stays Payroc's, here the simulated {api}\n",
            curl = self.curl_example(identity),
            base = self.identity_base(identity, DEMO_CREDENTIALS[0].0),
            api = self.sim.api_url(),
        )
    }

    /// How grpcurl connects: plaintext, or TLS with the sandbox's client
    /// certificate.
    fn grpcurl_flags(&self) -> String {
        match &self.pki {
            None => "-plaintext".to_owned(),
            Some(pki) => format!(
                "-cacert {} -cert {} -key {}",
                pki.ca_cert.display(),
                pki.client_cert.display(),
                pki.client_key.display()
            ),
        }
    }

    /// A grpcurl line for an ext_authz Check that the sandbox allows: a
    /// request to the simulated API's authority for demo terminal 1234001.
    pub fn check_example(&self, addr: SocketAddr) -> String {
        let api = &self.config.payroc.api_url;
        let mut authority = api.host_str().unwrap_or_default().to_owned();
        if let Some(port) = api.port() {
            authority.push_str(&format!(":{port}"));
        }
        let path = format!(
            "{}/processing-terminals/{}/refunds",
            api.path().trim_end_matches('/'),
            DEMO_CREDENTIALS[0].1[0]
        );
        format!(
            "grpcurl {conn} -d '{{\"attributes\": {{\"request\": {{\"http\": {{\"method\": \"POST\", \
             \"host\": \"{authority}\", \"path\": \"{path}\", \"headers\": {{\"x-api-key\": \"none\"}}}}}}}}}}' \
             {addr} envoy.service.auth.v3.Authorization/Check",
            conn = self.grpcurl_flags(),
        )
    }
}
