// Types for nomoat.js (written by hand against www/nomoat.js and the engine's JSON in
// web/src/lib.rs; tests/browser/package.test.mjs compiles an example using every export).

/** The Cache API bucket that keeps downloaded models, keyed by URL. */
export declare const MODEL_CACHE: 'nomoat-models-v1';

/** The `name` of every error the API rejects or throws with (an `Error`, message in English). */
export type NomoatErrorName =
  | 'NoWebGPU' // the browser has no WebGPU, or no adapter/device could be had
  | 'WorkerError' // the worker failed to start (its script or the wasm did not load)
  | 'NotGGUF' // the file is not a GGUF file
  | 'UnsupportedModel' // an architecture, tensor type, tokenizer or chat template nomoat lacks
  | 'InvalidModel' // a GGUF file with a broken header or missing tensors
  | 'InvalidAdapter' // a LoRA adapter that does not fit the loaded model
  | 'OutOfMemory' // over the GPU's memory, or over `maxGpuMemory`
  | 'DeviceLost' // the GPU device was lost: reload the page
  | 'GPUError' // another WebGPU failure
  | 'ReadError' // the download or the file read failed
  | 'Busy' // another operation holds the engine
  | 'NoModel' // the operation needs a loaded model
  | 'NoEngine' // the worker has no engine yet
  | 'BadRequest' // bad options, messages, schema or training data
  | 'ContextFull' // the conversation does not fit the context
  | 'TrainingFailed'; // the first fine-tuning step gave a loss that is not finite

/** What the API rejects with: an `Error` whose `name` says the kind. */
export interface NomoatError extends Error {
  name: NomoatErrorName;
}

export interface ChatMessage {
  /** Roles the model's chat template knows; usually 'system', 'user', 'assistant' and 'tool'. */
  role: 'system' | 'user' | 'assistant' | 'tool' | (string & {});
  /** May be null (or left out) on an assistant turn of tool calls only. */
  content: string | null;
  /** An assistant turn's calls, as a reply's `tool_calls` gave them. */
  tool_calls?: ToolCall[];
  /** A 'tool' turn: the id of the call whose result `content` is. */
  tool_call_id?: string;
}

/** A function the model may call (OpenAI's shape). */
export interface Tool {
  type: 'function';
  function: {
    /** 1 to 64 letters, digits, '_' or '-'. */
    name: string;
    description?: string;
    /** A JSON schema for the arguments object. */
    parameters?: Record<string, unknown>;
    strict?: boolean;
  };
}

/** A call the model made: `arguments` is JSON text that fits the tool's parameters. */
export interface ToolCall {
  id: string;
  type: 'function';
  function: { name: string; arguments: string };
}

/** OpenAI's `tool_choice`. */
export type ToolChoice = 'none' | 'auto' | 'required' | { type: 'function'; function: { name: string } };

/** Progress of a load: bytes downloaded (`total` 0 while unknown), then bytes put on the GPU. */
export interface TransferProgress {
  phase: 'download' | 'upload';
  done: number;
  total: number;
  /** Downloaded bytes held in memory, waiting for the engine ('download' reports of a network load). */
  buffered?: number;
  /** Set on the one 'download' report of a model that came from the Cache API. */
  cached?: boolean;
}

/** The browser had no room to keep a copy in the Cache API: the model loads all the same. */
export interface CacheRefused {
  phase: 'cache';
  stored: false;
  /** 'QuotaExceededError'. */
  error: string;
  /** The copy's size. */
  bytes: number;
}

export type LoadProgress = TransferProgress | CacheRefused;

export interface LoadOptions {
  onProgress?: (progress: LoadProgress) => void;
  /** Context size in tokens (default 2048, at most the model's training context). */
  nCtx?: number;
  /** The KV cache's element type (default 'f16'); 'q8_0' takes 1.0625 bytes an element, about
   * half of f16's, for models whose kv heads fill rows of a multiple of 64. */
  kv?: 'f16' | 'f32' | 'q8_0';
  /** GPU memory the model may take in MiB (weights + KV cache); a larger one is refused first. */
  maxGpuMemory?: number;
}

export interface LoadUrlOptions extends LoadOptions {
  /** Keep the download in the Cache API and load from it next time (default true). */
  cache?: boolean;
  /** Downloaded bytes held in memory before the network is paused (default 64 MiB). */
  maxBufferedBytes?: number;
}

/** The sampling a chat gets when it sets none, and which of it the model's GGUF chose. */
export interface SamplingDefaults {
  temperature: number;
  top_k: number;
  top_p: number;
  min_p: number;
  repeat_penalty: number;
  /** "temp 0.2, top_p 0.9": the values the model set, or null. */
  from_model: string | null;
  /** One line per general.sampling.* key that was left out, saying why. */
  ignored: string[];
}

