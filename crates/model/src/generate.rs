//! Generation: sampling, stop rules, and chat sessions that keep their KV cache across turns.

use llava_gpu::ops::reduce::argmax;
use web_time::Instant;

use crate::error::{ModelError, Result};
use crate::language::KvCache;
use crate::llava::{EncodedImage, Llava};
use crate::text::Message;

/// How to pick the next tokens. `temperature == 0` (the default) is greedy decoding.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// transformers' repetition penalty over the prompt and generated ids (1: off).
    pub repetition_penalty: f32,
    pub seed: u64,
    /// Stop when the text contains one of these (it is cut from the answer).
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens (for parity tests against fixed-length references).
    pub ignore_eos: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: 0,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl GenerateParams {
    fn greedy(&self) -> bool {
        self.temperature <= 0.0 && self.repetition_penalty == 1.0
    }
}

/// One generated token as it streams out.
#[derive(Clone, Debug)]
pub struct TokenEvent<'a> {
    pub token_id: u32,
    /// The new text this token completes (may be empty while a multi-byte character is partial).
    pub text: &'a str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    Cancelled,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Timings {
    /// Vision tower and projector (about 0 when the image's features came from the model's cache).
    pub vision_s: f64,
    /// The image's features were reused from the model's cache ([`crate::image_cache`]).
    pub image_cached: bool,
    pub prefill_s: f64,
    pub prefill_tokens: usize,
    pub decode_s: f64,
    pub decode_tokens_per_s: f64,
}

/// The result of one turn.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Reply {
    pub text: String,
    /// Generated ids, including the end-of-sequence id when generation stopped on one.
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub image_tokens: usize,
    pub stop_reason: StopReason,
    pub timings: Timings,
    /// Logits at the last prompt position, when asked for.
    #[serde(skip)]
    pub first_logits: Option<Vec<f32>>,
}

/// What the next turn sends.
pub struct Turn<'a> {
    pub image: Option<&'a llava_image::Rgb8>,
    pub text: &'a str,
    /// Use `text` as the whole prompt (with `<image>` where the image goes): no chat template.
    pub raw_prompt: bool,
    /// Keep the logits at the last prompt position in [`Reply::first_logits`].
    pub want_logits: bool,
}

/// A conversation about (at most) one image. Follow-up turns reuse the KV cache of the
/// previous ones: only the tokens after the longest common prefix are run through the model.
pub struct ChatSession {
    system: Option<String>,
    messages: Vec<Message>,
    image: Option<EncodedImage>,
    cache: KvCache,
    /// The ids whose keys and values are in `cache`, in order.
    cached_ids: Vec<u32>,
}

impl ChatSession {
    pub(crate) fn new(system: Option<String>, cache: KvCache) -> ChatSession {
        ChatSession { system, messages: Vec::new(), image: None, cache, cached_ids: Vec::new() }
    }

