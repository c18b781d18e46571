//! Replays the fuzzers' committed seed corpus (`fuzz/corpus/<target>/`)
//! through the same harnesses, so every `cargo test` re-checks what fuzzing
//! found without needing a nightly toolchain.

use std::path::Path;

use payroc_broker::fuzzing;

fn replay(target: &str, harness: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| harness(&data));
        assert!(result.is_ok(), "{} panicked on {}", target, path.display());
        inputs += 1;
    }
    assert!(inputs > 0, "no seed corpus in {}", dir.display());
}

#[test]
fn problem_document_corpus() {
    replay("problem_document", fuzzing::problem_document);
}

#[test]
fn config_file_corpus() {
    replay("config_file", fuzzing::config_file);
}

#[test]
fn request_validation_corpus() {
    replay("request_validation", fuzzing::request_validation);
}

#[test]
fn xfcc_corpus() {
    replay("xfcc", fuzzing::xfcc);
}
