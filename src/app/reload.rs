//! When `serve` reloads its configuration: on SIGHUP, and when a file the
//! configuration was read from changes (the configuration file itself, an
//! `api_key_file`, a `[server.tls]` file), so that a key rotated by updating
//! a Kubernetes Secret in place reaches the running process without a signal
//! (its image has no shell to send one from). Both triggers take the same
//! path: the file is loaded again, a valid configuration goes to the server
//! (which applies it as it always has), an invalid one is logged and dropped
//! while the running one keeps serving.
//!
//! The files are polled with [`FileWatch`] every `poll` on tokio's clock
//! (paused in tests); see `file_watch` for why polling.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use futures_util::{Stream, StreamExt};
use tokio::time::{Interval, MissedTickBehavior};

use crate::{app::file_watch::FileWatch, config::Config};

/// How often `serve` looks at its files unless told otherwise.
pub const DEFAULT_POLL: Duration = Duration::from_secs(5);

/// The files a reload of `config` (read from `path`) would read again.
pub fn watched_files(path: &Path, config: &Config) -> Vec<PathBuf> {
    let mut files = vec![path.to_owned()];
    files.extend(
        config
            .credentials
            .iter()
            .filter_map(|c| c.api_key_file.clone()),
    );
    if let Some(tls) = &config.server.tls {
        files.push(tls.cert_file.clone());
        files.push(tls.key_file.clone());
        files.extend(tls.client_ca_file.clone());
    }
    files
}

