// The chat page: model picker (URL or file), progress, streaming replies, stop, tokens/s,
// sampling settings, system prompt, new chat, cached models, LoRA adapters (add, toggle, scale,
// download), and training an adapter on the loaded model (loss chart, stop, resume; the result
// is kept in the page's storage and re-added when its model loads again).
import { Nomoat } from './nomoat.js';

const ADAPTER_CACHE = 'nomoat-adapters-v1';

const $ = (id) => document.getElementById(id);
const ui = {
  device: $('device'), noWebgpu: $('no-webgpu'), error: $('error'),
  url: $('model-url'), loadUrl: $('load-url'), file: $('model-file'), nCtx: $('n-ctx'),
  progressBox: $('progress-box'), progressLabel: $('progress-label'), progress: $('progress'),
  modelInfo: $('model-info'), unload: $('unload'), cached: $('cached'),
  messages: $('messages'), stats: $('stats'), composer: $('composer'), input: $('input'),
  send: $('send'), stop: $('stop'), newChat: $('new-chat'), system: $('system'),
  adapterFile: $('adapter-file'), adapters: $('adapters'),
  trainFile: $('train-file'), trainData: $('train-data'), trainName: $('train-name'), trainRank: $('train-rank'),
  trainEpochs: $('train-epochs'), trainLr: $('train-lr'), trainStart: $('train-start'), trainStop: $('train-stop'),
  trainResume: $('train-resume'), trainChart: $('train-chart'), trainStatus: $('train-status'),
};

let engine = null;
let loaded = false;
let busy = false;
let history = []; // [{role, content}] without the system prompt
let abort = null;
let modelName = null;
let training = null; // the run while its loop goes
let resumable = null; // the name of a stopped run that can go on
let losses = []; // [{step, loss, valLoss}] of the run on the chart

const mib = (b) => `${(b / (1 << 20)).toFixed(1)} MiB`;
// a stored name with a bad %-escape (anything can be put in the cache) is shown as it is
const decoded = (s) => {
  try {
    return decodeURIComponent(s);
  } catch {
    return s;
  }
};

function showError(e) {
  ui.error.textContent = e ? `${e.name && e.name !== 'Error' ? e.name + ': ' : ''}${e.message || e}` : '';
  ui.error.hidden = !e;
}

function setState() {
  const ready = !!engine && loaded && !busy && !training;
  ui.input.disabled = !ready;
  ui.send.disabled = !ready;
  ui.loadUrl.disabled = !engine || busy;
  ui.file.disabled = !engine || busy;
  ui.unload.disabled = !engine || !loaded || busy;
  ui.adapterFile.disabled = !ready;
  for (const el of ui.adapters.querySelectorAll('input, button')) el.disabled = busy || !!training;
  ui.stop.disabled = !abort;
  ui.trainFile.disabled = !ready;
  ui.trainStart.disabled = !ready;
  ui.trainStop.disabled = !training;
  ui.trainResume.disabled = !ready || !resumable;
}

function addMessage(role, text) {
  const div = document.createElement('div');
  div.className = `msg ${role}`;
  div.textContent = text;
  ui.messages.append(div);
  ui.messages.scrollTop = ui.messages.scrollHeight;
  return div;
}

function onProgress({ phase, done, total, cached }) {
  ui.progressBox.hidden = false;
  const what = phase === 'download' ? (cached ? 'from the cache' : 'downloading') : 'uploading to the GPU';
  ui.progressLabel.textContent = `${what}: ${mib(done)}${total ? ' of ' + mib(total) : ''}`;
  if (total) ui.progress.value = done / total;
  else ui.progress.removeAttribute('value');
}

async function refreshCached() {
  const list = await Nomoat.cachedModels().catch(() => []);
  ui.cached.replaceChildren();
  if (!list.length) {
    const li = document.createElement('li');
    li.className = 'muted';
    li.textContent = 'none yet (URL loads are cached)';
    ui.cached.append(li);
  }
  for (const m of list) {
    const li = document.createElement('li');
    const name = document.createElement('a');
    name.href = '#';
    name.textContent = `${decoded(m.url.split('/').pop())}${m.bytes ? ' (' + mib(m.bytes) + ')' : ''}`;
    name.title = `load ${m.url}`;
    name.onclick = (ev) => {
      ev.preventDefault();
      ui.url.value = m.url;
      load(() => engine.loadUrl(m.url, loadOpts()));
    };
    const del = document.createElement('button');
    del.textContent = 'Delete';
    del.className = 'delete-cached';
    del.onclick = async () => {
      await Nomoat.deleteCached(m.url);
      refreshCached();
    };
    li.append(name, del);
    ui.cached.append(li);
  }
}

