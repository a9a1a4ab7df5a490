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
