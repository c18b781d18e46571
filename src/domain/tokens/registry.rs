//! Every configured credential's cache, which credential serves which
//! terminal, and what a reload keeps.

use std::{sync::Arc, time::Duration};

use crate::{
    clock::{Clock, SharedEntropy},
    config::CredentialConfig,
};

use super::{
    TokenHealth, TokenSource, credential::CredentialTokens, policy::TokenPolicy, refresh::WarmStart,
};

/// Every credential's cache, and which credential serves which terminal.
pub struct Tokens<S> {
    credentials: Vec<Arc<CredentialTokens<S>>>,
    /// Each credential's terminals, by the same index.
    terminals: Vec<Box<[String]>>,
    /// (terminal, credential index), sorted by terminal: looked up on every
    /// call by binary search, which for a configuration's few (or few
    /// thousand) terminals costs less than hashing the caller's string with
    /// std's SipHash. The configuration gives each terminal one credential.
    by_terminal: Box<[(Box<str>, usize)]>,
}

/// What building a [`Tokens`] needs besides the credentials.
pub struct TokensSetup<'a, S> {
    pub source: S,
    pub policy: TokenPolicy,
    pub clock: &'a Clock,
    pub entropy: &'a SharedEntropy,
    /// How many first fetches run at once at start-up.
    pub warm_start_concurrency: usize,
    /// First fetches are spread at random over this long.
    pub warm_start_spread: Duration,
}

impl<S: TokenSource + Clone> Tokens<S> {
    /// Builds every credential's cache, reusing those in `keep` whose name and
    /// API key are unchanged (their tokens survive a reload); new ones start
    /// their first fetch spread out over `warm_start_spread`.
    pub fn new(
        credentials: &[CredentialConfig],
        setup: TokensSetup<'_, S>,
        keep: Option<&Tokens<S>>,
    ) -> Self {
        let gate = Arc::new(tokio::sync::Semaphore::new(
            setup.warm_start_concurrency.max(1),
        ));
        let mut by_terminal = Vec::new();
        let terminals = credentials
            .iter()
            .map(|c| c.terminals.clone().into_boxed_slice())
            .collect();
        let credentials = credentials
            .iter()
            .enumerate()
            .map(|(i, c)| {
                by_terminal.extend(c.terminals.iter().map(|t| (t.as_str().into(), i)));
                let kept = keep.and_then(|k| {
                    k.credentials
                        .iter()
                        .find(|old| *old.name == *c.name && old.has_api_key(&c.api_key))
                });
                match kept {
                    Some(old) => Arc::clone(old),
                    None => Arc::new(CredentialTokens::spawn(
                        &c.name,
                        c.api_key.clone(),
                        setup.source.clone(),
                        setup.policy,
                        setup.clock.clone(),
                        Arc::clone(setup.entropy),
                        WarmStart {
                            delay: setup.entropy.jitter(setup.warm_start_spread),
                            gate: Some(Arc::clone(&gate)),
                        },
                    )),
                }
            })
            .collect();
        by_terminal.sort_unstable();
        Self {
            credentials,
            terminals,
            by_terminal: by_terminal.into_boxed_slice(),
        }
    }

    /// The credential configured as `name`, and its terminals.
    pub fn named(&self, name: &str) -> Option<(&Arc<CredentialTokens<S>>, &[String])> {
        let i = self.credentials.iter().position(|c| *c.name == *name)?;
        Some((&self.credentials[i], &self.terminals[i]))
    }

    /// The credential serving `terminal`.
    pub fn for_terminal(&self, terminal: &str) -> Option<&Arc<CredentialTokens<S>>> {
        let at = self
            .by_terminal
            .binary_search_by(|(t, _)| (**t).cmp(terminal))
            .ok()?;
        Some(&self.credentials[self.by_terminal[at].1])
    }

    pub fn credentials(&self) -> &[Arc<CredentialTokens<S>>] {
        &self.credentials
    }

