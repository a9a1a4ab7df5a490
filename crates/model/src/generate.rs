//! Generation: sampling, stop rules, and chat sessions that keep their KV cache across turns.

use llava_gpu::Counters;
use llava_gpu::ops::decode::Sampling;
use web_time::Instant;

use crate::error::{ModelError, Result};
use crate::llava::{EncodedImage, Llava, Sequence};
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
    /// Checks every parameter before any work, naming the parameter and the rule.
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &str, value: &dyn std::fmt::Debug, rule: &str| {
            Err(ModelError::Input(format!(
                "generation parameter `{name}` is {value:?}; it must be {rule}"
            )))
        };
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(
                "temperature",
                &self.temperature,
                "a finite number >= 0 (0: greedy)",
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", &self.top_p, "in (0, 1]");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                &self.repetition_penalty,
                "a finite number > 0 (1: off)",
            );
        }
        if self.stop.iter().any(String::is_empty) {
            return bad(
                "stop",
                &self.stop,
                "non-empty strings (an empty one would stop at once)",
            );
        }
        Ok(())
    }

    pub(crate) fn greedy(&self) -> bool {
        self.temperature <= 0.0 && self.repetition_penalty == 1.0
    }

    /// The GPU sampler's settings.
    pub(crate) fn sampling(&self) -> Sampling {
        Sampling {
            temperature: self.temperature.max(0.0),
            top_k: u32::try_from(self.top_k).unwrap_or(u32::MAX),
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        }
    }
}

/// One generated token as it streams out.
#[derive(Clone, Debug)]
pub struct TokenEvent<'a> {
    pub token_id: u32,
    /// The new text this token completes. It may be empty while a multi-byte character is
    /// partial, or while the text could be the beginning of a stop string: held-back text comes
    /// with a later token, or in one last event (with the last token's id) when generation ends.
    pub text: &'a str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    Cancelled,
    /// The KV cache is full: the reply holds the text generated so far.
    ContextFull,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Timings {
    /// Vision tower and projector, GPU work included (about 0 when the image's features came from
    /// the model's cache).
    pub vision_s: f64,
    /// The image's features were reused from the model's cache ([`crate::image_cache`]).
    pub image_cached: bool,
    pub prefill_s: f64,
    pub prefill_tokens: usize,
    pub decode_s: f64,
    pub decode_tokens_per_s: f64,
}

/// What the GPU was asked to do per decode step (averages over the steps of a reply: every token
/// after the first, whose prefill is not counted, and a step run ahead that the reply's end undid).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct GpuPerToken {
    pub dispatches: f64,
    pub passes: f64,
    pub submits: f64,
    pub buffers_created: f64,
    pub bind_groups_created: f64,
    pub bytes_written: f64,
    pub bytes_read: f64,
    /// Whether the planned decode step ran (else op by op).
    pub planned: bool,
}

impl GpuPerToken {
    fn average(c: Counters, tokens: usize, planned: bool) -> GpuPerToken {
        let n = tokens.max(1) as f64;
        GpuPerToken {
            dispatches: c.dispatches as f64 / n,
            passes: c.passes as f64 / n,
            submits: c.submits as f64 / n,
            buffers_created: c.buffers_created as f64 / n,
            bind_groups_created: c.bind_groups_created as f64 / n,
            bytes_written: c.bytes_written as f64 / n,
            bytes_read: c.bytes_read as f64 / n,
            planned,
        }
    }
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
    /// GPU work per decode token.
    pub gpu: GpuPerToken,
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
    /// The conversation so far on the GPU (its KV cache is reused across turns).
    sequence: Sequence,
}

impl ChatSession {
    pub(crate) fn new(system: Option<String>, sequence: Sequence) -> ChatSession {
        ChatSession {
            system,
            messages: Vec::new(),
            image: None,
            sequence,
        }
    }

