//! Per-request controls between hyper and a port's service: the peer's
//! identity in the request's extensions, the server-wide bound on requests in
//! flight (answered at once, never queued: RESOURCE_EXHAUSTED on the gRPC
//! port), and the deadline by which the request body must have arrived in
//! full.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tonic::Status;

use super::{
    Edge, PeerInfo,
    limits::{ActiveRequest, Activity, RefusalLog},
};
use crate::{clock::Clock, domain::error::BrokerError};

/// What every connection's service shares.
#[derive(Clone)]
pub struct Shared<S> {
    pub service: S,
    /// Requests in flight server-wide.
    pub in_flight: Arc<Semaphore>,
    pub request_timeout: Duration,
    /// The WARN line for shed requests, rate-limited like refused connections.
    pub shed_log: Arc<RefusalLog>,
    pub clock: Clock,
}

/// The service of one connection: `Shared` plus who is on the other end.
#[derive(Clone)]
pub struct ConnService<S> {
    pub shared: Shared<S>,
    pub peer: PeerInfo,
    pub activity: Activity,
}

type BoxFuture =
    Pin<Box<dyn Future<Output = Result<Response<tonic::body::Body>, Infallible>> + Send>>;

impl<S: Edge> hyper::service::Service<Request<Incoming>> for ConnService<S>
where
    S::Future: Send,
{
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        // Counted from the start, refused or not: the idle timer must not
        // fire while a response is still being written.
        let active = self.activity.begin();
        let Ok(permit) = Arc::clone(&self.shared.in_flight).try_acquire_owned() else {
            if let Some(shed) = self.shared.shed_log.record(self.shared.clock.now()) {
                tracing::warn!(
                    shed,
                    peer = %self.peer.remote,
                    "too many requests in flight (server.max_in_flight_requests); refusing at once"
                );
            }
            // Refused without reading the body: the stream costs nothing more.
            let response = self.shared.service.overloaded(BrokerError::Overloaded(
                "the server has too many requests in flight; retry with backoff".into(),
            ));
            return Box::pin(async move {
                drop(active);
                Ok(response)
            });
        };
        let deadline = self.shared.clock.now() + self.shared.request_timeout;
        let (mut parts, body) = req.into_parts();
        // The one extension the transport adds (`access::peer_of` reads it):
        // not also tonic's `TcpConnectInfo`, which nothing here reads, since
        // each insert past the map's first three buckets costs a rehash.
        parts.extensions.insert(self.peer.clone());
        let body = tonic::body::Body::new(DeadlineBody::new(body, deadline));
        let req = Request::from_parts(parts, body);
        let mut service = self.shared.service.clone();
        Box::pin(async move {
            // Routes and the identity service are always ready.
            let response = tower_service::Service::call(&mut service, req).await?;
            Ok(response.map(|body| {
                tonic::body::Body::new(Guarded {
                    inner: body,
                    _permit: permit,
                    _active: active,
                })
            }))
        })
    }
}

/// A request body that fails with DEADLINE_EXCEEDED when it has not ended by
/// `deadline`: a client that sends HEADERS and part of a message cannot hold a
/// stream (and its buffers) open for ever.
struct DeadlineBody<B> {
    inner: B,
    deadline: Pin<Box<Sleep>>,
    ended: bool,
}

impl<B> DeadlineBody<B> {
    fn new(inner: B, deadline: Instant) -> Self {
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            ended: false,
        }
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Status::from_error(e.into())))),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.ended = true;
                    Poll::Ready(Some(Err(Status::from(BrokerError::RequestTimeout))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that holds the request's in-flight permit and activity
/// mark until the response is done (a stream of WatchBearerToken holds them
/// for its lifetime: it is in flight).
struct Guarded {
    inner: tonic::body::Body,
    _permit: OwnedSemaphorePermit,
    _active: ActiveRequest,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
