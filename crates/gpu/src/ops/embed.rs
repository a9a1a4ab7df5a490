//! Row gathers: token embedding lookup (F32 / F16 / Q8 / Q6 / Q4 tables) and [`gather_rows`] for
//! f32 activations (packing image features, dropping CLS tokens).
//!
//! A 7B model's embedding table (262 MB in f16, 525 MB in f32) can exceed the adapter's largest
//! storage binding, so the table is bound in windows of rows, one dispatch per window, each
//! writing the outputs whose ids fall in it.
//!
//! Ids live on the GPU, so they cannot be checked here: an id `>= V` is clamped to row `V - 1`
//! in-shader, which only keeps it from reading out of bounds. Callers validate ids before upload.

use crate::context::Binding;
use crate::error::{GpuError, Result, shape_err};
use crate::registry::{PipelineKey, Shader};
use crate::{Batch, DType, Gpu, Tensor, shader};

const SHADER: Shader = shader!("embed");
const WORKGROUP: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    count: u32,
    d: u32,
    vocab: u32,
    start: u32,
    window: u32,
}

/// Rows `[V, D]` of `table` for each id of `ids` (`[T]` U32), as f32 `[T, D]`.
pub fn embedding(batch: &mut Batch, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let max = batch.gpu().max_binding();
    gather_windowed(batch, "embedding", table, ids, max)
}

/// Rows of `src` (`[N, C]` F32) picked by `index` (`[M]` U32, repeats allowed), as `[M, C]`.
pub fn gather_rows(batch: &mut Batch, src: &Tensor, index: &Tensor) -> Result<Tensor> {
    if src.dtype() != DType::F32 {
        return Err(shape_err(
            "gather_rows",
            format!("src must be F32, got {:?}", src.dtype()),
        ));
    }
    let max = batch.gpu().max_binding();
    gather_windowed(batch, "gather_rows", src, index, max)
}

/// Bytes per table row in the main buffer and in the scales buffer (0 when unquantized).
fn row_bytes(table: &Tensor, d: usize) -> (u64, u64) {
    let scales = if table.dtype().is_quantized() {
        (d / table.dtype().group_size()) as u64 * 2
    } else {
        0
    };
    (table.dtype().data_bytes(d), scales)
}

