// nomoat.js — open LLMs on WebGPU, for any page. The model runs in a module Web Worker
// (worker.js) so the page stays responsive.
//
//   import { Nomoat } from './nomoat.js';
//   const e = await Nomoat.create();                       // throws NoWebGPU without WebGPU
//   await e.loadUrl('models/SmolLM2-135M-Instruct.Q4_1.gguf', {
//     onProgress: ({ phase, done, total }) => console.log(phase, done, total), // 'download' | 'upload'
//   });
//   const reply = e.chat([{ role: 'user', content: 'Hi!' }], { temperature: 0.7, seed: 1, maxTokens: 256, signal });
//   for await (const piece of reply) output.textContent += piece;
//   const summary = await reply.result; // {text, tokens, prompt_tps, gen_tps, finish_reason, ...}
//   e.unload();
//
// loadFile(file) takes a File from an <input type=file>. Downloads are kept in the Cache API
// (bucket 'nomoat-models-v1'), and a cached URL loads with no network request:
// Nomoat.cachedModels() lists them and Nomoat.deleteCached(url) removes one. When the browser
// has no room for the copy, the model loads all the same and onProgress gets {phase: 'cache',
// stored: false, error: 'QuotaExceededError', bytes}.
//
// Structured output: chat(messages, { responseFormat }) with OpenAI's shapes, {type:
// 'json_object'} or {type: 'json_schema', json_schema: {name, schema, strict}}: the reply is
// constrained on the GPU to fit (the same engine as `nomoat serve`'s response_format).
//
// Tool calling: chat(messages, { tools, toolChoice, parallelToolCalls }) with OpenAI's shapes.
// A reply of calls is not streamed as text: its result has finish_reason 'tool_calls' and
// tool_calls [{id, type: 'function', function: {name, arguments (JSON text)}}] ('length' when
// maxTokens ran out inside a call: the complete calls are kept, the unfinished one dropped). Send the
// results back as {role: 'tool', tool_call_id, content} after the assistant turn
// {role: 'assistant', content: null, tool_calls}, as with OpenAI's API.
//
// Raw token ids: logits(ids) resolves to the last position's logits (a Float32Array).
//
// LoRA adapters: addAdapter(file), setAdapters([{name, scale}]), removeAdapter(name), adapters().
//
// Several conversations over one loaded model (a chat and an agent): chat(messages, {session:
// 'agent'}) keeps each name's KV cache apart (no second copy of the weights); sessions() lists
// them, closeSession(name) frees one. Replies asked at once run in turn, never interleaved.
//
// Fine-tuning a LoRA adapter on the loaded model:
//   const run = e.finetune(examples, { rank: 8, epochs: 3, lr: 2e-4, name: 'facts' });
//   for await (const p of run) console.log(p.step, p.steps, p.loss, p.valLoss, p.tokensPerSecond);
//   const adapter = await run; // {name, bytes (GGUF, llama.cpp's LoRA format), finished, ...}
// `examples`: JSONL text or an array of {messages} | {prompt, completion} | {text} objects.
// e.stopFinetune() ends the loop after the step in flight (the adapter so far comes back);
// e.resumeFinetune({name}) goes on with the same run. The adapter joins adapters(), active.
//
// Errors are Error objects whose `name` tells the kind: NoWebGPU, NotGGUF, UnsupportedModel,
// InvalidModel, InvalidAdapter, OutOfMemory, DeviceLost, ReadError, Busy, NoModel, BadRequest,
// ContextFull.

export const MODEL_CACHE = 'nomoat-models-v1';

function makeError({ name, message }) {
  const e = new Error(message);
  e.name = name;
  return e;
}

