//! Element-wise kernels: residual add.

use crate::error::{Result, shape_err};
use crate::registry::PipelineKey;
use crate::{Batch, DType, Tensor, shader};

const SHADER: crate::registry::Shader = shader!("elementwise");
const WORKGROUP: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
}

fn check_same_f32(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return Err(shape_err(op, format!("{:?} {:?} vs {:?} {:?}", a.shape(), a.dtype(), b.shape(), b.dtype())));
    }
    Ok(())
}

/// `a + b` into a new tensor.
pub fn add(batch: &mut Batch, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_same_f32("add", a, b)?;
    let out = Tensor::empty(batch.gpu(), a.shape(), DType::F32)?;
    let n = a.numel() as u32;
    let grid = batch.gpu().grid(n.div_ceil(WORKGROUP));
    batch.dispatch(
        &PipelineKey::new(SHADER, "add"),
        bytemuck::bytes_of(&Params { n }),
        &[a.binding(), b.binding(), out.binding()],
        grid,
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gpu, random};

    #[test]
    fn add_matches_cpu() {
        let gpu = gpu();
        for n in [1, 255, 257, 70_001] {
            let (a, b) = (random(n, 1), random(n, 2));
            let ta = Tensor::from_f32(gpu, &[n], &a).unwrap();
            let tb = Tensor::from_f32(gpu, &[n], &b).unwrap();
            let mut batch = gpu.batch();
            let out = add(&mut batch, &ta, &tb).unwrap();
            batch.submit().unwrap();
            let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
            assert_close(&pollster::block_on(out.to_f32(gpu)).unwrap(), &want, 0.0, "add");
        }
    }

    #[test]
    fn add_rejects_mismatched_shapes() {
        let gpu = gpu();
        let a = Tensor::from_f32(gpu, &[2], &[1.0, 2.0]).unwrap();
        let b = Tensor::from_f32(gpu, &[1, 2], &[1.0, 2.0]).unwrap();
        assert!(add(&mut gpu.batch(), &a, &b).is_err());
    }
}
