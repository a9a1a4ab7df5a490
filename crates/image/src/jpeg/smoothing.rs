//! libjpeg-turbo's interblock smoothing for progressive files whose first coefficients are not
//! known to full precision (`jdcoefct.c`, `smoothing_ok` and `decompress_smooth_data`): each of
//! the first nine AC coefficients that is still zero is estimated from the DC values of the block
//! and its 24 neighbours, and when no AC data came at all, the DC too.

/// Natural-order positions of the coefficients that smoothing estimates, in zigzag order 1..=9.
const POSITIONS: [usize; 9] = [1, 8, 16, 9, 2, 3, 10, 17, 24];

/// `smoothing_ok` once all scans are in: every component has its DC, no quantiser that the
/// estimates divide by is zero, and some first coefficient is not known to full precision.
/// `components` holds each component's `coef_bits` and quantisation table.
pub(super) fn applies(components: &[(&[i32; 64], &[u16; 64])]) -> bool {
    let mut useful = false;
    for (coef_bits, quant) in components {
        if quant[0] == 0 || POSITIONS.iter().any(|&p| quant[p] == 0) || coef_bits[0] < 0 {
            return false;
        }
        useful |= coef_bits[1..10].iter().any(|&b| b != 0);
    }
    useful
}

/// A component's coefficient blocks, `blocks_w` per row (rows and columns padded to whole MCUs).
pub(super) struct Blocks<'a> {
    pub coefs: &'a [i16],
    pub blocks_w: usize,
    pub blocks_h: usize,
    /// `width_in_blocks` and `height_in_blocks`: the blocks that hold image data.
    pub real_w: usize,
    pub real_h: usize,
    /// Vertical sampling factor (block rows per iMCU row).
    pub v: usize,
}

impl Blocks<'_> {
    fn dc(&self, row: usize, col: usize) -> i64 {
        let row = row.min(self.blocks_h - 1);
        i64::from(self.coefs[(row * self.blocks_w + col) * 64])
    }
}

/// The `coef_bits` latched for output: `previous` (from before each component's latest scan)
/// applies to iMCU rows after `last_good_imcu_row`, where the last scan ran out of data.
pub(super) struct Latches {
    pub current: [i32; 64],
    pub previous: [i32; 64],
    pub last_good_imcu_row: usize,
}

/// Calls `emit(block_x, block_y, smoothed_block)` for every block with image data, as
/// `decompress_smooth_data` does after all input is consumed. `total_imcu_rows` is the frame's
/// iMCU row count; libjpeg's row bookkeeping (including its quirks in the last iMCU row) is kept.
pub(super) fn smooth(
    blocks: &Blocks,
    latches: &Latches,
    quant: &[u16; 64],
    total_imcu_rows: usize,
    mut emit: impl FnMut(usize, usize, &[i16; 64]),
) {
    let q = |pos: usize| i64::from(quant[pos]);
    let last_imcu_row = total_imcu_rows - 1;
    for imcu_row in 0..total_imcu_rows {
        let coef_bits = if imcu_row > latches.last_good_imcu_row {
            &latches.previous
        } else {
            &latches.current
        };
        // DC interpolation only if no AC coefficient data is available.
        let change_dc = coef_bits[1..10].iter().all(|&b| b == -1);
        let block_rows = if imcu_row < last_imcu_row {
            blocks.v
        } else {
            match blocks.real_h % blocks.v {
                0 => blocks.v,
                rows => rows,
            }
        };
        let image_block_rows = (block_rows * total_imcu_rows) as i64;
        for block_row in 0..block_rows {
            let image_block_row = (imcu_row * block_rows + block_row) as i64;
            let row = imcu_row * blocks.v + block_row;
            let prev = if image_block_row > 0 { row - 1 } else { row };
            let prev_prev = if image_block_row > 1 { row - 2 } else { prev };
            let next = if image_block_row < image_block_rows - 1 {
                row + 1
            } else {
                row
            };
            let next_next = if image_block_row < image_block_rows - 2 {
                row + 2
            } else {
                next
            };
            let rows = [prev_prev, prev, row, next, next_next];
            // dc[r][c]: DC of the block in window row r (0 = two above) and column c (0 = two left),
            // a sliding register as in libjpeg, which repeats edge values on narrow images.
            let mut dc = [[0i64; 5]; 5];
            for (r, &block_y) in rows.iter().enumerate() {
                dc[r] = [blocks.dc(block_y, 0); 5];
            }
            let last_block_column = blocks.real_w - 1;
            for block_num in 0..blocks.real_w {
                if block_num == 0 && block_num < last_block_column {
                    for (r, &block_y) in rows.iter().enumerate() {
                        dc[r][3] = blocks.dc(block_y, 1);
                        dc[r][4] = dc[r][3];
                    }
                }
                if block_num + 1 < last_block_column {
                    for (r, &block_y) in rows.iter().enumerate() {
                        dc[r][4] = blocks.dc(block_y, block_num + 2);
                    }
                }
                let start = (row * blocks.blocks_w + block_num) * 64;
                let mut block: [i16; 64] = blocks.coefs[start..start + 64].try_into().expect("64");
                estimate(&mut block, &dc, coef_bits, change_dc, q);
                emit(block_num, row, &block);
                for r in &mut dc {
                    r.copy_within(1.., 0);
                }
            }
        }
    }
}