/// Valid configurations loaded again after each of `hangups` and after each
/// change to the files of the configuration in force (checked every `poll`;
/// `None`: never). `current` is the configuration serving now, read from
/// `path`; `load` reads the file and checks it, or says why not, one line
/// per problem.
pub fn reloads<L, H>(
    path: PathBuf,
    current: &Config,
    mut load: L,
    hangups: H,
    poll: Option<Duration>,
) -> impl Stream<Item = Config> + Send + 'static + use<L, H>
where
    L: FnMut() -> Result<Config, Vec<String>> + Send + 'static,
    H: Stream<Item = ()> + Send + 'static,
{
    let mut watch = FileWatch::new(watched_files(&path, current));
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        // A signal stream that ends must not end the polling too.
        let mut hangups = std::pin::pin!(hangups.chain(futures_util::stream::pending()));
        let mut ticks = poll.filter(|p| !p.is_zero()).map(|p| {
            let mut i = tokio::time::interval(p);
            // The first look is one period from now: the files were just read.
            i.reset();
            // After a stall, one look is enough.
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            i
        });
        loop {
            tokio::select! {
                Some(()) = hangups.next() => {
                    tracing::info!(file = %path.display(), "SIGHUP received: reloading the configuration");
                    // Whatever changed is read by this reload: not news for
                    // the next look.
                    watch.changed();
                }
                () = tick(&mut ticks) => {
                    let changed = watch.changed();
                    if changed.is_empty() {
                        continue;
                    }
                    let files = changed
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ");
                    tracing::info!(%files, "files of the configuration changed: reloading the configuration");
                }
            }
            match load() {
                Ok(next) => {
                    // Files the new configuration names (a new key file) are
                    // watched from now on.
                    watch.set_paths(watched_files(&path, &next));
                    if tx.send(next).await.is_err() {
                        break;
                    }
                }
                Err(lines) => {
                    for problem in lines {
                        tracing::error!(%problem, "reload refused; the running configuration keeps serving");
                    }
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The next tick, or never without polling.
async fn tick(ticks: &mut Option<Interval>) {
    match ticks {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use futures_util::stream;
    use secrecy::ExposeSecret;
    use tokio::time::{Instant, timeout};

    use super::*;
    use crate::app::file_watch::tests::{Scratch, SecretVolume};

    const POLL: Duration = Duration::from_secs(5);

    fn write_config(dir: &Path, terminals: &str) -> PathBuf {
        let path = dir.join("broker.toml");
        std::fs::write(
            &path,
            format!(
                "[payroc]\nidentity_url = \"http://127.0.0.1:9/authorize\"\n\
                 api_url = \"http://127.0.0.1:9/v1\"\n\
                 [[credentials]]\nname = \"acme\"\napi_key_file = \"keys/acme\"\n\
                 terminals = [{terminals}]\n"
            ),
        )
        .unwrap();
        path
    }

    fn loader(path: &Path) -> impl FnMut() -> Result<Config, Vec<String>> + Send + 'static {
        let path = path.to_owned();
        move || Config::load(&path, &|_| None).map_err(|e| vec![e.to_string()])
    }

    fn key(c: &Config) -> String {
        c.credentials[0].api_key.expose_secret().to_owned()
    }

    /// Nothing comes out of `s` for a minute of (paused) time.
    async fn quiet(s: &mut (impl Stream<Item = Config> + Unpin)) {
        assert!(
            timeout(Duration::from_secs(60), s.next()).await.is_err(),
            "a reload nobody asked for"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_secret_volume_update_reloads_with_the_new_key_without_a_signal() {
        let scratch = Scratch::new("reload");
        let mut volume = SecretVolume::new(&scratch.0.join("keys"), &[("acme", "key-one")]);
        let path = write_config(&scratch.0, "\"1234001\"");
        let mut load = loader(&path);
        let first = load().unwrap();
        assert_eq!(key(&first), "key-one");
        let mut reloads = Box::pin(reloads(
            path.clone(),
            &first,
            load,
            stream::pending(),
            Some(POLL),
        ));
        quiet(&mut reloads).await;

        volume.update(&[("acme", "key-two")]);
        let started = Instant::now();
        let next = timeout(POLL * 2, reloads.next()).await.unwrap().unwrap();
        assert_eq!(key(&next), "key-two");
        assert!(started.elapsed() <= POLL, "seen at the next look");
        quiet(&mut reloads).await;

        // The configuration file itself, rewritten in place.
        write_config(&scratch.0, "\"1234001\", \"1234002\"");
        let next = timeout(POLL * 2, reloads.next()).await.unwrap().unwrap();
        assert_eq!(next.credentials[0].terminals.len(), 2);
        assert_eq!(key(&next), "key-two");
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_update_is_refused_and_the_fix_is_picked_up() {
        let scratch = Scratch::new("broken");
        let mut volume = SecretVolume::new(&scratch.0.join("keys"), &[("acme", "key-one")]);
        let path = write_config(&scratch.0, "\"1234001\"");
        let mut load = loader(&path);
        let first = load().unwrap();
        let mut reloads = Box::pin(reloads(path, &first, load, stream::pending(), Some(POLL)));

        // An empty key file: refused (logged), and not retried until the
        // files change again.
        volume.update(&[("acme", "  \n")]);
        quiet(&mut reloads).await;
        volume.update(&[("acme", "key-three")]);
        let next = timeout(POLL * 2, reloads.next()).await.unwrap().unwrap();
        assert_eq!(key(&next), "key-three");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hangup_reloads_too_and_without_polling_only_hangups_do() {
        let scratch = Scratch::new("hup");
        let mut volume = SecretVolume::new(&scratch.0.join("keys"), &[("acme", "key-one")]);
        let path = write_config(&scratch.0, "\"1234001\"");
        let mut load = loader(&path);
        let first = load().unwrap();
        let (hup, hangups) = tokio::sync::mpsc::channel(1);
        let hangups = tokio_stream::wrappers::ReceiverStream::new(hangups);
        let mut reloads = Box::pin(reloads(path, &first, load, hangups, None));

        volume.update(&[("acme", "key-two")]);
        quiet(&mut reloads).await;
        hup.send(()).await.unwrap();
        let next = timeout(POLL, reloads.next()).await.unwrap().unwrap();
        assert_eq!(key(&next), "key-two");
    }

    fn self_signed() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[tokio::test(start_paused = true)]
    async fn a_tls_secret_update_reloads_too() {
        let scratch = Scratch::new("tls");
        let _keys = SecretVolume::new(&scratch.0.join("keys"), &[("acme", "key-one")]);
        let (cert, key) = self_signed();
        let mut tls = SecretVolume::new(
            &scratch.0.join("tls"),
            &[("tls.crt", cert.as_str()), ("tls.key", key.as_str())],
        );
        let path = write_config(&scratch.0, "\"1234001\"");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            format!(
                "[server.tls]\ncert_file = \"tls/tls.crt\"\nkey_file = \"tls/tls.key\"\n{text}"
            ),
        )
        .unwrap();
        let mut load = loader(&path);
        let first = load().unwrap();
        let mut reloads = Box::pin(reloads(path, &first, load, stream::pending(), Some(POLL)));
        quiet(&mut reloads).await;

        let (cert, key) = self_signed();
        tls.update(&[("tls.crt", cert.as_str()), ("tls.key", key.as_str())]);
        let next = timeout(POLL * 2, reloads.next()).await.unwrap().unwrap();
        assert!(next.server.tls.is_some());
    }

    #[test]
    fn the_watched_files_are_the_config_key_files_and_tls_files() {
        let scratch = Scratch::new("files");
        let _volume = SecretVolume::new(&scratch.0.join("keys"), &[("acme", "key-one")]);
        let path = write_config(&scratch.0, "\"1234001\"");
        let mut config = Config::load(&path, &|_| None).unwrap();
        assert_eq!(
            watched_files(&path, &config),
            vec![path.clone(), scratch.0.join("keys/acme")]
        );
        config.server.tls = Some(crate::config::TlsConfig {
            cert_file: "/tls/tls.crt".into(),
            key_file: "/tls/tls.key".into(),
            client_ca_file: Some("/tls/ca.crt".into()),
            require_client_cert: false,
        });
        assert_eq!(watched_files(&path, &config).len(), 5);
    }
}
