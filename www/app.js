// The chat page: conversations (kept in IndexedDB: list, open, rename, delete, new), streaming
// replies rendered as sanitised Markdown, stop, regenerate and edit the last message, tokens/s;
// in the drawer (a sidebar on wide screens): model picker (URL or file), progress, sampling
// settings, system prompt, tools (calls shown as calls, results typed in), stored models with the storage they take, LoRA adapters (add,
// toggle, scale, download), and training an adapter on the loaded model (loss chart, stop,
// resume; the result is kept in the page's storage and re-added when its model loads again).
import { Nomoat } from './nomoat.js';
import { renderMarkdown, copyButton } from './render.js';
import * as store from './store.js';

const ADAPTER_CACHE = 'nomoat-adapters-v1';
const CURRENT_KEY = 'nomoat-current-conversation';
const MODEL_URL_KEY = 'nomoat-last-model-url';

const $ = (id) => document.getElementById(id);
const ui = {
  device: $('device'), deviceToggle: $('device-toggle'), deviceDetail: $('device-detail'),
  noWebgpu: $('no-webgpu'), error: $('error'), notice: $('notice'),
  menuToggle: $('menu-toggle'), menuClose: $('menu-close'), side: $('side'), backdrop: $('drawer-backdrop'),
  conversations: $('conversations'), welcome: $('welcome'), announce: $('announce'), storage: $('storage'),
  url: $('model-url'), loadUrl: $('load-url'), file: $('model-file'), nCtx: $('n-ctx'),
  progressBox: $('progress-box'), progressLabel: $('progress-label'), progress: $('progress'),
  modelInfo: $('model-info'), unload: $('unload'), cached: $('cached'),
  messages: $('messages'), stats: $('stats'), composer: $('composer'), input: $('input'),
  send: $('send'), stop: $('stop'), newChat: $('new-chat'), system: $('system'), tools: $('tools'), toolChoice: $('tool-choice'),
  adapterFile: $('adapter-file'), adapters: $('adapters'),
  trainFile: $('train-file'), trainData: $('train-data'), trainName: $('train-name'), trainRank: $('train-rank'),
  trainEpochs: $('train-epochs'), trainLr: $('train-lr'), trainStart: $('train-start'), trainStop: $('train-stop'),
  trainResume: $('train-resume'), trainChart: $('train-chart'), trainStatus: $('train-status'),
};

let engine = null;
let loaded = false;
let busy = false;
let conv = freshConversation(); // the open conversation; its messages exclude the system prompt
let abort = null;
let modelName = null;
let training = null; // the run while its loop goes
let resumable = null; // the name of a stopped run that can go on
let losses = []; // [{step, loss, valLoss}] of the run on the chart

const mib = (b) => `${(b / (1 << 20)).toFixed(1)} MiB`;
const size = (b) =>
  b >= 1 << 30 ? `${(b / (1 << 30)).toFixed(1)} GiB` : b >= 1 << 20 ? `${Math.round(b / (1 << 20))} MiB` : `${Math.round(b / 1024)} KiB`;
// f32 values from the engine (0.949999988) as people write them (0.95)
const plain = (x) => (x == null || Number.isNaN(Number(x)) ? '' : String(Number(Number(x).toPrecision(4))));
// a stored name with a bad %-escape (anything can be put in the cache) is shown as it is
const decoded = (s) => {
  try {
    return decodeURIComponent(s);
  } catch {
    return s;
  }
};
const phoneLayout = matchMedia('(max-width: 720px)');

function showError(e) {
  ui.error.textContent = e ? `${e.name && e.name !== 'Error' ? e.name + ': ' : ''}${e.message || e}` : '';
  ui.error.hidden = !e;
}

/** A message that is not an error (storage full, kept in memory...), with optional buttons. */
function showNotice(text, actions = []) {
  ui.notice.replaceChildren(text);
  for (const [label, onclick] of actions) {
    const b = document.createElement('button');
    b.type = 'button';
    b.textContent = label;
    b.onclick = onclick;
    ui.notice.append(' ', b);
  }
  const close = document.createElement('button');
  close.type = 'button';
  close.textContent = 'Dismiss';
  close.onclick = () => (ui.notice.hidden = true);
  ui.notice.append(' ', close);
  ui.notice.hidden = false;
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
  for (const el of ui.messages.querySelectorAll('.needs-model')) el.disabled = !ready;
  for (const el of ui.conversations.querySelectorAll('button')) el.disabled = busy;
  ui.newChat.disabled = busy;
  $('welcome-load').hidden = loaded;
  $('welcome-ready').hidden = !loaded;
  // a phone has no Shift+Enter to speak of, and little room
  const keys = phoneLayout.matches ? '' : ' (Enter sends, Shift+Enter for a new line)';
  ui.input.placeholder = loaded ? `Message ${modelName}${keys}` : `Load a model, then type a message${keys}`;
}

