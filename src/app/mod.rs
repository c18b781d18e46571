//! Assembly and the command line's policy: `serve` wires the layers below
//! into one server, `reload` and `file_watch` decide when it reloads, `probe`
//! is the `health` subcommand, and `sandbox` runs it all against the
//! simulated Payroc.

pub mod file_watch;
pub mod probe;
pub mod reload;
#[cfg(feature = "sandbox")]
pub mod sandbox;
pub mod server;
