//! Bearer tokens followed over time, through a real broker in front of the
//! simulated Payroc: WatchBearerToken, and the cache's robustness against
//! identity answers that would break its arithmetic.

mod common;

use common::*;
use tonic::Code;

#[tokio::test]
async fn an_absurd_expires_in_fails_internal_and_the_next_request_succeeds() {
    let h = Harness::cold().await;
    h.sim.faults().announce_expires_in(Some(u64::MAX));
    let e = h.bearer("1234001").await.unwrap_err();
    let (status, _) = expect_code(e, Code::Internal);
    assert!(status.message().contains("expires_in"), "{status:?}");
    h.sim.faults().announce_expires_in(None);
    // The failed fetch is negatively cached for about a second; then the
    // cache (no lock poisoned, no task dead) fetches a good token.
    eventually("a token after the fault is removed", || async {
        h.bearer("1234001").await.is_ok()
    })
    .await;
}
