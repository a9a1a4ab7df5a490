//! A JPEG decoder that reproduces libjpeg-turbo's output with the settings Pillow uses (accurate
//! integer IDCT `JDCT_ISLOW`, fancy upsampling, RGB or greyscale output), so that JPEG files give
//! exactly the bytes transformers gets from Pillow. The IDCT follows libjpeg-turbo's x86-64 SIMD
//! kernels, which equal `jidctint.c` except on crafted out-of-range coefficients (see `idct`).
//!
//! Supported: 8-bit Huffman-coded baseline, extended (SOF1) and progressive (SOF2) files with one
//! (greyscale) or three components (YCbCr, or RGB when libjpeg would guess so from an Adobe marker
//! with transform 0 or component ids 'R','G','B'), any integral sampling factors, restart markers,
//! fill bytes, and missing DHT segments (libjpeg-turbo's standard tables). [`decode_jpeg`] returns
//! `Ok(None)` for what it does not reproduce: lossless and hierarchical files, and four components
//! (CMYK/YCCK); arithmetic-coded files are refused with an error that says so. Progressive files whose scans leave some of the first ten
//! coefficients unrefined get libjpeg's block smoothing.
//!
//! Damaged entropy-coded data is decoded the way libjpeg does it with its warnings (which Pillow
//! ignores): data that ends at a marker is padded with zero bits and the rest of the restart
//! interval is left blank, a bit pattern that is no Huffman code reads as symbol 0, and wrong
//! restart markers are resynchronised as `jpeg_resync_to_restart` does. A file whose data runs out
//! without a marker is refused as truncated, as Pillow does; so is a multi-scan file without its
//! end-of-image marker (a one-scan file is complete once its scan is, as for Pillow).

mod huffman;
mod idct;
mod smoothing;
mod upsample;

use huffman::{BitReader, HuffmanTable, find_marker};
use upsample::{Plane, Upsampling, YccTables, upsample_row};

use crate::decode::check_size;
use crate::{ImageError, Rgb8};

fn corrupt(what: impl std::fmt::Display) -> ImageError {
    ImageError::Decode(format!("corrupt JPEG: {what}"))
}

fn truncated() -> ImageError {
    ImageError::Decode("truncated JPEG: no end-of-image marker".into())
}

/// Zigzag position -> natural (row-major) index, with libjpeg's 16 extra entries so that a corrupt
/// run length past the end of a block lands on coefficient 63 instead of out of bounds.
const NATURAL_ORDER: [usize; 80] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63,
    63, 63, 63, 63, 63, 63,
];

struct Component {
    id: u8,
    h: usize,
    v: usize,
    quant_index: usize,
    /// The quantisation table, latched at the component's first scan (natural order).
    quant: Option<[u16; 64]>,
    /// Blocks per row/column, padded to whole MCUs of an interleaved scan.
    blocks_w: usize,
    blocks_h: usize,
    /// Blocks that hold image data (`width_in_blocks`, `height_in_blocks`).
    real_blocks_w: usize,
    real_blocks_h: usize,
    /// Size in samples (`downsampled_width`, `downsampled_height`).
    width: usize,
    height: usize,
    /// Coefficients of every block (multi-scan files only).
    coefs: Vec<i16>,
    /// IDCT output, `blocks_w * 8` samples per row.
    samples: Vec<u8>,
    dc_pred: i32,
    /// libjpeg's `coef_bits`: the point-transform bit each coefficient is known to, -1 if never seen.
    coef_bits: [i32; 64],
    /// libjpeg's copy of `coef_bits` from before the component's latest scan (for coefficients
    /// `min(Ss, 1)..=max(Se, 9)` of that scan), used by block smoothing past the last good row.
    prev_coef_bits: [i32; 64],
}

impl Component {
    fn stride(&self) -> usize {
        self.blocks_w * 8
    }

    fn store_samples(&mut self, bx: usize, by: usize, block: &[i16; 64]) {
        let quant = self.quant.as_ref().expect("latched at the first scan");
        let stride = self.stride();
        idct::idct_islow(
            block,
            quant,
            &mut self.samples[by * 8 * stride + bx * 8..],
            stride,
        );
    }
}

