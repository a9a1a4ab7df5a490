//! Huffman tables and the entropy-coded-segment bit reader, following libjpeg-turbo's `jdhuff.c`.

use crate::ImageError;

fn corrupt(what: &str) -> ImageError {
    ImageError::Decode(format!("corrupt JPEG: {what}"))
}

/// Bits of lookahead for the fast decoding path.
const LOOKAHEAD: u32 = 9;

/// A decoding table built as `jpeg_make_d_derived_tbl` does (canonical codes, all-ones codes refused).
#[derive(Clone)]
pub(super) struct HuffmanTable {
    /// `(code length, symbol)` for every `LOOKAHEAD`-bit prefix whose code is at most that long.
    fast: Vec<(u8, u8)>,
    /// Largest code of each length (index 1..=16), -1 where there is none.
    max_code: [i32; 17],
    /// Added to a code of each length to index `values`.
    value_offset: [i32; 17],
    /// The symbols, zero-padded to 256 like libjpeg's `huffval`.
    values: [u8; 256],
}

impl HuffmanTable {
    /// `counts[l]` codes of length `l + 1`, then the symbols in code order. DC tables may only hold
    /// symbols 0..=15 (libjpeg refuses others).
    pub(super) fn new(counts: &[u8; 16], values: &[u8], is_dc: bool) -> Result<Self, ImageError> {
        let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
        if total > 256 || values.len() != total {
            return Err(corrupt("Huffman table has a bad symbol count"));
        }
        if is_dc && values.iter().any(|&v| v > 15) {
            return Err(corrupt("DC Huffman table has a symbol above 15"));
        }
        let mut max_code = [-1i32; 17];
        let mut value_offset = [0i32; 17];
        let mut fast = vec![(0u8, 0u8); 1 << LOOKAHEAD];
        let (mut code, mut index) = (0u32, 0usize);
        for length in 1..=16u32 {
            let count = u32::from(counts[length as usize - 1]);
            value_offset[length as usize] = index as i32 - code as i32;
            // The codes of this length must fit in it without being all ones (libjpeg:
            // JERR_BAD_HUFF_TABLE).
            if code + count >= 1 << length {
                return Err(corrupt("Huffman table has too many codes"));
            }
            for _ in 0..count {
                if length <= LOOKAHEAD {
                    let shift = LOOKAHEAD - length;
                    for low in 0..1u32 << shift {
                        fast[((code << shift) | low) as usize] = (length as u8, values[index]);
                    }
                }
                code += 1;
                index += 1;
            }
            if count > 0 {
                max_code[length as usize] = code as i32 - 1;
            }
            code <<= 1;
        }
        let mut padded = [0u8; 256];
        padded[..values.len()].copy_from_slice(values);
        Ok(Self {
            fast,
            max_code,
            value_offset,
            values: padded,
        })
    }

    /// The standard tables of JPEG Annex K.3, which libjpeg-turbo substitutes for a missing DHT
    /// (`jpeg_std_huff_table`: table 0 luminance, 1 chrominance).
    pub(super) fn standard(is_dc: bool, index: usize) -> Option<Self> {
        let (counts, values): (&[u8; 16], &[u8]) = match (is_dc, index) {
            (true, 0) => (&STD_DC_LUMA_COUNTS, &STD_DC_VALUES),
            (true, 1) => (&STD_DC_CHROMA_COUNTS, &STD_DC_VALUES),
            (false, 0) => (&STD_AC_LUMA_COUNTS, &STD_AC_LUMA_VALUES),
            (false, 1) => (&STD_AC_CHROMA_COUNTS, &STD_AC_CHROMA_VALUES),
            _ => return None,
        };
        Self::new(counts, values, is_dc).ok()
    }
}

