//! Helpers for the kernel tests: one shared device, deterministic random data, comparisons.

use std::sync::OnceLock;

pub use crate::random;
use half::f16;

use crate::quant::{dequantize, quantize};
use crate::{DType, GemmTile, Gpu, GpuOptions, Tensor};

/// The device shared by all tests of this crate (tests run in parallel on it). It has
/// shader-f16 where the adapter offers it (llvmpipe does) and `LLAVA_NO_F16` is not set, and runs
/// every GEMM on the wide tile ([`GemmTile::Wide`]) and the decode GEMV in pairs of units
/// ([`Gpu::gemv_pairs`]) with the Q4 table ([`Gpu::q4_table`]), as GPUs run it.
pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        Gpu::with_options_blocking(GpuOptions {
            gemm_tile: GemmTile::Wide,
            gemv_pairs: Some(true),
            q4_table: Some(true),
            ..GpuOptions::from_env()
        })
        .expect("a wgpu adapter (install mesa-vulkan-drivers)")
    })
}

/// A second shared device opened as a browser's adapter of unknown type gets it: without
/// shader-f16 (the f32 path of kernels that have `SHADER_F16` variants) and with the 8x8 GEMM
/// tile ([`GemmTile::Narrow`]) and the decode GEMV a unit at a time with its Q4 code book
/// computed, so that tests run both paths on the same machine.
pub fn browser_like_gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        Gpu::with_options_blocking(GpuOptions {
            f16: false,
            gemm_tile: GemmTile::Narrow,
            subgroups: false,
            gemv_pairs: Some(false),
            q4_table: Some(false),
            ..Default::default()
        })
        .expect("a wgpu adapter (install mesa-vulkan-drivers)")
    })
}

/// Both shared devices, for kernels whose variants differ between them: [`gpu`] (shader-f16,
/// the wide GEMM tile, subgroups where the adapter has them: llvmpipe's are 8 wide, the decode
/// GEMV in pairs of units) and [`browser_like_gpu`] (the f32 path, the 8x8 tile, reductions
/// through workgroup memory, the GEMV a unit at a time).
pub fn devices() -> [&'static Gpu; 2] {
    [gpu(), browser_like_gpu()]
}

/// Asserts `|got - want| <= tol * max(1, |want|)` element-wise, naming the first failure.
#[track_caller]
pub fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0) && g.is_finite() == w.is_finite(),
            "{what}: element {i}: got {g}, want {w} (tol {tol})"
        );
    }
}

/// Random weights `[n, k]` in `dtype` on `gpu`, with the f32 values a kernel must compute with
/// (the f16-rounded or dequantized ones).
pub fn weights(gpu: &Gpu, dtype: DType, n: usize, k: usize, seed: u64) -> (Tensor, Vec<f32>) {
    let w = random(n * k, seed);
    match dtype {
        DType::F32 => (Tensor::from_f32(gpu, &[n, k], &w).unwrap(), w),
        DType::F16 => {
            let h: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let exact = h.iter().map(|v| v.to_f32()).collect();
            (Tensor::from_f16(gpu, &[n, k], &h).unwrap(), exact)
        }
        _ => {
            let q = quantize(dtype, n, k, &w);
            (Tensor::from_quant(gpu, &q).unwrap(), dequantize(&q))
        }
    }
}

/// `source` (preprocessed) with the workgroup memory that entry point `entry` uses filled with
/// huge values (1e30, 60000 in f16, 2^31 - 1) before anything else runs: pipelines are compiled
/// without zeroing it, so in this crate's tests a kernel that reads workgroup memory it did not
/// write computes with these and fails its reference check.
pub fn poison_workgroup_memory(source: &str, entry: &str) -> String {
    use naga::{ArraySize, Binding, BuiltIn, Scalar, ScalarKind, TypeInner};
    let module = naga::front::wgsl::parse_str(source).expect("shader parses");
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .expect("shader validates");
    let (index, ep) = module
        .entry_points
        .iter()
        .enumerate()
        .find(|(_, e)| e.name == entry)
        .expect("entry point");
    let uses = info.get_entry_point(index);
    let threads: u32 = ep.workgroup_size.iter().product();
    let lid = ep.function.arguments.iter().find_map(|a| match a.binding {
        Some(Binding::BuiltIn(BuiltIn::LocalInvocationIndex)) => a.name.clone(),
        _ => None,
    });
    let scalar = |s: Scalar| match (s.kind, s.width) {
        (ScalarKind::Float, 4) => ("f32", "1e30"),
        (ScalarKind::Float, 2) => ("f16", "60000.0"),
        (ScalarKind::Uint, 4) => ("u32", "2147483647"),
        (ScalarKind::Sint, 4) => ("i32", "2147483647"),
        other => panic!("no poison for {other:?}"),
    };
    let index_name = lid.as_deref().unwrap_or("poison_lid");
    // The value of a scalar or vector type, and whether it is atomic.
    let value = |ty: &TypeInner, name: &str| -> (String, bool) {
        match *ty {
            TypeInner::Scalar(s) => {
                let (t, v) = scalar(s);
                (format!("{t}({v})"), false)
            }
            TypeInner::Vector { size, scalar: s } => {
                let (t, v) = scalar(s);
                (format!("vec{}<{t}>({v})", size as u8), false)
            }
            TypeInner::Atomic(s) => {
                let (t, v) = scalar(s);
                (format!("{t}({v})"), true)
            }
            ref other => panic!("no poison for {name}: {other:?}"),
        }
    };
    let store = |place: String, (value, atomic): (String, bool)| {
        if atomic {
            format!("atomicStore(&{place}, {value});")
        } else {
            format!("{place} = {value};")
        }
    };
    let mut fill = String::new();
    for (handle, var) in module.global_variables.iter() {
        if var.space != naga::AddressSpace::WorkGroup || uses[handle].is_empty() {
            continue;
        }
        let name = var.name.as_deref().expect("named");
        let line = match module.types[var.ty].inner {
            TypeInner::Array {
                base,
                size: ArraySize::Constant(len),
                ..
            } => {
                let set = store(format!("{name}[i]"), value(&module.types[base].inner, name));
                format!("for (var i = {index_name}; i < {len}u; i += {threads}u) {{ {set} }}\n")
            }
            ref ty => {
                let set = store(name.to_string(), value(ty, name));
                format!("if ({index_name} == 0u) {{ {set} }}\n")
            }
        };
        fill.push_str(&line);
    }
    if fill.is_empty() {
        return source.to_string();
    }
    fill.push_str("workgroupBarrier();\n");
    // Into the entry point: the invocation index as its first argument where it has none, the
    // fill before its first statement.
    let start = source.find(&format!("fn {entry}(")).expect("entry point");
    let args = start + source[start..].find('(').unwrap() + 1;
    let body = start + source[start..].find('{').unwrap() + 1;
    let mut out = source[..args].to_string();
    if lid.is_none() {
        out.push_str("@builtin(local_invocation_index) poison_lid: u32, ");
    }
    out.push_str(&source[args..body]);
    out.push('\n');
    out.push_str(&fill);
    out.push_str(&source[body..]);
    out
}