struct Frame {
    width: usize,
    height: usize,
    progressive: bool,
    components: Vec<Component>,
    max_h: usize,
    max_v: usize,
    mcus_x: usize,
    mcus_y: usize,
    /// Coefficients are kept until all scans are read (progressive or one scan per component).
    buffered: Option<bool>,
    /// libjpeg's `last_good_iMCU_row`: the iMCU row of the last MCU started with data left.
    last_good_imcu_row: usize,
}

struct ScanComponent {
    index: usize,
    dc_table: usize,
    ac_table: usize,
}

struct Scan {
    components: Vec<ScanComponent>,
    ss: usize,
    se: usize,
    ah: u32,
    al: u32,
}

/// Colour space of a three-component file, as libjpeg's `default_decompress_parms` guesses it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ColourSpace {
    Grey,
    YCbCr,
    Rgb,
}

#[derive(Default)]
struct Decoder {
    quant_tables: [Option<[u16; 64]>; 4],
    dc_tables: [Option<HuffmanTable>; 4],
    ac_tables: [Option<HuffmanTable>; 4],
    restart_interval: usize,
    saw_jfif: bool,
    adobe_transform: Option<u8>,
    frame: Option<Frame>,
    scans: usize,
}

/// Decodes a JPEG to RGB exactly as Pillow 13 (libjpeg-turbo) does, or returns `Ok(None)` for the
/// variants listed in the module docs.
pub(crate) fn decode_jpeg(bytes: &[u8]) -> Result<Option<Rgb8>, ImageError> {
    if bytes.get(..2) != Some(&[0xff, 0xd8]) {
        return Err(ImageError::Decode(
            "not a JPEG: no start-of-image marker".into(),
        ));
    }
    let mut decoder = Decoder::default();
    let mut pos = 2;
    loop {
        // A one-scan sequential image is complete when its scan is: libjpeg reads what follows
        // only in jpeg_finish_decompress, and Pillow ignores that call running out of data.
        let complete = decoder
            .frame
            .as_ref()
            .is_some_and(|f| f.buffered == Some(false));
        let Some((marker, after)) = find_marker(bytes, pos) else {
            if complete {
                break;
            }
            return Err(truncated());
        };
        pos = after;
        match marker {
            0xd9 => break,
            0xd0..=0xd7 | 0x01 => {} // stray RSTn / TEM: no parameters, ignored as libjpeg does
            0xda => pos = decoder.scan(bytes, pos)?,
            // libjpeg refuses other markers before reading a length (JERR_UNKNOWN_MARKER).
            0xc0..=0xcf | 0xdb..=0xdd | 0xe0..=0xef | 0xfe => {
                let length = match segment_length(bytes, pos) {
                    // Segments libjpeg skips unread just make jpeg_finish_decompress suspend.
                    Err(_) if complete && matches!(marker, 0xe0..=0xef | 0xfe | 0xdc | 0xcc) => {
                        break;
                    }
                    other => other?,
                };
                let body = &bytes[pos + 2..pos + length];
                pos += length;
                match marker {
                    0xc0..=0xc2 => decoder.start_frame(body, marker == 0xc2)?,
                    // Arithmetic coding: zune-jpeg cannot decode it either (it fails with an
                    // unrelated message), so it is refused here by name.
                    0xc9..=0xcb | 0xcd..=0xcf => {
                        return Err(ImageError::Decode(format!(
                            "arithmetic-coded JPEG (frame marker FF{marker:02X}) is not supported; \
                             save the image as a Huffman-coded JPEG or as PNG"
                        )));
                    }
                    // Lossless and hierarchical frames.
                    0xc3 | 0xc5..=0xc7 => return Ok(None),
                    0xc4 => decoder.define_huffman_tables(body)?,
                    0xdb => decoder.define_quant_tables(body)?,
                    0xdd => decoder.define_restart_interval(body)?,
                    0xe0 => decoder.saw_jfif |= body.len() >= 14 && body.starts_with(b"JFIF\0"),
                    0xee if body.len() >= 12 && body.starts_with(b"Adobe") => {
                        decoder.adobe_transform = Some(body[11]);
                    }
                    // APPn, COM, DNL, DAC: skipped.
                    0xe1..=0xef | 0xfe | 0xdc | 0xcc => {}
                    other => return Err(corrupt(format!("unexpected marker FF{other:02X}"))),
                }
            }
            other => return Err(corrupt(format!("unexpected marker FF{other:02X}"))),
        }
        if decoder
            .frame
            .as_ref()
            .is_some_and(|f| f.components.len() == 4)
        {
            return Ok(None);
        }
    }
    decoder.finish()
}