    /// Forgets the conversation and the image (the GPU cache is kept for reuse).
    pub fn reset(&mut self) {
        self.messages.clear();
        self.image = None;
        self.sequence.clear();
    }

    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Whether an image is part of the conversation (a turn that failed adds none).
    pub fn has_image(&self) -> bool {
        self.image.is_some()
    }

    /// Runs one turn, streaming tokens to `on_token`; returning `false` from it cancels.
    pub async fn send(
        &mut self,
        model: &Llava,
        turn: Turn<'_>,
        params: &GenerateParams,
        mut on_token: impl FnMut(TokenEvent<'_>) -> bool,
    ) -> Result<Reply> {
        params.validate()?;
        check_turn(&turn, self.image.is_some())?;
        let mut timings = Timings::default();
        if turn.raw_prompt {
            self.reset();
        }
        // The session takes the image only when the turn succeeds, so that a failed turn leaves
        // the conversation as it was.
        let new_image = match turn.image {
            Some(image) => {
                let start = Instant::now();
                let (encoded, cached) = model.encode_image_cached(image).await?;
                // The tower's GPU work belongs to vision_s, not to the prefill after it.
                model.gpu().finished().await?;
                timings.image_cached = cached;
                timings.vision_s = start.elapsed().as_secs_f64();
                Some(encoded)
            }
            None => None,
        };
        let image = new_image.as_ref().or(self.image.as_ref());
        let image_tokens = image.map(|i| i.tokens);
        let prompt = if turn.raw_prompt {
            turn.text.to_string()
        } else {
            let mut messages = self.messages.clone();
            messages.push(Message::user(turn.image.is_some() as usize, turn.text));
            let prompt = model.render_chat(self.system.as_deref(), &messages)?;
            if turn.image.is_some() && !prompt.contains("<image>") {
                return Err(ModelError::Template(
                    "the chat template wrote no `<image>` for the message's image (it must render an \
                     {\"type\": \"image\"} content item as `<image>`)"
                        .into(),
                ));
            }
            prompt
        };
        let (ids, image_start) = model.tokenize_prompt(&prompt, image_tokens)?;
        if ids.len() + params.max_new_tokens.min(1) > self.sequence.capacity() {
            return Err(ModelError::ContextOverflow {
                needed: ids.len() + 1,
                capacity: self.sequence.capacity(),
            });
        }

        let start = Instant::now();
        let gpu = model.gpu();
        let mut sampler = Sampler::new(params, &ids);
        let image_at = image.zip(image_start);
        let first = model
            .prefill(
                &mut self.sequence,
                &ids,
                image_at,
                &mut sampler,
                turn.want_logits,
            )
            .await?;
        timings.prefill_s = start.elapsed().as_secs_f64();
        timings.prefill_tokens = first.tokens_run;

        let start = Instant::now();
        let counted_from = gpu.counters();
        let mut decoder = model.tokenizer().stream_decoder(true);
        let mut tokens = Vec::new();
        let mut text = String::new();
        // Bytes of `text` already passed to `on_token`.
        let mut streamed = 0;
        let mut next = first.token;
        let stop_reason = loop {
            if params.max_new_tokens == 0 {
                break StopReason::MaxTokens;
            }
            tokens.push(next);
            sampler.seen(next);
            if !params.ignore_eos && model.is_eos(next) {
                break StopReason::Eos;
            }
            let piece = decoder.step(next)?.unwrap_or_default();
            text.push_str(&piece);
            if let Some(cut) = params
                .stop
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                text.truncate(cut);
                break StopReason::StopString;
            }
            let release = streamable_len(&text, &params.stop).max(streamed);
            if !on_token(TokenEvent {
                token_id: next,
                text: &text[streamed..release],
            }) {
                streamed = release;
                break StopReason::Cancelled;
            }
            streamed = release;
            if tokens.len() >= params.max_new_tokens {
                break StopReason::MaxTokens;
            }
            if !self.sequence.has_room() {
                break StopReason::ContextFull;
            }
            next = model.step(&mut self.sequence, next, &mut sampler).await?;
        };
        let steps = self.sequence.end_reply();
        let gpu_per_token = GpuPerToken::average(
            gpu.counters() - counted_from,
            steps,
            self.sequence.planned(),
        );
        // Text held back because it could have begun a stop string.
        if let Some(&last) = tokens.last().filter(|_| streamed < text.len()) {
            on_token(TokenEvent {
                token_id: last,
                text: &text[streamed..],
            });
        }
        timings.decode_s = start.elapsed().as_secs_f64();
        timings.decode_tokens_per_s = tokens.len() as f64 / timings.decode_s.max(1e-9);

        if new_image.is_some() {
            self.image = new_image;
        }
        if !turn.raw_prompt {
            self.messages
                .push(Message::user(turn.image.is_some() as usize, turn.text));
            self.messages.push(Message::assistant(text.clone()));
        }
        Ok(Reply {
            text,
            tokens,
            prompt_tokens: ids.len(),
            image_tokens: image_tokens.unwrap_or(0),
            stop_reason,
            timings,
            gpu: gpu_per_token,
            first_logits: first.logits,
        })
    }
}

