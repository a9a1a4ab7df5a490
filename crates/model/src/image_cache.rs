//! Projected image features kept per model, so that a new chat, a reset or another question about
//! an image already seen skips the vision tower and projector (SGLang-style feature reuse).
//!
//! Entries are keyed by a SHA-256 of the decoded pixels and of the preprocessing settings, and
//! bounded by the GPU bytes of their features: the least recently used entries go first.

use std::sync::Mutex;

use llava_image::{ImageConfig, Rgb8};
use sha2::{Digest, Sha256};

use crate::llava::EncodedImage;

/// Default bound on the cached features' GPU memory: about five LLaVA-7B images of 2928 tokens.
pub const DEFAULT_IMAGE_CACHE_BYTES: u64 = 256 << 20;

/// What identifies an image's features for one model: its pixels and how they are preprocessed.
pub type ImageKey = [u8; 32];

pub fn image_key(image: &Rgb8, config: &ImageConfig) -> ImageKey {
    let mut hash = Sha256::new();
    hash.update(image.width.to_le_bytes());
    hash.update(image.height.to_le_bytes());
    hash.update(&image.data);
    hash.update(config.tile_size.to_le_bytes());
    hash.update(config.patch_size.to_le_bytes());
    hash.update((config.grid_pinpoints.len() as u64).to_le_bytes());
    for [h, w] in &config.grid_pinpoints {
        hash.update(h.to_le_bytes());
        hash.update(w.to_le_bytes());
    }
    for v in config.image_mean.iter().chain(&config.image_std) {
        hash.update(v.to_le_bytes());
    }
    hash.finalize().into()
}

/// Counters and occupancy of an [`ImageCache`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ImageCacheStats {
    /// Lookups answered from the cache (no vision tower run).
    pub hits: u64,
    /// Lookups that had to run the vision tower.
    pub misses: u64,
    pub entries: usize,
    pub bytes: u64,
    pub limit_bytes: u64,
}

/// The model's cache of [`EncodedImage`]s (shared GPU tensors: a hit costs no copy).
pub struct ImageCache {
    lru: Mutex<Lru<EncodedImage>>,
}

impl ImageCache {
    pub fn new(limit_bytes: u64) -> ImageCache {
        ImageCache {
            lru: Mutex::new(Lru::new(limit_bytes)),
        }
    }

    pub fn get(&self, key: &ImageKey) -> Option<EncodedImage> {
        self.lock().get(key)
    }

    pub fn insert(&self, key: ImageKey, image: EncodedImage) {
        let bytes = image.features.byte_len();
        self.lock().insert(key, image, bytes);
    }

    /// Changes the bound (0 turns caching off), evicting what no longer fits.
    pub fn set_limit(&self, limit_bytes: u64) {
        self.lock().set_limit(limit_bytes);
    }