/// The length field of the segment starting at `pos` (it counts itself), checked against the input.
fn segment_length(bytes: &[u8], pos: usize) -> Result<usize, ImageError> {
    let field = bytes.get(pos..pos + 2).ok_or_else(truncated)?;
    let length = usize::from(u16::from_be_bytes([field[0], field[1]]));
    if length < 2 {
        return Err(corrupt("marker segment length below 2"));
    }
    if pos + length > bytes.len() {
        return Err(truncated());
    }
    Ok(length)
}

impl Decoder {
    fn start_frame(&mut self, body: &[u8], progressive: bool) -> Result<(), ImageError> {
        if self.frame.is_some() {
            return Err(corrupt("more than one frame header"));
        }
        if body.len() < 6 {
            return Err(corrupt("short frame header"));
        }
        let precision = body[0];
        let height = u32::from(u16::from_be_bytes([body[1], body[2]]));
        let width = u32::from(u16::from_be_bytes([body[3], body[4]]));
        let count = usize::from(body[5]);
        check_size(width, height)?;
        if precision != 8 {
            return Err(ImageError::Decode(format!(
                "unsupported JPEG: {precision}-bit samples"
            )));
        }
        if !matches!(count, 1 | 3 | 4) {
            return Err(ImageError::Decode(format!(
                "unsupported JPEG: {count} components"
            )));
        }
        if body.len() != 6 + 3 * count {
            return Err(corrupt("frame header length does not match its components"));
        }
        let mut components = Vec::with_capacity(count);
        for spec in body[6..].chunks_exact(3) {
            let (h, v) = (usize::from(spec[1] >> 4), usize::from(spec[1] & 15));
            if !(1..=4).contains(&h) || !(1..=4).contains(&v) {
                return Err(corrupt("sampling factor outside 1..=4"));
            }
            if spec[2] > 3 {
                return Err(corrupt("quantisation table index above 3"));
            }
            components.push(Component {
                id: spec[0],
                h,
                v,
                quant_index: usize::from(spec[2]),
                quant: None,
                blocks_w: 0,
                blocks_h: 0,
                real_blocks_w: 0,
                real_blocks_h: 0,
                width: 0,
                height: 0,
                coefs: Vec::new(),
                samples: Vec::new(),
                dc_pred: 0,
                coef_bits: [-1; 64],
                prev_coef_bits: [-1; 64],
            });
        }
        let (width, height) = (width as usize, height as usize);
        let max_h = components.iter().map(|c| c.h).max().unwrap_or(1);
        let max_v = components.iter().map(|c| c.v).max().unwrap_or(1);
        let mcus_x = width.div_ceil(8 * max_h);
        let mcus_y = height.div_ceil(8 * max_v);
        for c in &mut components {
            if max_h % c.h != 0 || max_v % c.v != 0 {
                // jdsample.c: JERR_FRACT_SAMPLE_NOTIMPL.
                return Err(ImageError::Decode(
                    "unsupported JPEG: fractional sampling ratio".into(),
                ));
            }
            c.width = (width * c.h).div_ceil(max_h);
            c.height = (height * c.v).div_ceil(max_v);
            c.real_blocks_w = c.width.div_ceil(8);
            c.real_blocks_h = c.height.div_ceil(8);
            c.blocks_w = mcus_x * c.h;
            c.blocks_h = mcus_y * c.v;
        }
        self.frame = Some(Frame {
            width,
            height,
            progressive,
            components,
            max_h,
            max_v,
            mcus_x,
            mcus_y,
            buffered: None,
            last_good_imcu_row: 0,
        });
        Ok(())
    }