/// Refuses a turn that cannot work before it changes anything: a second image, or a chat
/// message that types the `<image>` placeholder itself.
fn check_turn(turn: &Turn<'_>, has_image: bool) -> Result<()> {
    if turn.image.is_some() && has_image && !turn.raw_prompt {
        return Err(ModelError::Input(
            "this chat already has an image; reset the chat to ask about another one".into(),
        ));
    }
    if !turn.raw_prompt && turn.text.contains("<image>") {
        return Err(ModelError::Input(
            "the message contains the text `<image>`, which marks where the image goes in a prompt; \
             remove it (the image is attached separately)"
                .into(),
        ));
    }
    Ok(())
}

/// How much of `text` may be streamed: all but the longest ending that could still grow into a
/// stop string (so the caller never sees the beginning of one).
fn streamable_len(text: &str, stop: &[String]) -> usize {
    let longest = stop.iter().map(String::len).max().unwrap_or(0);
    let earliest = text.len().saturating_sub(longest.saturating_sub(1));
    (earliest..text.len())
        .filter(|&i| text.is_char_boundary(i))
        .find(|&i| stop.iter().any(|s| s.starts_with(&text[i..])))
        .unwrap_or(text.len())
}

/// transformers' logits processing order: repetition penalty, temperature, top-k, top-p. The
/// host sampler of models whose decode step is not planned (the planned step samples on the GPU,
/// `llava_gpu::ops::decode::sample`, with the same distribution).
pub struct Sampler<'a> {
    pub(crate) params: &'a GenerateParams,
    rng: u64,
    seen: Vec<u32>,
}

impl<'a> Sampler<'a> {
    /// A sampler for a reply to `prompt` (the ids the repetition penalty starts from).
    pub fn new(params: &'a GenerateParams, prompt: &[u32]) -> Self {
        Sampler {
            params,
            rng: params.seed ^ 0x2545_F491_4F6C_DD1D,
            seen: prompt.to_vec(),
        }
    }

    /// Records a generated id for the repetition penalty.
    pub fn seen(&mut self, id: u32) {
        self.seen.push(id);
    }