/** The stream of a reply: async-iterate it for text pieces; `result` is the summary. */
class Reply {
  constructor() {
    this.queue = [];
    this.waiting = null;
    this.done = false;
    this.error = null;
    this.result = new Promise((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    this.result.catch(() => {}); // the iterator reports it too
  }
  push(piece) {
    this.queue.push(piece);
    this.wake();
  }
  finish(result) {
    this.done = true;
    this.resolve(result);
    this.wake();
  }
  fail(error) {
    this.done = true;
    this.error = error;
    this.reject(error);
    this.wake();
  }
  wake() {
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = null;
      w();
    }
  }
  async *[Symbol.asyncIterator]() {
    for (;;) {
      if (this.queue.length) {
        yield this.queue.shift();
        continue;
      }
      if (this.error) throw this.error;
      if (this.done) return;
      await new Promise((resolve) => (this.waiting = resolve));
    }
  }
}

/**
 * A fine-tuning run: async-iterate it for progress objects: first {type: 'start', format,
 * examples, skipped_too_long, tokens, trained_tokens, valid_examples, memory_mib: {weights,
 * adapters, activations}, steps, adapters} (not on resume), then one {type: 'step', step, steps, loss, valLoss, lr, gradNorm, tokens, seconds,
 * tokensPerSecond, etaSeconds} a step. Await it (or its `result`) for the adapter {name, bytes
 * (null if no step was taken), finished, stopped, error (a step whose loss was not finite:
 * bytes are the last good step's), summary, last}.
 */
class Training extends Reply {
  then(resolve, reject) {
    return this.result.then(resolve, reject);
  }
}

export class Nomoat {
  /**
   * Starts the worker and opens the WebGPU device. Options: {workerUrl} (default: worker.js
   * beside this module).
   */
  static async create({ workerUrl } = {}) {
    if (!Nomoat.hasWebGPU()) {
      throw makeError({
        name: 'NoWebGPU',
        message: 'this browser has no WebGPU (navigator.gpu is missing): use a recent Chrome, Edge or Safari, or Firefox with WebGPU enabled, on https or localhost',
      });
    }
    // The default spelled out as `new Worker(new URL(...), ...)`: the form Vite and webpack
    // recognise, so they bundle worker.js and its wasm themselves.
    const worker = workerUrl ? new Worker(workerUrl, { type: 'module' }) : new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
    const n = new Nomoat(worker);
    try {
      const { device } = await n.#call('create');
      n.device = device;
    } catch (e) {
      n.terminate();
      throw e;
    }
    return n;
  }

  static hasWebGPU() {
    return typeof navigator !== 'undefined' && !!navigator.gpu;
  }

  /** Cached model downloads: [{url, bytes, cached}] (bytes/cached when known). */
  static async cachedModels() {
    if (typeof caches === 'undefined') return [];
    const cache = await caches.open(MODEL_CACHE);
    const out = [];
    for (const req of await cache.keys()) {
      const res = await cache.match(req);
      out.push({
        url: req.url,
        bytes: Number(res?.headers.get('content-length')) || null,
        cached: res?.headers.get('x-nomoat-cached') || null,
      });
    }
    return out;
  }

  static async deleteCached(url) {
    if (typeof caches === 'undefined') return false;
    const cache = await caches.open(MODEL_CACHE);
    return cache.delete(new URL(url, location.href).href);
  }

  constructor(worker) {
    this.worker = worker;
    this.nextId = 1;
    this.pending = new Map();
    this.device = null;
    worker.onmessage = (ev) => this.#receive(ev.data);
    worker.onerror = (ev) => {
      const err = makeError({ name: 'WorkerError', message: ev.message || 'the worker failed to start (is pkg/ built?)' });
      for (const p of this.pending.values()) p.reject(err);
      this.pending.clear();
    };
  }

  #receive({ id, type, progress, piece, result, error }) {
    const p = this.pending.get(id);
    if (!p) return;
    if (type === 'progress') p.onProgress?.(progress);
    else if (type === 'piece') p.onPiece?.(piece);
    else {
      this.pending.delete(id);
      if (type === 'result') p.resolve(result);
      else p.reject(makeError(error));
    }
  }