    fn define_huffman_tables(&mut self, mut body: &[u8]) -> Result<(), ImageError> {
        while !body.is_empty() {
            if body.len() < 17 {
                return Err(corrupt("short Huffman table"));
            }
            let (class, index) = (body[0] >> 4, usize::from(body[0] & 15));
            if class > 1 || index > 3 {
                return Err(corrupt("bad Huffman table class or index"));
            }
            let counts: [u8; 16] = body[1..17].try_into().expect("16 bytes");
            let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
            let values = body
                .get(17..17 + total)
                .ok_or_else(|| corrupt("Huffman table longer than its segment"))?;
            let table = HuffmanTable::new(&counts, values, class == 0)?;
            if class == 0 {
                self.dc_tables[index] = Some(table);
            } else {
                self.ac_tables[index] = Some(table);
            }
            body = &body[17 + total..];
        }
        Ok(())
    }

    fn define_quant_tables(&mut self, mut body: &[u8]) -> Result<(), ImageError> {
        while !body.is_empty() {
            let (precision, index) = (body[0] >> 4, usize::from(body[0] & 15));
            if index > 3 || precision > 1 {
                return Err(corrupt("bad quantisation table index or precision"));
            }
            let size = 64 << precision;
            let values = body
                .get(1..1 + size)
                .ok_or_else(|| corrupt("short quantisation table"))?;
            let mut table = [0u16; 64];
            for k in 0..64 {
                table[NATURAL_ORDER[k]] = if precision == 1 {
                    u16::from_be_bytes([values[2 * k], values[2 * k + 1]])
                } else {
                    u16::from(values[k])
                };
            }
            self.quant_tables[index] = Some(table);
            body = &body[1 + size..];
        }
        Ok(())
    }

    fn define_restart_interval(&mut self, body: &[u8]) -> Result<(), ImageError> {
        let [high, low] = body else {
            return Err(corrupt("restart interval segment is not 2 bytes"));
        };
        self.restart_interval = usize::from(u16::from_be_bytes([*high, *low]));
        Ok(())
    }

