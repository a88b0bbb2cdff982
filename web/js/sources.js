// Byte sources for nomoat's wasm Engine (wasm-bindgen copies this file into pkg/snippets).
//
// A reader is { name, size, fromCache, read(offset, length), plan(ranges), finish(), close() }:
// - size: the file's length in bytes, or null while unknown (a download without Content-Length);
// - read(offset, length) resolves to a Uint8Array of exactly `length` bytes, shorter only at
//   the end of the file; a streaming reader waits until those bytes have arrived;
// - plan(ranges): flat [start, end, ...] byte ranges the engine will read, each once, after the
//   header; a streaming reader frees each downloaded chunk as soon as every planned byte in it
//   has been read, so the file never sits whole in memory (JS or wasm) while it loads;
// - finish() resolves once the whole download, and its copy in the Cache API, is complete (a
//   copy refused for want of room is reported as progress {phase: 'cache', stored: false,
//   error: 'QuotaExceededError', bytes}, and the load goes on);
// - close() aborts a download in progress (its partial cache entry is never written).
//
// A download reads the network only while fewer than `maxBuffered` downloaded bytes wait in JS
// memory for the engine (default 64 MiB), or while the engine waits for bytes not yet here: a
// fast server (nomoat serve on localhost) then goes at the GPU upload's pace instead of piling
// the whole model up in memory.

/** Cache API bucket holding downloaded models, keyed by URL. */
export const MODEL_CACHE = 'nomoat-models-v1';

/** Downloaded bytes a load may hold in JS memory before it pauses reading the network. */
export const DEFAULT_MAX_BUFFERED = 64 << 20;

export function hasWebGPU() {
  return typeof navigator !== 'undefined' && !!navigator.gpu;
}

/** What the browser says about its WebGPU adapter (wgpu leaves most of it out). */
export async function adapterInfo() {
  const a = await navigator.gpu.requestAdapter({ powerPreference: 'high-performance' });
  const i = a?.info || {};
  return {
    vendor: i.vendor || '',
    architecture: i.architecture || '',
    device: i.device || '',
    description: i.description || '',
    fallback: !!(i.isFallbackAdapter ?? a?.isFallbackAdapter),
  };
}

/** A File or Blob, read slice by slice. */
export class BlobSource {
  constructor(blob, name, fromCache = false) {
    this.blob = blob;
    this.name = name;
    this.size = blob.size;
    this.fromCache = fromCache;
  }
  async read(offset, length) {
    const end = Math.min(offset + length, this.blob.size);
    return new Uint8Array(await this.blob.slice(offset, end).arrayBuffer());
  }
  plan() {}
  async finish() {}
  close() {}
}

export async function openFile(file) {
  if (!(file instanceof Blob)) throw new Error('load_from_file needs a File or Blob');
  return new BlobSource(file, file.name || 'model.gguf');
}

/** A download in progress: chunks kept in JS memory until the engine has read them. */
export class StreamSource {
  constructor(url, body, size, onProgress, cachePut, cacheSink, controller, maxBuffered) {
    this.key = url;
    this.name = url.split('/').pop().split('?')[0] || url;
    this.size = size;
    this.fromCache = false;
    this.onProgress = onProgress;
    this.cachePut = cachePut;
    this.cacheSink = cacheSink; // the cache copy's stream controller: fed each chunk as it is read
    this.controller = controller;
    this.maxBuffered = maxBuffered > 0 ? maxBuffered : DEFAULT_MAX_BUFFERED;
    this.chunks = []; // {start, end, bytes (null once freed), need, got}
    this.received = 0;
    this.held = 0; // bytes of chunks not yet freed
    this.peakHeld = 0;
    this.draining = false; // finish() was called: read to the end whatever is held
    this.ended = false;
    this.error = null;
    this.waiters = [];
    this.roomWaiters = [];
    this.ranges = null; // sorted planned ranges
    this.reader = body.getReader();
    this.pumping = this.pump();
  }

  async pump() {
    try {
      for (;;) {
        // back-pressure: pause while enough is held and nobody waits for more
        while (this.held >= this.maxBuffered && this.waiters.length === 0 && !this.draining && !this.error) {
          await new Promise((resolve) => this.roomWaiters.push(resolve));
        }
        if (this.error) break;
        const { done, value } = await this.reader.read();
        if (done) break;
        if (this.cacheSink) {
          try {
            this.cacheSink.enqueue(value);
          } catch {
            this.cacheSink = null; // the copy failed (no room): finish() reports it, the load goes on
          }
        }
        const c = { start: this.received, end: this.received + value.length, bytes: value, need: 0, got: 0 };
        if (this.ranges) {
          c.need = this.planned(c.start, c.end);
          if (c.need === 0) c.bytes = null; // past the planned ranges: never read
        }
        if (c.bytes) this.hold(c.end - c.start);
        this.chunks.push(c);
        this.received = c.end;
        if (typeof this.onProgress === 'function') {
          this.onProgress({ phase: 'download', done: this.received, total: this.size ?? 0, buffered: this.held });
        }
        this.wake();
      }
      this.ended = true;
      if (this.size == null) this.size = this.received;
      else if (this.received < this.size) this.error = new Error(`the download ended after ${this.received} of ${this.size} bytes`);
    } catch (e) {
      this.error = e;
    }
    if (this.cacheSink) {
      try {
        if (this.error) this.cacheSink.error(this.error); else this.cacheSink.close();
      } catch {}
    }
    this.wake();
  }

