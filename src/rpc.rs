//! The one list of the calls the broker answers, and the names the rest of
//! the crate knows them by.
//!
//! A call's name is the same word everywhere it appears: in a caller's `rpcs`
//! allow list, in the `rpc` label of the metrics and in the `rpc` field of
//! the audit event. Adding a call is one line in the `rpcs!` table below; every
//! `match` on [`Rpc`] elsewhere (the handlers, the metrics' arrays sized by
//! [`Rpc::COUNT`]) then fails to compile until it is served.
//!
//! Also here: [`code_name`], the outcome vocabulary shared by the audit trail
//! and the metrics.

use tonic::Code;

/// Declares [`Rpc`] and its one table: variant, then the route that serves
/// it. Generated so the list of variants and [`Rpc::ALL`] cannot
/// drift apart.
macro_rules! rpcs {
    ($( $(#[$doc:meta])* $rpc:ident => $path:expr ),+ $(,)?) => {
        /// A call the broker answers, as named in allow lists, metrics and
        /// audit events.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Rpc {
            $( $(#[$doc])* $rpc ),+
        }

        impl Rpc {
            /// Every call, in declaration order (`ALL[r as usize] == r`).
            pub const ALL: &'static [Rpc] = &[$(Rpc::$rpc),+];

            /// The name in allow lists, the `rpc` metric label and the
            /// audit event's `rpc` field.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Rpc::$rpc => stringify!($rpc)),+
                }
            }

            /// Where it is served.
            pub const fn route(self) -> Route {
                match self {
                    $(Rpc::$rpc => $path),+
                }
            }
        }
    };
}

/// Where a call is served: a gRPC method on the gRPC port, or an HTTP route
/// on a port of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The gRPC request path.
    Grpc(&'static str),
    /// The HTTP method and path template (documentation and messages).
    Http(&'static str),
}

rpcs! {
    GetBearerToken => Route::Grpc("/payroc.broker.v1.TokenBroker/GetBearerToken"),
    CreateSession => Route::Grpc("/payroc.broker.v1.TokenBroker/CreateSession"),
    WatchBearerToken => Route::Grpc("/payroc.broker.v1.TokenBroker/WatchBearerToken"),
    /// Envoy's `envoy.service.auth.v3.Authorization/Check`; allow lists
    /// call it `ExtAuthz`.
    ExtAuthz => Route::Grpc("/envoy.service.auth.v3.Authorization/Check"),
    /// The Payroc-compatible identity endpoint (`[identity_endpoint]`), which
    /// the official SDKs call for their Bearer token.
    Authorize => Route::Http("POST /credentials/{credential}/authorize"),
}

impl Rpc {
    /// How many calls there are: the size of per-call arrays.
    pub const COUNT: usize = Self::ALL.len();

    /// The call an allow list names.
    pub fn from_name(name: &str) -> Option<Rpc> {
        Self::ALL.iter().copied().find(|r| r.name() == name)
    }

    /// The call a gRPC request path names: `None` for a path that serves
    /// none (audited as `unknown`).
    pub fn from_path(path: &str) -> Option<Rpc> {
        Self::ALL
            .iter()
            .copied()
            .find(|r| matches!(r.route(), Route::Grpc(p) if p == path))
    }

    /// Position in [`Rpc::ALL`]: an index into per-call arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Every name, comma-separated, for error messages.
    pub fn names() -> String {
        let names: Vec<&str> = Self::ALL.iter().map(|r| r.name()).collect();
        names.join(", ")
    }
}

/// The gRPC code as gRPC spells it (`OK`, `INVALID_ARGUMENT`, ...): the
/// audit event's `code` and the metrics' `code` label.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_indexed_in_order_and_names_round_trip() {
        for (i, rpc) in Rpc::ALL.iter().enumerate() {
            assert_eq!(rpc.index(), i);
            assert_eq!(Rpc::from_name(rpc.name()), Some(*rpc));
            if let Route::Grpc(path) = rpc.route() {
                assert_eq!(Rpc::from_path(path), Some(*rpc));
            }
        }
        assert_eq!(Rpc::from_name("Nope"), None);
        assert_eq!(
            Rpc::names(),
            "GetBearerToken, CreateSession, WatchBearerToken, ExtAuthz, Authorize"
        );
    }

    #[test]
    fn paths_name_rpcs() {
        assert_eq!(
            Rpc::from_path("/payroc.broker.v1.TokenBroker/GetBearerToken"),
            Some(Rpc::GetBearerToken)
        );
        assert_eq!(
            Rpc::from_path("/envoy.service.auth.v3.Authorization/Check"),
            Some(Rpc::ExtAuthz)
        );
        assert_eq!(
            Rpc::from_path("/payroc.broker.v1.TokenBroker/ExtAuthz"),
            None
        );
        assert_eq!(Rpc::from_path("/payroc.broker.v1.TokenBroker/Nope"), None);
        assert_eq!(Rpc::from_path("/credentials/{credential}/authorize"), None);
    }

    #[test]
    fn code_names_are_grpcs() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(Code::Unauthenticated), "UNAUTHENTICATED");
        assert_eq!(code_name(Code::from_i32(999)), "UNKNOWN");
    }
}
