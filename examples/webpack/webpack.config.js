import path from 'node:path';
import { fileURLToPath } from 'node:url';

import HtmlWebpackPlugin from 'html-webpack-plugin';

const here = path.dirname(fileURLToPath(import.meta.url));

export default {
  mode: 'production',
  entry: './src/main.js',
  output: { path: path.join(here, 'dist'), clean: true },
  plugins: [new HtmlWebpackPlugin({ template: './src/index.html' })],
  // The model runtime's .wasm is about 4.5 MiB by nature: no size warnings about it.
  performance: { hints: false },
};
