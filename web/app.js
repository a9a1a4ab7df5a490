// The demo page: load a model folder, pick an image, ask questions, watch the answer stream.
import { LlavaModel } from '../pkg/index.js';

const $ = (id) => document.getElementById(id);
let model = null;
let chat = null;
let image = null; // the File/Blob to send with the chat's first question
let imageSent = false;
let reply = null;
// Streamed token ids of every answer, for tests and the curious.
window.__turns = [];

function setState(state) {
  document.body.dataset.state = state;
  $('load').disabled = state === 'loading' || state === 'generating';
  $('send').disabled = state !== 'ready';
  $('new-chat').disabled = state !== 'ready';
  $('stop').disabled = state !== 'generating';
}

function showError(e) {
  $('error').hidden = false;
  $('error').textContent = e?.message ?? String(e);
}

function clearError() {
  $('error').hidden = true;
  $('error').textContent = '';
}

function megabytes(bytes) {
  return `${(bytes / 1048576).toFixed(1)} MB`;
}

// Checkpoint folders to pick from (any other folder URL works too, converted ones included),
// with what a load downloads: the hub's f16 shards, quantized after download (--quant on load).
const KNOWN_MODELS = [
  { label: 'bundled tiny model (random weights, for tests)', url: '/tests/fixtures/models/mistral-tiny/' },
  { label: 'LLaVA-1.6 Mistral 7B, about 15 GB', url: 'https://huggingface.co/llava-hf/llava-v1.6-mistral-7b-hf/resolve/main/', bytes: 15.1e9 },
  { label: 'LLaVA-1.6 Vicuna 7B, about 14 GB', url: 'https://huggingface.co/llava-hf/llava-v1.6-vicuna-7b-hf/resolve/main/', bytes: 14.1e9 },
  { label: 'LLaVA-1.6 Vicuna 13B, about 27 GB', url: 'https://huggingface.co/llava-hf/llava-v1.6-vicuna-13b-hf/resolve/main/', bytes: 26.7e9 },
];
$('known-models').replaceChildren(
  ...KNOWN_MODELS.map(({ label, url }) => Object.assign(document.createElement('option'), { value: url, label })),
);

/** Why the model at `url` may not load here, checked before any download (empty: no reason). */
async function roomFor(url) {
  const reasons = [];
  const adapter = await navigator.gpu?.requestAdapter().catch(() => null);
  if (!adapter) reasons.push('this browser offers no WebGPU adapter, so no model can run here');
  const bytes = KNOWN_MODELS.find((m) => m.url === url)?.bytes;
  if (bytes && navigator.storage?.estimate) {
    const { quota = 0, usage = 0 } = await navigator.storage.estimate();
    if (quota - usage < bytes) {
      reasons.push(
        `it downloads ${megabytes(bytes)} but the browser offers ${megabytes(Math.max(0, quota - usage))} of storage: ` +
          'it would load without the download cache and download everything again next time',
      );
    }
  }
  return reasons;
}

// The URL whose warnings were shown: a second click on Load goes ahead anyway.
let warnedFor = null;

$('load').addEventListener('click', async () => {
  clearError();
  const url = $('model-url').value;
  const previous = document.body.dataset.state;
  setState('loading');
  const reasons = warnedFor === url ? [] : await roomFor(url);
  $('notice').hidden = reasons.length === 0;
  if (reasons.length) {
    warnedFor = url;
    $('notice').textContent = `Before loading: ${reasons.join('; ')}. Click Load again to try anyway.`;
    setState(previous);
    return;
  }
  model?.dispose();
  model = chat = null;
  const started = performance.now();
  try {
    model = await LlavaModel.load(url, {
      quant: $('quant').value || undefined,
      onProgress({ loaded, total, file }) {
        $('progress').max = total || 1;
        $('progress').value = loaded;
        $('progress-text').textContent = `${megabytes(loaded)} / ${megabytes(total)} ${file}`;
      },
    });
    await newChat();
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    $('progress-text').textContent = `loaded in ${seconds} s (context ${model.info.context} tokens)`;
    setState('ready');
  } catch (e) {
    showError(e);
    setState('empty');
  }
});

async function newChat() {
  await chat?.dispose();
  chat = await model.chat();
  imageSent = false;
  $('conversation').replaceChildren();
  window.__turns = [];
}

$('new-chat').addEventListener('click', () => newChat().catch(showError));

function setImage(file) {
  if (!file || !file.type.startsWith('image/')) return;
  image = file;
  const preview = $('preview');
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  document.body.dataset.image = file.name || 'pasted';
  // A new image starts a new conversation (a chat is about one image).
  if (model && imageSent && document.body.dataset.state === 'ready') newChat().catch(showError);
}

$('image-input').addEventListener('change', (e) => setImage(e.target.files[0]));
const drop = $('drop');
drop.addEventListener('dragover', (e) => {
  e.preventDefault();
  drop.classList.add('over');
});
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', (e) => {
  e.preventDefault();
  drop.classList.remove('over');
  setImage(e.dataTransfer.files[0]);
});
document.addEventListener('paste', (e) => {
  const item = [...e.clipboardData.items].find((i) => i.type.startsWith('image/'));
  if (item) setImage(item.getAsFile());
});

function addTurn(role, text) {
  const div = document.createElement('div');
  div.className = `turn ${role}`;
  div.textContent = text;
  $('conversation').append(div);
  return div;
}

$('send').addEventListener('click', async () => {
  clearError();
  const text = $('question').value.trim();
  if (!text) return;
  setState('generating');
  addTurn('user', text);
  const answer = addTurn('assistant', '');
  const turn = { tokens: [], done: false };
  window.__turns.push(turn);
  const started = performance.now();
  let firstToken = null;
  try {
    reply = chat.send({
      image: imageSent ? undefined : (image ?? undefined),
      text,
      maxNewTokens: Number($('max-tokens').value) || 256,
    });
    for await (const { text: piece, tokenId } of reply) {
      firstToken ??= performance.now();
      turn.tokens.push(tokenId);
      answer.textContent += piece;
    }
    const result = await reply.result;
    if (image) imageSent = true;
    turn.stopReason = result.stopReason;
    const ttft = ((firstToken ?? performance.now()) - started) / 1000;
    const t = result.timings;
    const vision = t.imageCached ? 'image features from the cache' : `vision ${t.visionS.toFixed(2)} s`;
    $('stats').textContent =
      `${result.tokens.length} tokens, ${t.decodeTokensPerS.toFixed(1)} tokens/s, ` +
      `time to first token ${ttft.toFixed(2)} s (${result.promptTokens} prompt tokens, ${result.imageTokens} image) ` +
      `— ${result.stopReason} | ${vision}, prefill ${t.prefillS.toFixed(2)} s (${t.prefillTokens} tokens), ` +
      `decode ${t.decodeS.toFixed(2)} s`;
  } catch (e) {
    turn.error = e.message;
    showError(e);
  } finally {
    turn.done = true;
    reply = null;
    setState('ready');
  }
});

$('stop').addEventListener('click', () => reply?.cancel());

// The repository's sample picture (assets/sample.jpg), so that a first question needs no file;
// a file chosen meanwhile wins. Without it (the page served alone) the page just waits for one.
fetch(new URL('../assets/sample.jpg', import.meta.url))
  .then((response) => (response.ok ? response.blob() : null))
  .then((blob) => {
    if (blob && !image) setImage(new File([blob], 'sample.jpg', { type: 'image/jpeg' }));
  })
  .catch(() => {});

setState('empty');
