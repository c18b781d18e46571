//! `[server]`: the gRPC listener, its connection limits, logs and metrics.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Deserializer};

use super::{Checker, TlsConfig, defaults};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// How long in-flight RPCs may run on after SIGTERM before the process exits anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Longest health stays NOT_SERVING at start-up waiting for first tokens.
    #[serde(with = "humantime_serde")]
    pub warm_start_timeout: Duration,
    /// Open client connections at most; more are closed at once.
    pub max_connections: usize,
    /// Concurrent RPCs per HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// `[server.tls]`; `None`: plaintext h2c.
    pub tls: Option<TlsConfig>,
    pub forwarded_identity: ForwardedIdentity,
    /// Peers whose forwarded identity header is believed.
    pub trusted_proxies: Vec<IpNet>,
    pub log_format: LogFormat,
    /// Prometheus `/metrics` listener; `None`: off.
    pub metrics_listen: Option<SocketAddr>,
    /// The TLS handshake and the HTTP/2 preface must be done within this.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A connection with no open stream for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Connections are closed gracefully (GOAWAY) after this long.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// Open connections per remote IP address; more are closed at once.
    pub max_connections_per_peer: usize,
    /// A whole request, body included, must arrive within this.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// RPCs in flight server-wide; more are refused with RESOURCE_EXHAUSTED.
    pub max_in_flight_requests: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: defaults::LISTEN
                .parse()
                .expect("the default address parses"),
            shutdown_grace: defaults::SHUTDOWN_GRACE,
            warm_start_timeout: defaults::WARM_START_TIMEOUT,
            max_connections: defaults::MAX_CONNECTIONS,
            max_concurrent_streams: defaults::MAX_CONCURRENT_STREAMS,
            tls: None,
            forwarded_identity: ForwardedIdentity::None,
            trusted_proxies: defaults::trusted_proxies(),
            log_format: LogFormat::Text,
            metrics_listen: None,
            handshake_timeout: defaults::HANDSHAKE_TIMEOUT,
            idle_timeout: defaults::IDLE_TIMEOUT,
            max_connection_age: defaults::MAX_CONNECTION_AGE,
            max_connections_per_peer: defaults::MAX_CONNECTIONS_PER_PEER,
            request_timeout: defaults::SERVER_REQUEST_TIMEOUT,
            max_in_flight_requests: defaults::MAX_IN_FLIGHT_REQUESTS,
        }
    }
}

impl ServerConfig {
    /// The rules serde cannot express. TLS paths become absolute here.
    pub(super) fn check(&mut self, c: &mut Checker<'_>) {
        c.at_least_one("server.max_connections", self.max_connections);
        c.at_least_one(
            "server.max_concurrent_streams",
            self.max_concurrent_streams as usize,
        );
        if let Some(tls) = &mut self.tls {
            tls.check(c);
        }
        // Port 0 is a fresh port for each listener (tests, `sandbox`), so
        // two of them never clash; as for identity_endpoint.listen.
        if self.metrics_listen == Some(self.listen) && self.listen.port() != 0 {
            c.problem(
                "server.metrics_listen",
                format!(
                    "`{}` is the gRPC address (server.listen); use another port",
                    self.listen
                ),
            );
        }
        c.nonzero("server.handshake_timeout", self.handshake_timeout);
        c.nonzero("server.idle_timeout", self.idle_timeout);
        c.nonzero("server.max_connection_age", self.max_connection_age);
        c.nonzero("server.request_timeout", self.request_timeout);
        c.at_least_one(
            "server.max_connections_per_peer",
            self.max_connections_per_peer,
        );
        c.at_least_one("server.max_in_flight_requests", self.max_in_flight_requests);
    }
}

/// Whose forwarded identity header the broker believes (from `trusted_proxies` only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ForwardedIdentity {
    #[default]
    #[serde(rename = "none")]
    None,
    /// Envoy/Istio `x-forwarded-client-cert`: `URI=` of its last element.
    #[serde(rename = "xfcc")]
    Xfcc,
    /// Linkerd `l5d-client-id`.
    #[serde(rename = "l5d-client-id")]
    L5dClientId,
}

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// An IP network in CIDR form (`10.0.0.0/8`, `::1/128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    /// Whether `ip` lies inside the network. IPv4-mapped IPv6 addresses
    /// (`::ffff:10.0.0.1`) count as their IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let bits = u32::from(self.prefix.min(32));
                let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let bits = u32::from(self.prefix.min(128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// `10.0.0.0/8`, `::1/128`, or a bare address (a single host). Host bits
/// below the prefix are refused: `10.0.0.1/8` is most likely a typo.
impl FromStr for IpNet {
    type Err = String;

    fn from_str(text: &str) -> Result<IpNet, String> {
        let bad =
            |why: &str| format!("`{text}` is not a network like 10.0.0.0/8 or ::1/128 ({why})");
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            // Digits only: `u8::from_str` would take a `+`.
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().map_err(|_| bad("bad prefix length"))?
            }
            Some(_) => return Err(bad("bad prefix length")),
        };
        if prefix > max {
            return Err(bad(&format!("the prefix length is at most {max}")));
        }
        let network = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(u32::from(32 - prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(u32::from(128 - prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        if network != addr {
            return Err(format!(
                "`{text}` has host bits set; the network is {network}/{prefix}"
            ));
        }
        Ok(IpNet { addr, prefix })
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}
