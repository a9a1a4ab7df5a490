//! Every file in `shaders/` parses and validates with naga under every combination of the
//! `#if` flags it uses, or, where the file lists its variants in a `// variants: A | B C | -`
//! line (flag sets separated by `|`, `-` for none), under exactly those. Needs no GPU. Naga's
//! f16 capability is granted to `SHADER_F16` variants only, its subgroup ones to `SUBGROUPS`
//! variants only.

use std::collections::BTreeSet;
use std::path::Path;

use llava_gpu::registry::{SHADER_F16, preprocess};

/// The flag sets a shader declares with `// variants:`, if it does.
fn declared_variants(source: &str) -> Option<Vec<Vec<String>>> {
    let line = source
        .lines()
        .find_map(|l| l.trim().strip_prefix("// variants:"))?;
    Some(
        line.split('|')
            .map(|set| {
                set.split_whitespace()
                    .filter(|f| *f != "-")
                    .map(String::from)
                    .collect()
            })
            .collect(),
    )
}

/// Every combination of the flags a shader tests with `#if`.
fn all_combinations(source: &str) -> Vec<Vec<String>> {
    let flags = flags_used(source);
    assert!(
        flags.len() <= 8,
        "too many flags to enumerate: {flags:?}; declare `// variants:`"
    );
    (0..1u32 << flags.len())
        .map(|mask| {
            flags
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, f)| f.clone())
                .collect()
        })
        .collect()
}

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
        let variants = declared_variants(&source).unwrap_or_else(|| all_combinations(&source));
        for variant in &variants {
            let on: Vec<&str> = variant.iter().map(String::as_str).collect();
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
                    failures.push(format!(
                        "{} {on:?}: {}",
                        path.display(),
                        e.emit_to_string(&text)
                    ));
                    continue;
                }
            };
            // Only SHADER_F16 variants (whose text starts with `enable f16;`) may use f16 values,
            // and only SUBGROUPS variants subgroup operations: the others must run on devices
            // without shader-f16 or subgroups (browsers).
            let mut caps = naga::valid::Capabilities::all();
            caps.set(
                naga::valid::Capabilities::SHADER_FLOAT16,
                on.contains(&SHADER_F16),
            );
            caps.set(
                naga::valid::Capabilities::SUBGROUP | naga::valid::Capabilities::SUBGROUP_BARRIER,
                on.contains(&"SUBGROUPS"),
            );
            let mut validator =
                naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps);
            if let Err(e) = validator.validate(&module) {
                failures.push(format!(
                    "{} {on:?}: {}",
                    path.display(),
                    e.emit_to_string(&text)
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "shader validation failed:\n{}",
        failures.join("\n")
    );
}
