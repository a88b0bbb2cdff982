// Every export of the npm package `nomoat`, used as a TypeScript page would: package.test.mjs
// type-checks this file (tsc --noEmit, strict) against the installed tarball's index.d.ts, and
// checks that every method of Nomoat appears here. The `@ts-expect-error` lines are misuses
// the types must refuse (tsc fails if one of them compiles).
import DefaultNomoat, { Nomoat, MODEL_CACHE } from 'nomoat';
import type {
  AdapterState,
  CachedModel,
  ChatMessage,
  FinetuneResult,
  LoadProgress,
  ModelInfo,
  SessionState,
  Tool,
  ToolCall,
  NomoatError,
  NomoatErrorName,
  ReplyResult,
  ResponseFormat,
  TrainingExample,
} from 'nomoat';

const bucket: 'nomoat-models-v1' = MODEL_CACHE;
const same: typeof Nomoat = DefaultNomoat;

export async function everything(file: File, adapterFile: File, log: (line: string) => void): Promise<void> {
  if (!Nomoat.hasWebGPU()) return;
  const cached: CachedModel[] = await Nomoat.cachedModels();
  for (const m of cached) log(`${m.url} ${m.bytes ?? '?'} bytes, cached ${m.cached ?? '?'} in ${bucket}`);
  const removed: boolean = await Nomoat.deleteCached('models/old.gguf');

  const engine = await same.create({ workerUrl: new URL('./worker.js', import.meta.url) });
  const device: string | null = engine.device;
  const onProgress = (p: LoadProgress) => log(p.phase === 'cache' ? `not cached: ${p.error}, ${p.bytes} bytes` : `${p.phase} ${p.done}/${p.total}`);
  let info: ModelInfo = await engine.loadUrl('models/SmolLM2-135M-Instruct.Q4_1.gguf', { onProgress, nCtx: 1024, kv: 'f16', cache: true, maxGpuMemory: 512 });
  info = await engine.loadFile(file, { onProgress, kv: 'f32' });
  info = await engine.info();
  log(`${info.architecture} ${info.n_layer} layers, temp ${info.sampling.temperature}, ${device} ${removed}`);

  const messages: ChatMessage[] = [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hi!' }];
  const controller = new AbortController();
  const reply = engine.chat(messages, { temperature: 0.7, topK: 40, topP: 0.9, minP: 0.05, repeatPenalty: 1.1, presencePenalty: 0, frequencyPenalty: 0, seed: 1, maxTokens: 64, stop: ['\n\n'], signal: controller.signal });
  for await (const piece of reply) log(piece.toUpperCase());
  const summary: ReplyResult = await reply.result;
  if (summary.finish_reason === 'cancelled') log(`stopped after ${summary.tokens} tokens at ${summary.gen_tps} tokens/s`);

  const schema: ResponseFormat = { type: 'json_schema', json_schema: { name: 'city', strict: true, schema: { type: 'object', properties: { name: { type: 'string' } } } } };
  const city = JSON.parse((await engine.chat(messages, { responseFormat: schema }).result).text) as { name: string };
  const completion = engine.complete('Once upon a time', { maxTokens: 8, responseFormat: { type: 'json_object' } });
  await engine.stop();
  log(`${city.name} ${(await completion.result).text}`);

  const tools: Tool[] = [{ type: 'function', function: { name: 'get_weather', description: 'Weather in a city', parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] } } }];
  const asked = await engine.chat(messages, { tools, toolChoice: { type: 'function', function: { name: 'get_weather' } }, parallelToolCalls: false }).result;
  const calls: ToolCall[] = asked.tool_calls ?? [];
  const answered: ChatMessage[] = [...messages, { role: 'assistant', content: null, tool_calls: calls }, ...calls.map((c): ChatMessage => ({ role: 'tool', tool_call_id: c.id, content: `sunny in ${JSON.parse(c.function.arguments).city}` }))];
  log((await engine.chat(answered, { tools, toolChoice: 'none' }).result).text);
  const agent = engine.chat(messages, { session: 'agent' });
  let open: SessionState[] = await engine.sessions();
  open = await engine.closeSession('agent');
  log(`${(await agent.result).text} ${open.map((s) => `${s.name} ${s.tokens}/${s.n_ctx}`).join(', ')}`);

  const logits: Float32Array = await engine.logits([1, 2, 3], { reusePrefix: true });
  const prompt: string = await engine.render(messages);
  log(`${logits.length} ${prompt.length}`);

  const added: AdapterState = await engine.addAdapter(adapterFile);
  let list: AdapterState[] = await engine.setAdapters([{ name: added.name, scale: 0.8 }]);
  list = await engine.adapters();
  list = await engine.removeAdapter(added.name);
  log(list.map((a) => `${a.name} ${a.active} ${a.scale ?? '-'}`).join(', '));

  const examples: TrainingExample[] = [
    { messages: [{ role: 'user', content: 'Capital of France?' }, { role: 'assistant', content: 'Paris.' }] },
    { prompt: 'Two plus two is', completion: ' four.' },
    { text: 'Plain text to learn.' },
  ];
  const run = engine.finetune(examples, { rank: 8, alpha: 16, targets: ['q', 'v'], lr: 2e-4, epochs: 1, batchTokens: 512, ctx: 256, strict: false, seed: 1, valid: '{"text": "held out"}', validEvery: 5, name: 'facts', activate: false, signal: controller.signal });
  for await (const p of run) {
    // p: FinetuneProgress, a start summary then one object a step
    if (p.type === 'start') log(`${p.examples} examples, ${p.steps} steps`);
    else log(`step ${p.step}/${p.steps} loss ${p.loss} val ${p.valLoss ?? '-'} eta ${p.etaSeconds}s`);
  }
  const adapter: FinetuneResult = await run;
  await engine.stopFinetune();
  const resumed = await engine.resumeFinetune({ name: 'facts', activate: true });
  await engine.endFinetune();
  log(`${adapter.bytes?.byteLength ?? 0} bytes, finished ${adapter.finished}, ${resumed.last?.loss}`);

  await engine.unload();
  engine.terminate();

  // misuses the declarations refuse
  // @ts-expect-error: messages are objects, not a string
  engine.chat('Hi!');
  // @ts-expect-error: no such response format
  engine.chat(messages, { responseFormat: { type: 'xml' } });
  // @ts-expect-error: options are camelCase, as in nomoat.js
  engine.chat(messages, { max_tokens: 5 });
  // @ts-expect-error: a tool is {type: 'function', function: {...}}
  engine.chat(messages, { tools: [{ name: 'get_weather' }] });
  // @ts-expect-error: a cache report has no byte counts
  engine.loadUrl('m.gguf', { onProgress: ({ done }: LoadProgress) => log(String(done)) });
  // @ts-expect-error: kv is f16 or f32
  await engine.loadUrl('m.gguf', { kv: 'q8' });
  // @ts-expect-error: not a fine-tuning target
  engine.finetune(examples, { targets: ['embed'] });
  // @ts-expect-error: a reply's result is a summary object, not text
  const text: string = await reply.result;
  log(text);
}

export function kind(e: unknown): NomoatErrorName | null {
  const err = e as NomoatError;
  // @ts-expect-error: not one of the error names
  if (err.name === 'NoGPU') return null;
  return err instanceof Error ? err.name : null;
}