/** What loadUrl, loadFile and info resolve to. */
export interface ModelInfo {
  name: string;
  architecture: string;
  n_layer: number;
  n_embd: number;
  n_head: number;
  n_kv_head: number;
  n_vocab: number;
  n_ctx: number;
  n_ctx_train: number;
  /** The KV cache's element type. */
  kv: 'f16' | 'f32' | 'q8_0';
  /** The conversations over the model ('default' at load). */
  sessions: SessionState[];
  weight_bytes: number;
  has_chat_template: boolean;
  from_cache: boolean;
  load_seconds: number;
  device: string;
  sampling: SamplingDefaults;
}

/** OpenAI's `response_format`: the reply is constrained on the GPU to fit it. */
export type ResponseFormat =
  | { type: 'text' }
  | { type: 'json_object' }
  | { type: 'json_schema'; json_schema: { name: string; schema?: Record<string, unknown>; strict?: boolean; description?: string } };

export interface ChatOptions {
  /** Sampling options left out take the model's own values (ModelInfo.sampling), else llama.cpp's. */
  temperature?: number;
  topK?: number;
  topP?: number;
  minP?: number;
  repeatPenalty?: number;
  presencePenalty?: number;
  frequencyPenalty?: number;
  seed?: number;
  maxTokens?: number;
  stop?: string[];
  responseFormat?: ResponseFormat;
  /** Functions the model may call (chat() only): a reply of calls comes back in `tool_calls`. */
  tools?: Tool[];
  /** 'auto' (the default with tools), 'none', 'required' or one named function. */
  toolChoice?: ToolChoice;
  /** Whether one reply may hold several calls (default true). */
  parallelToolCalls?: boolean;
  /** Which conversation's KV cache (default 'default'): a new name makes one (at most 8). */
  session?: string;
  /** Aborting it stops the reply; it then resolves with finish_reason 'cancelled'. */
  signal?: AbortSignal;
}

/** The summary a reply's `result` resolves to. */
export interface ReplyResult {
  /** The reply's text; with tool calls, any text the model wrote before them ('' if none). */
  text: string;
  /** The calls of a reply with tools (finish_reason 'tool_calls', or 'length' when maxTokens ran
   * out inside a later call: the complete ones are kept), else null. */
  tool_calls: ToolCall[] | null;
  tokens: number;
  token_ids: number[];
  prompt_tokens: number;
  /** Prompt tokens whose KV cache was kept from the previous reply. */
  reused_tokens: number;
  prompt_seconds: number;
  gen_seconds: number;
  prompt_tps: number;
  gen_tps: number;
  finish_reason: 'stop' | 'length' | 'cancelled' | 'tool_calls';
}

/** A reply being written: iterate it for text pieces as they come; `result` is the summary. */
export interface Reply extends AsyncIterable<string> {
  readonly result: Promise<ReplyResult>;
}

/** A conversation over the loaded model: its own KV cache, the same weights. */
export interface SessionState {
  name: string;
  /** Tokens its KV cache holds. */
  tokens: number;
  n_ctx: number;
}

/** An added LoRA adapter. */
export interface AdapterState {
  name: string;
  bytes: number;
  /** Adapted weight matrices (A/B pairs). */
  tensors: number;
  alpha: number;
  active: boolean;
  /** The scale it applies with, or null when inactive. */
  scale: number | null;
}

/** One training example: a conversation (loss on the assistant turns), a prompt and its completion, or text. */
export type TrainingExample =
  | { messages: ChatMessage[] }
  | { prompt: string; completion: string }
  | { text: string };

/** JSONL text (one example a line) or an array of examples. */
export type TrainingData = string | TrainingExample[];

/** The options of the CLI's `nomoat finetune`, plus where the adapter goes. */
export interface FinetuneOptions {
  rank?: number;
  alpha?: number;
  targets?: Array<'q' | 'k' | 'v' | 'o' | 'gate' | 'up' | 'down'>;
  lr?: number;
  epochs?: number;
  steps?: number;
  batchTokens?: number;
  /** Longest example in tokens; longer ones are skipped (or rejected with `strict`). */
  ctx?: number;
  strict?: boolean;
  seed?: number;
  valid?: TrainingData;
  validEvery?: number;
  /** The adapter's name in adapters() (default 'adapter'). */
  name?: string;
  /** Make the new adapter the only active one when the run ends (default true). */
  activate?: boolean;
  /** Aborting it stops the run after the step in flight, as stopFinetune(). */
  signal?: AbortSignal;
}

