//! Minimal `.npy` (format version 1.0) reading and writing for little-endian, C-order arrays of
//! f32, u8 and u32: enough to exchange tensors with numpy-based reference scripts.

use std::io::{Read, Write};
use std::path::Path;

use crate::error::{ModelError, Result};

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Element types this module reads and writes, with their numpy `descr`.
pub trait NpyElement: Copy {
    const DESCR: &'static str;
    const SIZE: usize;
    fn write_le(self, out: &mut Vec<u8>);
    fn read_le(bytes: &[u8]) -> Self;
}

impl NpyElement for f32 {
    const DESCR: &'static str = "<f4";
    const SIZE: usize = 4;
    fn write_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn read_le(bytes: &[u8]) -> Self {
        f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
    }
}

impl NpyElement for u32 {
    const DESCR: &'static str = "<u4";
    const SIZE: usize = 4;
    fn write_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn read_le(bytes: &[u8]) -> Self {
        u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
    }
}

impl NpyElement for u8 {
    const DESCR: &'static str = "|u1";
    const SIZE: usize = 1;
    fn write_le(self, out: &mut Vec<u8>) {
        out.push(self);
    }
    fn read_le(bytes: &[u8]) -> Self {
        bytes[0]
    }
}

/// Encodes an array as `.npy` bytes.
pub fn to_bytes<T: NpyElement>(
    shape: &[usize],
    data: &[T],
) -> std::result::Result<Vec<u8>, String> {
    let numel: usize = shape.iter().product();
    if numel != data.len() {
        return Err(format!(
            "shape {shape:?} holds {numel} elements but {} were given",
            data.len()
        ));
    }
    let dims = match shape {
        [single] => format!("({single},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {dims}, }}",
        T::DESCR
    );
    // Pad with spaces so that magic + version + length + header + '\n' is a multiple of 64.
    let unpadded = MAGIC.len() + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let header_len = u16::try_from(header.len())
        .map_err(|_| format!("shape {shape:?} makes too long a header"))?;
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + header.len() + data.len() * T::SIZE);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for &x in data {
        x.write_le(&mut out);
    }
    Ok(out)
}