/// Reads bits from entropy-coded data the way libjpeg's `jpeg_fill_bit_buffer` does: `FF 00` is a
/// data byte `FF`, a run of `FF` fill bytes is skipped, and any other `FF xx` is a marker that ends
/// the data; past it (or past the end of the input) zero bits are supplied. Consuming any of those
/// padding bits is what libjpeg reports as "premature end of data segment"; here it is an error.
pub(super) struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
    /// The unread bits are the low `bits` bits of `acc`.
    acc: u64,
    bits: u32,
    /// How many of the lowest unread bits are padding rather than data.
    padding_bits: u32,
    /// The marker that ended the data (`pos` is just after it).
    marker: Option<u8>,
    /// The input ran out without a marker.
    ended: bool,
    /// Padding bits were consumed.
    overrun: bool,
}

impl<'a> BitReader<'a> {
    pub(super) fn new(data: &'a [u8], pos: usize) -> Self {
        Self {
            data,
            pos,
            acc: 0,
            bits: 0,
            padding_bits: 0,
            marker: None,
            ended: false,
            overrun: false,
        }
    }

    fn next_byte(&mut self) -> Option<u8> {
        let byte = *self.data.get(self.pos)?;
        if byte != 0xff {
            self.pos += 1;
            return Some(byte);
        }
        let mut next = self.pos + 1;
        while self.data.get(next) == Some(&0xff) {
            next += 1;
        }
        match self.data.get(next) {
            Some(0) => {
                self.pos = next + 1;
                Some(0xff)
            }
            Some(&marker) => {
                self.marker = Some(marker);
                self.pos = next + 1;
                None
            }
            None => {
                self.pos = next;
                None
            }
        }
    }

    fn fill(&mut self) {
        while self.bits <= 56 {
            let byte = if self.marker.is_some() || self.ended {
                None
            } else {
                self.next_byte()
            };
            let byte = byte.unwrap_or_else(|| {
                if self.marker.is_none() {
                    self.ended = true;
                }
                self.padding_bits += 8;
                0
            });
            self.acc = (self.acc << 8) | u64::from(byte);
            self.bits += 8;
        }
    }

    #[inline]
    fn ensure(&mut self) {
        if self.bits < 32 {
            self.fill();
        }
    }

    #[inline]
    fn peek(&self, n: u32) -> u32 {
        ((self.acc >> (self.bits - n)) & ((1u64 << n) - 1)) as u32
    }

    #[inline]
    fn consume(&mut self, n: u32) {
        self.bits -= n;
        if self.bits < self.padding_bits {
            self.overrun = true;
            self.padding_bits = self.bits;
        }
    }

    /// `n` (0..=16) raw bits.
    #[inline]
    pub(super) fn bits(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        self.ensure();
        let value = self.peek(n);
        self.consume(n);
        value
    }

    /// One Huffman-coded symbol. A bit pattern that is no code of the table is read the way
    /// `jpeg_huff_decode` does: 17 bits are consumed and the symbol is 0 (libjpeg only warns).
    #[inline]
    pub(super) fn symbol(&mut self, table: &HuffmanTable) -> u8 {
        self.ensure();
        let (length, value) = table.fast[self.peek(LOOKAHEAD) as usize];
        if length > 0 {
            self.consume(u32::from(length));
            return value;
        }
        let code16 = self.peek(16) as i32;
        for length in LOOKAHEAD + 1..=16 {
            let code = code16 >> (16 - length);
            if code <= table.max_code[length as usize] {
                self.consume(length);
                return table.values
                    [((code + table.value_offset[length as usize]) & 0xff) as usize];
            }
        }
        self.consume(16);
        self.bits(1);
        0
    }

    /// `symbol` bits read as a signed value (JPEG's `HUFF_EXTEND`).
    #[inline]
    pub(super) fn signed(&mut self, size: u32) -> i32 {
        if size == 0 {
            return 0;
        }
        let raw = self.bits(size) as i32;
        if raw < 1 << (size - 1) {
            raw - (1 << size) + 1
        } else {
            raw
        }
    }