    /// Parses a scan header at `pos` (just after SOS), decodes its entropy-coded data and returns
    /// the position of the marker that follows (its `FF`).
    fn scan(&mut self, bytes: &[u8], pos: usize) -> Result<usize, ImageError> {
        let length = segment_length(bytes, pos)?;
        let body = &bytes[pos + 2..pos + length];
        let frame = self
            .frame
            .as_mut()
            .ok_or_else(|| corrupt("scan before the frame header"))?;
        let count = usize::from(*body.first().ok_or_else(|| corrupt("empty scan header"))?);
        if !(1..=4).contains(&count) || body.len() != 4 + 2 * count {
            return Err(corrupt("bad scan header"));
        }
        let mut components: Vec<ScanComponent> = Vec::with_capacity(count);
        for spec in body[1..1 + 2 * count].chunks_exact(2) {
            let index = frame
                .components
                .iter()
                .position(|c| c.id == spec[0])
                .ok_or_else(|| corrupt("scan names a component not in the frame"))?;
            if components.iter().any(|c| c.index == index) {
                return Err(corrupt("scan names a component twice"));
            }
            components.push(ScanComponent {
                index,
                dc_table: usize::from(spec[1] >> 4),
                ac_table: usize::from(spec[1] & 15),
            });
        }
        let params = &body[1 + 2 * count..];
        let scan = Scan {
            components,
            ss: usize::from(params[0]),
            se: usize::from(params[1]),
            ah: u32::from(params[2] >> 4),
            al: u32::from(params[2] & 15),
        };
        if count > 1 {
            let blocks: usize = scan
                .components
                .iter()
                .map(|c| frame.components[c.index].h * frame.components[c.index].v)
                .sum();
            if blocks > 10 {
                return Err(corrupt("more than 10 blocks in an MCU"));
            }
        }
        let all_components = count == frame.components.len();
        let buffered = *frame
            .buffered
            .get_or_insert(frame.progressive || !all_components);
        if !buffered && self.scans > 0 {
            return Err(corrupt("a second scan in a single-scan sequential file"));
        }
        self.scans += 1;
        for sc in &scan.components {
            let c = &mut frame.components[sc.index];
            if c.quant.is_none() {
                c.quant = Some(
                    self.quant_tables[c.quant_index]
                        .ok_or_else(|| corrupt("missing quantisation table"))?,
                );
            }
            if c.samples.is_empty() {
                c.samples = vec![0; c.blocks_w * 64 * c.blocks_h];
                if buffered {
                    c.coefs = vec![0; c.blocks_w * 64 * c.blocks_h];
                }
            }
            c.dc_pred = 0;
        }
        let tables = scan_tables(&self.dc_tables, &self.ac_tables, &scan, frame.progressive)?;
        if frame.progressive {
            check_progression(&scan)?;
            for sc in &scan.components {
                let c = &mut frame.components[sc.index];
                for k in scan.ss.min(1)..=scan.se.max(9) {
                    c.prev_coef_bits[k] = if self.scans > 1 { c.coef_bits[k] } else { 0 };
                }
                c.coef_bits[scan.ss..=scan.se].fill(scan.al as i32);
            }
        }
        let mut reader = BitReader::new(bytes, pos + length);
        decode_scan(frame, &scan, &tables, self.restart_interval, &mut reader)?;
        // The data must end at a marker: libjpeg suspends (Pillow: truncated) when it has to read
        // past the end of the input, which it does while filling its bit buffer.
        if reader.input_ended() {
            return Err(ImageError::Decode(
                "truncated JPEG: the data ends inside a scan".into(),
            ));
        }
        // The marker after the scan; the main loop reads it again from its FF.
        let (_, after) = reader.next_marker().ok_or_else(truncated)?;
        Ok(after - 2)
    }

    fn finish(self) -> Result<Option<Rgb8>, ImageError> {
        let mut frame = self
            .frame
            .ok_or_else(|| corrupt("no frame header before the end of the image"))?;
        if self.scans == 0 {
            return Err(corrupt("no scan before the end of the image"));
        }
        let smooth = frame.progressive && {
            let latched: Option<Vec<_>> = (frame.components.iter())
                .map(|c| Some((&c.coef_bits, c.quant.as_ref()?)))
                .collect();
            latched.is_some_and(|l| smoothing::applies(&l))
        };
        let colour = match frame.components.len() {
            1 => ColourSpace::Grey,
            _ if self.saw_jfif => ColourSpace::YCbCr,
            _ => match self.adobe_transform {
                Some(0) => ColourSpace::Rgb,
                Some(_) => ColourSpace::YCbCr,
                None => {
                    let ids: Vec<u8> = frame.components.iter().map(|c| c.id).collect();
                    if ids == b"RGB" {
                        ColourSpace::Rgb
                    } else {
                        ColourSpace::YCbCr
                    }
                }
            },
        };
        for c in &mut frame.components {
            if c.samples.is_empty() {
                // Never in a scan: libjpeg leaves its coefficients zero, a flat mid-grey plane.
                c.samples = vec![128; c.blocks_w * 64 * c.blocks_h];
            } else if !c.coefs.is_empty() {
                let coefs = std::mem::take(&mut c.coefs);
                if smooth {
                    let blocks = smoothing::Blocks {
                        coefs: &coefs,
                        blocks_w: c.blocks_w,
                        blocks_h: c.blocks_h,
                        real_w: c.real_blocks_w,
                        real_h: c.real_blocks_h,
                        v: c.v,
                    };
                    // Rows past the last good one use the bits from before the latest scan.
                    let prev = if self.scans > 1 {
                        c.prev_coef_bits
                    } else {
                        [-1; 64]
                    };
                    let latches = smoothing::Latches {
                        current: c.coef_bits,
                        previous: prev,
                        last_good_imcu_row: frame.last_good_imcu_row,
                    };
                    let quant = c.quant.expect("latched");
                    smoothing::smooth(&blocks, &latches, &quant, frame.mcus_y, |x, y, block| {
                        c.store_samples(x, y, block)
                    });
                    continue;
                }
                for by in 0..c.real_blocks_h {
                    for bx in 0..c.real_blocks_w {
                        let start = (by * c.blocks_w + bx) * 64;
                        let block: &[i16; 64] = coefs[start..start + 64].try_into().expect("64");
                        c.store_samples(bx, by, block);
                    }
                }
            }
        }
        Ok(Some(to_rgb(&frame, colour)))
    }
}