// ---- the conversation on the page ----

function freshConversation() {
  const id = globalThis.crypto?.randomUUID?.() ?? `${Date.now()}-${Math.random().toString(36).slice(2)}`;
  return { id, title: 'New chat', messages: [], model: null, updated: 0 };
}

const nearBottom = () => ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 80;

/** Shows `text` in a message body: a reply as sanitised Markdown, the user's words as typed. */
function setBody(body, role, text) {
  body.dataset.source = text; // the text itself (the rendering drops Markdown's marks)
  if (role === 'assistant') body.replaceChildren(renderMarkdown(text));
  else body.textContent = text;
}

function addTurn(role, text) {
  ui.welcome.hidden = true;
  const follow = nearBottom();
  const turn = document.createElement('article');
  turn.className = `turn ${role}`;
  const who = document.createElement('h3');
  who.className = 'sr-only';
  who.textContent = { user: 'You said:', tool: 'The tool returned:' }[role] ?? 'The model replied:';
  const body = document.createElement('div');
  body.className = `msg ${role}`;
  setBody(body, role, text);
  const actions = document.createElement('div');
  actions.className = 'actions';
  turn.append(who, body, actions);
  ui.messages.append(turn);
  if (follow || role === 'user') ui.messages.scrollTop = ui.messages.scrollHeight;
  return body;
}

function actionButton(label, onclick, { needsModel = true, aria } = {}) {
  const b = document.createElement('button');
  b.type = 'button';
  b.textContent = label;
  if (aria) b.setAttribute('aria-label', aria);
  if (needsModel) b.classList.add('needs-model');
  b.onclick = onclick;
  return b;
}

/** Copy on every reply; Edit on the last question; Regenerate (or Retry) on the last turn. */
function updateTurnActions() {
  const turns = [...ui.messages.querySelectorAll('.turn')];
  const lastUser = turns.findLastIndex((t) => t.classList.contains('user'));
  turns.forEach((turn, i) => {
    const actions = turn.querySelector('.actions');
    actions.replaceChildren();
    const body = turn.querySelector('.msg');
    if (turn.classList.contains('assistant') && !body.classList.contains('streaming')) {
      const copy = copyButton('Copy the reply', () => body.dataset.source);
      copy.classList.add('copy-reply');
      actions.append(copy);
    }
    if (busy) return;
    // editing needs no model: the question waits in the composer until one is loaded
    if (i === lastUser) actions.append(actionButton('Edit', editLast, { needsModel: false, aria: 'Edit your last message' }));
    if (i === turns.length - 1) {
      const retry = !turn.classList.contains('assistant');
      actions.append(actionButton(retry ? 'Retry' : 'Regenerate', regenerate, { aria: retry ? 'Retry the reply' : 'Regenerate the reply' }));
    }
  });
  setState();
}

/** A message of the conversation on the page: text, or a reply's tool calls, or a tool's result. */
function addMessage(m) {
  const body = addTurn(m.role, m.content ?? '');
  if (m.tool_calls?.length) showCalls(body, m.tool_calls);
  if (m.role === 'tool') {
    const call = conv.messages.flatMap((x) => x.tool_calls ?? []).find((c) => c.id === m.tool_call_id);
    const label = document.createElement('div');
    label.className = 'tool-label';
    label.textContent = `result of ${call?.function.name ?? 'a call'}`;
    body.before(label);
  }
  return body;
}

/** The calls a reply made, under its text: each function's name and arguments. */
function showCalls(body, calls) {
  for (const c of calls) {
    const box = document.createElement('div');
    box.className = 'tool-call';
    const name = document.createElement('div');
    name.className = 'tool-label';
    name.textContent = `calls ${c.function.name}`;
    const args = document.createElement('pre');
    try {
      args.textContent = JSON.stringify(JSON.parse(c.function.arguments), null, 2);
    } catch {
      args.textContent = c.function.arguments;
    }
    box.append(name, args);
    body.append(box);
  }
}