// Adapters: each row has a toggle, a scale and a remove button. A change applies from the next
// reply on; the conversation so far is kept (its cache is recomputed with the new weights).
const adapterScales = new Map(); // name → the scale last typed, kept while the adapter is off
function renderAdapters(list) {
  ui.adapters.replaceChildren();
  if (!list.length) {
    const li = document.createElement('li');
    li.className = 'muted';
    li.textContent = loaded ? 'none (llama.cpp LoRA GGUF files)' : 'load a model first';
    ui.adapters.append(li);
  }
  for (const a of list) {
    const li = document.createElement('li');
    li.className = 'adapter';
    li.dataset.name = a.name;
    const on = document.createElement('input');
    on.type = 'checkbox';
    on.checked = a.active;
    on.className = 'adapter-on';
    on.title = 'use this adapter';
    const label = document.createElement('span');
    label.textContent = `${a.name} (${mib(a.bytes)})`;
    const scale = document.createElement('input');
    scale.type = 'number';
    scale.step = '0.1';
    scale.value = a.scale ?? adapterScales.get(a.name) ?? 1;
    scale.className = 'adapter-scale';
    scale.title = 'scale';
    const del = document.createElement('button');
    del.textContent = 'Remove';
    del.className = 'adapter-remove';
    on.onchange = () => applyAdapters();
    scale.onchange = () => {
      adapterScales.set(a.name, Number(scale.value));
      if (on.checked) applyAdapters();
    };
    del.onclick = () => adapterOp(() => engine.removeAdapter(a.name));
    const save = document.createElement('button');
    save.textContent = 'Save';
    save.className = 'adapter-download';
    save.title = 'download the adapter (llama.cpp GGUF LoRA)';
    save.hidden = !trained.has(a.name);
    save.onclick = () => download(`${a.name}.gguf`, trained.get(a.name));
    li.append(on, label, scale, save, del);
    ui.adapters.append(li);
  }
  setState();
}

async function adapterOp(op) {
  if (busy) return;
  busy = true;
  showError(null);
  setState();
  try {
    renderAdapters(await op());
  } catch (e) {
    showError(e);
  } finally {
    busy = false;
    setState();
  }
}

function applyAdapters() {
  const active = [...ui.adapters.querySelectorAll('li.adapter')]
    .filter((li) => li.querySelector('.adapter-on').checked)
    .map((li) => ({ name: li.dataset.name, scale: Number(li.querySelector('.adapter-scale').value) }));
  return adapterOp(() => engine.setAdapters(active));
}

// Adapters trained here: name → GGUF bytes, kept in the Cache API under the model's name so they
// come back when that model loads again.
const trained = new Map();
const adapterKey = (model, name) => new URL(`nomoat-adapters/${encodeURIComponent(model)}/${encodeURIComponent(name)}.gguf`, location.href).href;

async function storeAdapter(name, bytes) {
  if (typeof caches === 'undefined') return;
  const cache = await caches.open(ADAPTER_CACHE);
  await cache.put(adapterKey(modelName, name), new Response(bytes, { headers: { 'content-type': 'application/octet-stream' } }));
}

/** Adds the stored adapters trained on `model` (inactive), for a model just loaded. */
async function restoreAdapters(model) {
  if (typeof caches === 'undefined') return;
  const cache = await caches.open(ADAPTER_CACHE);
  const prefix = adapterKey(model, '').replace(/\.gguf$/, '');
  for (const req of await cache.keys()) {
    if (!req.url.startsWith(prefix)) continue;
    const name = decoded(req.url.slice(prefix.length).replace(/\.gguf$/, ''));
    const bytes = new Uint8Array(await (await cache.match(req)).arrayBuffer());
    try {
      await engine.addAdapter(new File([bytes], `${name}.gguf`));
      trained.set(name, bytes);
    } catch (e) {
      console.warn(`stored adapter ${name} did not load: ${e.message}`);
    }
  }
}

function download(fileName, bytes) {
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([bytes], { type: 'application/octet-stream' }));
  a.download = fileName;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
}

