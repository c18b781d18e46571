//! Noticing that files changed, by comparing what `stat` says about them
//! between two looks. Only the mechanism: when to look and what to do about a
//! change is the caller's (see [`crate::app::reload`]).
//!
//! Polled rather than watched with inotify (the `notify` crate): Kubernetes
//! updates a Secret or ConfigMap volume by writing a new directory and
//! swapping the `..data` symbolic link to it, then deleting the old
//! directory. An inotify watch on a key file's resolved path follows the old
//! inode into the deleted directory and says nothing useful about the new
//! one; getting it right means watching directories and re-resolving links.
//! Calling `stat` on a handful of paths every few seconds sees every kind of
//! update (link swap, rename over, rewrite in place), costs nothing, needs no
//! extra dependency or thread, and the kubelet itself takes up to a minute to
//! update a mounted volume, so seconds of polling delay do not matter.
//!
//! Metadata rather than content digests: comparing contents would read the
//! API keys and TLS private key every few seconds, leaving more copies of
//! them in memory for no gain. A replaced file has a new inode; a file
//! rewritten in place has a new ctime (nanoseconds on Linux file systems).

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// What `stat` (following symbolic links) says about a file, as far as a
/// change of its contents shows in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// `None` when the path does not lead to anything (yet): a file that
    /// appears or disappears is a change like any other.
    fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// A set of paths and how each looked at the last look.
#[derive(Debug, Default)]
pub struct FileWatch {
    files: Vec<(PathBuf, Option<Stamp>)>,
}

impl FileWatch {
    /// Watches `paths`, as they are now.
    pub fn new(paths: impl IntoIterator<Item = PathBuf>) -> Self {
        let mut w = FileWatch::default();
        w.set_paths(paths);
        w
    }

    /// Replaces the watched set. Paths already watched keep their last look
    /// (a change since then is still reported); new ones are looked at now.
    pub fn set_paths(&mut self, paths: impl IntoIterator<Item = PathBuf>) {
        let mut next: Vec<(PathBuf, Option<Stamp>)> = Vec::new();
        for path in paths {
            if next.iter().any(|(p, _)| *p == path) {
                continue;
            }
            let stamp = match self.files.iter().find(|(p, _)| *p == path) {
                Some((_, old)) => *old,
                None => Stamp::of(&path),
            };
            next.push((path, stamp));
        }
        self.files = next;
    }

    /// The watched paths that changed since the last look (empty: none);
    /// looks again, so each change is reported once.
    pub fn changed(&mut self) -> Vec<PathBuf> {
        let mut changed = Vec::new();
        for (path, last) in &mut self.files {
            let now = Stamp::of(path);
            if now != *last {
                *last = now;
                changed.push(path.clone());
            }
        }
        changed
    }

    /// The paths watched.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// A scratch directory, removed when dropped.
    pub(crate) struct Scratch(pub PathBuf);

    impl Scratch {
        pub(crate) fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "payroc-broker-watch-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A Secret volume as the kubelet lays it out: `<name> -> ..data/<name>`,
    /// `..data -> ..<version>/`.
    pub(crate) struct SecretVolume {
        pub dir: PathBuf,
        version: usize,
    }

    impl SecretVolume {
        pub(crate) fn new(dir: &Path, files: &[(&str, &str)]) -> Self {
            std::fs::create_dir_all(dir).unwrap();
            let mut v = SecretVolume {
                dir: dir.to_owned(),
                version: 0,
            };
            v.update(files);
            for (name, _) in files {
                symlink(format!("..data/{name}"), dir.join(name)).unwrap();
            }
            v
        }

        /// What the kubelet's atomic writer does: the new contents in a new
        /// directory, a new link renamed over `..data`, the old directory
        /// removed.
        pub(crate) fn update(&mut self, files: &[(&str, &str)]) {
            self.version += 1;
            let version = format!("..2026_11_29_03_00_00.{}", self.version);
            std::fs::create_dir(self.dir.join(&version)).unwrap();
            for (name, contents) in files {
                let path = self.dir.join(&version).join(name);
                std::fs::write(&path, contents).unwrap();
            }
            let tmp = self.dir.join("..data_tmp");
            symlink(&version, &tmp).unwrap();
            std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
            if self.version > 1 {
                let old = format!("..2026_11_29_03_00_00.{}", self.version - 1);
                std::fs::remove_dir_all(self.dir.join(old)).unwrap();
            }
        }
    }

    #[test]
    fn a_kubernetes_style_link_swap_is_a_change_seen_once() {
        let scratch = Scratch::new("swap");
        let mut volume = SecretVolume::new(&scratch.0, &[("acme", "key-one")]);
        let key = scratch.0.join("acme");
        let mut watch = FileWatch::new([key.clone()]);
        assert!(watch.changed().is_empty());
        // Same length, same contents even: the file is a new one.
        volume.update(&[("acme", "key-one")]);
        assert_eq!(watch.changed(), vec![key.clone()]);
        assert!(watch.changed().is_empty(), "reported once");
    }

    #[test]
    fn a_rewrite_in_place_and_a_file_coming_and_going_are_changes() {
        let scratch = Scratch::new("inplace");
        let file = scratch.0.join("broker.toml");
        std::fs::write(&file, "a = 1\n").unwrap();
        let mut watch = FileWatch::new([file.clone()]);
        std::fs::write(&file, "a = 2\n").unwrap();
        assert_eq!(watch.changed(), vec![file.clone()]);
        std::fs::remove_file(&file).unwrap();
        assert_eq!(watch.changed(), vec![file.clone()]);
        assert!(watch.changed().is_empty(), "still missing: no news");
        std::fs::write(&file, "a = 3\n").unwrap();
        assert_eq!(watch.changed(), vec![file.clone()]);
    }

    #[test]
    fn a_new_watched_set_keeps_the_last_look_of_known_paths() {
        let scratch = Scratch::new("set");
        let (a, b) = (scratch.0.join("a"), scratch.0.join("b"));
        std::fs::write(&a, "1").unwrap();
        std::fs::write(&b, "1").unwrap();
        let mut watch = FileWatch::new([a.clone()]);
        std::fs::write(&a, "22").unwrap();
        // `a` changed before the set was replaced: still reported.
        watch.set_paths([a.clone(), b.clone(), b.clone()]);
        assert_eq!(watch.paths().count(), 2);
        assert_eq!(watch.changed(), vec![a.clone()]);
        std::fs::write(&b, "22").unwrap();
        assert_eq!(watch.changed(), vec![b.clone()]);
    }
}
