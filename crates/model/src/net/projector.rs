//! The multimodal projector and the packing of one image's features into LLM tokens
//! (spec §5: base features first, then the unpadded grid with an `image_newline` after each row).

use llava_gpu::ops::elementwise::gelu;
use llava_gpu::ops::embed::gather_rows;
use llava_gpu::{Batch, DType, Tensor};
use llava_image::UnpadLayout;

use crate::error::Result;
use crate::files::weights::Weights;
use crate::net::layers::Linear;

pub struct Projector {
    linear_1: Linear,
    linear_2: Linear,
    image_newline: Tensor,
}

impl Projector {
    pub fn load(w: &mut Weights, vision_hidden: usize, text_hidden: usize) -> Result<Projector> {
        // config.rs refuses projector activations other than gelu.
        Ok(Projector {
            linear_1: Linear::load(
                w,
                "multi_modal_projector.linear_1",
                text_hidden,
                vision_hidden,
                true,
            )?,
            linear_2: Linear::load(
                w,
                "multi_modal_projector.linear_2",
                text_hidden,
                text_hidden,
                true,
            )?,
            image_newline: w.take("image_newline", &[text_hidden])?,
        })
    }

    /// `linear_2(gelu(linear_1(x)))` on `[N, vision_hidden]`.
    pub fn forward(&self, batch: &mut Batch, x: &Tensor) -> Result<Tensor> {
        let h = self.linear_1.forward(batch, x)?;
        let h = gelu(batch, &h)?;
        self.linear_2.forward(batch, &h)
    }

    /// Packs projected features `[patches * side², C]` (patch 0 = overview, then the grid tiles
    /// row-major, each `side x side` row-major) into the image's LLM tokens.
    pub fn pack(
        &self,
        batch: &mut Batch,
        features: &Tensor,
        grid: [u32; 2],
        side: usize,
        layout: &UnpadLayout,
    ) -> Result<Tensor> {
        let c = features.last_dim();
        let n = features.rows();
        // Source rows: the features, then the newline as one extra row.
        let src = batch.tensor(&[n + 1, c], DType::F32)?;
        Tensor::copy_rows(batch, features, 0, &src, 0, n)?;
        Tensor::copy_rows(batch, &self.image_newline, 0, &src, n, 1)?;
        let index = pack_index(grid, side, layout, n as u32);
        let index = Tensor::from_u32(batch.gpu(), &[index.len()], &index)?;
        Ok(gather_rows(batch, &src, &index)?)
    }
}

/// Row indices of the packed tokens into `[features..., newline]` (`newline` = its row index).
pub fn pack_index(grid: [u32; 2], side: usize, layout: &UnpadLayout, newline: u32) -> Vec<u32> {
    let tile_rows = side * side;
    let grid_cols = grid[1] as usize;
    let mut index: Vec<u32> = (0..tile_rows as u32).collect();
    for y in layout.row_start..layout.row_start + layout.rows {
        for x in layout.col_start..layout.col_start + layout.cols {
            let tile = 1 + (y / side) * grid_cols + x / side;
            index.push((tile * tile_rows + (y % side) * side + x % side) as u32);
        }
        index.push(newline);
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_index_follows_the_permute_unpad_newline_order() {
        // 2x2 grid of 2x2-patch tiles; unpad keeps feature rows 1..3 (all 4 columns).
        let layout = UnpadLayout {
            rows: 2,
            cols: 4,
            row_start: 1,
            col_start: 0,
        };
        let idx = pack_index([2, 2], 2, &layout, 99);
        // Base tile: rows 0..4. Feature row 1 = tile row 0, in-tile row 1: tiles 1 and 2.
        // Feature row 2 = tile row 1, in-tile row 0: tiles 3 and 4. Tile t starts at 4t.
        assert_eq!(idx, [0, 1, 2, 3, 6, 7, 10, 11, 99, 12, 13, 16, 17, 99]);
    }
}