function drawLosses() {
  const c = ui.trainChart;
  c.hidden = losses.length === 0;
  const g = c.getContext('2d');
  g.clearRect(0, 0, c.width, c.height);
  if (!losses.length) return;
  const values = losses.flatMap((p) => (p.valLoss != null ? [p.loss, p.valLoss] : [p.loss]));
  const [lo, hi] = [Math.min(...values), Math.max(...values)];
  const steps = losses[losses.length - 1].steps;
  const x = (step) => 6 + ((c.width - 12) * step) / Math.max(steps, 1);
  const y = (v) => c.height - 14 - ((c.height - 24) * (v - lo)) / Math.max(hi - lo, 1e-9);
  const style = getComputedStyle(document.documentElement);
  g.strokeStyle = style.getPropertyValue('--accent');
  g.lineWidth = 1.5;
  g.beginPath();
  losses.forEach((p, i) => (i ? g.lineTo(x(p.step), y(p.loss)) : g.moveTo(x(p.step), y(p.loss))));
  g.stroke();
  g.fillStyle = style.getPropertyValue('--err');
  for (const p of losses) if (p.valLoss != null) g.fillRect(x(p.step) - 2, y(p.valLoss) - 2, 4, 4);
  g.fillStyle = style.getPropertyValue('--muted');
  g.font = '10px system-ui';
  g.fillText(`loss ${hi.toFixed(2)} → ${losses[losses.length - 1].loss.toFixed(2)}   ■ validation`, 6, c.height - 3);
}

async function train(resume) {
  const name = ui.trainName.value.trim() || 'adapter';
  if (!resume) {
    const data = ui.trainData.value;
    if (!data.trim()) return showError({ name: 'BadRequest', message: 'choose a JSONL file or paste examples to train on' });
    losses = [];
    drawLosses();
  }
  showError(null);
  ui.trainStatus.textContent = resume ? 'going on…' : 'reading the examples…';
  const options = { name, rank: Number(ui.trainRank.value), epochs: Number(ui.trainEpochs.value), lr: Number(ui.trainLr.value) };
  training = resume ? engine.resumeFinetune({ name }) : engine.finetune(ui.trainData.value, options);
  resumable = null;
  setState();
  try {
    for await (const p of training) {
      if (p.type === 'start') {
        ui.trainStatus.textContent = `${p.examples} examples (${p.format}${p.skipped_too_long ? `, ${p.skipped_too_long} too long skipped` : ''}), ${p.steps} steps`;
        continue;
      }
      losses.push(p);
      drawLosses();
      const val = p.valLoss != null ? ` · validation ${p.valLoss.toFixed(3)}` : '';
      ui.trainStatus.textContent = `step ${p.step}/${p.steps} · loss ${p.loss.toFixed(3)}${val} · ${p.tokensPerSecond.toFixed(0)} tok/s · ${Math.round(p.etaSeconds)} s left`;
    }
    const r = await training;
    if (r.bytes) {
      trained.set(r.name, r.bytes);
      await storeAdapter(r.name, r.bytes).catch((e) => console.warn(`not stored: ${e.message}`));
    }
    resumable = r.stopped ? r.name : null;
    const state = r.finished ? 'trained' : r.error ? 'stopped by an error' : 'stopped';
    ui.trainStatus.textContent = `${state}${r.last ? ` after ${r.last.step} steps (loss ${r.last.loss.toFixed(3)})` : ''}${r.bytes ? `: '${r.name}' is on in the chat` : ''}`;
    if (r.error) showError(r.error);
    renderAdapters(await engine.adapters());
  } catch (e) {
    showError(e);
    ui.trainStatus.textContent = 'training failed';
  } finally {
    training = null;
    setState();
  }
}

const nCtx = () => Number(ui.nCtx.value) || 2048;
const loadOpts = () => {
  const limit = Number($('max-gpu-memory').value);
  return { onProgress, nCtx: nCtx(), maxGpuMemory: limit > 0 ? limit : undefined };
};

async function load(start) {
  if (busy) return;
  busy = true;
  loaded = false;
  showError(null);
  ui.modelInfo.textContent = '';
  ui.progress.value = 0;
  setState();
  try {
    const info = await start();
    loaded = true;
    ui.modelInfo.textContent = `${info.name}: ${info.architecture}, ${info.n_layer} layers, ${mib(info.weight_bytes)} on the GPU, context ${info.n_ctx}${info.from_cache ? ', from the cache' : ''} (${info.load_seconds.toFixed(1)} s)`;
    ui.progressLabel.textContent = 'loaded';
    showSampling(info.sampling);
    modelName = info.name;
    trained.clear();
    resumable = null;
    await restoreAdapters(info.name);
    renderAdapters(await engine.adapters());
    newChat();
  } catch (e) {
    showError(e);
    ui.progressBox.hidden = true;
  } finally {
    busy = false;
    setState();
    refreshCached();
  }
}

