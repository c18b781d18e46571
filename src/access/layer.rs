//! Admission before the body: a tower service in front of a gRPC service
//! that runs a check on each request's headers (identification and rate
//! limit) and answers a refusal at once, before a byte of the request body
//! is read or buffered.
//!
//! tonic's interceptors do this too but see neither the path (which RPC, for
//! the audit event of a refused call) nor give back what they found except
//! through extensions; this one passes what the check returns to the handler
//! as a request extension.

use std::{
    convert::Infallible,
    task::{Context, Poll},
};

use futures_util::future::{Either, Ready, ready};
use tonic::{
    Status,
    body::Body,
    codegen::{Service, http},
    metadata::MetadataMap,
    server::NamedService,
};

/// Runs `check(path, metadata, extensions)` on each request before calling
/// the inner service; `Ok(x)` puts `x` into the request's extensions, `Err`
/// is the response.
#[derive(Clone)]
pub struct Admission<S, F> {
    inner: S,
    check: F,
}

impl<S, F> Admission<S, F> {
    pub fn new(inner: S, check: F) -> Self {
        Self { inner, check }
    }
}

impl<S, F, X, B> Service<http::Request<B>> for Admission<S, F>
where
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>,
    F: Fn(&str, &MetadataMap, &http::Extensions) -> Result<X, Status>,
    X: Clone + Send + Sync + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Either<Ready<Result<http::Response<Body>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The headers move into a MetadataMap and back: no copy.
        let metadata = MetadataMap::from_headers(std::mem::take(req.headers_mut()));
        let verdict = (self.check)(req.uri().path(), &metadata, req.extensions());
        *req.headers_mut() = metadata.into_headers();
        match verdict {
            Ok(admitted) => {
                req.extensions_mut().insert(admitted);
                Either::Right(self.inner.call(req))
            }
            // The body is dropped unread with the request; hyper resets the
            // stream once the response is sent.
            Err(status) => Either::Left(ready(Ok(status.into_http()))),
        }
    }
}

impl<S: NamedService, F> NamedService for Admission<S, F> {
    const NAME: &'static str = S::NAME;
}