/// The DC and AC tables of each scan component (those the scan uses), with libjpeg-turbo's
/// standard tables standing in for undefined ones.
fn scan_tables(
    dc_tables: &[Option<HuffmanTable>; 4],
    ac_tables: &[Option<HuffmanTable>; 4],
    scan: &Scan,
    progressive: bool,
) -> Result<Vec<ComponentTables>, ImageError> {
    let needs_dc = !progressive || (scan.ss == 0 && scan.ah == 0);
    let needs_ac = !progressive || scan.ss > 0;
    let pick = |tables: &[Option<HuffmanTable>; 4], index: usize, is_dc: bool| {
        let table = tables
            .get(index)
            .and_then(|t| t.clone())
            .or_else(|| HuffmanTable::standard(is_dc, index));
        table.ok_or_else(|| corrupt(format!("Huffman table {index} is not defined")))
    };
    scan.components
        .iter()
        .map(|sc| {
            let dc = needs_dc
                .then(|| pick(dc_tables, sc.dc_table, true))
                .transpose()?;
            let ac = needs_ac
                .then(|| pick(ac_tables, sc.ac_table, false))
                .transpose()?;
            Ok((dc, ac))
        })
        .collect()
}

/// The scan parameter checks of libjpeg's `start_pass_phuff_decoder` (JERR_BAD_PROGRESSION).
fn check_progression(scan: &Scan) -> Result<(), ImageError> {
    let bad = if scan.ss == 0 {
        scan.se != 0
    } else {
        scan.ss > scan.se || scan.se > 63 || scan.components.len() != 1
    };
    if bad || (scan.ah != 0 && scan.al + 1 != scan.ah) || scan.al > 13 {
        return Err(corrupt(format!(
            "invalid progressive scan Ss={} Se={} Ah={} Al={}",
            scan.ss, scan.se, scan.ah, scan.al
        )));
    }
    Ok(())
}

/// The DC and AC tables one scan component uses (`None` for those its scan does not read).
type ComponentTables = (Option<HuffmanTable>, Option<HuffmanTable>);

type ScanTables = [ComponentTables];

