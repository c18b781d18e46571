//! Watchers at scale: many WatchBearerToken streams held open at once, what
//! each costs the broker in memory, and how long a new token takes to reach
//! the last of them.
//!
//! The new token is made to come at a chosen moment: one CreateSession is
//! answered 401 by the simulator (Payroc rejecting the cached token), the
//! broker drops the token, fetches the next, retries the session, and every
//! watcher is sent the replacement, as after a background renewal. Delivery
//! times count from the moment the simulator issued that token.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use payroc_broker::proto::{
    GetBearerTokenResponse, WatchBearerTokenRequest, token_broker_client::TokenBrokerClient,
};
use tokio::sync::Barrier;
use tonic::{Request, transport::Channel};

/// What one run of the scenario measured.
pub struct Watched {
    pub streams: usize,
    /// Streams that did not get the new token: failed to open, ended
    /// early, or still waiting at the bound.
    pub failures: usize,
    /// Every stream's delivery of the new token, in ns after it was issued.
    pub delivery_ns: Vec<u64>,
    /// The streams that got it, still open: what is measured after the
    /// deliveries must not include closing them.
    pub held: Vec<tonic::Streaming<GetBearerTokenResponse>>,
}

/// `connections` HTTP/2 connections to `addr`, established.
pub async fn connect(addr: SocketAddr, connections: usize) -> Vec<Channel> {
    let mut channels = Vec::new();
    for _ in 0..connections.max(1) {
        channels.push(
            Channel::from_shared(format!("http://{addr}"))
                .expect("URL")
                .tcp_nodelay(true)
                .connect()
                .await
                .expect("the broker accepts connections"),
        );
    }
    channels
}

/// `streams` watchers of `terminal` spread over `channels`; `opened`
/// runs once every stream holds its first token (measure memory there),
/// `trigger` then makes the broker replace the token; returns once every
/// stream has the new one, or `bound` has passed.
pub async fn watchers<O, T>(
    channels: &[Channel],
    streams: usize,
    caller_token: &str,
    terminal: &str,
    bound: Duration,
    opened: O,
    trigger: T,
) -> Watched
where
    O: AsyncFnOnce(),
    T: AsyncFnOnce() -> Option<Instant>,
{
    let auth: tonic::metadata::MetadataValue<_> = format!("Bearer {caller_token}")
        .parse()
        .expect("header value");
    // Every task waits here with its first token, then for the second.
    let first = Arc::new(Barrier::new(streams + 1));
    let seconds = Arc::new(Mutex::new(Vec::with_capacity(streams)));
    let mut tasks = Vec::with_capacity(streams);
    for i in 0..streams {
        let mut client = TokenBrokerClient::new(channels[i % channels.len()].clone());
        let mut req = Request::new(WatchBearerTokenRequest {
            processing_terminal_id: terminal.to_owned(),
            min_validity: None,
        });
        req.metadata_mut().insert("authorization", auth.clone());
        let (first, seconds) = (Arc::clone(&first), Arc::clone(&seconds));
        tasks.push(tokio::spawn(async move {
            let mut stream = match client.watch_bearer_token(req).await {
                Ok(s) => s.into_inner(),
                Err(_) => {
                    first.wait().await;
                    return;
                }
            };
            let token = match stream.message().await {
                Ok(Some(t)) => t.access_token,
                _ => {
                    first.wait().await;
                    return;
                }
            };
            first.wait().await;
            loop {
                match stream.message().await {
                    Ok(Some(t)) if t.access_token != token => {
                        seconds.lock().unwrap().push((Instant::now(), stream));
                        return;
                    }
                    Ok(Some(_)) => {}
                    _ => return,
                }
            }
        }));
    }
    first.wait().await;
    opened().await;
    let issued = trigger().await;
    let all = async {
        for t in tasks {
            let _ = t.await;
        }
    };
    let _ = tokio::time::timeout(bound, all).await;
    let (times, held): (Vec<Instant>, Vec<_>) = std::mem::take(&mut *seconds.lock().unwrap())
        .into_iter()
        .unzip();
    let delivery_ns = match issued {
        Some(at) => times
            .iter()
            .map(|t| t.saturating_duration_since(at).as_nanos() as u64)
            .collect(),
        None => Vec::new(),
    };
    Watched {
        held,
        streams,
        failures: streams - delivery_ns.len(),
        delivery_ns,
    }
}