/** The calls of the last reply that have no result yet. */
function pendingCalls() {
  const i = conv.messages.findLastIndex((m) => m.tool_calls?.length);
  if (i < 0) return [];
  const answered = new Set(conv.messages.slice(i + 1).filter((m) => m.role === 'tool').map((m) => m.tool_call_id));
  return conv.messages.slice(i + 1).some((m) => m.role === 'user') ? [] : conv.messages[i].tool_calls.filter((c) => !answered.has(c.id));
}

/** A form under the conversation for the first pending call's result. */
function askForResult() {
  ui.messages.querySelector('.tool-result-form')?.remove();
  const [call] = pendingCalls();
  if (!call) return;
  const form = document.createElement('form');
  form.className = 'tool-result-form';
  const label = document.createElement('label');
  label.textContent = `Result of ${call.function.name}`;
  const input = document.createElement('textarea');
  input.rows = 2;
  input.name = 'result';
  label.append(input);
  const button = document.createElement('button');
  button.type = 'submit';
  button.textContent = 'Send result';
  button.classList.add('needs-model');
  form.append(label, button);
  form.onsubmit = async (ev) => {
    ev.preventDefault();
    if (busy || !loaded) return;
    const m = { role: 'tool', tool_call_id: call.id, content: input.value.trim() };
    conv.messages.push(m);
    form.remove();
    addMessage(m);
    await persist();
    if (pendingCalls().length) askForResult();
    else await reply();
  };
  ui.messages.append(form);
  setState();
}

function renderConversation() {
  for (const t of ui.messages.querySelectorAll('.turn, .tool-result-form')) t.remove();
  ui.welcome.hidden = conv.messages.length > 0;
  for (const m of conv.messages) addMessage(m);
  askForResult();
  ui.messages.scrollTop = ui.messages.scrollHeight;
  ui.stats.textContent = '';
  updateTurnActions();
}

async function persist() {
  if (!conv.messages.length && !conv.updated) return; // an empty new chat is not kept
  if (conv.title === 'New chat') {
    const first = conv.messages.find((m) => m.role === 'user');
    if (first) conv.title = store.titleFrom(first.content);
  }
  try {
    await store.saveConversation(conv);
    localStorage.setItem(CURRENT_KEY, conv.id);
  } catch (e) {
    showNotice(`This conversation could not be saved (${e.name === 'QuotaExceededError' ? 'the browser has no more room for this site' : e.message}): it stays on the page until you leave it.`, [['Manage stored models', showStoredModels]]);
  }
  await refreshConversations();
}

async function openConversation(id) {
  if (busy) return;
  const c = await store.getConversation(id);
  if (!c) return refreshConversations();
  conv = c;
  localStorage.setItem(CURRENT_KEY, c.id);
  renderConversation();
  await refreshConversations();
  if (phoneLayout.matches) setDrawer(false);
}

function newChat() {
  if (abort) abort.abort();
  conv = freshConversation();
  localStorage.removeItem(CURRENT_KEY);
  renderConversation();
  refreshConversations();
}

function startRename(li, c) {
  const input = document.createElement('input');
  input.type = 'text';
  input.value = c.title;
  input.className = 'rename';
  input.setAttribute('aria-label', 'New name for the conversation');
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title && title !== c.title) {
      c.title = title;
      if (conv.id === c.id) conv.title = title;
      await store.saveConversation(c, { touch: false });
    }
    await refreshConversations();
    ui.conversations.querySelector(`li[data-id="${CSS.escape(c.id)}"] .conv-rename`)?.focus();
  };
  input.onkeydown = (ev) => {
    if (ev.key === 'Enter') finish(true);
    else if (ev.key === 'Escape') finish(false);
  };
  input.onblur = () => finish(true);
  li.querySelector('.conv-open').replaceWith(input);
  input.focus();
  input.select();
}

