//! The fields of an audit record, as a sink they are written to: the JSON
//! log line's members, a trace span's attributes. A module of its own so
//! that the audit and the span exporter both depend on it, not on each
//! other.

use std::net::SocketAddr;

use crate::obs::logging;

/// Where an audit record's fields are written (`Audit::fields`): the JSON
/// line's members, a trace span's attributes. Names are the event's.
pub trait Fields {
    fn str(&mut self, name: &'static str, value: &str);
    fn u64(&mut self, name: &'static str, value: u64);
    /// `peer`.
    fn peer(&mut self, value: &SocketAddr);
    /// `duration_ms`, from whole µs.
    fn duration(&mut self, micros: u64);
    /// `token_fp`.
    fn fingerprint(&mut self, value: &str);
    /// `trace_id`.
    fn trace_id(&mut self, value: &str);
}

impl Fields for logging::JsonMembers<'_> {
    fn str(&mut self, name: &'static str, value: &str) {
        logging::JsonMembers::str(self, name, value);
    }

    fn u64(&mut self, name: &'static str, value: u64) {
        logging::JsonMembers::u64(self, name, value);
    }

    fn peer(&mut self, value: &SocketAddr) {
        self.socket_addr("peer", value);
    }

    fn duration(&mut self, micros: u64) {
        self.thousandths("duration_ms", micros);
    }

    fn fingerprint(&mut self, value: &str) {
        logging::JsonMembers::str(self, "token_fp", value);
    }

    fn trace_id(&mut self, value: &str) {
        logging::JsonMembers::str(self, "trace_id", value);
    }
}
