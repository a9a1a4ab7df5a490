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
export function gpuSelfTest(options?: { seed?: number }): Promise<SelfTestReport>;

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
export function preprocessImage(image: ImageInput, options?: ImageOptions): Promise<PreprocessedImage>;