async function refreshConversations() {
  const list = await store.listConversations().catch(() => []);
  ui.conversations.replaceChildren();
  if (!list.length) {
    const li = document.createElement('li');
    li.className = 'muted';
    li.textContent = store.persistent ? 'none yet: conversations are kept in this browser' : 'none yet (this browser keeps no storage for the page: they last until you leave)';
    ui.conversations.append(li);
  }
  for (const c of list) {
    const li = document.createElement('li');
    li.dataset.id = c.id;
    const open = document.createElement('button');
    open.type = 'button';
    open.className = 'conv-open';
    open.textContent = c.title;
    open.title = `${c.messages.length} messages, ${new Date(c.updated).toLocaleString()}${c.model ? ', ' + c.model : ''}`;
    if (c.id === conv.id) open.setAttribute('aria-current', 'true');
    open.onclick = () => openConversation(c.id);
    const rename = actionButton('✎', () => startRename(li, c), { needsModel: false, aria: `Rename “${c.title}”` });
    rename.className = 'conv-rename icon-button';
    const del = actionButton('✕', async () => {
      await store.deleteConversation(c.id);
      if (c.id === conv.id) newChat();
      else await refreshConversations();
    }, { needsModel: false, aria: `Delete “${c.title}”` });
    del.className = 'conv-delete icon-button';
    li.append(open, rename, del);
    ui.conversations.append(li);
  }
  setState();
}

/** The conversation the page showed last (or the latest one), back on the page after a reload. */
async function restoreConversation() {
  const id = localStorage.getItem(CURRENT_KEY);
  const c = (id && (await store.getConversation(id).catch(() => null))) || null;
  if (c) conv = c;
  renderConversation();
  await refreshConversations();
}

// ---- models and storage ----

function onProgress({ phase, done, total, cached, bytes }) {
  if (phase === 'cache') {
    // the copy into the Cache API ran out of room: the model is loaded all the same
    showNotice(`No room to store this model on this device (it takes ${size(bytes)}): it stays loaded until you leave the page, and downloads again next time. Delete stored models to make room.`, [['Manage stored models', showStoredModels]]);
    refreshStorage();
    return;
  }
  ui.progressBox.hidden = false;
  const what = phase === 'download' ? (cached ? 'from the cache' : 'downloading') : 'uploading to the GPU';
  ui.progressLabel.textContent = `${what}: ${mib(done)}${total ? ' of ' + mib(total) : ''}`;
  if (total) ui.progress.value = done / total;
  else ui.progress.removeAttribute('value');
}

function showStoredModels() {
  setDrawer(true);
  ui.cached.closest('section').scrollIntoView({ block: 'start' });
  (ui.cached.querySelector('button') || ui.menuClose).focus();
}

async function refreshStorage() {
  if (!navigator.storage?.estimate) {
    ui.storage.textContent = '';
    return;
  }
  try {
    const { usage = 0, quota = 0 } = await navigator.storage.estimate();
    ui.storage.textContent = `${size(usage)} used of the ${size(quota)} this browser lets the page keep`;
  } catch {
    ui.storage.textContent = '';
  }
}

// The catalog (pkg/catalog.json, the CLI's runtime/src/catalog.json): each model with its size,
// licence and what it is for; whether this server has it (nomoat serve serves the catalog's
// models in its cache at models/<file>) and whether it fits the GPU memory limit and the
// storage left, with a button that loads it.
async function renderCatalog() {
  const list = $('catalog');
  let models = [];
  try {
    models = (await (await fetch('pkg/catalog.json')).json()).models;
  } catch {
    list.replaceChildren(Object.assign(document.createElement('li'), { className: 'muted', textContent: 'no catalog (pkg/ is not built)' }));
    return;
  }
  let room = Infinity;
  try {
    const { usage = 0, quota = 0 } = await navigator.storage.estimate();
    if (quota) room = quota - usage;
  } catch {}
  const limit = Number($('max-gpu-memory').value) || Infinity;
  const rows = await Promise.all(models.map(async (m) => {
    const url = `models/${m.file}`;
    const here = await fetch(url, { method: 'HEAD' }).then((r) => r.ok, () => false);
    const li = document.createElement('li');
    const title = document.createElement('strong');
    title.textContent = m.title;
    const facts = document.createElement('div');
    facts.className = 'muted';
    const notes = [mib(m.size), m.license, `context ${m.context.toLocaleString('en')}`, m.chat ? 'chat' : 'base model (no chat)'];
    if (m.size > limit * (1 << 20)) notes.push('over your GPU memory limit');
    if (m.size > room) notes.push('no room to store it: loads for this visit only');
    facts.textContent = `${notes.join(' · ')} — ${m.about}`;
    const button = document.createElement('button');
    button.type = 'button';
    button.textContent = here ? 'Load' : 'Not on this server';
    button.disabled = !here;
    button.setAttribute('aria-label', here ? `Load ${m.title}` : `${m.title} is not on this server: nomoat pull ${m.name}, then nomoat serve`);
    if (!here) button.title = `nomoat pull ${m.name}, then nomoat serve`;
    button.onclick = () => {
      ui.url.value = url;
      load(() => engine.loadUrl(url, loadOpts()));
    };
    li.append(title, ' ', button, facts);
    li.dataset.model = m.name;
    return li;
  }));
  list.replaceChildren(...rows);
}

