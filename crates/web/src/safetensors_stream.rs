//! A safetensors file read as a stream of network chunks: the header is parsed as soon as it has
//! arrived, and each tensor is handed out as soon as its bytes are complete, so that a loader
//! holds at most one tensor (plus one chunk) in memory.

use llava_model::checkpoint::{SafetensorsEntry, canonical_name, header_len, parse_header};
use llava_model::{HostTensor, StoredDtype};

/// Parses one safetensors file from consecutive chunks of its bytes.
pub struct SafetensorsStream {
    /// The file's size (its Content-Length), or `None` when the server did not say.
    file_size: Option<u64>,
    /// Bytes received but not yet handed out; `pending[0]` is at file offset `offset`.
    pending: Vec<u8>,
    offset: u64,
    /// Tensors still to come, in file order (`None` until the header has arrived).
    entries: Option<std::vec::IntoIter<SafetensorsEntry>>,
}

impl SafetensorsStream {
    pub fn new(file_size: Option<u64>) -> SafetensorsStream {
        SafetensorsStream {
            file_size,
            pending: Vec::new(),
            offset: 0,
            entries: None,
        }
    }

    /// Adds the next chunk and returns the tensors it completed, as (canonical name, tensor).
    /// Tensors whose names the model does not use are skipped.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<(String, HostTensor)>, String> {
        self.pending.extend_from_slice(chunk);
        let mut done = Vec::new();
        if self.entries.is_none() && !self.read_header()? {
            return Ok(done);
        }
        let entries = self.entries.as_mut().expect("the header was read");
        while let Some(entry) = entries.as_slice().first() {
            let received_to = self.offset + self.pending.len() as u64;
            if entry.end > received_to {
                break;
            }
            let entry = entries.next().expect("peeked");
            if entry.start < self.offset {
                return Err(format!(
                    "tensor `{}` overlaps the one before it",
                    entry.name
                ));
            }
            // Skip any gap before the tensor, then split its bytes off without copying the rest.
            self.pending.drain(..(entry.start - self.offset) as usize);
            let rest = self.pending.split_off((entry.end - entry.start) as usize);
            let bytes = std::mem::replace(&mut self.pending, rest);
            self.offset = entry.end;
            let Some(name) = canonical_name(&entry.name) else {
                continue;
            };
            let dtype = match entry.info.dtype {
                StoredDtype::Known(dtype) => dtype,
                StoredDtype::Unsupported(other) => {
                    return Err(format!(
                        "tensor `{}` has dtype {other}; only F32, F16 and BF16 are supported",
                        entry.name
                    ));
                }
            };
            done.push((
                name,
                HostTensor {
                    shape: entry.info.shape,
                    dtype,
                    bytes,
                },
            ));
        }
        Ok(done)
    }

    /// Checks that the stream ended exactly after the last tensor.
    pub fn finish(&self) -> Result<(), String> {
        match &self.entries {
            None => Err("the file ended inside its safetensors header".into()),
            Some(entries) if entries.len() > 0 => Err(format!(
                "the file ended before tensor `{}` was complete",
                entries.as_slice()[0].name
            )),
            Some(_) => Ok(()),
        }
    }

    /// Parses the header once it has arrived; returns whether it has.
    fn read_header(&mut self) -> Result<bool, String> {
        if self.pending.len() < 8 {
            return Ok(false);
        }
        let size = self.file_size.unwrap_or(u64::MAX);
        let prefix: [u8; 8] = self.pending[..8].try_into().expect("8 bytes");
        let len = header_len(prefix, size)? as usize;
        if self.pending.len() < 8 + len {
            return Ok(false);
        }
        let mut entries = parse_header(&self.pending[8..8 + len], size)?;
        entries.sort_by_key(|e| e.start);
        self.pending.drain(..8 + len);
        self.offset = 8 + len as u64;
        self.entries = Some(entries.into_iter());
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llava_model::Checkpoint;
    use std::path::Path;

    const MODEL: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/models/mistral-tiny"
    );

    /// Streams every shard of the bundled checkpoint in odd-sized chunks and compares each tensor
    /// with the file reader's.
    #[test]
    fn streamed_tensors_equal_the_checkpoint_reader() {
        let checkpoint = Checkpoint::open(MODEL).unwrap();
        let mut seen = 0;
        let mut shards: Vec<_> = std::fs::read_dir(MODEL)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        shards.sort();
        assert!(!shards.is_empty());
        for shard in &shards {
            let bytes = std::fs::read(Path::new(shard)).unwrap();
            let mut stream = SafetensorsStream::new(Some(bytes.len() as u64));
            for chunk in bytes.chunks(65_537) {
                for (name, host) in stream.push(chunk).unwrap() {
                    assert_eq!(host, checkpoint.read(&name).unwrap(), "{name}");
                    seen += 1;
                }
            }
            stream.finish().unwrap();
        }
        assert_eq!(seen, checkpoint.names().count());
    }

    #[test]
    fn a_truncated_file_is_an_error() {
        let shard = std::fs::read(format!("{MODEL}/model-00001-of-00003.safetensors")).unwrap();
        let mut stream = SafetensorsStream::new(Some(shard.len() as u64));
        stream.push(&shard[..shard.len() - 1]).unwrap();
        assert!(stream.finish().unwrap_err().contains("ended before tensor"));
        let mut stream = SafetensorsStream::new(Some(shard.len() as u64));
        stream.push(&shard[..20]).unwrap();
        assert!(stream.finish().unwrap_err().contains("header"));
    }
}