fn decode_scan(
    frame: &mut Frame,
    scan: &Scan,
    tables: &ScanTables,
    restart_interval: usize,
    reader: &mut BitReader,
) -> Result<(), ImageError> {
    let single = scan.components.len() == 1;
    let (mcus_x, mcus_y) = if single {
        let c = &frame.components[scan.components[0].index];
        (c.real_blocks_w, c.real_blocks_h)
    } else {
        (frame.mcus_x, frame.mcus_y)
    };
    let buffered = frame.buffered == Some(true);
    let progressive = frame.progressive;
    let mut eob_run = 0u32;
    let mut next_restart = 0u8;
    // libjpeg's `insufficient_data`: the data ended at a marker, so the rest of this restart
    // interval is left as it is (zero coefficients, a flat mid-grey for a one-pass file).
    let mut out_of_data = false;
    let mut block = [0i16; 64];
    for mcu in 0..mcus_x * mcus_y {
        if restart_interval > 0 && mcu > 0 && mcu % restart_interval == 0 {
            reader.restart(next_restart)?;
            next_restart = (next_restart + 1) % 8;
            eob_run = 0;
            for sc in &scan.components {
                frame.components[sc.index].dc_pred = 0;
            }
            if !reader.marker_pending() {
                out_of_data = false;
            }
        }
        let (mx, my) = (mcu % mcus_x, mcu / mcus_x);
        if !out_of_data {
            // An MCU row of a one-component scan is one block row; an iMCU row has `v` of them.
            let v = if single {
                frame.components[scan.components[0].index].v
            } else {
                1
            };
            frame.last_good_imcu_row = my / v;
        }
        for (sc, (dc_table, ac_table)) in scan.components.iter().zip(tables) {
            let c = &mut frame.components[sc.index];
            let (bw, bh) = if single { (1, 1) } else { (c.h, c.v) };
            for by in 0..bh {
                for bx in 0..bw {
                    let (x, y) = (mx * bw + bx, my * bh + by);
                    if !progressive {
                        block.fill(0);
                        if !out_of_data {
                            let (dc, ac) = (dc_table.as_ref(), ac_table.as_ref());
                            decode_sequential(
                                reader,
                                dc.expect("DC"),
                                ac.expect("AC"),
                                &mut c.dc_pred,
                                &mut block,
                            );
                        }
                        if buffered {
                            let start = (y * c.blocks_w + x) * 64;
                            c.coefs[start..start + 64].copy_from_slice(&block);
                        } else if x < c.real_blocks_w && y < c.real_blocks_h {
                            c.store_samples(x, y, &block);
                        }
                        continue;
                    }
                    if out_of_data {
                        continue;
                    }
                    let start = (y * c.blocks_w + x) * 64;
                    let coefs: &mut [i16; 64] =
                        (&mut c.coefs[start..start + 64]).try_into().expect("64");
                    match (scan.ss == 0, scan.ah == 0) {
                        (true, true) => decode_dc_first(
                            reader,
                            dc_table.as_ref().expect("DC"),
                            &mut c.dc_pred,
                            scan.al,
                            coefs,
                        ),
                        (true, false) => {
                            if reader.bits(1) == 1 {
                                coefs[0] |= 1 << scan.al;
                            }
                        }
                        (false, true) => decode_ac_first(
                            reader,
                            ac_table.as_ref().expect("AC"),
                            scan,
                            &mut eob_run,
                            coefs,
                        ),
                        (false, false) => decode_ac_refine(
                            reader,
                            ac_table.as_ref().expect("AC"),
                            scan,
                            &mut eob_run,
                            coefs,
                        ),
                    }
                }
            }
        }
        reader.check_truncated()?;
        out_of_data |= reader.out_of_data();
    }
    Ok(())
}

/// One block of a sequential scan (`decode_mcu_slow` in jdhuff.c).
fn decode_sequential(
    reader: &mut BitReader,
    dc: &HuffmanTable,
    ac: &HuffmanTable,
    dc_pred: &mut i32,
    block: &mut [i16; 64],
) {
    let size = reader.symbol(dc);
    let diff = reader.signed(u32::from(size));
    // int arithmetic that wraps on (corrupt) overflow; JCOEF keeps the low 16 bits.
    *dc_pred = dc_pred.wrapping_add(diff);
    block[0] = *dc_pred as i16;
    let mut k = 1;
    while k < 64 {
        let symbol = reader.symbol(ac);
        let (run, size) = (usize::from(symbol >> 4), u32::from(symbol & 15));
        if size != 0 {
            k += run;
            block[NATURAL_ORDER[k]] = reader.signed(size) as i16;
        } else if run == 15 {
            k += 15;
        } else {
            break;
        }
        k += 1;
    }
}

/// `decode_mcu_DC_first` (jdphuff.c).
fn decode_dc_first(
    reader: &mut BitReader,
    dc: &HuffmanTable,
    dc_pred: &mut i32,
    al: u32,
    block: &mut [i16; 64],
) {
    let size = reader.symbol(dc);
    let diff = reader.signed(u32::from(size));
    *dc_pred = dc_pred.wrapping_add(diff);
    block[0] = ((*dc_pred as u32) << al) as i16;
}