async function refreshCached() {
  const list = await Nomoat.cachedModels().catch(() => []);
  ui.cached.replaceChildren();
  if (!list.length) {
    const li = document.createElement('li');
    li.className = 'muted';
    li.textContent = 'none yet (URL loads are stored)';
    ui.cached.append(li);
  }
  for (const m of list) {
    const li = document.createElement('li');
    const name = document.createElement('a');
    name.href = '#';
    const file = decoded(m.url.split('/').pop());
    name.textContent = `${file}${m.bytes ? ' (' + mib(m.bytes) + ')' : ''}`;
    name.title = `load ${m.url}`;
    name.onclick = (ev) => {
      ev.preventDefault();
      ui.url.value = m.url;
      load(() => engine.loadUrl(m.url, loadOpts()));
    };
    const del = document.createElement('button');
    del.textContent = 'Delete';
    del.className = 'delete-cached';
    del.setAttribute('aria-label', `Delete ${file}`);
    del.onclick = async () => {
      await Nomoat.deleteCached(m.url);
      refreshCached();
    };
    li.append(name, del);
    ui.cached.append(li);
  }
  refreshStorage();
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
        const m = p.memory_mib;
        ui.trainStatus.textContent = `${p.examples} examples (${p.format}${p.skipped_too_long ? `, ${p.skipped_too_long} too long skipped` : ''}), ${p.steps} steps, ${m.adapters + m.activations} MiB of GPU memory beside the model`;
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
  return { onProgress, nCtx: nCtx(), kv: $('kv').value, maxGpuMemory: limit > 0 ? limit : undefined };
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
    const asked = nCtx();
    const lowered = asked > info.n_ctx ? ` (${asked} asked for: the model was trained on ${info.n_ctx_train})` : '';
    ui.modelInfo.textContent = `${info.name}: ${info.architecture}, ${info.n_layer} layers, ${mib(info.weight_bytes)} on the GPU, context ${info.n_ctx}${lowered}, KV cache ${info.kv}${info.from_cache ? ', from the cache' : ''} (${info.load_seconds.toFixed(1)} s)`;
    ui.progressLabel.textContent = 'loaded';
    showSampling(info.sampling);
    modelName = info.name;
    trained.clear();
    resumable = null;
    await restoreAdapters(info.name);
    renderAdapters(await engine.adapters());
    // the conversation on the page goes on with this model; New chat starts another
    if (phoneLayout.matches) setDrawer(false);
  } catch (e) {
    showError(e);
    ui.progressBox.hidden = true;
  } finally {
    busy = false;
    setState();
    updateTurnActions();
    refreshCached();
    if (loaded && !ui.side.contains(document.activeElement)) ui.input.focus();
  }
}

// A model's own recommendation (its GGUF's general.sampling.*) replaces whatever the fields held:
// the fields always show what the next reply will use.
function showSampling(s) {
  if (!s) return;
  $('temperature').value = plain(s.temperature);
  $('top-k').value = plain(s.top_k);
  $('top-p').value = plain(s.top_p);
  $('min-p').value = plain(s.min_p);
  $('repeat-penalty').value = plain(s.repeat_penalty);
  if (s.from_model) ui.modelInfo.textContent += `; sampling from the model: ${s.from_model}`;
  for (const note of s.ignored) console.warn(note);
}

