//! The pipeline registry: WGSL sources from `shaders/` (embedded with `include_str!`),
//! specialised and compiled once per [`PipelineKey`], then cached.
//!
//! Specialisation has two mechanisms:
//! - **flags**, for code that must not exist at all in some variants (the browser-only
//!   `enable subgroups;` that naga rejects, dtype-specific loads, `f16` code): a tiny
//!   preprocessor keeps or drops lines between `#if FLAG` / `#if !FLAG`, `#else` and `#endif`
//!   (nestable; directives stand alone on their line). The flag [`SHADER_F16`] also puts
//!   `enable f16;` at the very start of the module (WGSL wants directives before any
//!   declaration), so shaders only write `#if SHADER_F16` sections; such pipelines need a device
//!   with SHADER_F16 ([`crate::Gpu::has_f16`]).
//!   A shader whose flags are not independent lists its valid sets on a `// variants:` line
//!   (e.g. `// variants: F32 | F16 | Q8 QUANT | Q6 QUANT | Q4 QUANT`); the naga test validates those.
//! - **override constants** (`override TILE: u32 = 64;`), set per pipeline by name, for sizes.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use crate::error::{GpuError, Result};

/// The flag of kernel variants that compute with `f16` values (see the module docs).
pub const SHADER_F16: &str = "SHADER_F16";

/// A WGSL source file from `shaders/`.
#[derive(Clone, Copy, Debug)]
pub struct Shader {
    pub name: &'static str,
    pub source: &'static str,
}

/// Embeds `shaders/<name>.wgsl` as a [`Shader`].
#[macro_export]
macro_rules! shader {
    ($name:literal) => {
        $crate::registry::Shader {
            name: $name,
            source: include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shaders/",
                $name,
                ".wgsl"
            )),
        }
    };
}

/// Identifies one compiled pipeline: shader, entry point, flags and override constants.
#[derive(Clone, Debug)]
pub struct PipelineKey {
    pub shader: Shader,
    pub entry: &'static str,
    flags: Vec<&'static str>,
    constants: Vec<(&'static str, u32)>,
}

impl PipelineKey {
    pub fn new(shader: Shader, entry: &'static str) -> Self {
        PipelineKey {
            shader,
            entry,
            flags: Vec::new(),
            constants: Vec::new(),
        }
    }

    /// Turns on `#if FLAG` sections.
    pub fn flag(mut self, flag: &'static str) -> Self {
        if !self.flags.contains(&flag) {
            self.flags.push(flag);
            self.flags.sort_unstable();
        }
        self
    }

    /// Turns on `flag` when `on`.
    pub fn flag_if(self, on: bool, flag: &'static str) -> Self {
        if on { self.flag(flag) } else { self }
    }

    /// Sets the WGSL `override` constant `name`.
    pub fn constant(mut self, name: &'static str, value: u32) -> Self {
        self.constants.retain(|(n, _)| *n != name);
        self.constants.push((name, value));
        self.constants.sort_unstable();
        self
    }

    pub fn flags(&self) -> &[&'static str] {
        &self.flags
    }

    /// The entry point and its variant flags, e.g. `attention_tiled TILED KV_F16`.
    pub fn describe(&self) -> String {
        std::iter::once(self.entry)
            .chain(self.flags.iter().copied())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl PartialEq for PipelineKey {
    fn eq(&self, other: &Self) -> bool {
        self.shader.name == other.shader.name
            && self.entry == other.entry
            && self.flags == other.flags
            && self.constants == other.constants
    }
}
impl Eq for PipelineKey {}
impl Hash for PipelineKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self.shader.name, self.entry, &self.flags, &self.constants).hash(state);
    }
}