    /// Whether bits past the end of the data were used: libjpeg's `insufficient_data` when the
    /// data ended at a marker.
    pub(super) fn out_of_data(&self) -> bool {
        self.overrun
    }

    /// Fails if bits past the end of the input (not a marker) were needed: Pillow reports such a
    /// file as truncated.
    pub(super) fn check_truncated(&self) -> Result<(), ImageError> {
        if self.overrun && self.ended {
            return Err(ImageError::Decode(
                "truncated JPEG: the data ends inside a scan".into(),
            ));
        }
        Ok(())
    }

    /// Whether the input ran out (without a marker) while filling the bit buffer.
    pub(super) fn input_ended(&self) -> bool {
        self.ended
    }

    /// Whether a marker that ended the data is still waiting to be read.
    pub(super) fn marker_pending(&self) -> bool {
        self.marker.is_some()
    }

    /// Drops the buffered bits and reads the next marker, skipping any bytes before it as libjpeg's
    /// `next_marker` does. Returns the marker and the position just after it, or `None` at the end
    /// of the input.
    pub(super) fn next_marker(&mut self) -> Option<(u8, usize)> {
        self.acc = 0;
        self.bits = 0;
        self.padding_bits = 0;
        if let Some(marker) = self.marker.take() {
            return Some((marker, self.pos));
        }
        let found = find_marker(self.data, self.pos)?;
        self.pos = found.1;
        Some(found)
    }

    /// Starts restart interval `index` (0..=7) as libjpeg's `read_restart_marker` and
    /// `jpeg_resync_to_restart` do: the expected `RSTn` (or one too far from it to make sense) is
    /// consumed; a marker for one of the two previous intervals (or an invalid one) is skipped to
    /// the next marker; any other marker (the next two `RSTn`, or a non-restart marker such as
    /// EOI) is left pending, so that the interval reads as empty (zero bits).
    pub(super) fn restart(&mut self, index: u8) -> Result<(), ImageError> {
        let truncated = || ImageError::Decode("truncated JPEG: the data ends inside a scan".into());
        self.overrun = false;
        let (mut marker, _) = self.next_marker().ok_or_else(truncated)?;
        let rst = |n: u8| 0xd0 + (n & 7);
        loop {
            if marker == rst(index) {
                return Ok(());
            }
            let restart_number = (0xd0..=0xd7).contains(&marker).then_some(marker);
            match restart_number {
                _ if marker < 0xc0 => {}
                None => break,
                Some(m) if m == rst(index + 1) || m == rst(index + 2) => break,
                Some(m) if m == rst(index.wrapping_sub(1)) || m == rst(index.wrapping_sub(2)) => {}
                Some(_) => return Ok(()),
            }
            marker = self.next_marker().ok_or_else(truncated)?.0;
        }
        self.marker = Some(marker);
        Ok(())
    }
}

/// The next marker at or after `pos` (skipping non-marker bytes, fill bytes and stuffed `FF 00`),
/// with the position just after its code.
pub(super) fn find_marker(data: &[u8], mut pos: usize) -> Option<(u8, usize)> {
    loop {
        pos += data.get(pos..)?.iter().position(|&b| b == 0xff)?;
        while data.get(pos) == Some(&0xff) {
            pos += 1;
        }
        match *data.get(pos)? {
            0 => pos += 1,
            marker => return Some((marker, pos + 1)),
        }
    }
}