/// The estimates of one block from the 5x5 DC window (`DC01`..`DC25` row by row in libjpeg).
fn estimate(
    block: &mut [i16; 64],
    dc: &[[i64; 5]; 5],
    coef_bits: &[i32; 64],
    change_dc: bool,
    q: impl Fn(usize) -> i64,
) {
    let d = |n: usize| dc[(n - 1) / 5][(n - 1) % 5];
    let q00 = q(0);
    // (zigzag index, natural position, numerator with DC interpolation, without).
    let ac = [
        (
            1,
            -d(1) - d(2) + d(4) + d(5) - 3 * d(6) + 13 * d(7) - 13 * d(9) + 3 * d(10) - 3 * d(11)
                + 38 * d(12)
                - 38 * d(14)
                + 3 * d(15)
                - 3 * d(16)
                + 13 * d(17)
                - 13 * d(19)
                + 3 * d(20)
                - d(21)
                - d(22)
                + d(24)
                + d(25),
            -7 * d(11) + 50 * d(12) - 50 * d(14) + 7 * d(15),
        ),
        (
            2,
            -d(1) - 3 * d(2) - 3 * d(3) - 3 * d(4) - d(5) - d(6)
                + 13 * d(7)
                + 38 * d(8)
                + 13 * d(9)
                - d(10)
                + d(16)
                - 13 * d(17)
                - 38 * d(18)
                - 13 * d(19)
                + d(20)
                + d(21)
                + 3 * d(22)
                + 3 * d(23)
                + 3 * d(24)
                + d(25),
            -7 * d(3) + 50 * d(8) - 50 * d(18) + 7 * d(23),
        ),
        (
            3,
            d(3) + 2 * d(7) + 7 * d(8) + 2 * d(9) - 5 * d(12) - 14 * d(13) - 5 * d(14)
                + 2 * d(17)
                + 7 * d(18)
                + 2 * d(19)
                + d(23),
            -d(3) + 13 * d(8) - 24 * d(13) + 13 * d(18) - d(23),
        ),
        (
            4,
            -d(1) + d(5) + 9 * d(7) - 9 * d(9) - 9 * d(17) + 9 * d(19) + d(21) - d(25),
            d(10) + d(16) - 10 * d(17) + 10 * d(19) - d(2) - d(20) + d(22) - d(24) + d(4) - d(6)
                + 10 * d(7)
                - 10 * d(9),
        ),
        (
            5,
            2 * d(7) - 5 * d(8) + 2 * d(9) + d(11) + 7 * d(12) - 14 * d(13)
                + 7 * d(14)
                + d(15)
                + 2 * d(17)
                - 5 * d(18)
                + 2 * d(19),
            -d(11) + 13 * d(12) - 24 * d(13) + 13 * d(14) - d(15),
        ),
    ];
    let only_with_dc_change = [
        (6, d(7) - d(9) + 2 * d(12) - 2 * d(14) + d(17) - d(19)),
        (7, d(7) - 3 * d(8) + d(9) - d(17) + 3 * d(18) - d(19)),
        (8, d(7) - d(9) - 3 * d(12) + 3 * d(14) + d(17) - d(19)),
        (9, d(7) + 2 * d(8) + d(9) - d(17) - 2 * d(18) - d(19)),
    ];
    let terms = ac
        .iter()
        .map(|&(k, with, without)| (k, if change_dc { with } else { without }))
        .chain(only_with_dc_change.into_iter().filter(|_| change_dc));
    for (k, weights) in terms {
        let al = coef_bits[k];
        let pos = POSITIONS[k - 1];
        if al == 0 || block[pos] != 0 {
            continue;
        }
        block[pos] = predict(q00 * weights, q(pos), Some(al));
    }
    if change_dc {
        let weights = -2 * d(1) - 6 * d(2) - 8 * d(3) - 6 * d(4) - 2 * d(5) - 6 * d(6)
            + 6 * d(7)
            + 42 * d(8)
            + 6 * d(9)
            - 6 * d(10)
            - 8 * d(11)
            + 42 * d(12)
            + 152 * d(13)
            + 42 * d(14)
            - 8 * d(15)
            - 6 * d(16)
            + 6 * d(17)
            + 42 * d(18)
            + 6 * d(19)
            - 6 * d(20)
            - 2 * d(21)
            - 6 * d(22)
            - 8 * d(23)
            - 6 * d(24)
            - 2 * d(25);
        block[0] = predict(q00 * weights, q00, None);
    }
}

/// `pred = round(num / (q << 8))` away from zero at halves, limited below `1 << Al` when the
/// coefficient is known to bit `Al` (`Al` > 0), then stored as a 16-bit `JCOEF`.
fn predict(num: i64, q: i64, al: Option<i32>) -> i16 {
    let limit = |pred: i64| match al {
        Some(al) if al > 0 && pred >= 1 << al => (1 << al) - 1,
        _ => pred,
    };
    let pred = if num >= 0 {
        limit(((q << 7) + num) / (q << 8))
    } else {
        -limit(((q << 7) - num) / (q << 8))
    };
    pred as i32 as i16
}
