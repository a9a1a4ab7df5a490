/** One kernel of the GPU self-test compared with its CPU reference. */
export interface SelfTestCheck {
  name: string;
  /** Output elements compared. */
  elements: number;
  /** Float outputs: max |got - want| / max(1, |want|). Index outputs: number of mismatches. */
  maxError: number;
  tolerance: number;
  passed: boolean;
}

export interface SelfTestReport {
  adapter: {
    name: string;
    vendor: number;
    device: number;
    deviceType: string;
    driver: string;
    driverInfo: string;
    /** `BrowserWebGpu` in a browser. */
    backend: string;
  };
  features: { shaderF16: boolean; subgroup: boolean };
  limits: {
    maxBufferSize: number;
    maxStorageBufferBindingSize: number;
    maxComputeWorkgroupsPerDimension: number;
    maxComputeInvocationsPerWorkgroup: number;
    maxComputeWorkgroupStorageSize: number;
    minStorageBufferOffsetAlignment: number;
  };
  checks: SelfTestCheck[];
  /** Every check within its tolerance. */
  passed: boolean;
}

/** Runs a few of the model's GPU kernels in the worker and compares them with the CPU. */
/** Where the package's worker and wasm are served, for setups that move them (default: beside pkg/index.js). */
export interface AssetUrls {
  /** URL of pkg/worker.js (a module worker). */
  workerUrl?: string | URL;
  /** URL of pkg/wasm/llava_web_bg.wasm. */
  wasmUrl?: string | URL;
}

export function gpuSelfTest(options?: { seed?: number } & AssetUrls): Promise<SelfTestReport>;

/** The image types the API accepts; encoded files (Blob, File, bytes) are decoded by the same
 * Rust code as natively. */
export type ImageInput =
  | Blob
  | ArrayBuffer
  | ArrayBufferView
  | ImageData
  | ImageBitmap
  | HTMLImageElement
  | HTMLCanvasElement
  | OffscreenCanvas;

/** preprocessor_config.json values; each defaults to LLaVA-1.6's. */
export interface ImageOptions {
  tileSize?: number;
  patchSize?: number;
  /** [height, width] pairs, multiples of tileSize. */
  gridPinpoints?: [number, number][];
  imageMean?: [number, number, number];
  imageStd?: [number, number, number];
}

export interface PreprocessedImage {
  width: number;
  height: number;
  /** The chosen pinpoint, [height, width]. */
  bestResolution: [number, number];
  /** Tiles, [rows, cols]. */
  grid: [number, number];
  /** 1 overview + rows * cols tiles. */
  numPatches: number;
  /** Image tokens this image takes in the prompt. */
  imageTokens: number;
  /** The decoded image, RGB, rows top to bottom. */
  rgb: Uint8Array;
  /** Normalised pixels, [numPatches, 3, tileSize, tileSize]. */
  pixels: Float32Array;
}

/** Decodes and preprocesses an image exactly as the model does before the vision tower. */
export function preprocessImage(image: ImageInput, options?: ImageOptions, urls?: AssetUrls): Promise<PreprocessedImage>;

export interface LoadProgress {
  /**
   * 'download': more weight bytes arrived (from the network or the cache); 'warning': a file is
   * loaded without the cache (`message` says why; also written to the console); 'ready': the
   * model is built (the last event) and, unless `compileKernels` is false, its GPU kernels are
   * being compiled in the background, so a question asked a little later does not wait for them.
   */
  stage: 'download' | 'warning' | 'ready';
  /** Weight bytes downloaded so far. */
  loaded: number;
  /** Total weight bytes (from the shard index or Content-Length). */
  total: number;
  /** The file being downloaded ('' once done). */
  file: string;
  /** Only with stage 'warning'. */
  message?: string;
}