/// Rows per window: the most that fit in `max_bytes`, rounded down so that every window starts
/// on the storage-offset alignment in both the data and the scales buffer.
pub(crate) fn window_rows(gpu: &Gpu, table: &Tensor, max_bytes: u64) -> Result<usize> {
    let (rows, d) = table.dims2()?;
    let align = gpu.limits().min_storage_buffer_offset_alignment as u64;
    let (data, scales) = row_bytes(table, d);
    let step = |bytes: u64| {
        if bytes == 0 {
            1
        } else {
            align / gcd(bytes, align)
        }
    };
    let granule = lcm(step(data), step(scales));
    if data * rows as u64 <= max_bytes {
        return Ok(rows);
    }
    let window = (max_bytes / data.max(1)) / granule * granule;
    if window == 0 {
        return Err(GpuError::TooLarge {
            bytes: data * granule,
            limit: max_bytes,
            what: "embedding window",
        });
    }
    Ok(window as usize)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn lcm(a: u64, b: u64) -> u64 {
    a / gcd(a, b) * b
}

/// [`embedding`] with the table bound in windows of at most `max_window_bytes` (tests force
/// small windows through this).
pub(crate) fn gather_windowed(
    batch: &mut Batch,
    op: &'static str,
    table: &Tensor,
    ids: &Tensor,
    max_window_bytes: u64,
) -> Result<Tensor> {
    let (vocab, d) = table
        .dims2()
        .map_err(|_| shape_err(op, format!("table must be [V, D], got {:?}", table.shape())))?;
    if ids.dtype() != DType::U32 || ids.rank() != 1 {
        return Err(shape_err(
            op,
            format!(
                "ids must be U32 [T], got {:?} {:?}",
                ids.dtype(),
                ids.shape()
            ),
        ));
    }
    let flag = match table.dtype() {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::Q8 => "Q8",
        DType::Q6 => "Q6",
        DType::Q4 => "Q4",
        DType::U32 => {
            return Err(GpuError::Unsupported {
                op,
                what: "a U32 table".into(),
            });
        }
    };
    let count = ids.numel();
    if vocab == 0 && count > 0 {
        return Err(shape_err(op, "empty table"));
    }
    if u32::try_from(count * d).is_err() {
        return Err(shape_err(
            op,
            format!("output [{count}, {d}] has too many elements"),
        ));
    }
    let out = batch.tensor(&[count, d], DType::F32)?;
    if count == 0 || d == 0 {
        return Ok(out);
    }
    // Element indices inside one window must fit in u32 too.
    let max_bytes = max_window_bytes.min(table.dtype().data_bytes(u32::MAX as usize));
    let window = window_rows(batch.gpu(), table, max_bytes)?;
    let key = PipelineKey::new(SHADER, "gather")
        .flag(flag)
        .flag_if(table.dtype().is_quantized(), "QUANT");
    let grid = batch
        .gpu()
        .grid((count * d).div_ceil(WORKGROUP as usize) as u32);
    let (data_row, scales_row) = row_bytes(table, d);
    let whole = table.binding();
    for start in (0..vocab).step_by(window) {
        let rows = window.min(vocab - start);
        let data = Binding {
            buffer: whole.buffer,
            offset: whole.offset + start as u64 * data_row,
            size: rows as u64 * data_row,
        };
        let mut buffers = vec![ids.binding(), data];
        if let Some(scales) = table.scales_binding() {
            buffers.push(Binding {
                buffer: scales.buffer,
                offset: scales.offset + start as u64 * scales_row,
                size: rows as u64 * scales_row,
            });
        }
        buffers.push(out.binding());
        let params = Params {
            count: count as u32,
            d: d as u32,
            vocab: vocab as u32,
            start: start as u32,
            window: rows as u32,
        };
        batch.dispatch(&key, bytemuck::bytes_of(&params), &buffers, grid)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize, quantize};
    use crate::testing::{assert_close, gpu, random};

    fn gather_cpu(table: &[f32], d: usize, ids: &[u32]) -> Vec<f32> {
        let vocab = table.len() / d;
        ids.iter()
            .flat_map(|&id| {
                let row = (id as usize).min(vocab - 1);
                table[row * d..(row + 1) * d].iter().copied()
            })
            .collect()
    }

    /// The table in `dtype` on the GPU, and the f32 values it stands for.
    fn upload_table(dtype: DType, vocab: usize, d: usize, seed: u64) -> (Tensor, Vec<f32>) {
        let gpu = gpu();
        let w = random(vocab * d, seed);
        match dtype {
            DType::F32 => (Tensor::from_f32(gpu, &[vocab, d], &w).unwrap(), w),
            DType::F16 => {
                let h: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
                (
                    Tensor::from_f16(gpu, &[vocab, d], &h).unwrap(),
                    h.iter().map(|v| v.to_f32()).collect(),
                )
            }
            q => {
                let qm = quantize(q, vocab, d, &w);
                (Tensor::from_quant(gpu, &qm).unwrap(), dequantize(&qm))
            }
        }
    }

    fn run(table: &Tensor, ids: &[u32], max_window_bytes: Option<u64>) -> Vec<f32> {
        let gpu = gpu();
        let tids = Tensor::from_u32(gpu, &[ids.len()], ids).unwrap();
        let mut batch = gpu.batch();
        let out = match max_window_bytes {
            Some(max) => gather_windowed(&mut batch, "embedding", table, &tids, max).unwrap(),
            None => embedding(&mut batch, table, &tids).unwrap(),
        };
        batch.submit().unwrap();
        assert_eq!(out.shape(), &[ids.len(), table.shape()[1]]);
        pollster::block_on(out.to_f32(gpu)).unwrap()
    }

    #[test]
    fn embedding_matches_cpu_for_every_table_dtype() {
        // Odd widths for F32/F16 (F16 rows then straddle u32 words); quantized rows need whole groups.
        for (dtype, vocab, d) in [
            (DType::F32, 301, 5),
            (DType::F16, 301, 7),
            (DType::F32, 50, 1000),
            (DType::Q8, 97, 96),
            (DType::Q6, 97, 192),
            (DType::Q4, 97, 192),
        ] {
            let (table, values) = upload_table(dtype, vocab, d, 3);
            let ids: Vec<u32> = vec![0, vocab as u32 - 1, 17, 17, 3, 42, 1, vocab as u32 - 2, 5];
            let got = run(&table, &ids, None);
            assert_close(
                &got,
                &gather_cpu(&values, d, &ids),
                0.0,
                &format!("embedding {dtype:?} D {d}"),
            );
        }
    }

    #[test]
    fn embedding_clamps_out_of_range_ids_to_the_last_row() {
        let (table, values) = upload_table(DType::F16, 10, 6, 4);
        let ids = [10, u32::MAX, 2];
        let got = run(&table, &ids, None);
        assert_close(
            &got,
            &gather_cpu(&values, 6, &[9, 9, 2]),
            0.0,
            "clamped ids",
        );
    }

    #[test]
    fn windowed_embedding_covers_every_row() {
        let gpu = gpu();
        for (dtype, vocab, d, max) in [
            (DType::F32, 700, 5, 5_000),
            (DType::F16, 700, 6, 3_000),
            (DType::Q8, 300, 64, 5_000),
            (DType::Q6, 300, 64, 4_000),
            (DType::Q4, 300, 64, 3_000),
        ] {
            let (table, values) = upload_table(dtype, vocab, d, 5);
            let window = window_rows(gpu, &table, max).unwrap();
            assert!(
                window < vocab / 2,
                "{dtype:?}: want at least three windows, got {window} rows each"
            );
            // Every row once, in a scrambled order, plus clamped and repeated ids.
            let mut ids: Vec<u32> = (0..vocab as u32)
                .map(|i| (i * 7919) % vocab as u32)
                .collect();
            ids.extend([vocab as u32 + 5, 0, 0]);
            let got = run(&table, &ids, Some(max));
            assert_close(
                &got,
                &gather_cpu(&values, d, &ids),
                0.0,
                &format!("windowed {dtype:?}"),
            );
        }
    }

    #[test]
    fn window_too_small_for_one_aligned_granule_is_an_error() {
        let gpu = gpu();
        let (table, _) = upload_table(DType::F32, 700, 5, 6);
        let ids = Tensor::from_u32(gpu, &[1], &[0]).unwrap();
        let err = gather_windowed(&mut gpu.batch(), "embedding", &table, &ids, 19).unwrap_err();
        assert!(matches!(err, GpuError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn gather_rows_repeats_and_reorders_rows() {
        let gpu = gpu();
        let (n, c) = (577, 33);
        let src = random(n * c, 7);
        let tsrc = Tensor::from_f32(gpu, &[n, c], &src).unwrap();
        // Drop the CLS row, then repeat some rows (like an image-newline row appended per line).
        let mut index: Vec<u32> = (1..n as u32).collect();
        index.extend([5, 5, 576, 1]);
        let tindex = Tensor::from_u32(gpu, &[index.len()], &index).unwrap();
        let mut batch = gpu.batch();
        let out = gather_rows(&mut batch, &tsrc, &tindex).unwrap();
        batch.submit().unwrap();
        assert_eq!(out.shape(), &[index.len(), c]);
        assert_close(
            &pollster::block_on(out.to_f32(gpu)).unwrap(),
            &gather_cpu(&src, c, &index),
            0.0,
            "gather_rows",
        );
    }

    #[test]
    fn gathers_reject_bad_shapes_and_dtypes() {
        let gpu = gpu();
        let table = Tensor::from_f32(gpu, &[4, 2], &[0.0; 8]).unwrap();
        let table16 = Tensor::from_f16(gpu, &[4, 2], &[half::f16::ZERO; 8]).unwrap();
        let flat = Tensor::from_f32(gpu, &[8], &[0.0; 8]).unwrap();
        let ids = Tensor::from_u32(gpu, &[2], &[0, 1]).unwrap();
        let ids2d = Tensor::from_u32(gpu, &[1, 2], &[0, 1]).unwrap();
        let float_ids = Tensor::from_f32(gpu, &[2], &[0.0, 1.0]).unwrap();
        let mut batch = gpu.batch();
        assert!(embedding(&mut batch, &flat, &ids).is_err());
        assert!(embedding(&mut batch, &table, &ids2d).is_err());
        assert!(embedding(&mut batch, &table, &float_ids).is_err());
        assert!(embedding(&mut batch, &ids2d, &ids).is_err());
        assert!(gather_rows(&mut batch, &table16, &ids).is_err());
    }
}
