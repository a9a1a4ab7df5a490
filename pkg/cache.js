// The download cache of llava-webgpu: model files stored with the Cache API, so that a second
// visit loads from disk. Each file is stored only once all of its bytes have arrived, so an
// interrupted download leaves no partial entry and the next load refetches only the files that
// are not yet cached. When storage is full the file is loaded without the cache, with a warning.

/** The Cache API cache holding downloaded model files. */
export const CACHE_NAME = 'llava-webgpu-v1';

/** Starts every warning of the cache, so that a page can tell them from other console output. */
export const WARNING_PREFIX = 'llava-webgpu cache:';

/** Bytes of a file that may wait for the cache write before the download pauses. */
const CACHE_BACKLOG_BYTES = 16 << 20;

/** An error of our own that fails a cache write on purpose (not worth a warning). */
class IncompleteDownload extends Error {}

/** The body length a response promises, or null where it cannot be checked. */
function promisedLength(response) {
  const encoding = response.headers.get('content-encoding');
  // A compressed body arrives decoded, so its length differs from Content-Length.
  if (encoding && encoding !== 'identity') return null;
  const length = Number(response.headers.get('content-length') ?? NaN);
  return Number.isSafeInteger(length) && length >= 0 ? length : null;
}

/**
 * Splits `body` into the stream returned to the caller and the stream stored in the cache. The
 * download runs at the caller's pace (and pauses while the cache write lags behind by more than
 * CACHE_BACKLOG_BYTES); the cache stream ends normally only when `expected` bytes (if known)
 * have arrived, and fails otherwise, which discards the cache write.
 */
function splitForCache(body, expected) {
  const network = body.getReader();
  let received = 0;
  let toCache;
  let cacheOpen = true;
  let abandoned = false;
  let cacheWants = null;
  const wakeDownload = () => {
    cacheWants?.();
    cacheWants = null;
  };
  const stopCaching = (error) => {
    if (!cacheOpen) return;
    cacheOpen = false;
    abandoned = error instanceof IncompleteDownload;
    if (error) toCache.error(error);
    else toCache.close();
    wakeDownload();
  };
  const cacheBody = new ReadableStream(
    {
      start(controller) {
        toCache = controller;
      },
      pull: wakeDownload,
      cancel() {
        cacheOpen = false;
        wakeDownload();
      },
    },
    new ByteLengthQueuingStrategy({ highWaterMark: CACHE_BACKLOG_BYTES }),
  );
  const callerBody = new ReadableStream(
    {
      async pull(controller) {
        let step;
        try {
          step = await network.read();
        } catch (e) {
          stopCaching(new IncompleteDownload(`the download failed: ${e?.message ?? e}`));
          throw e;
        }
        if (step.done) {
          if (expected !== null && received !== expected) {
            stopCaching(new IncompleteDownload(`${received} of ${expected} bytes arrived`));
          } else {
            stopCaching();
          }
          controller.close();
          return;
        }
        received += step.value.byteLength;
        controller.enqueue(step.value);
        if (!cacheOpen) return;
        toCache.enqueue(step.value);
        if (expected !== null && received > expected) {
          stopCaching(new IncompleteDownload(`more than the promised ${expected} bytes arrived`));
        } else if (received === expected) {
          // Complete: store it even if the caller never reads the end of the stream.
          stopCaching();
        } else if (toCache.desiredSize <= 0) {
          await new Promise((resolve) => (cacheWants = resolve));
        }
      },
      cancel(reason) {
        stopCaching(new IncompleteDownload('the download was cancelled'));
        return network.cancel(reason);
      },
    },
    { highWaterMark: 0 },
  );
  return { callerBody, cacheBody, stopCaching, abandoned: () => abandoned };
}

/**
 * Returns `cachedFetch(url) -> Promise<Response>`, a `fetch` for model files: a file in the cache
 * is answered from it without a request; any other file is fetched, and a complete 200 response
 * is stored while its body streams to the caller. `cachedFetch.settled()` resolves once every
 * cache write started so far has finished (stored or given up).
 *
 * Options (for tests and special set-ups): `cacheName`; `caches` (a CacheStorage); `fetch` (the
 * network); `estimate` (like `navigator.storage.estimate`); `onWarning(message)`, called when a
 * file is loaded without the cache (default: console.warn).
 */
export function createCachedFetch({
  cacheName = CACHE_NAME,
  caches: storage = globalThis.caches,
  fetch: network = (url) => globalThis.fetch(url),
  estimate = () => globalThis.navigator?.storage?.estimate?.(),
  onWarning = (message) => console.warn(message),
} = {}) {
  const writes = new Set();
  // Set once storage is known to be full or unusable: the rest of the files skip the cache.
  let disabled = false;
  let opened = null;
  const warn = (message) => onWarning(`${WARNING_PREFIX} ${message}`);

  function disable(message) {
    if (disabled) return;
    disabled = true;
    warn(`${message}; loading without the cache`);
  }

  async function openCache() {
    if (!storage) {
      disable('the Cache API is unavailable here (it needs a secure context: https or localhost)');
      return null;
    }
    opened ??= storage.open(cacheName);
    try {
      return await opened;
    } catch (e) {
      disable(`the cache could not be opened (${e?.message ?? e})`);
      return null;
    }
  }

  /** Whether storage has room for `bytes` more (true where the browser cannot tell). */
  async function hasRoomFor(bytes) {
    let quota;
    let usage;
    try {
      ({ quota, usage } = (await estimate()) ?? {});
    } catch {
      return true;
    }
    return !(Number.isFinite(quota) && Number.isFinite(usage)) || quota - usage >= bytes;
  }

  function store(cache, url, response, { cacheBody, stopCaching, abandoned }, name) {
    const write = cache
      .put(url, new Response(cacheBody, { status: response.status, statusText: response.statusText, headers: response.headers }))
      .catch((e) => {
        stopCaching(e);
        // An interrupted or cancelled download already fails for the caller.
        if (abandoned()) return;
        if (e?.name === 'QuotaExceededError') disable(`storage is full (while storing ${name})`);
        else disable(`${name} could not be stored (${e?.message ?? e})`);
      })
      .finally(() => writes.delete(write));
    writes.add(write);
  }

  async function cachedFetch(url) {
    const href = String(url);
    const { protocol, pathname } = new URL(href);
    const name = pathname.split('/').pop() || href;
    const cacheable = protocol === 'https:' || protocol === 'http:';
    const cache = cacheable ? await openCache() : null;
    if (cache) {
      let hit;
      try {
        hit = await cache.match(href);
      } catch {
        hit = undefined; // An unreadable entry is fetched again (and replaced).
      }
      if (hit) return hit;
    }
    const response = await network(href);
    if (!cache || disabled || response.status !== 200 || !response.body) return response;
    const expected = promisedLength(response);
    if (expected !== null && !(await hasRoomFor(expected))) {
      disable(`storage has no room for ${name} (${expected} bytes)`);
      return response;
    }
    const split = splitForCache(response.body, expected);
    store(cache, href, response, split, name);
    return new Response(split.callerBody, { status: response.status, statusText: response.statusText, headers: response.headers });
  }

  cachedFetch.settled = async () => {
    while (writes.size) await Promise.all(writes);
  };
  return cachedFetch;
}

/** Deletes every cached model file; resolves to whether there was a cache to delete. */
export async function clearCache({ cacheName = CACHE_NAME, caches: storage = globalThis.caches } = {}) {
  if (!storage) return false;
  return storage.delete(cacheName);
}
