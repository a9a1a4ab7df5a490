// A minimal app: `llava-webgpu` imported by its package name, bundled by webpack 5 (the worker and
// the .wasm are found through their `new URL(..., import.meta.url)` and emitted as chunks and assets).
import { LlavaModel } from 'llava-webgpu';

/** Loads the model folder at `model`, asks `question` about `image` (a Blob or encoded bytes),
 * streams the answer's text to `onText`; resolves to `{ text, tokens }`. */
async function ask({ model, quant, image, question, maxNewTokens = 256, onText = () => {} }) {
  const llava = await LlavaModel.load(model, { quant });
  try {
    const chat = await llava.chat();
    const reply = chat.send({ image, text: question, maxNewTokens });
    for await (const piece of reply) onText(piece.text);
    const { text, tokens } = await reply.result;
    return { text, tokens: [...tokens] };
  } finally {
    llava.dispose();
  }
}

const $ = (id) => document.getElementById(id);
$('ask').addEventListener('click', async () => {
  $('answer').textContent = '';
  try {
    await ask({
      model: $('model').value,
      quant: 'q4',
      image: $('image').files[0],
      question: $('question').value,
      onText: (text) => ($('answer').textContent += text),
    });
  } catch (e) {
    $('answer').textContent = `error: ${e.message}`;
  }
});

// For tests/browser/bundlers.test.js.
window.example = { ask };
