//! Which log lines carry a call's span. In a file of its own: whether a
//! call opens a span depends on the most verbose level any subscriber in
//! the process enables, and the other test files install TRACE captures.

mod common;

use common::*;
use payroc_broker::{config::LogFormat, obs::logging};
use payroc_sim::{Fault, SimEndpoint};
use serde_json::Value;
use tonic::{Request, metadata::MetadataValue};
use tracing_subscriber::layer::SubscriberExt;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn traced<T>(mut r: Request<T>) -> Request<T> {
    r.metadata_mut()
        .insert("traceparent", MetadataValue::from_static(TRACEPARENT));
    r
}

/// Log lines a call causes carry its span (`rpc`, `trace_id`) when the call
/// came with a trace; at INFO, a call without one has no span at all (it
/// would cost every call a span for lines only a few calls log).
#[tokio::test]
async fn a_traced_call_puts_its_span_on_the_lines_it_logs() {
    let json = LogBuffer::default();
    let out = json.clone();
    let subscriber = tracing_subscriber::registry()
        .with(logging::fmt_layer(
            LogFormat::Json,
            move || out.clone(),
            false,
        ))
        .with(tracing_subscriber::filter::LevelFilter::INFO);
    let _guard = tracing::subscriber::set_default(subscriber);
    let h = Harness::start().await;
    // Payroc rejects the cached Bearer token once per call: the broker logs
    // that at INFO inside the call, fetches a new one and retries.
    for request in [
        traced(Request::new(payment("1234001"))),
        Request::new(payment("1234001")),
    ] {
        h.sim
            .faults()
            .push(SimEndpoint::Sessions, Fault::status(401), 1);
        h.client.clone().create_session(request).await.unwrap();
    }
    h.shutdown().await.unwrap();
    let rejected: Vec<Value> = json
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|l: &Value| {
            l["fields"]["message"]
                .as_str()
                .or(l["message"].as_str())
                .is_some_and(|m| m.starts_with("Payroc rejected the cached Bearer token"))
        })
        .collect();
    assert_eq!(rejected.len(), 2, "{rejected:#?}");
    assert_eq!(rejected[0]["span"]["rpc"], "CreateSession", "{rejected:#?}");
    assert_eq!(rejected[0]["span"]["trace_id"], TRACE_ID, "{rejected:#?}");
    assert!(rejected[1].get("span").is_none(), "{rejected:#?}");
}