    /// Forgets the conversation and the image (the GPU cache is kept for reuse).
    pub fn reset(&mut self) {
        self.messages.clear();
        self.image = None;
        self.cache.truncate(0);
        self.cached_ids.clear();
    }

    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Runs one turn, streaming tokens to `on_token`; returning `false` from it cancels.
    pub async fn send(
        &mut self,
        model: &Llava,
        turn: Turn<'_>,
        params: &GenerateParams,
        mut on_token: impl FnMut(TokenEvent<'_>) -> bool,
    ) -> Result<Reply> {
        let mut timings = Timings::default();
        if turn.raw_prompt {
            self.reset();
        }
        if let Some(image) = turn.image {
            if self.image.is_some() {
                return Err(ModelError::Input(
                    "this chat already has an image; reset the chat to ask about another one".into(),
                ));
            }
            let start = Instant::now();
            let (encoded, cached) = model.encode_image_cached(image).await?;
            (self.image, timings.image_cached) = (Some(encoded), cached);
            timings.vision_s = start.elapsed().as_secs_f64();
        }
        let image_tokens = self.image.as_ref().map(|i| i.tokens);
        let prompt = if turn.raw_prompt {
            turn.text.to_string()
        } else {
            let mut messages = self.messages.clone();
            messages.push(Message::user(turn.image.is_some() as usize, turn.text));
            model.render_chat(self.system.as_deref(), &messages)?
        };
        let (ids, image_start) = model.tokenize_prompt(&prompt, image_tokens)?;
        if ids.len() + params.max_new_tokens.min(1) > self.cache.capacity() {
            return Err(ModelError::ContextOverflow { needed: ids.len() + 1, capacity: self.cache.capacity() });
        }

        // Reuse the cached prefix; run the rest.
        let common = self.cached_ids.iter().zip(&ids).take_while(|(a, b)| a == b).count().min(ids.len() - 1);
        self.cache.truncate(common);
        self.cached_ids.truncate(common);
        let start = Instant::now();
        let gpu = model.gpu();
        let mut batch = gpu.batch();
        let new_ids = &ids[common..];
        let x = model.embed_prompt(&mut batch, new_ids)?;
        if let (Some(image), Some(image_start)) = (&self.image, image_start) {
            model.splice_image(&mut batch, &x, common, image_start, image)?;
        }
        let hidden = model.language().forward(&mut batch, &x, &mut self.cache)?;
        self.cached_ids.extend_from_slice(new_ids);
        let logits = model.language().logits(&mut batch, &hidden)?;
        let mut sampler = Sampler::new(params, &ids);
        let first_logits = if turn.want_logits || !params.greedy() {
            batch.submit()?;
            Some(logits.to_f32(gpu).await?)
        } else {
            let best = argmax(&mut batch, &logits)?;
            batch.submit()?;
            sampler.pending = Some(best.to_u32(gpu).await?[0]);
            None
        };
        timings.prefill_s = start.elapsed().as_secs_f64();
        timings.prefill_tokens = new_ids.len();

        let start = Instant::now();
        let mut decoder = model.tokenizer().stream_decoder(true);
        let mut tokens = Vec::new();
        let mut text = String::new();
        let mut next = match (&first_logits, sampler.pending.take()) {
            (_, Some(id)) => id,
            (Some(l), None) => sampler.sample(l),
            (None, None) => unreachable!("prefill yields logits or an argmax"),
        };
        let stop_reason = loop {
            tokens.push(next);
            sampler.seen(next);
            if !params.ignore_eos && model.is_eos(next) {
                break StopReason::Eos;
            }
            let piece = decoder.step(next)?.unwrap_or_default();
            text.push_str(&piece);
            if let Some(cut) = params.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(cut);
                break StopReason::StopString;
            }
            if !on_token(TokenEvent { token_id: next, text: &piece }) {
                break StopReason::Cancelled;
            }
            if tokens.len() >= params.max_new_tokens {
                break StopReason::MaxTokens;
            }
            if self.cache.len() + 1 > self.cache.capacity() {
                return Err(ModelError::ContextOverflow { needed: self.cache.len() + 1, capacity: self.cache.capacity() });
            }
            // One decode step: one submission, one number (or the logits) read back.
            let mut batch = gpu.batch();
            let x = model.language().embed(&mut batch, &[next])?;
            let hidden = model.language().forward(&mut batch, &x, &mut self.cache)?;
            self.cached_ids.push(next);
            let logits = model.language().logits(&mut batch, &hidden)?;
            next = if params.greedy() {
                let best = argmax(&mut batch, &logits)?;
                batch.submit()?;
                best.to_u32(gpu).await?[0]
            } else {
                batch.submit()?;
                sampler.sample(&logits.to_f32(gpu).await?)
            };
        };
        timings.decode_s = start.elapsed().as_secs_f64();
        timings.decode_tokens_per_s = tokens.len() as f64 / timings.decode_s.max(1e-9);

        if !turn.raw_prompt {
            self.messages.push(Message::user(turn.image.is_some() as usize, turn.text));
            self.messages.push(Message::assistant(text.clone()));
        }
        Ok(Reply {
            text,
            tokens,
            prompt_tokens: ids.len(),
            image_tokens: image_tokens.unwrap_or(0),
            stop_reason,
            timings,
            first_logits,
        })
    }
}