/// Keeps the lines of `source` whose `#if` conditions hold for `flags`; with [`SHADER_F16`] the
/// result starts with `enable f16;` (on the first line: it adds no line).
pub fn preprocess(source: &str, flags: &[&str]) -> Result<String, String> {
    let mut out = String::with_capacity(source.len() + 12);
    if flags.contains(&SHADER_F16) {
        out.push_str("enable f16; ");
    }
    // One entry per open `#if`: (this branch is taken, the enclosing region is live).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let live = |stack: &[(bool, bool)]| stack.last().is_none_or(|&(taken, outer)| taken && outer);
    for (n, line) in source.lines().enumerate() {
        let t = line.trim();
        if let Some(cond) = t.strip_prefix("#if ") {
            let cond = cond.trim();
            let value = match cond.strip_prefix('!') {
                Some(f) => !flags.contains(&f.trim()),
                None => flags.contains(&cond),
            };
            let outer = live(&stack);
            stack.push((value, outer));
        } else if t == "#else" {
            let top = stack
                .last_mut()
                .ok_or(format!("line {}: #else without #if", n + 1))?;
            top.0 = !top.0;
        } else if t == "#endif" {
            stack
                .pop()
                .ok_or(format!("line {}: #endif without #if", n + 1))?;
        } else if t.starts_with('#') {
            return Err(format!("line {}: unknown directive {t}", n + 1));
        } else if live(&stack) {
            out.push_str(line);
            out.push('\n');
        } else {
            // Keep line numbers of compiler errors meaningful.
            out.push('\n');
        }
    }
    if !stack.is_empty() {
        return Err("unterminated #if".into());
    }
    Ok(out)
}

/// Compiled pipelines, keyed by [`PipelineKey`].
#[derive(Default)]
pub struct PipelineRegistry {
    cache: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
}

impl PipelineRegistry {
    /// How many pipelines have been compiled.
    pub fn created(&self) -> u64 {
        self.cache.lock().unwrap().len() as u64
    }

    pub fn get(
        &self,
        device: &wgpu::Device,
        key: &PipelineKey,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        if let Some(p) = self.cache.lock().unwrap().get(key) {
            return Ok(p.clone());
        }
        let source = preprocess(key.shader.source, &key.flags)
            .map_err(|e| GpuError::Validation(format!("{}.wgsl: {e}", key.shader.name)))?;
        #[cfg(test)]
        let source = crate::testing::poison_workgroup_memory(&source, key.entry);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(key.shader.name),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let constants: Vec<(&str, f64)> =
            key.constants.iter().map(|&(n, v)| (n, v as f64)).collect();
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(key.entry),
            layout: None,
            module: &module,
            entry_point: Some(key.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                // Every kernel writes its workgroup memory before reading it (this crate's tests
                // fill it with 1e30 first: testing::poison_workgroup_memory), so zeroing it would
                // only cost each workgroup a pass over it and a barrier. Browsers zero it anyway.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        let pipeline = Arc::new(pipeline);
        self.cache
            .lock()
            .unwrap()
            .insert(key.clone(), pipeline.clone());
        Ok(pipeline)
    }
}

#[cfg(test)]
mod tests {
    use super::preprocess;

    #[test]
    fn preprocessor_keeps_taken_branches_only() {
        let src = "a\n#if F16\nb\n#if !X\nc\n#else\nd\n#endif\n#else\ne\n#endif\nf\n";
        let keep = |flags: &[&str]| -> Vec<String> {
            preprocess(src, flags)
                .unwrap()
                .lines()
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        };
        assert_eq!(keep(&[]), ["a", "e", "f"]);
        assert_eq!(keep(&["F16"]), ["a", "b", "c", "f"]);
        assert_eq!(keep(&["F16", "X"]), ["a", "b", "d", "f"]);
        assert!(preprocess("#if A\n", &[]).is_err());
        assert!(preprocess("#endif\n", &[]).is_err());
        assert!(preprocess("#define A\n", &[]).is_err());
    }

    #[test]
    fn shader_f16_flag_enables_f16_before_everything_on_line_one() {
        let src = "// header\n#if SHADER_F16\nalias T = f16;\n#else\nalias T = f32;\n#endif\n";
        assert_eq!(
            preprocess(src, &["SHADER_F16"]).unwrap(),
            "enable f16; // header\nalias T = f16;\n\n"
        );
        assert_eq!(
            preprocess(src, &[]).unwrap(),
            "// header\n\nalias T = f32;\n"
        );
    }
}