export interface ResumeOptions {
  name?: string;
  activate?: boolean;
  signal?: AbortSignal;
}

/** The first progress object of a run (not sent on resume). */
export interface FinetuneStart {
  type: 'start';
  /** The data's format, e.g. '{"messages": [...]}'. */
  format: string;
  examples: number;
  skipped_too_long: number;
  tokens: number;
  trained_tokens: number;
  valid_examples: number;
  steps: number;
  adapters: number;
}

/** One optimizer step. */
export interface FinetuneStep {
  type: 'step';
  step: number;
  steps: number;
  loss: number;
  /** The validation loss when this step measured it, else null. */
  valLoss: number | null;
  lr: number;
  gradNorm: number;
  tokens: number;
  seconds: number;
  tokensPerSecond: number;
  etaSeconds: number;
}

export type FinetuneProgress = FinetuneStart | FinetuneStep;

/** What a run resolves to. */
export interface FinetuneResult {
  name: string;
  /** The adapter in llama.cpp's GGUF LoRA format, or null if no step was taken. */
  bytes: Uint8Array | null;
  finished: boolean;
  stopped: boolean;
  /** A step whose loss was not finite ended the run; `bytes` are the last good step's. */
  error: { name: string; message: string } | null;
  /** The start summary without its `type` (null on resume). */
  summary: Omit<FinetuneStart, 'type'> | null;
  last: FinetuneStep | null;
}

/** A fine-tuning run: iterate it for progress, await it for the adapter. */
export interface Training extends AsyncIterable<FinetuneProgress>, PromiseLike<FinetuneResult> {
  readonly result: Promise<FinetuneResult>;
}

export interface CachedModel {
  url: string;
  bytes: number | null;
  /** When it was cached (an ISO 8601 time), when known. */
  cached: string | null;
}

export declare class Nomoat {
  /** Starts the worker (default: worker.js beside the module) and opens the WebGPU device. */
  static create(options?: { workerUrl?: string | URL }): Promise<Nomoat>;
  static hasWebGPU(): boolean;
  static cachedModels(): Promise<CachedModel[]>;
  static deleteCached(url: string): Promise<boolean>;

  /** The WebGPU adapter the engine runs on, in words. */
  device: string | null;

  /** Streams a GGUF from a URL (or from the Cache API); resolves when it is on the GPU. */
  loadUrl(url: string | URL, options?: LoadUrlOptions): Promise<ModelInfo>;
  /** Loads a GGUF from a File or Blob (an `<input type=file>`'s). */
  loadFile(file: Blob, options?: LoadOptions): Promise<ModelInfo>;
  /** Replies to `messages` with the model's chat template. */
  chat(messages: ChatMessage[], options?: ChatOptions): Reply;
  /** Continues a raw prompt, no template. */
  complete(prompt: string, options?: ChatOptions): Reply;
  /** The last position's logits after the token ids `ids`. */
  logits(ids: number[], options?: { reusePrefix?: boolean }): Promise<Float32Array>;
  /** The prompt text the chat template makes of `messages`. */
  render(messages: ChatMessage[]): Promise<string>;
  info(): Promise<ModelInfo>;
  /** Stops the reply being written. */
  stop(): Promise<boolean>;

  /** Adds a LoRA adapter (llama.cpp's GGUF format), inactive, checked against the model. */
  addAdapter(file: Blob): Promise<AdapterState>;
  /** Which adapters apply from the next reply on ([] = the base model). */
  setAdapters(active: Array<{ name: string; scale: number }>): Promise<AdapterState[]>;
  removeAdapter(name: string): Promise<AdapterState[]>;
  adapters(): Promise<AdapterState[]>;
  /** The conversations over the loaded model, 'default' first; chat's `session` makes others. */
  sessions(): Promise<SessionState[]>;
  /** Frees a conversation's KV cache ('default' is emptied); resolves to the remaining list. */
  closeSession(name: string): Promise<SessionState[]>;

  /** Fine-tunes a LoRA adapter on the loaded model. */
  finetune(examples: TrainingData, options?: FinetuneOptions): Training;
  resumeFinetune(options?: ResumeOptions): Training;
  stopFinetune(): Promise<boolean>;
  /** Frees the run's GPU memory; a stopped run cannot resume after it. */
  endFinetune(): Promise<boolean>;

  /** Frees the model's GPU memory (and its adapters'). */
  unload(): Promise<boolean>;
  /** Ends the worker; the engine cannot be used after it. */
  terminate(): void;
}

export default Nomoat;