  #call(op, args = {}, handlers = {}, transfer = []) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, ...handlers });
      this.worker.postMessage({ id, op, args }, transfer);
    });
  }

  /**
   * Streams a GGUF from a URL (or the cache). Options: {onProgress, nCtx, kv, cache,
   * maxGpuMemory (MiB: a larger model is refused before upload), maxBufferedBytes (downloaded
   * bytes held in memory before the network is paused, default 64 MiB)}. Resolves to model info.
   */
  loadUrl(url, { onProgress, nCtx, kv, cache, maxGpuMemory, maxBufferedBytes } = {}) {
    const absolute = new URL(url, location.href).href;
    return this.#call('loadUrl', { url: absolute, options: loadOptions({ nCtx, kv, cache, maxGpuMemory, maxBufferedBytes }) }, { onProgress });
  }

  /** Loads a GGUF from a File / Blob. Options: {onProgress, nCtx, kv, maxGpuMemory}. */
  loadFile(file, { onProgress, nCtx, kv, maxGpuMemory } = {}) {
    return this.#call('loadFile', { file, options: loadOptions({ nCtx, kv, maxGpuMemory }) }, { onProgress });
  }

  /**
   * Replies to `messages` ([{role: 'system' | 'user' | 'assistant', content}]) with the model's
   * chat template. Options: {temperature, topK, topP, minP, repeatPenalty, presencePenalty,
   * frequencyPenalty, seed, maxTokens, stop, responseFormat, tools, toolChoice, parallelToolCalls,
   * session (which conversation's KV cache: see sessions()), signal}; a sampling option left out takes the
   * model's own value (its GGUF's general.sampling.*, listed in the load result's `sampling`),
   * else llama.cpp's default. Returns an async iterable of text pieces with a `result` promise.
   */
  chat(messages, options = {}) {
    return this.#stream('chat', { messages }, options);
  }

  /** Like chat() for a raw prompt, no template. */
  complete(prompt, options = {}) {
    return this.#stream('complete', { prompt }, options);
  }

  #stream(op, args, options) {
    const reply = new Reply();
    const { signal } = options;
    const id = this.nextId; // the id #call gives this request
    // stops this request alone: another conversation's may be running
    const onAbort = () => this.#call('stop', { id });
    if (signal) {
      if (signal.aborted) queueMicrotask(onAbort);
      signal.addEventListener('abort', onAbort, { once: true });
    }
    this.#call(op, { ...args, options: chatOptions(options) }, { onPiece: (p) => reply.push(p) })
      .then((r) => reply.finish(r), (e) => reply.fail(e))
      .finally(() => signal?.removeEventListener('abort', onAbort));
    return reply;
  }

  /**
   * The last position's logits (a Float32Array of the vocabulary's size) after the token ids
   * `ids`, computed with the KV cache type chosen at load. From an empty cache, or with
   * {reusePrefix: true} after the longest prefix of `ids` the cache already holds (the last id
   * is always evaluated: one more id a call decodes token by token). Replaces the
   * conversation's cache.
   */
  logits(ids, { reusePrefix = false } = {}) {
    return this.#call('logits', { ids, reusePrefix });
  }

  /** The prompt text the chat template makes of `messages`. */
  render(messages) {
    return this.#call('render', { messages });
  }

  info() {
    return this.#call('info');
  }

  /**
   * The conversations over the loaded model: [{name, tokens, n_ctx}], 'default' first. chat()
   * with {session: NAME} makes one (its own KV cache over the same weights, the active
   * adapters; at most 8); replies to several conversations asked at once run one after another.
   */
  sessions() {
    return this.#call('sessions');
  }

  /** Frees a conversation's KV cache ('default' is emptied); resolves to the remaining list. */
  closeSession(name) {
    return this.#call('closeSession', { name });
  }

  /** Stops the reply being written; it resolves with finish_reason 'cancelled'. */
  stop() {
    return this.#call('stop');
  }

  /**
   * Adds a LoRA adapter (llama.cpp's GGUF adapter format) from a File, checked against the
   * loaded model; it starts inactive. Resolves to {name, bytes, tensors, alpha}. An adapter
   * made for another model rejects with InvalidAdapter, naming the first tensor that differs.
   */
  addAdapter(file) {
    return this.#call('addAdapter', { file });
  }

  /**
   * Which adapters apply from the next reply on: [{name, scale}] ([] = the base model).
   * Resolves to the list of added adapters [{name, bytes, tensors, alpha, active, scale}].
   */
  setAdapters(active) {
    return this.#call('setAdapters', { active });
  }

  /** Removes an added adapter and frees its GPU memory; resolves to the remaining list. */
  removeAdapter(name) {
    return this.#call('removeAdapter', { name });
  }

  /** The added adapters [{name, bytes, tensors, alpha, active, scale}]. */
  adapters() {
    return this.#call('adapters');
  }

  /**
   * Fine-tunes a LoRA adapter on the loaded model. Options (the CLI's `nomoat finetune` flags):
   * {rank, alpha, targets: ['q', 'k', 'v', 'o', 'gate', 'up', 'down'], lr, epochs | steps,
   * batchTokens, ctx, strict, seed, valid (examples, as `examples`), validEvery, name, activate
   * (default true: the adapter replaces the active ones when the loop ends), signal (aborting it
   * stops the run, as stopFinetune)}. See `Training`.
   */
  finetune(examples, options = {}) {
    const { name = 'adapter', activate = true, signal, ...rest } = options;
    let o;
    try {
      o = trainOptions(rest);
    } catch (e) {
      const run = new Training();
      run.fail(e);
      return run;
    }
    return this.#train({ data: jsonl(examples), options: o, name, activate }, signal);
  }

  /** Goes on with the run stopped by stopFinetune(). Options: {name, activate, signal}. */
  resumeFinetune({ name = 'adapter', activate = true, signal } = {}) {
    return this.#train({ name, activate, resume: true }, signal);
  }

  /** Ends the run's loop after the step in flight; its iterator ends and it resolves. */
  stopFinetune() {
    return this.#call('stopFinetune');
  }

  /** Frees the run's GPU memory (the adapters it made stay). A stopped run cannot resume then. */
  endFinetune() {
    return this.#call('endFinetune');
  }

  #train(args, signal) {
    const run = new Training();
    const onAbort = () => this.stopFinetune();
    if (signal) {
      if (signal.aborted) queueMicrotask(onAbort);
      signal.addEventListener('abort', onAbort, { once: true });
    }
    this.#call('finetune', args, { onProgress: (p) => run.push(p) })
      .then((r) => run.finish({ ...r, bytes: r.adapter, adapter: undefined }), (e) => run.fail(e))
      .finally(() => signal?.removeEventListener('abort', onAbort));
    return run;
  }

  /** Frees the model's GPU memory (and its adapters'). */
  unload() {
    return this.#call('unload');
  }

  terminate() {
    this.worker.terminate();
  }
}