/// Decodes `.npy` bytes of element type `T`: `(shape, data)`.
pub fn from_bytes<T: NpyElement>(
    bytes: &[u8],
) -> std::result::Result<(Vec<usize>, Vec<T>), String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not an .npy file (bad magic)".into());
    }
    let (header_len, header_start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        version => return Err(format!("unsupported .npy version {version}")),
    };
    let data_start = header_start + header_len;
    let header = bytes
        .get(header_start..data_start)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("header is truncated or not text")?;
    let descr = dict_value(header, "descr").ok_or("header has no 'descr'")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    // Single-byte types may be written '<u1' or '|u1'.
    let descr_ok = descr == T::DESCR || (T::SIZE == 1 && descr.get(1..) == T::DESCR.get(1..));
    if !descr_ok {
        return Err(format!("element type '{descr}', expected '{}'", T::DESCR));
    }
    if dict_value(header, "fortran_order") != Some("False") {
        return Err("Fortran-order arrays are not supported".into());
    }
    let shape_text = dict_value(header, "shape").ok_or("header has no 'shape'")?;
    let shape = shape_text
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| {
            d.parse::<usize>()
                .map_err(|_| format!("bad shape {shape_text}"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let numel = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or("shape overflows")?;
    let payload = &bytes[data_start.min(bytes.len())..];
    if payload.len() != numel * T::SIZE {
        return Err(format!(
            "shape {shape:?} needs {} data bytes, file has {}",
            numel * T::SIZE,
            payload.len()
        ));
    }
    Ok((
        shape,
        payload.chunks_exact(T::SIZE).map(T::read_le).collect(),
    ))
}

/// The text of `key`'s value in numpy's Python-literal header dict (tuples kept whole).
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let after_key = header
        .split_once(&format!("'{key}':"))
        .map(|(_, rest)| rest.trim_start())?;
    let end = if after_key.starts_with('(') {
        after_key.find(')')? + 1
    } else {
        after_key.find([',', '}'])?
    };
    Some(after_key[..end].trim())
}

pub fn write<T: NpyElement>(path: impl AsRef<Path>, shape: &[usize], data: &[T]) -> Result<()> {
    let path = path.as_ref();
    let bytes = to_bytes(shape, data).map_err(|msg| npy_error(path, msg))?;
    std::fs::write(path, bytes).map_err(|e| ModelError::io(path, e))
}

pub fn write_to<T: NpyElement>(writer: &mut impl Write, shape: &[usize], data: &[T]) -> Result<()> {
    let bytes = to_bytes(shape, data).map_err(|msg| npy_error("<writer>", msg))?;
    writer
        .write_all(&bytes)
        .map_err(|e| ModelError::io("<writer>", e))
}

pub fn read<T: NpyElement>(path: impl AsRef<Path>) -> Result<(Vec<usize>, Vec<T>)> {
    let path = path.as_ref();
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .map_err(|e| ModelError::io(path, e))?;
    from_bytes(&bytes).map_err(|msg| npy_error(path, msg))
}

pub fn write_f32(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<()> {
    write(path, shape, data)
}

pub fn read_f32(path: impl AsRef<Path>) -> Result<(Vec<usize>, Vec<f32>)> {
    read(path)
}

fn npy_error(path: impl AsRef<Path>, msg: String) -> ModelError {
    ModelError::Npy {
        path: path.as_ref().display().to_string(),
        msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_file(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name)
    }

    #[test]
    fn reads_files_written_by_numpy() {
        // np.arange(12, dtype=f32).reshape(2, 3, 2) * 0.5 - 1.25, saved by numpy 2.4.
        let (shape, data) = read_f32(data_file("numpy_f32_2x3x2.npy")).unwrap();
        assert_eq!(shape, [2, 3, 2]);
        assert_eq!(
            data,
            (0..12).map(|i| i as f32 * 0.5 - 1.25).collect::<Vec<_>>()
        );

        let (shape, bytes) = read::<u8>(data_file("numpy_u8_5.npy")).unwrap();
        assert_eq!((shape, bytes), (vec![5], vec![0, 1, 127, 128, 255]));

        let (shape, words) = read::<u32>(data_file("numpy_u32_2x2.npy")).unwrap();
        assert_eq!((shape, words), (vec![2, 2], vec![0, 1, 65536, u32::MAX]));
    }

    #[test]
    fn round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        let values = [1.5f32, -0.0, f32::MAX, f32::MIN_POSITIVE, 3.25, -7.0];
        write_f32(&path, &[3, 2], &values).unwrap();
        let (shape, back) = read_f32(&path).unwrap();
        assert_eq!(shape, [3, 2]);
        assert_eq!(
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            values.map(f32::to_bits)
        );

        let mut buffer = Vec::new();
        write_to(&mut buffer, &[4], &[9u32, 8, 7, 6]).unwrap();
        // magic (6) + version (2) + length (2) + dict (57) + newline = 68, padded to 128.
        assert_eq!(buffer.len(), 128 + 16);
        assert_eq!(
            from_bytes::<u32>(&buffer).unwrap(),
            (vec![4], vec![9, 8, 7, 6])
        );

        let scalar = to_bytes::<u8>(&[], &[42]).unwrap();
        assert_eq!(from_bytes::<u8>(&scalar).unwrap(), (vec![], vec![42]));
        let empty = to_bytes::<f32>(&[0, 3], &[]).unwrap();
        assert_eq!(from_bytes::<f32>(&empty).unwrap(), (vec![0, 3], vec![]));
    }

    #[test]
    fn rejects_bad_input() {
        assert!(
            to_bytes::<f32>(&[2, 2], &[1.0; 3])
                .unwrap_err()
                .contains("holds 4 elements but 3")
        );
        let good = std::fs::read(data_file("numpy_f32_2x3x2.npy")).unwrap();
        assert!(
            from_bytes::<u32>(&good)
                .unwrap_err()
                .contains("element type '<f4', expected '<u4'")
        );
        assert!(
            from_bytes::<f32>(&good[..good.len() - 1])
                .unwrap_err()
                .contains("needs 48 data bytes")
        );
        assert!(
            from_bytes::<f32>(b"PK\x03\x04 not npy")
                .unwrap_err()
                .contains("bad magic")
        );
        let mut fortran = good.clone();
        let at = good.windows(5).position(|w| w == b"False").unwrap();
        fortran[at..at + 5].copy_from_slice(b"True ");
        assert!(from_bytes::<f32>(&fortran).unwrap_err().contains("Fortran"));
        let missing = read_f32(data_file("does_not_exist.npy")).unwrap_err();
        assert!(matches!(missing, ModelError::Io { .. }), "{missing}");
    }
}
