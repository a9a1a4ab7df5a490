//! The Llama / Mistral decoder with grouped-query attention and a GPU KV cache.

use llava_gpu::ops::attention::{Mask, attention, kv_store};
use llava_gpu::ops::decode::{
    self, ATTEND_KEYS, Epilogue, Norm, Qkv, SamplerState, Sampling, Step, StepUniform,
};
use llava_gpu::ops::embed::embedding;
use llava_gpu::ops::matmul::{linear, linear_qkv, linear_residual, linear_silu_mul};
use llava_gpu::ops::norm::rms_norm;
use llava_gpu::ops::rope::rope;
use llava_gpu::{Batch, DType, Gpu, Plan, Readback, Tensor};

use crate::error::{ModelError, Result};
use crate::files::config::TextConfig;
use crate::files::needs;
use crate::files::weights::Weights;
use crate::net::layers::{fits, pack};

pub(crate) struct DecoderLayer {
    pub(crate) input_layernorm: Tensor,
    pub(crate) q_proj: Tensor,
    pub(crate) k_proj: Tensor,
    pub(crate) v_proj: Tensor,
    pub(crate) o_proj: Tensor,
    pub(crate) post_attention_layernorm: Tensor,
    pub(crate) gate_proj: Tensor,
    pub(crate) up_proj: Tensor,
    pub(crate) down_proj: Tensor,
}

