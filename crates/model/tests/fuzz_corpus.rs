//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz targets' entry
//! points in the ordinary test build (overflow checks on): every input must be handled without a
//! panic. `tests/fuzz.sh` grows the corpus with cargo-fuzz.

use std::path::PathBuf;

use llava_model::fuzzing::TARGETS;

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus")).join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_input_is_handled_without_a_panic() {
    for (target, run) in TARGETS {
        let files = corpus(target);
        assert!(
            files.len() >= 3,
            "{target}: only {} corpus files",
            files.len()
        );
        for path in files {
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target} panicked on {}", path.display());
        }
    }
}
