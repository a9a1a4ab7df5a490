//! Every file in `shaders/` parses and validates with naga under every combination of the
//! `#if` flags it uses. Needs no GPU.

use std::collections::BTreeSet;
use std::path::Path;

use llava_gpu::registry::preprocess;

fn flags_used(source: &str) -> Vec<String> {
    let set: BTreeSet<String> = source
        .lines()
        .filter_map(|l| l.trim().strip_prefix("#if "))
        .map(|c| c.trim().trim_start_matches('!').trim().to_string())
        .collect();
    set.into_iter().collect()
}

#[test]
fn every_shader_validates_with_naga() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shaders");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wgsl"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no shaders found in {}", dir.display());
    let mut failures = Vec::new();
    for path in &files {
        let source = std::fs::read_to_string(path).unwrap();
        let flags = flags_used(&source);
        assert!(flags.len() <= 8, "{}: too many flags to enumerate", path.display());
        for mask in 0..1u32 << flags.len() {
            let on: Vec<&str> =
                flags.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, f)| f.as_str()).collect();
            let text = match preprocess(&source, &on) {
                Ok(t) => t,
                Err(e) => {
                    failures.push(format!("{} {on:?}: {e}", path.display()));
                    continue;
                }
            };
            let module = match naga::front::wgsl::parse_str(&text) {
                Ok(m) => m,
                Err(e) => {
                    failures.push(format!("{} {on:?}: {}", path.display(), e.emit_to_string(&text)));
                    continue;
                }
            };
            let mut validator =
                naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all());
            if let Err(e) = validator.validate(&module) {
                failures.push(format!("{} {on:?}: {}", path.display(), e.emit_to_string(&text)));
            }
        }
    }
    assert!(failures.is_empty(), "shader validation failed:\n{}", failures.join("\n"));
}