impl DecoderLayer {
    fn load(w: &mut Weights, gpu: &Gpu, cfg: &TextConfig, i: usize) -> Result<DecoderLayer> {
        let (d, m) = (cfg.hidden_size, cfg.intermediate_size);
        let (q_dim, kv_dim) = (
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
        );
        let p = format!("model.layers.{i}");
        let q = w.take(&format!("{p}.self_attn.q_proj.weight"), &[q_dim, d])?;
        let k = w.take(&format!("{p}.self_attn.k_proj.weight"), &[kv_dim, d])?;
        let v = w.take(&format!("{p}.self_attn.v_proj.weight"), &[kv_dim, d])?;
        // q, k and v in one buffer where they fit, else q and k (v may be in another format).
        let [q_proj, k_proj, v_proj] = if q.dtype() != k.dtype() {
            [q, k, v]
        } else if fits(gpu, &[&q, &k, &v]) {
            pack(gpu, &[&q, &k, &v])?
        } else if fits(gpu, &[&q, &k]) {
            let [q, k] = pack(gpu, &[&q, &k])?;
            [q, k, v]
        } else {
            [q, k, v]
        };
        let gate = w.take(&format!("{p}.mlp.gate_proj.weight"), &[m, d])?;
        let up = w.take(&format!("{p}.mlp.up_proj.weight"), &[m, d])?;
        let [gate_proj, up_proj] = if gate.dtype() == up.dtype() && fits(gpu, &[&gate, &up]) {
            pack(gpu, &[&gate, &up])?
        } else {
            [gate, up]
        };
        Ok(DecoderLayer {
            input_layernorm: w.take(&format!("{p}.input_layernorm.weight"), &[d])?,
            q_proj,
            k_proj,
            v_proj,
            o_proj: w.take(&format!("{p}.self_attn.o_proj.weight"), &[d, q_dim])?,
            post_attention_layernorm: w
                .take(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
            gate_proj,
            up_proj,
            down_proj: w.take(&format!("{p}.mlp.down_proj.weight"), &[d, m])?,
        })
    }
}

/// Keys and values of every layer for the tokens seen so far: per layer one tensor
/// `[2, rows, kv_heads, head_dim]` (keys, then values; `rows` is the capacity rounded up to the
/// decode attention's chunk), viewed as `[1, rows, kv_heads, head_dim]` keys and values.
pub struct KvCache {
    pub(crate) layers: Vec<Tensor>,
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
    /// Counts `n` more tokens as cached (a planned decode step wrote their keys and values).
    pub(crate) fn extend(&mut self, n: usize) -> Result<()> {
        if self.len + n > self.capacity {
            return Err(ModelError::ContextOverflow {
                needed: self.len + n,
                capacity: self.capacity,
            });
        }
        self.len += n;
        Ok(())
    }
}

pub struct LanguageModel {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    /// `None` when tied to `embed_tokens`.
    lm_head: Option<Tensor>,
    cfg: TextConfig,
    /// The most prompt tokens one prefill pass runs, when capped ([`needs::prefill_rows`]).
    prefill_cap: Option<usize>,
}

impl LanguageModel {
    pub fn load(
        w: &mut Weights,
        gpu: &Gpu,
        cfg: &TextConfig,
        tie_word_embeddings: bool,
    ) -> Result<LanguageModel> {
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        Ok(LanguageModel {
            embed_tokens: w.take("model.embed_tokens.weight", &[v, d])?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| DecoderLayer::load(w, gpu, cfg, i))
                .collect::<Result<_>>()?,
            norm: w.take("model.norm.weight", &[d])?,
            lm_head: if tie_word_embeddings {
                None
            } else {
                Some(w.take("lm_head.weight", &[v, d])?)
            },
            cfg: cfg.clone(),
            prefill_cap: None,
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// An empty cache for up to `capacity` tokens, stored as `dtype` (F32 or F16).
    pub fn new_cache(&self, gpu: &Gpu, capacity: usize, dtype: DType) -> Result<KvCache> {
        if !matches!(dtype, DType::F32 | DType::F16) {
            return Err(ModelError::Input(format!(
                "a {dtype:?} KV cache (it must be F32 or F16)"
            )));
        }
        let (hkv, hd) = (self.cfg.num_key_value_heads, self.cfg.head_dim);
        let rows = capacity.next_multiple_of(ATTEND_KEYS);
        let mut cache = KvCache {
            layers: Vec::new(),
            keys: Vec::new(),
            values: Vec::new(),
            len: 0,
            capacity,
        };
        for _ in &self.layers {
            let layer = Tensor::empty(gpu, &[2, rows, hkv, hd], dtype)?;
            let flat = layer.reshape(&[2 * rows, hkv * hd])?;
            cache.keys.push(
                flat.narrow_rows(gpu, 0, rows)?
                    .reshape(&[1, rows, hkv, hd])?,
            );
            cache.values.push(
                flat.narrow_rows(gpu, rows, rows)?
                    .reshape(&[1, rows, hkv, hd])?,
            );
            cache.layers.push(layer);
        }
        Ok(cache)
    }

    /// Embeddings `[T, D]` of token ids (ids must be < vocab; checked here).
    pub fn embed(&self, batch: &mut Batch, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            let msg = format!(
                "token id {bad} is outside the vocabulary ({})",
                self.cfg.vocab_size
            );
            return Err(ModelError::Input(msg));
        }
        let ids = Tensor::from_u32(batch.gpu(), &[ids.len()], ids)?;
        Ok(embedding(batch, &self.embed_tokens, &ids)?)
    }

    /// Runs `x: [T, D]` (the embeddings of the next T tokens) through the decoder, appending their
    /// keys and values to `cache`. Returns the final-normed hidden state of the LAST token `[1, D]`.
    pub fn forward(&self, batch: &mut Batch, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let last = self.forward_last(batch, x, cache)?;
        self.final_norm(batch, &last)
    }

    /// Caps the prompt tokens one prefill pass runs (`None`: as many as one storage binding
    /// holds); a longer prompt runs in chunks, each attending to the cache the ones before wrote.
    pub fn set_prefill_cap(&mut self, tokens: Option<usize>) {
        self.prefill_cap = tokens;
    }

    /// [`LanguageModel::forward`] before the final norm: the residual stream of the last token.
    pub fn forward_last(
        &self,
        batch: &mut Batch,
        x: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let t = x.shape()[0];
        if t == 0 {
            return Err(ModelError::Input("no tokens to run".into()));
        }
        if cache.len + t > cache.capacity {
            return Err(ModelError::ContextOverflow {
                needed: cache.len + t,
                capacity: cache.capacity,
            });
        }
        let rows = needs::prefill_rows(&self.cfg, batch.gpu().max_binding(), self.prefill_cap);
        if t <= rows {
            return self.forward_rows(batch, x, cache);
        }
        let mut last = None;
        for start in (0..t).step_by(rows) {
            let count = rows.min(t - start);
            let chunk = batch.tensor(&[count, self.cfg.hidden_size], DType::F32)?;
            Tensor::copy_rows(batch, x, start, &chunk, 0, count)?;
            last = Some(self.forward_rows(batch, &chunk, cache)?);
        }
        Ok(last.expect("a prompt of at least one chunk"))
    }

    /// [`LanguageModel::forward_last`] of rows that one pass runs.
    fn forward_rows(&self, batch: &mut Batch, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let t = x.shape()[0];
        let pos = cache.len;
        let c = &self.cfg;
        let (hq, hkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let eps = c.rms_norm_eps as f32;
        let theta = c.rope_theta as f32;
        let mut h = x.clone();
        for (layer, (k_cache, v_cache)) in
            self.layers.iter().zip(cache.keys.iter().zip(&cache.values))
        {
            let a = rms_norm(batch, &h, &layer.input_layernorm, eps)?;
            let (q, k, v) = linear_qkv(
                batch,
                &a,
                [&layer.q_proj, &layer.k_proj, &layer.v_proj],
                None,
            )?;
            let (q, k) = (q.reshape(&[t, hq, hd])?, k.reshape(&[t, hkv, hd])?);
            let q = rope(batch, &q, pos, theta)?.reshape(&[1, t, hq, hd])?;
            let k = rope(batch, &k, pos, theta)?;
            kv_store(batch, &k, k_cache, pos)?;
            kv_store(batch, &v, v_cache, pos)?;
            let o = attention(
                batch,
                &q,
                k_cache,
                v_cache,
                pos + t,
                Mask::Causal { q_offset: pos },
            )?;
            let o = o.reshape(&[t, hq * hd])?;
            h = linear_residual(batch, &o, &layer.o_proj, None, &h)?;
            let a = rms_norm(batch, &h, &layer.post_attention_layernorm, eps)?;
            let act = linear_silu_mul(batch, &a, &layer.gate_proj, &layer.up_proj)?;
            h = linear_residual(batch, &act, &layer.down_proj, None, &h)?;
            if t > 1 {
                // Prefill: submit layer by layer so that at most one layer's activations are alive.
                batch.flush()?;
            }
        }
        cache.len = pos + t;
        let last = batch.tensor(&[1, c.hidden_size], DType::F32)?;
        Tensor::copy_rows(batch, &h, t - 1, &last, 0, 1)?;
        Ok(last)
    }

    /// The final norm of [`LanguageModel::forward_last`]'s residual stream.
    pub fn final_norm(&self, batch: &mut Batch, last: &Tensor) -> Result<Tensor> {
        Ok(rms_norm(
            batch,
            last,
            &self.norm,
            self.cfg.rms_norm_eps as f32,
        )?)
    }

    /// Vocabulary logits `[1, V]` of a final hidden state `[1, D]`.
    pub fn logits(&self, batch: &mut Batch, hidden: &Tensor) -> Result<Tensor> {
        Ok(linear(
            batch,
            hidden,
            self.lm_head.as_ref().unwrap_or(&self.embed_tokens),
            None,
        )?)
    }
}

/// The decode step of one chat, planned once ([`LanguageModel::plan_decode`]): its buffers and
/// bind groups exist before the first token, so a token is one parameter write, one submit of
/// one compute pass and a 4-byte readback. Per layer six dispatches: norm + q/k/v (+ RoPE and the
/// cache write), attention and its merge, o_proj (+ residual), norm + gate/up (+ SiLU·mul),
/// down_proj (+ residual).
pub struct DecodePlan {
    step: StepUniform,
    /// `[0]`: the token the step embeds (the sampler writes it); `[1]`: the same, for the host.
    token: Tensor,
    /// The residual stream of the token being run (the prefill leaves its last row here).
    h: Tensor,
    logits: Tensor,
    /// Embedding of `token[0]` and the layers, at the step's position.
    layers: Plan,
    /// Final norm and lm_head of `h` into `logits`.
    head: Plan,
    /// Sampling of `logits` into `token` as `sampler` says.
    sample: Plan,
    sampler: SamplerState,
    /// Where the host reads tokens back; two, so that one step can be in flight while the
    /// previous one's token is read.
    readback: [Readback; 2],
}

impl DecodePlan {
    /// Sets how the next tokens are picked and the ids the repetition penalty starts from.
    pub fn set_sampling(&self, gpu: &Gpu, sampling: Sampling, seen: &[u32]) {
        self.sampler.reset(gpu, sampling, seen);
    }

    /// Records the step of the token the sampler left in `token[0]`, at the cache's end, and
    /// counts it cached; `index` is the token's place in the reply (the sampler's random stream).
    pub fn record_step(&self, batch: &mut Batch, cache: &mut KvCache, index: usize) -> Result<()> {
        let pos = cache.len();
        cache.extend(1)?;
        let step = Step {
            pos: pos as u32,
            kv_len: pos as u32 + 1,
            index: index as u32,
            pad: 0,
        };
        self.step.write(batch.gpu(), step);
        batch.run(&self.layers)?;
        Ok(batch.run(&self.head)?)
    }

    /// Records the final norm and lm_head of `last` (the prefill's last residual row); the token
    /// it leads to is the reply's first.
    pub fn record_head(&self, batch: &mut Batch, last: &Tensor) -> Result<()> {
        self.step.write(batch.gpu(), Step::default());
        batch.copy(last.binding(), self.h.binding());
        Ok(batch.run(&self.head)?)
    }

    /// Submits `batch` (ending in a recorded head) with the sampler, and returns its token
    /// (4 bytes read back; the next step embeds it from the GPU) and, with `want_logits`, the
    /// logits it was picked from.
    pub async fn submit_sampled(
        &self,
        batch: Batch<'_>,
        want_logits: bool,
    ) -> Result<(u32, Option<Vec<f32>>)> {
        let gpu = batch.gpu();
        self.submit(batch, 0)?;
        let logits = match want_logits {
            true => Some(self.logits.to_f32(gpu).await?),
            false => None,
        };
        Ok((self.read(gpu, 0).await?, logits))
    }

    /// Submits `batch` (ending in a recorded head or step) with the sampler, its token going to
    /// read-back slot `slot` (0 or 1) for [`DecodePlan::read`]. The next step may be recorded and
    /// submitted before the token is read: it embeds the token from the GPU.
    pub fn submit(&self, mut batch: Batch<'_>, slot: usize) -> Result<()> {
        batch.run(&self.sample)?;
        batch.copy_to_host(self.token.binding().slice(4, 4), &self.readback[slot % 2]);
        Ok(batch.submit()?)
    }

    /// The token of the step submitted to `slot` (waits for it).
    pub async fn read(&self, gpu: &Gpu, slot: usize) -> Result<u32> {
        let bytes = self.readback[slot % 2].read(gpu).await?;
        Ok(u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")))
    }
}

impl LanguageModel {
    /// Records the decode step over `cache`, or `None` where the fused kernels do not take this
    /// model (a head dim not a multiple of 4, q/k or gate/up in different formats, weights over
    /// one binding, ...): decoding then runs op by op through [`LanguageModel::forward`].
    pub fn plan_decode(&self, gpu: &Gpu, cache: &KvCache) -> Result<Option<DecodePlan>> {
        if !self.plannable(cache) {
            return Ok(None);
        }
        let c = &self.cfg;
        let (hq, hkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let eps = c.rms_norm_eps as f32;
        let step = StepUniform::new(gpu)?;
        let token = Tensor::from_u32(gpu, &[2, 1], &[0, 0])?;
        let logits = Tensor::empty(gpu, &[1, c.vocab_size], DType::F32)?;

        let mut b = gpu.plan();
        let ids = token.narrow_rows(gpu, 0, 1)?.reshape(&[1])?;
        let h = embedding(&mut b, &self.embed_tokens, &ids)?;
        let q = Tensor::empty(gpu, &[hq * hd], DType::F32)?;
        let act = Tensor::empty(gpu, &[c.intermediate_size], DType::F32)?;
        for (layer, kv) in self.layers.iter().zip(&cache.layers) {
            let rope_theta = c.rope_theta as f32;
            let qkv = Qkv {
                step: &step,
                k: &layer.k_proj,
                v: &layer.v_proj,
                kv,
                heads: hq,
                kv_heads: hkv,
                head_dim: hd,
                rope_theta,
            };
            let norm = Norm {
                weight: &layer.input_layernorm,
                eps,
            };
            decode::gemv(
                &mut b,
                &h,
                &layer.q_proj,
                Some(norm),
                Epilogue::Qkv(qkv),
                &q,
            )?;
            let o = decode::attend(&mut b, &step, &q, kv, hq, hkv)?;
            decode::gemv(&mut b, &o, &layer.o_proj, None, Epilogue::Residual, &h)?;
            let norm = Norm {
                weight: &layer.post_attention_layernorm,
                eps,
            };
            let silu = Epilogue::SiluMul { up: &layer.up_proj };
            decode::gemv(&mut b, &h, &layer.gate_proj, Some(norm), silu, &act)?;
            decode::gemv(&mut b, &act, &layer.down_proj, None, Epilogue::Residual, &h)?;
        }
        let layers = b.into_plan()?;

        let mut b = gpu.plan();
        let norm = Norm {
            weight: &self.norm,
            eps,
        };
        decode::gemv(
            &mut b,
            &h,
            self.lm_head(),
            Some(norm),
            Epilogue::Store,
            &logits,
        )?;
        let head = b.into_plan()?;
        let sampler = SamplerState::new(gpu, c.vocab_size)?;
        let mut b = gpu.plan();
        decode::sample(&mut b, &step, &sampler, &logits, &token)?;
        let sample = b.into_plan()?;
        let readback = [Readback::new(gpu, 4)?, Readback::new(gpu, 4)?];
        Ok(Some(DecodePlan {
            step,
            token,
            h,
            logits,
            layers,
            head,
            sample,
            sampler,
            readback,
        }))
    }

    /// Bytes of weights one decode step reads: every layer's matrices and norms, the final norm
    /// and lm_head (and one embedding row, which is negligible and not counted).
    pub fn decode_weight_bytes(&self) -> u64 {
        let bytes = |t: &Tensor| t.byte_len() + t.scales_binding().map_or(0, |s| s.size);
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| {
                [
                    &l.input_layernorm,
                    &l.q_proj,
                    &l.k_proj,
                    &l.v_proj,
                    &l.o_proj,
                    &l.post_attention_layernorm,
                ]
                .into_iter()
                .chain([&l.gate_proj, &l.up_proj, &l.down_proj])
                .map(bytes)
                .sum::<u64>()
            })
            .sum();
        layers + bytes(&self.norm) + bytes(self.lm_head())
    }

    fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    fn plannable(&self, cache: &KvCache) -> bool {
        let c = &self.cfg;
        let (d, hd) = (c.hidden_size, c.head_dim);
        let same = |a: &Tensor, b: &Tensor| a.shares_buffer(b) && a.dtype() == b.dtype();
        decode::attend_supports(c.num_attention_heads, c.num_key_value_heads, hd)
            && hd % 4 == 0
            && hd <= 256
            && cache.layers.len() == self.layers.len()
            && decode::gemv_supports(self.lm_head(), d)
            && self.layers.iter().all(|l| {
                same(&l.q_proj, &l.k_proj)
                    && same(&l.gate_proj, &l.up_proj)
                    && decode::gemv_supports(&l.q_proj, d)
                    && decode::gemv_supports(&l.v_proj, d)
                    && decode::gemv_supports(&l.o_proj, l.o_proj.last_dim())
                    && decode::gemv_supports(&l.gate_proj, d)
                    && decode::gemv_supports(&l.down_proj, c.intermediate_size)
            })
    }
}
