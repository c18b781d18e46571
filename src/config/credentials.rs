//! `[[credentials]]`: the Payroc API keys and the terminals each serves.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{Checker, is_valid_name};

/// One Payroc API key and the terminals it serves.
#[derive(Debug, Clone)]
pub struct CredentialConfig {
    pub name: String,
    pub api_key: SecretString,
    pub terminals: Vec<String>,
    /// The file the key was read from (`api_key_file`, made absolute), so
    /// that a change to it can trigger a reload; `None` for `api_key_env`.
    pub api_key_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCredential {
    name: String,
    api_key_env: Option<String>,
    api_key_file: Option<PathBuf>,
    terminals: Vec<String>,
}

pub(super) fn check(raw: Vec<RawCredential>, c: &mut Checker<'_>) -> Vec<CredentialConfig> {
    let mut owner: HashMap<String, String> = HashMap::new();
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, cred) in raw.into_iter().enumerate() {
        let at = format!("credentials[{i}]");
        if !is_valid_name(&cred.name) {
            c.problem(
                format!("{at}.name"),
                format!("`{}` must be 1 to 64 of A-Z a-z 0-9 . _ -", cred.name),
            );
        } else if !names.insert(cred.name.clone()) {
            c.problem(
                format!("{at}.name"),
                format!("`{}` is used twice", cred.name),
            );
        }
        let api_key_from_file = cred.api_key_file.is_some();
        let api_key_file = cred.api_key_file.as_ref().map(|p| c.base_dir.join(p));
        let api_key = match (cred.api_key_env, cred.api_key_file) {
            (Some(var), None) => c.env_secret(&format!("{at}.api_key_env"), &var),
            (None, Some(path)) => c.file_secret(&format!("{at}.api_key_file"), &path),
            _ => {
                c.problem(
                    format!("{at}.api_key_env"),
                    "set exactly one of api_key_env and api_key_file",
                );
                None
            }
        };
        if let Some(key) = &api_key
            && !is_header_value(key.expose_secret())
        {
            let source = if api_key_from_file {
                "api_key_file"
            } else {
                "api_key_env"
            };
            c.problem(
                format!("{at}.{source}"),
                "the API key is not a valid HTTP header value: it holds a control \
                 character (such as a line break inside it) or a non-ASCII character",
            );
        }
        if cred.terminals.is_empty() {
            c.problem(format!("{at}.terminals"), "lists no terminal");
        }
        for (j, t) in cred.terminals.iter().enumerate() {
            let key = format!("{at}.terminals[{j}]");
            if !crate::payroc::is_valid_terminal_id(t) {
                // Not echoed: it may hold control characters.
                c.problem(
                    key,
                    format!("the terminal id {}", crate::payroc::TERMINAL_ID_RULE),
                );
            } else if let Some(first) = owner.get(t) {
                c.problem(
                    key,
                    format!("terminal `{t}` is already served by credential `{first}`"),
                );
            } else {
                owner.insert(t.clone(), cred.name.clone());
            }
        }
        out.push(CredentialConfig {
            name: cred.name,
            api_key: api_key.unwrap_or_else(|| SecretString::from("")),
            terminals: cred.terminals,
            api_key_file,
        });
    }
    if out.is_empty() {
        c.problem("credentials", "no [[credentials]] are configured");
    }
    out
}

/// The API key travels in the `x-api-key` header: visible ASCII, spaces and
/// tabs only. Checked here so a key with an inner newline is a configuration
/// error, not a request failure later blamed on Payroc.
fn is_header_value(key: &str) -> bool {
    key.bytes().all(|b| matches!(b, b' ' | b'\t' | 0x21..=0x7e))
}