    /// Completes once every credential's first fetch has finished (either way).
    pub async fn warmed(&self) {
        for c in &self.credentials {
            let mut h = c.health();
            let _ = h.wait_for(|h| *h != TokenHealth::Starting).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::tokens::{testing::*, *};

    fn config(name: &str, key: &str, terminals: &[&str]) -> CredentialConfig {
        CredentialConfig {
            name: name.into(),
            api_key: SecretString::from(key.to_owned()),
            terminals: terminals.iter().map(|t| t.to_string()).collect(),
            api_key_file: None,
        }
    }

    fn setup<'a>(
        script: &Script,
        clock: &'a Clock,
        entropy: &'a SharedEntropy,
        spread: u64,
    ) -> TokensSetup<'a, Script> {
        TokensSetup {
            source: script.clone(),
            policy: TokenPolicy::new(Duration::from_secs(300), FLOOR),
            clock,
            entropy,
            warm_start_concurrency: 2,
            warm_start_spread: Duration::from_secs(spread),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_terminal_finds_its_credential_and_no_other_finds_one() {
        let script = Script::answers(&[Ok(3600)]);
        let clock = Clock::starting_at(SystemTime::UNIX_EPOCH);
        let entropy: SharedEntropy = Arc::new(crate::clock::OsEntropy);
        // Terminals out of order, interleaved between credentials.
        let creds = vec![
            config("a", "ka", &["3001", "1001", "2002"]),
            config("b", "kb", &["2001", "9", "30010"]),
        ];
        let tokens = Tokens::new(&creds, setup(&script, &clock, &entropy, 0), None);
        for (terminal, credential) in [
            ("1001", "a"),
            ("2002", "a"),
            ("3001", "a"),
            ("2001", "b"),
            ("9", "b"),
            ("30010", "b"),
        ] {
            let found = tokens.for_terminal(terminal).map(|c| &*c.name);
            assert_eq!(found, Some(credential), "terminal {terminal}");
        }
        for unknown in ["", "1", "300", "3000", "3002", "99", "１００１"] {
            assert!(tokens.for_terminal(unknown).is_none(), "{unknown:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn warm_start_is_spread_out_and_reload_keeps_unchanged_credentials() {
        let script = Script::answers(&[Ok(3600)]);
        let clock = Clock::starting_at(SystemTime::UNIX_EPOCH);
        let entropy: SharedEntropy = Arc::new(crate::clock::OsEntropy);
        let creds: Vec<_> = (0..6)
            .map(|i| config(&format!("c{i}"), &format!("k{i}"), &[&format!("100{i}")]))
            .collect();
        let tokens = Tokens::new(&creds, setup(&script, &clock, &entropy, 10), None);
        settle().await;
        assert!(script.calls() < 6, "first fetches are spread over 10 s");
        tokio::time::timeout(Duration::from_secs(11), tokens.warmed())
            .await
            .expect("warm within the spread");
        assert_eq!(script.calls(), 6);

        // Reload: c0 unchanged, c1 with a rotated key, c2..c5 removed, c6 new.
        let next = vec![
            config("c0", "k0", &["1000", "2000"]),
            config("c1", "k1-rotated", &["1001"]),
            config("c6", "k6", &["1006"]),
        ];
        let old_c0 = tokens.for_terminal("1000").unwrap().cached().unwrap();
        let reloaded = Tokens::new(&next, setup(&script, &clock, &entropy, 0), Some(&tokens));
        drop(tokens);
        settle().await;
        assert_eq!(
            script.calls(),
            8,
            "only the rotated and the new credential fetch"
        );
        let kept = reloaded.for_terminal("2000").unwrap().cached().unwrap();
        assert!(
            Arc::ptr_eq(&old_c0, &kept),
            "c0's token survived the reload"
        );
        assert!(reloaded.for_terminal("1002").is_none());
        assert_eq!(&*reloaded.for_terminal("1006").unwrap().name, "c6");
    }
}