    pub fn stats(&self) -> ImageCacheStats {
        self.lock().stats()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru<EncodedImage>> {
        // The cache holds no invariant a panicking holder could break halfway: keep using it.
        self.lru
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

struct Slot<V> {
    key: ImageKey,
    value: V,
    bytes: u64,
    last_used: u64,
}

/// A least-recently-used map bounded by the sum of its values' sizes. A handful of entries at
/// most (each is a whole image's features), so a linear scan beats any index.
struct Lru<V> {
    slots: Vec<Slot<V>>,
    limit: u64,
    bytes: u64,
    clock: u64,
    hits: u64,
    misses: u64,
}

impl<V: Clone> Lru<V> {
    fn new(limit: u64) -> Self {
        Lru {
            slots: Vec::new(),
            limit,
            bytes: 0,
            clock: 0,
            hits: 0,
            misses: 0,
        }
    }

    fn get(&mut self, key: &ImageKey) -> Option<V> {
        self.clock += 1;
        match self.slots.iter_mut().find(|s| &s.key == key) {
            Some(slot) => {
                slot.last_used = self.clock;
                self.hits += 1;
                Some(slot.value.clone())
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Stores `value` (replacing an entry with the same key), evicting the least recently used
    /// entries until it fits; a value larger than the whole bound is not stored.
    fn insert(&mut self, key: ImageKey, value: V, bytes: u64) {
        if let Some(i) = self.slots.iter().position(|s| s.key == key) {
            self.bytes -= self.slots.swap_remove(i).bytes;
        }
        if bytes > self.limit {
            return;
        }
        self.evict_to(self.limit - bytes);
        self.clock += 1;
        self.bytes += bytes;
        self.slots.push(Slot {
            key,
            value,
            bytes,
            last_used: self.clock,
        });
    }

    fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
        self.evict_to(limit);
    }

    fn evict_to(&mut self, budget: u64) {
        while self.bytes > budget {
            let oldest = (0..self.slots.len())
                .min_by_key(|&i| self.slots[i].last_used)
                .expect("bytes > 0 means a slot");
            self.bytes -= self.slots.swap_remove(oldest).bytes;
        }
    }

    fn stats(&self) -> ImageCacheStats {
        ImageCacheStats {
            hits: self.hits,
            misses: self.misses,
            entries: self.slots.len(),
            bytes: self.bytes,
            limit_bytes: self.limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> ImageKey {
        [n; 32]
    }

    #[test]
    fn least_recently_used_entries_go_first() {
        let mut lru = Lru::new(100);
        lru.insert(key(1), "a", 40);
        lru.insert(key(2), "b", 40);
        assert_eq!(lru.get(&key(1)), Some("a")); // 1 is now newer than 2
        lru.insert(key(3), "c", 40); // 120 > 100: evicts 2
        assert_eq!(lru.get(&key(2)), None);
        assert_eq!(lru.get(&key(1)), Some("a"));
        assert_eq!(lru.get(&key(3)), Some("c"));
        assert_eq!(
            lru.stats(),
            ImageCacheStats {
                hits: 3,
                misses: 1,
                entries: 2,
                bytes: 80,
                limit_bytes: 100
            }
        );
    }

    #[test]
    fn oversized_values_are_not_stored_and_a_smaller_limit_evicts() {
        let mut lru = Lru::new(100);
        lru.insert(key(1), 1, 60);
        lru.insert(key(2), 2, 101);
        assert_eq!(lru.get(&key(2)), None);
        assert_eq!(lru.stats().bytes, 60);
        // Re-inserting a key replaces its entry instead of counting it twice.
        lru.insert(key(1), 10, 30);
        assert_eq!(
            (lru.get(&key(1)), lru.stats().bytes, lru.stats().entries),
            (Some(10), 30, 1)
        );
        lru.insert(key(3), 3, 30);
        lru.set_limit(40); // keeps the most recent (3) only
        assert_eq!(lru.stats().entries, 1);
        assert_eq!(lru.get(&key(3)), Some(3));
        lru.set_limit(0);
        assert_eq!((lru.stats().entries, lru.stats().bytes), (0, 0));
    }

    #[test]
    fn the_key_covers_pixels_size_and_preprocessing() {
        let config = ImageConfig {
            tile_size: 336,
            patch_size: 14,
            grid_pinpoints: vec![[336, 672], [672, 336]],
            image_mean: [0.5; 3],
            image_std: [0.25; 3],
        };
        let image = Rgb8 {
            width: 2,
            height: 1,
            data: vec![1, 2, 3, 4, 5, 6],
        };
        let base = image_key(&image, &config);
        assert_eq!(base, image_key(&image.clone(), &config.clone()));
        let mut pixel = image.clone();
        pixel.data[5] = 7;
        let transposed = Rgb8 {
            width: 1,
            height: 2,
            ..image.clone()
        };
        let mut pinpoints = config.clone();
        pinpoints.grid_pinpoints.swap(0, 1);
        let mut mean = config.clone();
        mean.image_mean[2] = 0.4;
        for other in [
            image_key(&pixel, &config),
            image_key(&transposed, &config),
            image_key(&image, &pinpoints),
            image_key(&image, &mean),
        ] {
            assert_ne!(base, other);
        }
    }
}