/// transformers' logits processing order: repetition penalty, temperature, top-k, top-p.
struct Sampler<'a> {
    params: &'a GenerateParams,
    rng: u64,
    seen: Vec<u32>,
    /// A token already chosen on the GPU.
    pending: Option<u32>,
}

impl<'a> Sampler<'a> {
    fn new(params: &'a GenerateParams, prompt: &[u32]) -> Self {
        Sampler { params, rng: params.seed ^ 0x2545_F491_4F6C_DD1D, seen: prompt.to_vec(), pending: None }
    }

    fn seen(&mut self, id: u32) {
        self.seen.push(id);
    }

    fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        let mut logits = logits.to_vec();
        if p.repetition_penalty != 1.0 {
            let mut ids = self.seen.clone();
            ids.sort_unstable();
            ids.dedup();
            for id in ids {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax_cpu(&logits);
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let max = logits[order[0]] / p.temperature;
        let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i] / p.temperature - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            // Keep tokens until the cumulative probability reaches top_p (at least one).
            let mut cumulative = 0.0;
            let keep = probs.iter().take_while(|&&q| {
                let keep = cumulative < p.top_p as f64;
                cumulative += q;
                keep
            });
            let n = keep.count().max(1);
            order.truncate(n);
            probs.truncate(n);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= total);
        }
        let r = self.uniform();
        let mut cumulative = 0.0;
        for (q, &i) in probs.iter().zip(&order) {
            cumulative += q;
            if r < cumulative {
                return i as u32;
            }
        }
        *order.last().unwrap() as u32
    }

    /// Uniform in [0, 1) (splitmix64).
    fn uniform(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// First index of the largest value (torch.argmax's tie rule).
fn argmax_cpu(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, repetition_penalty: f32) -> GenerateParams {
        GenerateParams { temperature, top_k, top_p, repetition_penalty, ..Default::default() }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        // Token 0 (seen, 3.0 -> 1.5) loses to token 1 (2.0); seen negative token 2 stays below.
        let p = params(0.0, 0, 1.0, 2.0);
        let mut s = Sampler::new(&p, &[0, 2]);
        assert_eq!(s.sample(&[3.0, 2.0, -1.0]), 1);
        let p = params(0.0, 0, 1.0, 1.0);
        assert_eq!(Sampler::new(&p, &[0]).sample(&[3.0, 2.0, -1.0]), 0);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.1, 2.0, 1.9, -3.0];
        for p in [params(1.0, 1, 1.0, 1.0), params(1.0, 0, 1e-6, 1.0)] {
            let mut s = Sampler::new(&p, &[]);
            assert!((0..50).all(|_| s.sample(&logits) == 1));
        }
    }

    #[test]
    fn sampling_follows_the_softmax_and_is_seeded() {
        // p = softmax([0, ln 3]) = [0.25, 0.75].
        let p = params(1.0, 0, 1.0, 1.0);
        let mut s = Sampler::new(&p, &[]);
        let n = 20_000;
        let ones = (0..n).filter(|_| s.sample(&[0.0, 3f32.ln()]) == 1).count();
        assert!((ones as f64 / n as f64 - 0.75).abs() < 0.015, "{ones}");
        let draw = |seed| {
            let p = GenerateParams { seed, ..params(1.0, 0, 1.0, 1.0) };
            let mut s = Sampler::new(&p, &[]);
            (0..32).map(|_| s.sample(&[0.0, 0.1, 0.2, 0.3])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_p_drops_the_tail() {
        // probs ~ [0.665, 0.245, 0.090]: top_p 0.8 keeps the first two only.
        let p = params(1.0, 0, 0.8, 1.0);
        let mut s = Sampler::new(&p, &[]);
        assert!((0..2000).all(|_| s.sample(&[2.0, 1.0, 0.0]) != 2));
    }
}
