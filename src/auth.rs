//! Caller authentication and authorisation.
//!
//! Callers present `authorization: Bearer <caller token>` metadata. The broker
//! keeps only SHA-256 hashes of caller tokens and compares the presented
//! token's hash against every configured hash in constant time, so neither the
//! tokens nor timing reveal anything. Authentication happens first (before
//! request validation); authorisation (the caller's terminal and RPC allow
//! lists) after validation, as the contract orders them.
//!
//! mTLS identities (SPIFFE IDs) will be another way to reach a [`Caller`].

use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;

use crate::{
    config::{CallerConfig, CallerIdentity, Rpc, sha256},
    error::BrokerError,
};

/// Who may call.
#[derive(Debug)]
pub enum Callers {
    /// No `[[callers]]`: anyone on the network may call (`--allow-unauthenticated`).
    Open,
    /// Only these callers.
    Known(Vec<CallerConfig>),
}

/// An authenticated caller.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'a> {
    Anonymous,
    Known(&'a CallerConfig),
}

impl Callers {
    pub fn from_config(callers: &[CallerConfig]) -> Self {
        if callers.is_empty() {
            Callers::Open
        } else {
            Callers::Known(callers.to_vec())
        }
    }

    /// Identifies the caller from request metadata.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller<'_>, BrokerError> {
        let known = match self {
            Callers::Open => return Ok(Caller::Anonymous),
            Callers::Known(k) => k,
        };
        let value = metadata
            .get("authorization")
            .ok_or(BrokerError::Unauthenticated(
                "missing `authorization: Bearer <token>` metadata",
            ))?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or(BrokerError::Unauthenticated(
                "`authorization` metadata is not `Bearer <token>`",
            ))?;
        let presented = sha256(token.as_bytes());
        // Visit every caller whatever matches, so timing says nothing about
        // which (or whether) one did.
        let mut found: Option<&CallerConfig> = None;
        for c in known {
            let CallerIdentity::TokenSha256(hash) = &c.identity else {
                continue;
            };
            let eq: bool = hash.ct_eq(&presented).into();
            if eq {
                found = Some(c);
            }
        }
        found
            .map(Caller::Known)
            .ok_or(BrokerError::Unauthenticated("unknown caller token"))
    }
}

impl Caller<'_> {
    /// The caller's configured name, for logs.
    pub fn name(&self) -> &str {
        match self {
            Caller::Anonymous => "anonymous",
            Caller::Known(c) => &c.name,
        }
    }

    /// Checks the caller's allow lists.
    pub fn authorize(&self, rpc: Rpc, terminal: &str) -> Result<(), BrokerError> {
        let Caller::Known(c) = self else {
            return Ok(());
        };
        let denied = |reason: String| BrokerError::PermissionDenied {
            caller: c.name.clone(),
            reason,
        };
        if !c.rpcs.permits(&rpc) {
            return Err(denied(format!("may not call {}", rpc.name())));
        }
        if !c.terminals.permits(&terminal.to_owned()) {
            return Err(denied(format!(
                "may not use processing terminal `{terminal}`"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Allow;

    fn callers() -> Callers {
        Callers::Known(vec![
            CallerConfig {
                name: "web".into(),
                identity: CallerIdentity::TokenSha256(sha256(b"web-token")),
                rate_limit: None,
                terminals: Allow::Only(vec!["1234001".into()]),
                rpcs: Allow::Only(vec![Rpc::CreateSession]),
            },
            CallerConfig {
                name: "ops".into(),
                identity: CallerIdentity::TokenSha256(sha256(b"ops-token")),
                rate_limit: None,
                terminals: Allow::All,
                rpcs: Allow::All,
            },
        ])
    }

    fn md(value: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(v) = value {
            m.insert("authorization", v.parse().unwrap());
        }
        m
    }

    #[test]
    fn known_tokens_identify_their_caller() {
        let c = callers();
        assert_eq!(
            c.authenticate(&md(Some("Bearer web-token")))
                .unwrap()
                .name(),
            "web"
        );
        assert_eq!(
            c.authenticate(&md(Some("bearer ops-token")))
                .unwrap()
                .name(),
            "ops"
        );
    }

    #[test]
    fn missing_malformed_and_unknown_tokens_are_unauthenticated() {
        let c = callers();
        for v in [
            None,
            Some("web-token"),
            Some("Basic web-token"),
            Some("Bearer "),
            Some("Bearer nope"),
        ] {
            let e = c.authenticate(&md(v)).unwrap_err();
            assert!(matches!(e, BrokerError::Unauthenticated(_)), "{v:?}: {e:?}");
        }
    }

    #[test]
    fn allow_lists_are_enforced() {
        let c = callers();
        let web = c.authenticate(&md(Some("Bearer web-token"))).unwrap();
        web.authorize(Rpc::CreateSession, "1234001").unwrap();
        assert!(matches!(
            web.authorize(Rpc::GetBearerToken, "1234001"),
            Err(BrokerError::PermissionDenied { .. })
        ));
        assert!(matches!(
            web.authorize(Rpc::CreateSession, "9999999"),
            Err(BrokerError::PermissionDenied { .. })
        ));
        let ops = c.authenticate(&md(Some("Bearer ops-token"))).unwrap();
        ops.authorize(Rpc::GetBearerToken, "anything").unwrap();
    }

    #[test]
    fn open_mode_lets_everyone_in() {
        let open = Callers::Open;
        let c = open.authenticate(&md(None)).unwrap();
        c.authorize(Rpc::GetBearerToken, "1234001").unwrap();
        assert_eq!(c.name(), "anonymous");
    }
}
