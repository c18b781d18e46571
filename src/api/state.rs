//! What every handler reads, on every port: the configuration in force and
//! the caller a request was admitted as.

use crate::{
    access::{Caller, Callers},
    domain::broker::Broker,
};
use std::sync::Arc;

/// Swapped whole on reload, so a call sees one consistent configuration
/// from start to end.
pub struct State {
    pub broker: Broker,
    pub callers: Callers,
}

/// What admission found: the configuration the call runs on from start to
/// end, and its caller.
#[derive(Clone)]
pub struct Admitted {
    pub state: Arc<State>,
    pub caller: Caller,
}
