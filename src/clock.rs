//! Time and randomness, injected: the `broker-clock` crate (`clock/`),
//! re-exported here so that the broker's code and its users name it
//! `payroc_broker::clock`. It is a crate of its own because the simulated
//! Payroc (`payroc-sim`) runs on the same [`Clock`] and [`Entropy`], and the
//! broker's `sandbox` subcommand depends on the simulator.

pub use broker_clock::*;
