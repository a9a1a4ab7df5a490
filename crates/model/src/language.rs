//! The Llama / Mistral decoder with grouped-query attention and a GPU KV cache.

use llava_gpu::ops::attention::{Mask, attention, kv_store};
use llava_gpu::ops::elementwise::{add, silu_mul};
use llava_gpu::ops::embed::embedding;
use llava_gpu::ops::matmul::linear;
use llava_gpu::ops::norm::rms_norm;
use llava_gpu::ops::rope::rope;
use llava_gpu::{Batch, DType, Gpu, Tensor};

use crate::config::TextConfig;
use crate::error::{ModelError, Result};
use crate::weights::Weights;

struct DecoderLayer {
    input_layernorm: Tensor,
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    o_proj: Tensor,
    post_attention_layernorm: Tensor,
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

impl DecoderLayer {
    fn load(w: &mut Weights, cfg: &TextConfig, i: usize) -> Result<DecoderLayer> {
        let (d, m) = (cfg.hidden_size, cfg.intermediate_size);
        let (q_dim, kv_dim) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim);
        let p = format!("model.layers.{i}");
        Ok(DecoderLayer {
            input_layernorm: w.take(&format!("{p}.input_layernorm.weight"), &[d])?,
            q_proj: w.take(&format!("{p}.self_attn.q_proj.weight"), &[q_dim, d])?,
            k_proj: w.take(&format!("{p}.self_attn.k_proj.weight"), &[kv_dim, d])?,
            v_proj: w.take(&format!("{p}.self_attn.v_proj.weight"), &[kv_dim, d])?,
            o_proj: w.take(&format!("{p}.self_attn.o_proj.weight"), &[d, q_dim])?,
            post_attention_layernorm: w.take(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
            gate_proj: w.take(&format!("{p}.mlp.gate_proj.weight"), &[m, d])?,
            up_proj: w.take(&format!("{p}.mlp.up_proj.weight"), &[m, d])?,
            down_proj: w.take(&format!("{p}.mlp.down_proj.weight"), &[d, m])?,
        })
    }
}

/// Keys and values of every layer for the tokens seen so far, `[1, capacity, kv_heads, head_dim]`.
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Forgets everything after the first `len` tokens (they will be overwritten).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

pub struct LanguageModel {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    /// `None` when tied to `embed_tokens`.
    lm_head: Option<Tensor>,
    cfg: TextConfig,
}

impl LanguageModel {
    pub fn load(w: &mut Weights, cfg: &TextConfig, tie_word_embeddings: bool) -> Result<LanguageModel> {
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        Ok(LanguageModel {
            embed_tokens: w.take("model.embed_tokens.weight", &[v, d])?,
            layers: (0..cfg.num_hidden_layers).map(|i| DecoderLayer::load(w, cfg, i)).collect::<Result<_>>()?,
            norm: w.take("model.norm.weight", &[d])?,
            lm_head: if tie_word_embeddings { None } else { Some(w.take("lm_head.weight", &[v, d])?) },
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// An empty cache for up to `capacity` tokens, stored as `dtype` (F32 or F16).
    pub fn new_cache(&self, gpu: &Gpu, capacity: usize, dtype: DType) -> Result<KvCache> {
        if !matches!(dtype, DType::F32 | DType::F16) {
            return Err(ModelError::Input(format!("a {dtype:?} KV cache (it must be F32 or F16)")));
        }
        let shape = [1, capacity, self.cfg.num_key_value_heads, self.cfg.head_dim];
        let n = self.layers.len();
        Ok(KvCache {
            keys: (0..n).map(|_| Tensor::empty(gpu, &shape, dtype)).collect::<Result<_, _>>()?,
            values: (0..n).map(|_| Tensor::empty(gpu, &shape, dtype)).collect::<Result<_, _>>()?,
            len: 0,
            capacity,
        })
    }

    /// Embeddings `[T, D]` of token ids (ids must be < vocab; checked here).
    pub fn embed(&self, batch: &mut Batch, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            let msg = format!("token id {bad} is outside the vocabulary ({})", self.cfg.vocab_size);
            return Err(ModelError::Input(msg));
        }
        let ids = Tensor::from_u32(batch.gpu(), &[ids.len()], ids)?;
        Ok(embedding(batch, &self.embed_tokens, &ids)?)
    }

    /// Runs `x: [T, D]` (the embeddings of the next T tokens) through the decoder, appending their
    /// keys and values to `cache`. Returns the final-normed hidden state of the LAST token `[1, D]`.
    pub fn forward(&self, batch: &mut Batch, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let t = x.shape()[0];
        let pos = cache.len;
        if t == 0 {
            return Err(ModelError::Input("no tokens to run".into()));
        }
        if pos + t > cache.capacity {
            return Err(ModelError::ContextOverflow { needed: pos + t, capacity: cache.capacity });
        }
        let c = &self.cfg;
        let (hq, hkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let eps = c.rms_norm_eps as f32;
        let theta = c.rope_theta as f32;
        let mut h = x.clone();
        for (layer, (k_cache, v_cache)) in self.layers.iter().zip(cache.keys.iter().zip(&cache.values)) {
            let a = rms_norm(batch, &h, &layer.input_layernorm, eps)?;
            let q = linear(batch, &a, &layer.q_proj, None)?.reshape(&[t, hq, hd])?;
            let k = linear(batch, &a, &layer.k_proj, None)?.reshape(&[t, hkv, hd])?;
            let v = linear(batch, &a, &layer.v_proj, None)?;
            let q = rope(batch, &q, pos, theta)?.reshape(&[1, t, hq, hd])?;
            let k = rope(batch, &k, pos, theta)?;
            kv_store(batch, &k, k_cache, pos)?;
            kv_store(batch, &v, v_cache, pos)?;
            let o = attention(batch, &q, k_cache, v_cache, pos + t, Mask::Causal { q_offset: pos })?;
            let o = linear(batch, &o.reshape(&[t, hq * hd])?, &layer.o_proj, None)?;
            h = add(batch, &h, &o)?;
            let a = rms_norm(batch, &h, &layer.post_attention_layernorm, eps)?;
            let gate = linear(batch, &a, &layer.gate_proj, None)?;
            let up = linear(batch, &a, &layer.up_proj, None)?;
            let act = silu_mul(batch, &gate, &up)?;
            let mlp = linear(batch, &act, &layer.down_proj, None)?;
            h = add(batch, &h, &mlp)?;
            if t > 1 {
                // Prefill: submit layer by layer so that at most one layer's activations are alive.
                batch.flush()?;
            }
        }
        cache.len = pos + t;
        let d = c.hidden_size as u64 * 4;
        let last = Tensor::empty(batch.gpu(), &[1, c.hidden_size], DType::F32)?;
        batch.copy(h.binding().slice((t as u64 - 1) * d, d), last.binding());
        Ok(rms_norm(batch, &last, &self.norm, eps)?)
    }

    /// Vocabulary logits `[1, V]` of a final hidden state `[1, D]`.
    pub fn logits(&self, batch: &mut Batch, hidden: &Tensor) -> Result<Tensor> {
        Ok(linear(batch, hidden, self.lm_head.as_ref().unwrap_or(&self.embed_tokens), None)?)
    }
}