/// `decode_mcu_AC_first` (jdphuff.c).
fn decode_ac_first(
    reader: &mut BitReader,
    ac: &HuffmanTable,
    scan: &Scan,
    eob_run: &mut u32,
    block: &mut [i16; 64],
) {
    if *eob_run > 0 {
        *eob_run -= 1;
        return;
    }
    let mut k = scan.ss;
    while k <= scan.se {
        let symbol = reader.symbol(ac);
        let (run, size) = (u32::from(symbol >> 4), u32::from(symbol & 15));
        if size != 0 {
            k += run as usize;
            let value = reader.signed(size);
            block[NATURAL_ORDER[k]] = ((value as u32) << scan.al) as i16;
        } else if run == 15 {
            k += 15;
        } else {
            *eob_run = (1 << run) + reader.bits(run) - 1;
            break;
        }
        k += 1;
    }
}

/// `decode_mcu_AC_refine` (jdphuff.c): one correction bit for each already-nonzero coefficient the
/// scan passes, new coefficients of magnitude `1 << Al`.
fn decode_ac_refine(
    reader: &mut BitReader,
    ac: &HuffmanTable,
    scan: &Scan,
    eob_run: &mut u32,
    block: &mut [i16; 64],
) {
    let p1 = 1i16 << scan.al;
    let m1 = -p1;
    let refine = |reader: &mut BitReader, coef: &mut i16| {
        if reader.bits(1) == 1 && *coef & p1 == 0 {
            *coef = coef.wrapping_add(if *coef >= 0 { p1 } else { m1 });
        }
    };
    let mut k = scan.ss;
    if *eob_run == 0 {
        while k <= scan.se {
            let symbol = reader.symbol(ac);
            let (mut run, size) = (i32::from(symbol >> 4), symbol & 15);
            let mut value = 0;
            if size != 0 {
                // Sizes other than 1 are invalid; libjpeg warns and reads them as 1.
                value = if reader.bits(1) == 1 { p1 } else { m1 };
            } else if run != 15 {
                *eob_run = (1 << run) + reader.bits(run as u32);
                break;
            }
            while k <= scan.se {
                let coef = &mut block[NATURAL_ORDER[k]];
                if *coef != 0 {
                    refine(reader, coef);
                } else {
                    run -= 1;
                    if run < 0 {
                        break;
                    }
                }
                k += 1;
            }
            if value != 0 {
                block[NATURAL_ORDER[k]] = value;
            }
            k += 1;
        }
    }
    if *eob_run > 0 {
        while k <= scan.se {
            let coef = &mut block[NATURAL_ORDER[k]];
            if *coef != 0 {
                refine(reader, coef);
            }
            k += 1;
        }
        *eob_run -= 1;
    }
}

/// Upsamples every component and converts to RGB row by row.
fn to_rgb(frame: &Frame, colour: ColourSpace) -> Rgb8 {
    let (width, height) = (frame.width, frame.height);
    let planes: Vec<(Plane, Upsampling)> = frame
        .components
        .iter()
        .map(|c| {
            let plane = Plane {
                samples: &c.samples,
                stride: c.stride(),
                width: c.width,
                height: c.height,
            };
            let method = Upsampling::select(frame.max_h / c.h, frame.max_v / c.v, c.width);
            (plane, method)
        })
        .collect();
    let tables = YccTables::new();
    let mut rows = vec![vec![0u8; width]; planes.len()];
    let mut data = vec![0u8; width * height * 3];
    for (y, out) in data.chunks_exact_mut(width * 3).enumerate() {
        for ((plane, method), row) in planes.iter().zip(&mut rows) {
            upsample_row(plane, *method, y, row);
        }
        match colour {
            ColourSpace::Grey => {
                for (o, &l) in out.chunks_exact_mut(3).zip(&rows[0]) {
                    o.fill(l);
                }
            }
            ColourSpace::YCbCr => tables.convert(&rows[0], &rows[1], &rows[2], out),
            ColourSpace::Rgb => {
                for (x, o) in out.chunks_exact_mut(3).enumerate() {
                    o.copy_from_slice(&[rows[0][x], rows[1][x], rows[2][x]]);
                }
            }
        }
    }
    Rgb8 {
        width: width as u32,
        height: height as u32,
        data,
    }
}
