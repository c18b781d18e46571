//! Reading files that hold secrets (API key files, TLS private keys) or that
//! sit beside them (certificates, CA bundles), without the ways a file path
//! can hurt a process that trusts it.
//!
//! - Symbolic links are followed (Kubernetes Secret volumes are chains of
//!   them), but the target must be a regular file: a FIFO would block start-up
//!   for ever and a device such as `/dev/zero` would be read until memory runs
//!   out. The type is checked before opening, the file is opened with
//!   `O_NONBLOCK` and checked again through the open descriptor, so swapping
//!   the path for a FIFO in between cannot block either.
//! - The size is capped, before and while reading.
//! - A secret file that others, or a group other than the process's own, may
//!   read is worth a warning at start-up (and on each reload), naming the
//!   file and its mode. The process's own group is exempt because that is how
//!   a non-root pod reads a Kubernetes Secret: the files stay owned by root
//!   and `fsGroup` makes them group-readable (0440), whatever `defaultMode`.
//! - Secret bytes are read into one buffer allocated up front (no reallocation
//!   leaves copies behind) that is wiped when dropped.
//!
//! Used by the configuration (API key files; TLS files checked at parse time)
//! and by the transport when it re-reads TLS files on SIGHUP.

use std::{
    fmt,
    fs::{File, Metadata, OpenOptions},
    io::Read,
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use zeroize::Zeroizing;

/// Secret files larger than this are refused: an RSA-4096 PEM key is about
/// 3.3 KiB, an API key far less.
pub const MAX_SECRET_FILE_BYTES: u64 = 16 * 1024;

/// Certificate chains and CA bundles larger than this are refused (a full
/// public CA bundle is about 250 KiB).
pub const MAX_PUBLIC_FILE_BYTES: u64 = 1024 * 1024;

/// Why a file could not be used. Names the file, never its contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadError {
    pub path: PathBuf,
    /// Completes "`<path>` ...", e.g. "is not a regular file".
    pub reason: String,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for ReadError {}

/// Reads a secret file of at most `max_bytes` (see the module documentation),
/// warning when group or others may read it.
pub fn read(path: &Path, max_bytes: u64) -> Result<Zeroizing<Vec<u8>>, ReadError> {
    let (mut file, meta) = open_regular(path, max_bytes)?;
    let mode = meta.permissions().mode();
    // SAFETY: getegid has no preconditions and cannot fail.
    let own_group = unsafe { libc::getegid() };
    if readable_beyond_owner(mode, meta.gid(), own_group) {
        tracing::warn!(
            file = %path.display(),
            mode = %format_args!("{:o}", mode & 0o7777),
            "a secret file is readable by others or by another group than the broker's; make \
             it 0600 or 0400, or 0440 with the broker's group (Kubernetes: fsGroup and \
             defaultMode 0440 on the Secret volume)"
        );
    }
    // Capacity for the cap and one byte more (to tell "too big"), so the
    // buffer never moves and no unwiped copy of the secret is left behind.
    let cap = usize::try_from(max_bytes).unwrap_or(usize::MAX - 1);
    let mut buf = Zeroizing::new(Vec::with_capacity(cap + 1));
    read_capped(&mut file, path, max_bytes, &mut buf)?;
    Ok(buf)
}

/// Whether a secret file with `mode`, owned by group `file_group`, can be read
/// by anyone but its owner and the members of `own_group` (the broker's).
/// Group 0 is never exempt: a broker running as root would otherwise silence
/// the warning for every root-owned 0640 file, the case it exists for (root's
/// group is shared by system accounts, a pod's fsGroup is not).
fn readable_beyond_owner(mode: u32, file_group: u32, own_group: u32) -> bool {
    let own = file_group == own_group && own_group != 0;
    mode & 0o007 != 0 || (mode & 0o070 != 0 && !own)
}

/// Reads a file that is not secret (a certificate chain, a CA bundle) with
/// the same type and size rules as [`read`], without the mode warning.
pub fn read_public(path: &Path, max_bytes: u64) -> Result<Vec<u8>, ReadError> {
    let (mut file, meta) = open_regular(path, max_bytes)?;
    let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    read_capped(&mut file, path, max_bytes, &mut buf)?;
    Ok(buf)
}

fn error(path: &Path, reason: impl Into<String>) -> ReadError {
    ReadError {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn regular(path: &Path, meta: &Metadata, max_bytes: u64) -> Result<(), ReadError> {
    if !meta.is_file() {
        return Err(error(
            path,
            "is not a regular file (FIFOs, devices and directories are refused)",
        ));
    }
    if meta.len() > max_bytes {
        return Err(error(
            path,
            format!("is {} bytes, more than the {max_bytes} allowed", meta.len()),
        ));
    }
    Ok(())
}

/// Opens `path` (symbolic links followed) if it is a regular file of at most
/// `max_bytes`, never blocking on the way.
fn open_regular(path: &Path, max_bytes: u64) -> Result<(File, Metadata), ReadError> {
    let cannot = |e: std::io::Error| error(path, format!("cannot be read: {e}"));
    // Before opening: opening a FIFO for reading blocks until a writer comes.
    regular(path, &std::fs::metadata(path).map_err(cannot)?, max_bytes)?;
    // O_NONBLOCK in case the path was swapped for a FIFO since; on a regular
    // file it changes nothing.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(cannot)?;
    // Again, on what was actually opened.
    let meta = file.metadata().map_err(cannot)?;
    regular(path, &meta, max_bytes)?;
    Ok((file, meta))
}

fn read_capped(
    file: &mut File,
    path: &Path,
    max_bytes: u64,
    buf: &mut Vec<u8>,
) -> Result<(), ReadError> {
    file.take(max_bytes.saturating_add(1))
        .read_to_end(buf)
        .map_err(|e| error(path, format!("cannot be read: {e}")))?;
    // The file may have grown since its size was checked.
    if buf.len() as u64 > max_bytes {
        return Err(error(
            path,
            format!("is more than the {max_bytes} bytes allowed"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        ffi::CString,
        os::unix::{ffi::OsStrExt, fs::symlink},
        sync::{Arc, Mutex, mpsc},
        time::Duration,
    };

    use super::*;

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "payroc-broker-secret-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn write(&self, name: &str, contents: &[u8], mode: u32) -> PathBuf {
            let path = self.0.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, contents).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Runs `f` with WARN and above captured as text.
    fn warnings_of<T>(f: impl FnOnce() -> T) -> (T, String) {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        let out = tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        (out, text)
    }

    #[test]
    fn a_private_file_is_read_silently() {
        let dir = Scratch::new("ok");
        let path = dir.write("key", b"secret-key\n", 0o600);
        let (got, logs) = warnings_of(|| read(&path, MAX_SECRET_FILE_BYTES));
        assert_eq!(&got.unwrap()[..], b"secret-key\n");
        assert_eq!(logs, "");
    }

    #[test]
    fn a_file_others_can_read_is_warned_about_by_name_and_mode() {
        let dir = Scratch::new("mode");
        for (mode, shown) in [(0o644, "mode=644"), (0o604, "mode=604")] {
            let path = dir.write("key", b"secret-key", mode);
            let (got, logs) = warnings_of(|| read(&path, MAX_SECRET_FILE_BYTES));
            assert!(got.is_ok());
            assert!(logs.contains("WARN"), "{logs}");
            assert!(logs.contains(&path.display().to_string()), "{logs}");
            assert!(logs.contains(shown), "{logs}");
            assert!(!logs.contains("secret-key"), "{logs}");
        }
        // Group-readable with the process's own group (a file it created):
        // the fsGroup arrangement of a non-root Kubernetes pod, no warning;
        // except for group 0 (tests running as root), which is never exempt.
        let path = dir.write("key", b"secret-key", 0o440);
        let (got, logs) = warnings_of(|| read(&path, MAX_SECRET_FILE_BYTES));
        assert!(got.is_ok());
        // SAFETY: getegid has no preconditions and cannot fail.
        let root_group = unsafe { libc::getegid() } == 0;
        assert_eq!(logs.contains("mode=440"), root_group, "{logs}");
        // Certificates are public: no warning.
        let path = dir.write("cert", b"cert", 0o644);
        let (got, logs) = warnings_of(|| read_public(&path, MAX_PUBLIC_FILE_BYTES));
        assert_eq!(got.unwrap(), b"cert");
        assert_eq!(logs, "");
    }

    #[test]
    fn group_access_counts_only_for_another_group() {
        let (file_group, own) = (65532, 65532);
        assert!(!readable_beyond_owner(0o100600, file_group, own));
        assert!(!readable_beyond_owner(0o100440, file_group, own));
        assert!(readable_beyond_owner(0o100440, 0, own));
        assert!(readable_beyond_owner(0o100640, 1000, own));
        assert!(readable_beyond_owner(0o100444, file_group, own));
        assert!(readable_beyond_owner(0o100604, file_group, own));
        // Root's group is never "the broker's own".
        assert!(readable_beyond_owner(0o100640, 0, 0));
        assert!(!readable_beyond_owner(0o100600, 0, 0));
    }

    /// A Kubernetes Secret volume: `key -> ..data/key`, `..data -> ..<timestamp>`.
    #[test]
    fn symbolic_links_are_followed_to_a_regular_file() {
        let dir = Scratch::new("k8s");
        dir.write("..2024_01_01/api-key", b"k8s-secret", 0o400);
        symlink("..2024_01_01", dir.0.join("..data")).unwrap();
        symlink("..data/api-key", dir.0.join("api-key")).unwrap();
        let got = read(&dir.0.join("api-key"), MAX_SECRET_FILE_BYTES).unwrap();
        assert_eq!(&got[..], b"k8s-secret");
        // A link to something else than a regular file is still refused.
        symlink("/dev/zero", dir.0.join("zero")).unwrap();
        let e = read(&dir.0.join("zero"), MAX_SECRET_FILE_BYTES).unwrap_err();
        assert!(e.reason.starts_with("is not a regular file"), "{e}");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = Scratch::new("fifo");
        let path = dir.0.join("fifo");
        let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        // On another thread, so that a regression fails this test instead of
        // hanging the suite (nobody ever opens the FIFO for writing).
        let (tx, rx) = mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send((read(&p, MAX_SECRET_FILE_BYTES), read_public(&p, 10)));
        });
        let (secret, public) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("reading a FIFO blocked");
        for e in [secret.unwrap_err(), public.unwrap_err()] {
            assert_eq!(e.path, path);
            assert!(e.reason.starts_with("is not a regular file"), "{e}");
        }
    }

    #[test]
    fn devices_directories_and_missing_files_are_refused() {
        let e = read(Path::new("/dev/zero"), MAX_SECRET_FILE_BYTES).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`/dev/zero` is not a regular file (FIFOs, devices and directories are refused)"
        );
        let dir = Scratch::new("dir");
        let e = read(&dir.0, MAX_SECRET_FILE_BYTES).unwrap_err();
        assert!(e.reason.starts_with("is not a regular file"), "{e}");
        let e = read(&dir.0.join("missing"), MAX_SECRET_FILE_BYTES).unwrap_err();
        assert!(e.reason.starts_with("cannot be read: "), "{e}");
    }

    #[test]
    fn the_size_is_capped() {
        let dir = Scratch::new("big");
        let max = MAX_SECRET_FILE_BYTES as usize;
        let path = dir.write("ok", &vec![b'k'; max], 0o600);
        assert_eq!(read(&path, MAX_SECRET_FILE_BYTES).unwrap().len(), max);
        let path = dir.write("big", &vec![b'k'; max + 1], 0o600);
        let e = read(&path, MAX_SECRET_FILE_BYTES).unwrap_err();
        assert_eq!(e.reason, "is 16385 bytes, more than the 16384 allowed");
        let path = dir.write("cert", &[b'c'; 11], 0o644);
        assert!(read_public(&path, 10).is_err());
    }
}