export interface LoadOptions extends AssetUrls {
  onProgress?: (progress: LoadProgress) => void;
  /** Precision of the weights on the GPU (default: the checkpoint's, bf16 as f16). */
  quant?: 'f32' | 'f16' | 'q8' | 'q4';
  /** KV-cache size in tokens (default 4096, capped by the model). */
  context?: number;
  /**
   * What the KV cache stores: 'f16' halves its memory and what each token reads; 'f32' keeps
   * logits within 1e-4 of transformers'. Default: 'f16' where the adapter has shader-f16, else 'f32'.
   */
  kvCache?: 'f32' | 'f16';
  /**
   * Keep the downloaded files in the browser's Cache API storage (cache 'llava-webgpu-v1'), so
   * that the next load reads them from disk and an interrupted load refetches only the files
   * not yet stored; when storage is full the files load without the cache (default true).
   */
  cache?: boolean;
  /**
   * GPU memory, in MiB, for the projected features of images already seen (default 256; 0: off):
   * a new chat, a reset chat or another question about the same image skips the vision tower.
   */
  imageCacheMB?: number;
  /**
   * The model folder's file names (paths relative to `url`), when the app knows them (the Hub
   * API lists a repository's files): the loader then requests no file the folder lacks.
   * Without it, the optional files (chat templates, processor and generation configs, the
   * shard index) are probed, and each one the folder lacks costs a request answered 404.
   */
  files?: string[];
  /**
   * Have the GPU compile the kernels a first answer uses once the model is loaded (default true),
   * in the background, so that a question asked a little later does not wait for them; false:
   * each kernel compiles when first used (an app that loads a model without asking anything).
   */
  compileKernels?: boolean;
}

export interface GenerateOptions {
  maxNewTokens?: number;
  /** 0 (default): greedy. */
  temperature?: number;
  topP?: number;
  topK?: number;
  repetitionPenalty?: number;
  seed?: number;
  /** Stop when the answer contains one of these (cut from the answer). */
  stop?: string[];
  /** Keep going past end-of-sequence tokens. */
  ignoreEos?: boolean;
}

export interface SendOptions extends GenerateOptions {
  /** Only in the first turn of a chat. */
  image?: ImageInput;
  text: string;
  /** Use `text` as the whole prompt (with `<image>` where the image goes), no chat template. */
  rawPrompt?: boolean;
  /** Aborting stops generation after the current token. */
  signal?: AbortSignal;
}

export interface StreamedToken {
  /** The new text this token completes (empty while a multi-byte character is partial). */
  text: string;
  tokenId: number;
}

export interface ChatResult {
  text: string;
  /** Generated ids, including the end-of-sequence id when generation stopped on one. */
  tokens: Uint32Array;
  promptTokens: number;
  imageTokens: number;
  stopReason: 'eos' | 'stop_string' | 'max_tokens' | 'cancelled' | 'context_full';
  timings: {
    visionS: number;
    /** The image's features came from the model's cache (the vision tower did not run). */
    imageCached: boolean;
    prefillS: number;
    prefillTokens: number;
    decodeS: number;
    decodeTokensPerS: number;
  };
  /** GPU work per decode token (after the first): with the planned decode step, 0 buffers and bind groups created, 1 submit, 4 bytes read. */
  gpu: {
    planned: boolean;
    dispatches: number;
    passes: number;
    submits: number;
    buffersCreated: number;
    bindGroupsCreated: number;
    bytesWritten: number;
    bytesRead: number;
  };
}

export interface ChatReply extends AsyncIterable<StreamedToken> {
  result: Promise<ChatResult>;
  /** Stops generation after the current token. */
  cancel(): void;
}

export class LlavaChat {
  send(options: SendOptions): ChatReply;
  /** Forgets the conversation and its image. */
  reset(): Promise<void>;
  dispose(): Promise<void>;
}

export class LlavaModel {
  /** Loads a HuggingFace-layout checkpoint folder (llava-hf or liuhaotian) in a worker. */
  static load(url: string | URL, options?: LoadOptions): Promise<LlavaModel>;
  /** Deletes the files kept by `load` with `cache` (every model's); resolves to whether any were kept. */
  static clearCache(): Promise<boolean>;
  readonly info: { vocabSize: number; context: number };
  chat(options?: { system?: string }): Promise<LlavaChat>;
  /** Frees the GPU memory and stops the worker. */
  dispose(): void;
}