function loadOptions({ nCtx, kv, cache, maxGpuMemory, maxBufferedBytes }) {
  const o = {};
  if (maxBufferedBytes != null) o.max_buffered_bytes = maxBufferedBytes;
  if (maxGpuMemory != null) o.max_gpu_memory = maxGpuMemory;
  if (nCtx != null) o.n_ctx = nCtx;
  if (kv != null) o.kv = kv;
  if (cache != null) o.cache = cache;
  return o;
}

/** JSONL text from a string (as is) or an array of example objects. */
function jsonl(examples) {
  if (examples == null) return '';
  if (typeof examples === 'string') return examples;
  return examples.map((e) => JSON.stringify(e)).join('\n');
}

function trainOptions(o) {
  const map = {
    rank: 'rank',
    alpha: 'alpha',
    targets: 'targets',
    lr: 'lr',
    epochs: 'epochs',
    steps: 'steps',
    batchTokens: 'batch_tokens',
    ctx: 'ctx',
    strict: 'strict',
    seed: 'seed',
    validEvery: 'valid_every',
  };
  const out = {};
  for (const [k, v] of Object.entries(o)) {
    if (k === 'valid') out.valid = jsonl(v);
    else if (map[k]) out[map[k]] = v;
    else throw makeError({ name: 'BadRequest', message: `unknown fine-tuning option '${k}'` });
  }
  return out;
}

function chatOptions(o) {
  const map = {
    temperature: 'temperature',
    topK: 'top_k',
    topP: 'top_p',
    minP: 'min_p',
    repeatPenalty: 'repeat_penalty',
    presencePenalty: 'presence_penalty',
    frequencyPenalty: 'frequency_penalty',
    seed: 'seed',
    maxTokens: 'max_tokens',
    stop: 'stop',
    responseFormat: 'response_format',
    tools: 'tools',
    toolChoice: 'tool_choice',
    parallelToolCalls: 'parallel_tool_calls',
    session: 'session',
  };
  const out = {};
  for (const [k, v] of Object.entries(map)) if (o[k] != null) out[v] = o[k];
  return out;
}

export default Nomoat;