const STD_DC_LUMA_COUNTS: [u8; 16] = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
const STD_DC_CHROMA_COUNTS: [u8; 16] = [0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0];
const STD_DC_VALUES: [u8; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
const STD_AC_LUMA_COUNTS: [u8; 16] = [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7d];
#[rustfmt::skip]
const STD_AC_LUMA_VALUES: [u8; 162] = [
    0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07,
    0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xa1, 0x08, 0x23, 0x42, 0xb1, 0xc1, 0x15, 0x52, 0xd1, 0xf0,
    0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0a, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x25, 0x26, 0x27, 0x28,
    0x29, 0x2a, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49,
    0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69,
    0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89,
    0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7,
    0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3, 0xc4, 0xc5,
    0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe1, 0xe2,
    0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8,
    0xf9, 0xfa,
];
const STD_AC_CHROMA_COUNTS: [u8; 16] = [0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 0x77];
#[rustfmt::skip]
const STD_AC_CHROMA_VALUES: [u8; 162] = [
    0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07, 0x61, 0x71,
    0x13, 0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xa1, 0xb1, 0xc1, 0x09, 0x23, 0x33, 0x52, 0xf0,
    0x15, 0x62, 0x72, 0xd1, 0x0a, 0x16, 0x24, 0x34, 0xe1, 0x25, 0xf1, 0x17, 0x18, 0x19, 0x1a, 0x26,
    0x27, 0x28, 0x29, 0x2a, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48,
    0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68,
    0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87,
    0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4, 0xa5,
    0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3,
    0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda,
    0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8,
    0xf9, 0xfa,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(first: &[u8]) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..first.len()].copy_from_slice(first);
        c
    }

    #[test]
    fn tables_with_too_many_or_all_ones_codes_are_refused() {
        // Three 1-bit codes cannot exist; two would include the all-ones code "1".
        assert!(HuffmanTable::new(&counts(&[3]), &[0, 1, 2], false).is_err());
        assert!(HuffmanTable::new(&counts(&[2]), &[0, 1], false).is_err());
        // "0", "10", "11": the last is all ones.
        assert!(HuffmanTable::new(&counts(&[1, 2]), &[0, 1, 2], false).is_err());
        assert!(HuffmanTable::new(&counts(&[1, 1]), &[0, 1], false).is_ok());
        assert!(HuffmanTable::new(&counts(&[1, 1]), &[0, 16], true).is_err()); // DC symbol > 15
    }

    #[test]
    fn decodes_canonical_codes_short_and_long() {
        // Codes: "0" -> 7, "10" -> 8, then one 12-bit code 110000000000 -> 9 (past the lookahead).
        let table = HuffmanTable::new(
            &counts(&[1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
            &[7, 8, 9],
            false,
        )
        .unwrap();
        // Bits: 0 | 10 | 110000000000 | 0, padded with ones: 0101 1000 0000 0000 0111 1111.
        let data = [0b0101_1000, 0b0000_0000, 0b0111_1111];
        let mut reader = BitReader::new(&data, 0);
        let symbols: Vec<u8> = (0..4).map(|_| reader.symbol(&table)).collect();
        assert_eq!(symbols, [7, 8, 9, 7]);
        assert!(!reader.out_of_data());
    }

    #[test]
    fn bit_reader_unstuffs_and_stops_at_markers() {
        let data = [0xab, 0xff, 0x00, 0xcd, 0xff, 0xff, 0xd9, 0x12];
        let mut reader = BitReader::new(&data, 0);
        assert_eq!(reader.bits(16), 0xabff);
        assert_eq!(reader.bits(8), 0xcd);
        assert!(!reader.out_of_data());
        // Past the marker come zero bits, and using them is noted.
        assert_eq!(reader.bits(4), 0);
        assert!(reader.out_of_data());
        assert!(reader.check_truncated().is_ok());
        assert_eq!(reader.next_marker(), Some((0xd9, 7)));
    }

    #[test]
    fn signed_values_extend_like_huff_extend() {
        // 3-bit values: 000..011 are -7..-4, 100..111 are 4..7; 2-bit: 00 is -3, 10 is 2.
        let data = [0b0001_1100, 0b1000_0000];
        let mut reader = BitReader::new(&data, 0);
        assert_eq!(reader.signed(3), -7);
        assert_eq!(reader.signed(3), 7);
        assert_eq!(reader.signed(2), -3);
        assert_eq!(reader.signed(2), 2);
        assert_eq!(reader.signed(0), 0);
    }
}