/** The chat options for tools, from the drawer's Tools section ({} when it is empty). */
function toolOptions() {
  const text = ui.tools.value.trim();
  if (!text) return {};
  let tools;
  try {
    tools = JSON.parse(text);
  } catch (e) {
    throw Object.assign(new Error(`the Tools list is not JSON: ${e.message}`), { name: 'BadRequest' });
  }
  if (!Array.isArray(tools)) throw Object.assign(new Error('Tools must be a JSON list of {"type": "function", "function": {...}}'), { name: 'BadRequest' });
  return { tools, toolChoice: ui.toolChoice.value };
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
  ui.messages.querySelector('.tool-result-form')?.remove(); // a question instead of a result
  conv.messages.push({ role: 'user', content: text });
  addTurn('user', text);
  await persist();
  await reply();
}

/** Writes the model's reply to the conversation as it stands (its last message is the user's). */
async function reply() {
  const out = addTurn('assistant', '');
  out.classList.add('streaming');
  out.setAttribute('aria-busy', 'true');
  const system = ui.system.value.trim();
  const messages = system ? [{ role: 'system', content: system }, ...conv.messages] : [...conv.messages];
  busy = true;
  abort = new AbortController();
  updateTurnActions();
  ui.stats.textContent = 'reading the prompt…';
  ui.announce.textContent = 'The model is writing…';
  let text = '';
  let paintTimer = null;
  // Markdown is rendered at most every 50 ms while pieces stream in, not once per token
  const paint = () => {
    paintTimer = null;
    const follow = nearBottom();
    setBody(out, 'assistant', text);
    if (follow) ui.messages.scrollTop = ui.messages.scrollHeight;
  };
  try {
    const r = engine.chat(messages, { ...sampling(), ...toolOptions(), signal: abort.signal });
    for await (const piece of r) {
      text += piece;
      out.dataset.source = text;
      paintTimer ??= setTimeout(paint, 50);
      ui.stats.textContent = 'writing…';
    }
    const result = await r.result;
    clearTimeout(paintTimer);
    setBody(out, 'assistant', result.text);
    const m = { role: 'assistant', content: result.text };
    if (result.tool_calls) {
      m.content = result.text || null;
      m.tool_calls = result.tool_calls;
      showCalls(out, result.tool_calls);
    }
    conv.messages.push(m);
    conv.model = modelName;
    ui.stats.textContent = `${result.prompt_tokens} prompt tokens (${result.reused_tokens} reused) at ${result.prompt_tps.toFixed(1)} tok/s · ${result.tokens} tokens at ${result.gen_tps.toFixed(1)} tok/s · ${result.finish_reason}`;
    // the engine drops a call cut short: say why the reply is empty
    if (result.finish_reason === 'length' && !result.text && !result.tool_calls) ui.stats.textContent += ': Max tokens ran out inside a tool call';
    // the live region reads the finished reply once, not every piece as it streams
    ui.announce.textContent = out.textContent;
    await persist();
  } catch (e) {
    clearTimeout(paintTimer);
    out.closest('.turn').remove();
    showError(e);
    ui.stats.textContent = '';
    ui.announce.textContent = '';
  } finally {
    out.classList.remove('streaming');
    out.removeAttribute('aria-busy');
    busy = false;
    abort = null;
    updateTurnActions();
    askForResult();
    (ui.messages.querySelector('.tool-result-form textarea') ?? ui.input).focus();
  }
}

/** Replaces the last reply (or answers a question whose reply failed). */
async function regenerate() {
  if (busy || !loaded || !conv.messages.length) return;
  showError(null);
  ui.messages.querySelector('.tool-result-form')?.remove();
  if (conv.messages.at(-1).role === 'assistant') {
    conv.messages.pop();
    [...ui.messages.querySelectorAll('.turn')].at(-1)?.remove();
  }
  await reply();
}

/** Takes the last question (and its reply) back into the composer to change and send again. */
async function editLast() {
  if (busy) return;
  const i = conv.messages.findLastIndex((m) => m.role === 'user');
  if (i < 0) return;
  ui.input.value = conv.messages[i].content;
  conv.messages.splice(i);
  renderConversation();
  await persist();
  ui.input.focus();
  ui.input.setSelectionRange(ui.input.value.length, ui.input.value.length);
}

// ---- the drawer (phones) and the device line ----