function newChat() {
  if (abort) abort.abort();
  history = [];
  ui.messages.replaceChildren();
  ui.stats.textContent = '';
}

// A model's own recommendation (its GGUF's general.sampling.*) replaces whatever the fields held:
// the fields always show what the next reply will use.
function showSampling(s) {
  if (!s) return;
  $('temperature').value = s.temperature;
  $('top-k').value = s.top_k;
  $('top-p').value = s.top_p;
  $('min-p').value = s.min_p;
  $('repeat-penalty').value = s.repeat_penalty;
  if (s.from_model) ui.modelInfo.textContent += `; sampling from the model: ${s.from_model}`;
  for (const note of s.ignored) console.warn(note);
}

function sampling() {
  const num = (el) => (el.value === '' ? undefined : Number(el.value));
  return {
    temperature: num($('temperature')),
    topK: num($('top-k')),
    topP: num($('top-p')),
    minP: num($('min-p')),
    repeatPenalty: num($('repeat-penalty')),
    seed: num($('seed')) ?? Math.floor(Math.random() * 2 ** 32),
    maxTokens: num($('max-tokens')),
  };
}

async function send() {
  const text = ui.input.value.trim();
  if (!text || busy || !loaded) return;
  ui.input.value = '';
  showError(null);
  history.push({ role: 'user', content: text });
  addMessage('user', text);
  const out = addMessage('assistant', '');
  out.classList.add('streaming');
  const system = ui.system.value.trim();
  const messages = system ? [{ role: 'system', content: system }, ...history] : history;
  busy = true;
  abort = new AbortController();
  setState();
  ui.stats.textContent = 'reading the prompt…';
  try {
    const reply = engine.chat(messages, { ...sampling(), signal: abort.signal });
    for await (const piece of reply) {
      out.textContent += piece;
      ui.messages.scrollTop = ui.messages.scrollHeight;
      ui.stats.textContent = 'writing…';
    }
    const r = await reply.result;
    history.push({ role: 'assistant', content: r.text });
    ui.stats.textContent = `${r.prompt_tokens} prompt tokens (${r.reused_tokens} reused) at ${r.prompt_tps.toFixed(1)} tok/s · ${r.tokens} tokens at ${r.gen_tps.toFixed(1)} tok/s · ${r.finish_reason}`;
  } catch (e) {
    history.pop();
    showError(e);
    ui.stats.textContent = '';
  } finally {
    out.classList.remove('streaming');
    busy = false;
    abort = null;
    setState();
    ui.input.focus();
  }
}

ui.loadUrl.onclick = () => {
  const url = ui.url.value.trim();
  if (url) load(() => engine.loadUrl(url, loadOpts()));
};
ui.file.onchange = () => {
  const f = ui.file.files[0];
  if (f) load(() => engine.loadFile(f, loadOpts()));
  ui.file.value = '';
};
ui.adapterFile.onchange = () => {
  const f = ui.adapterFile.files[0];
  ui.adapterFile.value = '';
  if (f) adapterOp(async () => {
    await engine.addAdapter(f);
    return engine.adapters();
  });
};
ui.trainFile.onchange = async () => {
  const f = ui.trainFile.files[0];
  ui.trainFile.value = '';
  if (f) ui.trainData.value = await f.text();
};
ui.trainStart.onclick = () => train(false);
ui.trainStop.onclick = () => engine.stopFinetune();
ui.trainResume.onclick = () => train(true);
ui.unload.onclick = async () => {
  await engine.unload();
  loaded = false;
  resumable = null;
  renderAdapters([]);
  ui.modelInfo.textContent = 'unloaded';
  ui.progressBox.hidden = true;
  setState();
};
ui.composer.onsubmit = (ev) => {
  ev.preventDefault();
  send();
};
ui.input.onkeydown = (ev) => {
  if (ev.key === 'Enter' && !ev.shiftKey) {
    ev.preventDefault();
    send();
  }
};
ui.stop.onclick = () => abort?.abort();
ui.newChat.onclick = newChat;

async function main() {
  setState();
  refreshCached();
  renderAdapters([]);
  if (!Nomoat.hasWebGPU()) {
    ui.noWebgpu.hidden = false;
    ui.device.textContent = 'no WebGPU';
    return;
  }
  try {
    engine = await Nomoat.create();
    ui.device.textContent = engine.device;
  } catch (e) {
    if (e.name === 'NoWebGPU') ui.noWebgpu.hidden = false;
    ui.device.textContent = 'no GPU device';
    showError(e);
  }
  setState();
  window.nomoat = { engine, ready: true };
}

main();