  hold(n) {
    this.held += n;
    if (this.held > this.peakHeld) this.peakHeld = this.held;
  }

  release(c) {
    if (!c.bytes) return;
    this.held -= c.end - c.start;
    c.bytes = null;
    if (this.held < this.maxBuffered) this.wakeRoom();
  }

  wakeRoom() {
    const w = this.roomWaiters;
    this.roomWaiters = [];
    for (const f of w) f();
  }

  wake() {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  // planned bytes within [a, b)
  planned(a, b) {
    let n = 0;
    for (const [s, e] of this.ranges) {
      if (s >= b) break;
      if (e > a) n += Math.min(e, b) - Math.max(s, a);
    }
    return n;
  }

  plan(flat) {
    const r = [];
    for (let i = 0; i + 1 < flat.length; i += 2) r.push([flat[i], flat[i + 1]]);
    r.sort((x, y) => x[0] - y[0]);
    this.ranges = r;
    for (const c of this.chunks) {
      c.need = this.planned(c.start, c.end);
      c.got = 0;
      if (c.need === 0) this.release(c); // header, padding: never read again
    }
  }

  chunkIndex(offset) {
    let lo = 0, hi = this.chunks.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.chunks[mid].start <= offset) lo = mid; else hi = mid - 1;
    }
    return lo;
  }

  async read(offset, length) {
    const end = offset + length;
    while (this.received < end && !this.ended && !this.error) {
      const arrived = new Promise((resolve) => this.waiters.push(resolve));
      this.wakeRoom(); // the engine is waiting: read on whatever is held
      await arrived;
    }
    if (this.error) throw this.error;
    const stop = Math.min(end, this.received);
    const out = new Uint8Array(Math.max(0, stop - offset));
    if (out.length === 0) return out;
    for (let i = this.chunkIndex(offset); i < this.chunks.length; i++) {
      const c = this.chunks[i];
      if (c.start >= stop) break;
      const a = Math.max(c.start, offset), b = Math.min(c.end, stop);
      if (b <= a) continue;
      if (!c.bytes) throw new Error(`bytes ${a}..${b} were already released`);
      out.set(c.bytes.subarray(a - c.start, b - c.start), a - offset);
      if (this.ranges) {
        c.got += b - a;
        if (c.got >= c.need) this.release(c);
      }
    }
    return out;
  }

  async finish() {
    this.draining = true;
    this.wakeRoom();
    await this.pumping;
    if (this.error) throw this.error;
    this.chunks = [];
    if (!this.cachePut) return;
    try {
      await this.cachePut;
    } catch (e) {
      if (e?.name !== 'QuotaExceededError') throw e;
      // no room to keep a copy: the model loads all the same, for this visit, and the page
      // hears why it will download again next time
      if (typeof this.onProgress === 'function') this.onProgress({ phase: 'cache', stored: false, error: e.name, bytes: this.size ?? this.received });
    }
  }

  close() {
    this.controller.abort();
    this.error ??= new Error('the download was closed');
    this.wakeRoom();
    this.chunks = [];
    this.held = 0;
    // a download that finished before the failure (a small non-GGUF file) must not stay cached
    if (this.cachePut) {
      this.cachePut.then(() => caches.open(MODEL_CACHE)).then((c) => c.delete(this.key)).catch(() => {});
    }
  }
}

/**
 * Opens `url`: from the Cache API when it holds a copy (no network request), otherwise a
 * streaming download that is copied into the cache as it arrives.
 */
export async function openUrl(url, onProgress, useCache = true, maxBuffered = DEFAULT_MAX_BUFFERED) {
  const key = new URL(url, self.location.href).href;
  const cache = useCache && typeof caches !== 'undefined' ? await caches.open(MODEL_CACHE) : null;
  if (cache) {
    const hit = await cache.match(key);
    if (hit) {
      const blob = await hit.blob();
      if (typeof onProgress === 'function') onProgress({ phase: 'download', done: blob.size, total: blob.size, cached: true });
      return new BlobSource(blob, key.split('/').pop(), true);
    }
  }
  const controller = new AbortController();
  const response = await fetch(key, { signal: controller.signal });
  if (!response.ok) throw new Error(`HTTP ${response.status} ${response.statusText}`);
  const encoded = response.headers.get('content-encoding');
  const len = Number(response.headers.get('content-length'));
  const size = !encoded && len > 0 ? len : null;
  let cachePut = null;
  let cacheSink = null;
  if (cache) {
    // the cache copy gets each chunk as the load reads it (a tee would read on for it at the
    // network's pace and queue the load's branch in memory, whatever the back-pressure)
    const copy = new ReadableStream({ start(c) { cacheSink = c; } });
    const headers = { 'content-type': 'application/octet-stream', 'x-nomoat-cached': new Date().toISOString() };
    if (size != null) headers['content-length'] = String(size);
    cachePut = cache.put(key, new Response(copy, { headers }));
    cachePut.catch(() => {}); // reported through finish()
  }
  return new StreamSource(key, response.body, size, onProgress, cachePut, cacheSink, controller, maxBuffered);
}
