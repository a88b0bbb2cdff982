// Module Web Worker hosting nomoat's wasm Engine, so loading and generation never block the
// page. Protocol (nomoat.js speaks it for you):
//   page → worker  {id, op, args}
//     op: create | loadUrl {url, options} | loadFile {file, options} | chat {messages, options}
//         | complete {prompt, options} | logits {ids, reusePrefix} | render {messages} | info
//         | stop | unload
//         | addAdapter {file} | setAdapters {active: [{name, scale}]} | removeAdapter {name} | adapters
//   worker → page  {id, type: 'progress', progress} | {id, type: 'piece', piece}
//                | {id, type: 'result', result} | {id, type: 'error', error: {name, message}}
// `stop` is answered at once, even while a chat is running (the chat then resolves with
// finish_reason "cancelled").
import init, { Engine } from './pkg/nomoat_web.js';

let engine = null;
let initialized = null;

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
    case 'stop':
      if (engine) engine.stop();
      return true;
    case 'unload':
      if (engine) engine.unload();
      return true;
    default:
      throw new Error(`unknown operation '${op}'`);
  }
}

self.onmessage = async (ev) => {
  const { id, op, args = {} } = ev.data;
  try {
    const result = await handle(id, op, args);
    post({ id, type: 'result', result });
  } catch (e) {
    post({ id, type: 'error', error: errorOf(e) });
  }
};