function setDrawer(open) {
  const wasOpen = document.body.classList.contains('drawer-open');
  document.body.classList.toggle('drawer-open', open);
  ui.menuToggle.setAttribute('aria-expanded', String(open));
  ui.backdrop.hidden = !open;
  if (open && !wasOpen && phoneLayout.matches) ui.menuClose.focus();
  if (!open && wasOpen && ui.side.contains(document.activeElement)) ui.menuToggle.focus();
}

const VENDORS = { nvidia: 'NVIDIA', amd: 'AMD', intel: 'Intel', apple: 'Apple', qualcomm: 'Qualcomm', arm: 'Arm', google: 'Google', microsoft: 'Microsoft' };

/** The GPU in plain words, with what it means for speed; the engine's own line is the detail. */
async function describeDevice(technical) {
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: 'high-performance' }).catch(() => null);
  const i = adapter?.info || {};
  const all = `${i.vendor || ''} ${i.architecture || ''} ${i.description || ''} ${technical}`;
  if (/swiftshader/i.test(all)) return 'Software GPU (SwiftShader): slow — use a browser with hardware WebGPU';
  if (i.isFallbackAdapter || adapter?.isFallbackAdapter || /llvmpipe|lavapipe|basic render|software/i.test(all)) {
    return 'Software GPU: slow — use a browser with hardware WebGPU';
  }
  const vendor = VENDORS[(i.vendor || '').toLowerCase()] || i.vendor || '';
  const name = [vendor, i.architecture].filter(Boolean).join(' ');
  return name ? `GPU: ${name}` : 'GPU ready (WebGPU)';
}

function showDeviceDetail(show) {
  ui.deviceDetail.hidden = !show;
  ui.deviceToggle.setAttribute('aria-expanded', String(show));
}

ui.loadUrl.onclick = () => {
  const url = ui.url.value.trim();
  if (!url) return;
  localStorage.setItem(MODEL_URL_KEY, url); // the field offers it again after a reload
  load(() => engine.loadUrl(url, loadOpts()));
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
  if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    send();
  }
};
ui.stop.onclick = () => abort?.abort();
ui.newChat.onclick = () => {
  newChat();
  if (!ui.input.disabled) ui.input.focus();
};
ui.menuToggle.onclick = () => setDrawer(!document.body.classList.contains('drawer-open'));
ui.menuClose.onclick = () => setDrawer(false);
ui.backdrop.onclick = () => setDrawer(false);
ui.deviceToggle.onclick = () => showDeviceDetail(ui.deviceDetail.hidden);
for (const b of document.querySelectorAll('[data-open-drawer]')) {
  b.onclick = () => {
    setDrawer(true);
    ui.url.focus();
  };
}
document.addEventListener('keydown', (ev) => {
  if (ev.key !== 'Escape') return;
  if (!ui.deviceDetail.hidden) showDeviceDetail(false);
  else if (document.body.classList.contains('drawer-open')) setDrawer(false);
});
phoneLayout.addEventListener('change', () => {
  setDrawer(false);
  setState();
});

async function main() {
  ui.url.value = localStorage.getItem(MODEL_URL_KEY) || ui.url.value;
  setState();
  refreshCached();
  renderCatalog();
  $('max-gpu-memory').addEventListener('input', renderCatalog);
  renderAdapters([]);
  // the page works offline once it has been loaded, and can be installed
  if ('serviceWorker' in navigator && window.isSecureContext) {
    navigator.serviceWorker.register('sw.js').catch((e) => console.warn(`no offline copy of the page: ${e.message}`));
  }
  await restoreConversation().catch((e) => showError(e));
  if (!Nomoat.hasWebGPU()) {
    ui.noWebgpu.hidden = false;
    ui.device.textContent = 'No WebGPU in this browser: models cannot run here';
    ui.deviceDetail.textContent = 'navigator.gpu is missing';
    return;
  }
  try {
    engine = await Nomoat.create();
    ui.deviceDetail.textContent = engine.device;
    ui.device.textContent = await describeDevice(engine.device);
  } catch (e) {
    if (e.name === 'NoWebGPU') ui.noWebgpu.hidden = false;
    ui.device.textContent = 'No GPU device: models cannot run here';
    ui.deviceDetail.textContent = `${e.name}: ${e.message}`;
    showError(e);
  }
  setState();
  window.nomoat = { engine, ready: true };
}

main();