    pub(crate) fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        let mut logits = logits.to_vec();
        if p.repetition_penalty != 1.0 {
            let mut ids = self.seen.clone();
            ids.sort_unstable();
            ids.dedup();
            for id in ids {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
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
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] / p.temperature - max) as f64).exp())
            .collect();
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

    fn params(
        temperature: f32,
        top_k: usize,
        top_p: f32,
        repetition_penalty: f32,
    ) -> GenerateParams {
        GenerateParams {
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            ..Default::default()
        }
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
            let p = GenerateParams {
                seed,
                ..params(1.0, 0, 1.0, 1.0)
            };
            let mut s = Sampler::new(&p, &[]);
            (0..32)
                .map(|_| s.sample(&[0.0, 0.1, 0.2, 0.3]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    /// The GPU sampler (through its host reference, which its own test ties to the GPU) draws from
    /// the same distribution as this host sampler.
    #[test]
    fn gpu_sampler_has_the_host_samplers_distribution() {
        let logits = [2.0, 1.5, 1.5, 0.3, -0.5, 1.9, -2.0, 0.0];
        let seen = [5, 6];
        for p in [
            params(0.8, 4, 0.9, 1.2),
            params(1.0, 0, 1.0, 1.0),
            params(1.5, 0, 0.7, 1.0),
            params(0.6, 3, 1.0, 1.0),
        ] {
            let n = 40_000;
            let mut host = [0usize; 8];
            let mut s = Sampler::new(&p, &seen);
            (0..n).for_each(|_| host[s.sample(&logits) as usize] += 1);
            let mut gpu = [0usize; 8];
            let sampling = GenerateParams {
                seed: 9,
                ..p.clone()
            }
            .sampling();
            (0..n).for_each(|i| {
                gpu[llava_gpu::ops::decode::sample_reference(&logits, sampling, &seen, i as u32)
                    as usize] += 1
            });
            for (t, (h, g)) in host.iter().zip(&gpu).enumerate() {
                let (h, g) = (*h as f64 / n as f64, *g as f64 / n as f64);
                assert!(
                    (h - g).abs() < 0.012,
                    "{p:?}: token {t}: host {h:.4}, gpu {g:.4}"
                );
                assert_eq!(
                    h == 0.0,
                    g == 0.0,
                    "{p:?}: token {t} kept by one sampler only"
                );
            }
        }
    }

    #[test]
    fn text_that_could_begin_a_stop_string_is_held_back() {
        let stop = ["</answer>".to_string(), "##".to_string()];
        assert_eq!(streamable_len("hello", &stop), 5);
        assert_eq!(streamable_len("hello </ans", &stop), 6);
        assert_eq!(streamable_len("hello #", &stop), 6);
        assert_eq!(streamable_len("a < b", &stop), 5);
        assert_eq!(streamable_len("", &stop), 0);
        assert_eq!(streamable_len("anything <", &[]), 10);
        // A held-back ending starts on a character boundary.
        assert_eq!(streamable_len("é<", &["<é>".to_string()]), 2);
        assert_eq!(streamable_len("xé", &["éa".to_string()]), 1);
    }

    #[test]
    fn bad_sampling_parameters_are_refused_by_name() {
        assert!(GenerateParams::default().validate().is_ok());
        let cases = [
            (
                GenerateParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "`temperature` is NaN",
            ),
            (
                GenerateParams {
                    temperature: -1.0,
                    ..Default::default()
                },
                "`temperature` is -1.0",
            ),
            (
                GenerateParams {
                    temperature: f32::INFINITY,
                    ..Default::default()
                },
                "`temperature` is inf",
            ),
            (
                GenerateParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "`repetition_penalty` is 0.0",
            ),
            (
                GenerateParams {
                    repetition_penalty: f32::NAN,
                    ..Default::default()
                },
                "`repetition_penalty` is NaN",
            ),
            (
                GenerateParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "`top_p` is 0.0; it must be in (0, 1]",
            ),
            (
                GenerateParams {
                    top_p: 1.5,
                    ..Default::default()
                },
                "`top_p` is 1.5",
            ),
            (
                GenerateParams {
                    stop: vec!["x".into(), String::new()],
                    ..Default::default()
                },
                "`stop` is [\"x\", \"\"]",
            ),
        ];
        for (params, expected) in cases {
            let msg = params.validate().unwrap_err().to_string();
            assert!(msg.contains(expected), "{msg}");
        }
    }

    #[test]
    fn top_p_drops_the_tail() {
        // probs ~ [0.665, 0.245, 0.090]: top_p 0.8 keeps the first two only.
        let p = params(1.0, 0, 0.8, 1.0);
        let mut s = Sampler::new(&p, &[]);
        assert!((0..2000).all(|_| s.sample(&[2.0, 1.0, 0.0]) != 2));
    }
}
