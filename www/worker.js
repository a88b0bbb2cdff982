// Module Web Worker hosting nomoat's wasm Engine, so loading and generation never block the
// page. Protocol (nomoat.js speaks it for you):
//   page → worker  {id, op, args}
//     op: create | loadUrl {url, options} | loadFile {file, options} | chat {messages, options}
//         | complete {prompt, options} | logits {ids, reusePrefix} | render {messages} | info
//         | stop {id?} | unload | sessions | closeSession {name}
//         | addAdapter {file} | setAdapters {active: [{name, scale}]} | removeAdapter {name} | adapters
//         | finetune {data, options, name, activate, resume} | stopFinetune | endFinetune
//   worker → page  {id, type: 'progress', progress} | {id, type: 'piece', piece}
//                | {id, type: 'result', result} | {id, type: 'error', error: {name, message}}
// `stop` is answered at once, even while a chat is running (the chat then resolves with
// finish_reason "cancelled"); `stopFinetune` likewise ends a run's loop after the step in flight.
// chat, complete and logits wait their turn (one at a time, in order): several conversations
// (chat's `session` option) can be asked at once. `stop` with an id stops that request alone:
// running, it ends; waiting, it resolves cancelled without running.
import init, { Engine } from './pkg/nomoat_web.js';

let engine = null;
let initialized = null;
let training = null; // {stop} while a finetune loop runs
let runAt = null; // {step, tokens} where the engine's run stands
let turn = Promise.resolve(); // the queue of generation requests
let running = null; // the id of the generation request running
const cancelled = new Set(); // ids of waiting requests stopped before their turn
const GENERATION = new Set(['chat', 'complete', 'logits']);

// A waiting request's result when it is stopped before it runs.
const CANCELLED = { text: '', tool_calls: null, tokens: 0, token_ids: [], prompt_tokens: 0, reused_tokens: 0, prompt_seconds: 0, gen_seconds: 0, prompt_tps: 0, gen_tps: 0, finish_reason: 'cancelled' };

function post(msg) {
  self.postMessage(msg);
}

function errorOf(e) {
  if (e && typeof e === 'object') return { name: e.name || 'Error', message: e.message || String(e) };
  return { name: 'Error', message: String(e) };
}

function need() {
  if (!engine) {
    const e = new Error('the engine is not created yet');
    e.name = 'NoEngine';
    throw e;
  }
  return engine;
}

async function handle(id, op, args) {
  const progress = (p) => post({ id, type: 'progress', progress: p });
  switch (op) {
    case 'create': {
      initialized ??= init();
      await initialized;
      engine ??= await Engine.create();
      return { device: engine.device() };
    }
    case 'loadUrl':
      return JSON.parse(await need().load_from_url(args.url, progress, JSON.stringify(args.options || {})));
    case 'loadFile':
      return JSON.parse(await need().load_from_file(args.file, progress, JSON.stringify(args.options || {})));
    case 'chat':
      return JSON.parse(
        await need().chat(JSON.stringify(args.messages), JSON.stringify(args.options || {}), (piece) => post({ id, type: 'piece', piece })),
      );
    case 'complete':
      return JSON.parse(
        await need().complete(args.prompt, JSON.stringify(args.options || {}), (piece) => post({ id, type: 'piece', piece })),
      );
    case 'logits':
      return need().logits(JSON.stringify(args.ids), !!args.reusePrefix); // a Float32Array
    case 'render':
      return need().render(JSON.stringify(args.messages));
    case 'info':
      return JSON.parse(need().info());
    case 'addAdapter':
      return JSON.parse(await need().add_adapter(args.file));
    case 'setAdapters':
      return JSON.parse(await need().set_adapters(JSON.stringify(args.active)));
    case 'removeAdapter':
      return JSON.parse(await need().remove_adapter(args.name));
    case 'adapters':
      return JSON.parse(need().adapters());
    case 'finetune':
      return finetune(args, progress);
    case 'stopFinetune':
      if (training) training.stop = true;
      return true;
    case 'simulateDeviceLoss': // tests only: the page's handling of a lost GPU
      need().simulate_device_loss();
      return true;
    case 'endFinetune':
      if (engine) engine.finetune_end();
      return true;
    case 'stop':
      if (args.id == null || args.id === running) {
        if (engine) engine.stop();
      } else {
        cancelled.add(args.id);
      }
      return true;
    case 'sessions':
      return JSON.parse(need().sessions());
    case 'closeSession':
      return JSON.parse(need().close_session(args.name));
    case 'unload':
      if (engine) engine.unload();
      return true;
    default:
      throw new Error(`unknown operation '${op}'`);
  }
}

// Steps a run (started here, or the one stopped before with `resume`) until it ends or is
// stopped, posting each step's progress; then the adapter as it stands joins the engine's list
// (active, unless activate is false) and comes back as GGUF bytes. A failed step (a loss that
// is not finite) ends the loop with the adapter of the last good step and the error.
async function finetune({ data, options = {}, name = 'adapter', activate = true, resume = false }, progress) {
  const e = need();
  if (training) {
    const err = new Error('a fine-tuning run is already going: stop it first');
    err.name = 'Busy';
    throw err;
  }
  training = { stop: false };
  try {
    const summary = resume ? null : JSON.parse(await e.finetune_start(data, JSON.stringify(options)));
    if (!resume) runAt = null;
    if (summary) progress({ type: 'start', ...summary });
    const started = performance.now();
    const base = resume && runAt ? runAt : { step: 0, tokens: 0 };
    let last = null;
    let error = null;
    while (!training.stop) {
      let p;
      try {
        p = JSON.parse(await e.finetune_step());
      } catch (err) {
        if (err?.name !== 'TrainingFailed' || !runAt) throw err;
        error = errorOf(err);
        break;
      }
      // tokens/s and ETA over this loop's steps (a resumed run goes on from its last step)
      const seconds = (performance.now() - started) / 1000;
      const stepsHere = p.step - base.step;
      last = {
        type: 'step',
        step: p.step,
        steps: p.steps,
        loss: p.loss,
        valLoss: p.val_loss,
        lr: p.lr,
        gradNorm: p.grad_norm,
        tokens: p.tokens,
        seconds,
        tokensPerSecond: (p.tokens - base.tokens) / seconds,
        etaSeconds: (seconds / stepsHere) * (p.steps - p.step),
      };
      runAt = { step: p.step, tokens: p.tokens };
      progress(last);
      if (p.step >= p.steps) break;
    }
    const finished = !!last && last.step >= last.steps;
    const adapter = runAt ? await e.finetune_adapter(name, activate) : null;
    if (finished) e.finetune_end();
    return { name, adapter, finished, stopped: !finished && !error, error, summary, last };
  } finally {
    training = null;
  }
}

async function answer(id, op, args) {
  try {
    const result = await handle(id, op, args);
    post({ id, type: 'result', result });
  } catch (e) {
    post({ id, type: 'error', error: errorOf(e) });
  }
}

self.onmessage = (ev) => {
  const { id, op, args = {} } = ev.data;
  if (!GENERATION.has(op)) return answer(id, op, args);
  turn = turn.then(async () => {
    if (cancelled.delete(id)) return post({ id, type: 'result', result: op === 'logits' ? new Float32Array(0) : CANCELLED });
    running = id;
    await answer(id, op, args);
    running = null;
  });
};
