// The chat page as people use it (Chromium, WebGPU on SwiftShader), at 1280×800 and 390×844:
// - on a phone the conversation and the composer fill the first screen and the settings are a
//   drawer (open, Escape closes);
// - a stored reply renders its Markdown: a code block with a copy button that copies the code;
//   raw HTML (<img onerror>, <script>, <iframe>), javascript: links and images stay inert text;
// - without IndexedDB the conversations are kept in memory, and the list says so;
// - a real reply (SmolLM2, greedy) streams into a rendered message, is kept in IndexedDB and
//   comes back after a reload; regenerate gives the same greedy reply; edit takes the question
//   back; rename and delete change the stored list; numbers read 0.8, not 0.800000;
// - a browser with no room to store the model (a quota override through CDP) still loads it,
//   says why, and stores nothing;
// - axe-core finds no serious or critical accessibility violation (desktop, phone with the
//   drawer open, dark);
// - Chromium finds the page installable (its manifest and Service Worker); with the server
//   gone, a reload opens the page from the Service Worker's copy, the
//   conversation is there, the model loads from the Cache API and replies.
// Screenshots (light and dark, both sizes) go to target/browser-artifacts/app-*.png.
// Run: node --test tests/browser/app.test.mjs   (after scripts/build-web.sh)
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startServer, CHROMIUM_ARGS } from './server.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const WWW = path.join(ROOT, 'www');
const CACHE = process.env.NOMOAT_CACHE || path.join(os.homedir(), '.cache/nomoat');
const MODEL_DIR = path.join(CACHE, 'models');
const MODEL = 'SmolLM2-135M-Instruct.Q4_1.gguf';
const TINY_DIR = path.join(ROOT, 'tests/data/tiny');
const TINY = 'llama-tiny.gguf';
const ARTIFACTS = path.join(ROOT, 'target/browser-artifacts');
const AXE = createRequire(import.meta.url).resolve('axe-core/axe.min.js');
const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 390, height: 844 };
const LONG = 300_000;

// A reply as a model might write it: a code block, and the HTML and links that must stay inert.
const HOSTILE_REPLY = [
  'Here is the function:',
  '',
  '```python',
  'def add(a, b):',
  '    return a + b  # <b>not bold</b>',
  '```',
  '',
  'Inline `code`, **bold**, and <img src=x onerror="window.__xss = \'img\'"> an image tag.',
  '',
  '<script>window.__xss = "script"</script>',
  '',
  '<iframe srcdoc="<script>parent.__xss = 1</script>"></iframe>',
  '',
  '[click me](javascript:window.__xss=\'link\') and <a href="javascript:window.__xss=\'a\'">this</a>',
  '',
  '![tracker](http://example.invalid/pixel.png) and [a real link](https://example.org/)',
].join('\n');
const CODE = 'def add(a, b):\n    return a + b  # <b>not bold</b>\n';

let server;
let ctx;
let userDir;

async function openPage({ viewport = DESKTOP, colorScheme = 'light', waitReady = true } = {}) {
  const page = await ctx.newPage();
  await page.setViewportSize(viewport);
  await page.emulateMedia({ colorScheme });
  page.on('pageerror', (e) => console.log(`[page error] ${e.message}`));
  page.on('console', (m) => m.type() === 'error' && !m.text().startsWith('Failed to load resource') && console.log(`[console] ${m.text()}`));
  await page.goto(`${server.url}/`);
  if (waitReady) await page.waitForFunction(() => window.nomoat?.ready, null, { timeout: 60_000 });
  return page;
}

async function loadModel(page, url = `models/${MODEL}`) {
  await page.fill('#model-url', url);
  await page.click('#load-url');
  await page.waitForFunction(() => document.querySelector('#model-info').textContent.includes('layers') || !document.querySelector('#error').hidden, null, { timeout: LONG });
  assert.equal(await page.$eval('#error', (e) => (e.hidden ? '' : e.textContent)), '', 'loading the model failed');
}

/** Sends `text`; resolves to the last reply's {source, rendered text, stats}. */
async function ask(page, text) {
  const before = await page.$$eval('.msg.assistant', (els) => els.length);
  await page.fill('#input', text);
  await page.press('#input', 'Enter');
  await page.waitForFunction((n) => document.querySelectorAll('.msg.assistant').length > n && document.querySelector('#stats').textContent.includes('tok/s') || !document.querySelector('#error').hidden, before, { timeout: LONG });
  assert.equal(await page.$eval('#error', (e) => (e.hidden ? '' : e.textContent)), '', 'the reply failed');
  return lastReply(page);
}

function lastReply(page) {
  return page.$$eval('.msg.assistant', (els) => {
    const e = els[els.length - 1];
    return { source: e.dataset.source, text: e.textContent, html: e.innerHTML, stats: document.querySelector('#stats').textContent };
  });
}

/** Puts a conversation straight into the page's store (as a finished chat would have). */
function storeConversation(page, conv) {
  return page.evaluate(async (c) => {
    const store = await import('./store.js');
    await store.saveConversation(c);
    localStorage.setItem('nomoat-current-conversation', c.id);
  }, conv);
}

const shot = (page, name) => page.screenshot({ path: path.join(ARTIFACTS, `app-${name}.png`) });

before(async () => {
  assert.ok(fs.existsSync(path.join(WWW, 'pkg/nomoat_web_bg.wasm')), 'www/pkg is missing: run scripts/build-web.sh');
  assert.ok(fs.existsSync(path.join(MODEL_DIR, MODEL)), `${MODEL} is missing: run scripts/setup.sh`);
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  server = await startServer({ root: WWW, models: MODEL_DIR });
  userDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nomoat-chromium-'));
  ctx = await chromium.launchPersistentContext(userDir, { executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS, viewport: DESKTOP });
  await ctx.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: server.url });
});

after(async () => {
  await ctx?.close();
  await server?.close();
  if (userDir) fs.rmSync(userDir, { recursive: true, force: true });
});

test('on a phone the composer is in the first screen and the settings are a drawer', async () => {
  const page = await openPage({ viewport: PHONE });
  const box = await page.locator('#input').boundingBox();
  assert.ok(box && box.y >= 0 && box.y + box.height <= PHONE.height, `the composer is at ${JSON.stringify(box)}, outside the ${PHONE.height}px screen`);
  assert.ok(await page.isVisible('#send'));
  assert.equal(await page.isVisible('#model-url'), false, 'the settings show without opening the drawer');
  assert.equal(await page.$eval('html', (e) => e.scrollHeight <= window.innerHeight), true, 'the page scrolls');
  await shot(page, 'phone-light');
  await page.click('#menu-toggle');
  await page.waitForFunction(() => getComputedStyle(document.querySelector('#side')).transform === 'none');
  assert.ok(await page.isVisible('#model-url'));
  assert.equal(await page.getAttribute('#menu-toggle', 'aria-expanded'), 'true');
  assert.equal(await page.evaluate(() => document.activeElement.id), 'menu-close', 'focus did not move into the drawer');
  await shot(page, 'phone-drawer-light');
  await page.keyboard.press('Escape');
  await page.waitForFunction(() => getComputedStyle(document.querySelector('#side')).visibility === 'hidden');
  assert.equal(await page.evaluate(() => document.activeElement.id), 'menu-toggle', 'focus did not come back to the menu button');
  await page.close();
  // the desktop keeps its sidebar, with no menu button
  const desk = await openPage();
  assert.ok(await desk.isVisible('#model-url'));
  assert.equal(await desk.isVisible('#menu-toggle'), false);
  // the device line is in plain words, the engine's own line a click away
  assert.match(await desk.textContent('#device'), /^Software GPU \(SwiftShader\): slow — use a browser with hardware WebGPU$/);
  assert.equal(await desk.isVisible('#device-detail'), false);
  await desk.click('#device-toggle');
  assert.match(await desk.textContent('#device-detail'), /kernels/);
  await desk.close();
});

test('a reply renders its Markdown; HTML, scripts and javascript: links stay inert text', async () => {
  let page = await openPage({ waitReady: false });
  const dialogs = [];
  await storeConversation(page, {
    id: 'markdown-check',
    title: 'Markdown check',
    model: MODEL,
    messages: [{ role: 'user', content: 'Show me <b>code</b>' }, { role: 'assistant', content: HOSTILE_REPLY }],
  });
  await page.close();
  page = await openPage({ waitReady: false });
  page.on('dialog', (d) => {
    dialogs.push(d.message());
    d.dismiss();
  });
  await page.waitForSelector('.msg.assistant .code-block');
  const r = await lastReply(page);
  assert.equal(r.source, HOSTILE_REPLY);
  // the code block: its language, its text as written, a copy button that copies exactly it
  assert.equal(await page.getAttribute('.msg.assistant .code-block', 'data-lang'), 'python');
  assert.equal(await page.textContent('.msg.assistant .code-block pre code'), CODE);
  await page.click('.msg.assistant .code-block button.copy');
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()), CODE);
  await page.waitForSelector('.msg.assistant .code-block button.copied');
  assert.equal(await page.$$eval('.msg.assistant strong', (e) => e.map((x) => x.textContent)).then((t) => t.join()), 'bold');
  // nothing the reply wrote became an element that loads or runs
  const found = await page.$$eval('#messages', (m) => ['img', 'script', 'iframe', 'svg', 'b'].filter((t) => m[0].querySelector(`.msg.assistant ${t}`)));
  assert.deepEqual(found, []);
  const hrefs = await page.$$eval('.msg.assistant a', (as) => as.map((a) => a.getAttribute('href')));
  assert.deepEqual(hrefs, ['https://example.org/']);
  assert.match(r.text, /<img src=x onerror="window.__xss = 'img'"> an image tag/);
  assert.match(r.text, /<script>window.__xss = "script"<\/script>/);
  assert.ok(r.text.includes(`click me and <a href="javascript:window.__xss='a'">this</a>`), r.text);
  assert.match(r.text, /tracker and a real link/);
  // clicking what was a javascript: link runs nothing
  await page.getByText('click me and').click();
  await page.waitForTimeout(300);
  assert.equal(await page.evaluate(() => window.__xss), undefined);
  assert.deepEqual(dialogs, []);
  // the user's own words are never markup either
  assert.equal(await page.textContent('.msg.user'), 'Show me <b>code</b>');
  await shot(page, 'markdown-desktop-light');
  await page.emulateMedia({ colorScheme: 'dark' });
  await shot(page, 'markdown-desktop-dark');
  await page.setViewportSize(PHONE);
  await page.waitForFunction(() => getComputedStyle(document.querySelector('#side')).visibility === 'hidden');
  await shot(page, 'markdown-phone-dark');
  await page.emulateMedia({ colorScheme: 'light' });
  await shot(page, 'markdown-phone-light');
  await page.close();
});

test('without IndexedDB, conversations last the visit and the page says so', async () => {
  const page = await ctx.newPage();
  await page.addInitScript(() => delete window.indexedDB);
  await page.goto(`${server.url}/`);
  await page.waitForSelector('#conversations li');
  assert.match(await page.textContent('#conversations'), /this browser keeps no storage for the page/);
  const list = await page.evaluate(async () => {
    const store = await import('./store.js');
    await store.saveConversation({ id: 'm1', title: 'In memory', messages: [{ role: 'user', content: 'hi' }] });
    const got = await store.getConversation('m1');
    await store.saveConversation({ id: 'm2', title: 'Later', messages: [] });
    await store.deleteConversation('m2');
    return { got, all: await store.listConversations(), persistent: store.persistent };
  });
  assert.equal(list.persistent, false);
  assert.deepEqual(list.got.messages, [{ role: 'user', content: 'hi' }]);
  assert.deepEqual(list.all.map((c) => c.title), ['In memory']);
  await page.close();
});

test('a real reply streams in rendered, is kept, and survives a reload; regenerate, edit, rename, delete', { timeout: LONG * 2 }, async () => {
  let page = await openPage();
  await page.click('#new-chat');
  await loadModel(page);
  // the model's sampling values read as people write them
  for (const id of ['#temperature', '#top-p', '#min-p', '#repeat-penalty']) {
    const v = await page.inputValue(id);
    assert.match(v, /^\d+(\.\d{1,3})?$/, `${id} shows ${v}`);
  }
  await page.fill('#temperature', '0');
  await page.fill('#max-tokens', '28'); // the code block SmolLM2 writes closes within 24
  await page.fill('#seed', '1');
  // while the reply streams, its Markdown is already rendered: the code block shows before the end
  const streamed = page.waitForSelector('.msg.assistant.streaming .code-block pre code', { timeout: LONG });
  streamed.catch(() => {}); // awaited below; this only keeps a failed ask() from leaving it unhandled
  const first = await ask(page, 'Write a Python function that adds two numbers.');
  await streamed;
  console.log(`reply: ${JSON.stringify(first.source)}\n  ${first.stats}`);
  assert.ok(first.source.length > 0);
  // what the engine wrote is what the page keeps and renders (Markdown's marks aside)
  const rendered = await page.evaluate(async (s) => {
    const { renderMarkdown } = await import('./render.js');
    const d = document.createElement('div');
    d.append(renderMarkdown(s));
    return d.innerHTML;
  }, first.source);
  assert.equal(first.html, rendered);
  // SmolLM2 answers this greedily with a fenced Python block
  assert.match(first.source, /^```python\n/, 'SmolLM2 no longer starts its answer with a code block: choose another question');
  assert.ok(first.html.includes('<div class="code-block" data-lang="python">'), 'the fenced block in the reply did not render as one');
  assert.equal(await page.textContent('#announce'), first.text, 'the live region did not get the reply');
  await shot(page, 'reply-desktop-light');
  await page.setViewportSize(PHONE);
  await page.emulateMedia({ colorScheme: 'dark' });
  await page.waitForFunction(() => getComputedStyle(document.querySelector('#side')).visibility === 'hidden');
  await shot(page, 'reply-phone-dark');
  await page.setViewportSize(DESKTOP);
  // regenerate: greedy again, the same reply, still one reply on the page
  await page.getByRole('button', { name: 'Regenerate the reply' }).click();
  await page.waitForFunction(() => document.querySelector('#stats').textContent.includes('tok/s'), null, { timeout: LONG });
  const again = await lastReply(page);
  assert.equal(again.source, first.source);
  assert.equal(await page.$$eval('.msg.assistant', (e) => e.length), 1);
  // the conversation is in the list, titled by its question
  const title = 'Write a Python function that adds two numbers.';
  await page.waitForSelector(`#conversations .conv-open[aria-current]:has-text("${title}")`);
  // a reload: the same conversation, from IndexedDB
  await page.close();
  page = await openPage();
  await page.waitForSelector('.msg.assistant');
  assert.equal((await lastReply(page)).source, first.source);
  assert.equal(await page.textContent('.msg.user'), title);
  // edit: the question goes back into the composer, the turn leaves the page and the store
  await page.getByRole('button', { name: 'Edit your last message' }).click();
  assert.equal(await page.inputValue('#input'), title);
  assert.equal(await page.$$eval('.turn', (t) => t.length), 0);
  // rename, then delete
  await page.click('#conversations li:has(.conv-open[aria-current]) .conv-rename');
  await page.fill('#conversations input.rename', 'Adding numbers');
  await page.press('#conversations input.rename', 'Enter');
  await page.waitForSelector('#conversations .conv-open:has-text("Adding numbers")');
  const stored = await page.evaluate(async () => (await import('./store.js')).listConversations());
  const renamed = stored.find((c) => c.title === 'Adding numbers');
  assert.ok(renamed, 'the new name was not stored');
  assert.deepEqual(renamed.messages, []);
  await page.click('#conversations li:has(.conv-open:has-text("Adding numbers")) .conv-delete');
  await page.waitForFunction(() => !document.querySelector('#conversations').textContent.includes('Adding numbers'));
  const left = await page.evaluate(async () => (await import('./store.js')).listConversations());
  assert.equal(left.find((c) => c.title === 'Adding numbers'), undefined);
  await page.close();
});

test('with no room to store the model, it loads all the same and the page says why', { timeout: LONG }, async () => {
  const tiny = await startServer({ root: WWW, models: TINY_DIR });
  const page = await ctx.newPage();
  try {
    page.on('pageerror', (e) => console.log(`[page error] ${e.message}`));
    const cdp = await ctx.newCDPSession(page);
    await cdp.send('Storage.overrideQuotaForOrigin', { origin: tiny.url, quotaSize: 64 * 1024 });
    await page.goto(`${tiny.url}/`);
    await page.waitForFunction(() => window.nomoat?.ready, null, { timeout: 60_000 });
    // the page's Service Worker in control (as on every visit after the first): its copy of a
    // file finding no room must not cost the page the file (the engine's wasm failed to load)
    await page.evaluate(() => navigator.serviceWorker.ready);
    await page.reload();
    await page.waitForFunction(() => window.nomoat?.ready, null, { timeout: 60_000 });
    assert.ok(await page.evaluate(() => !!navigator.serviceWorker.controller), 'the Service Worker does not control the page');
    assert.ok(await page.evaluate(() => !!window.nomoat.engine), `no engine: ${await page.textContent('#error')} / ${await page.textContent('#device')}`);
    await page.fill('#model-url', `models/${TINY}`);
    await page.click('#load-url');
    await page.waitForFunction(() => document.querySelector('#model-info').textContent.includes('layers') || !document.querySelector('#error').hidden, null, { timeout: LONG });
    assert.equal(await page.$eval('#error', (e) => (e.hidden ? '' : e.textContent)), '', 'the load failed');
    await page.waitForSelector('#notice:not([hidden])');
    assert.match(await page.textContent('#notice'), /No room to store this model on this device \(it takes 443 KiB\): it stays loaded/);
    assert.deepEqual(await page.evaluate(async () => (await import('./nomoat.js')).Nomoat.cachedModels()), []);
    // (navigator.storage.estimate() does not report CDP's override: only the line's shape is checked)
    assert.match(await page.textContent('#storage'), /^\d+ [KMG]i?B used of the [\d.]+ [KMG]iB this browser lets the page keep$/);
    await shot(page, 'quota-desktop-light');
    // the model kept in memory works (the tiny models have no chat template: a raw completion)
    const r = await page.evaluate(async () => {
      const reply = window.nomoat.engine.complete('Once upon a time', { maxTokens: 4, temperature: 0 });
      for await (const _ of reply);
      return reply.result;
    });
    assert.equal(r.tokens, 4);
  } finally {
    await page.close();
    await tiny.close();
  }
});

test('the catalog lists the models by name with their sizes; one loads with its recommended sampling', { timeout: LONG }, async () => {
  const page = await openPage();
  await page.waitForSelector('#catalog li[data-model]', { timeout: 60_000 });
  const rows = await page.$$eval('#catalog li[data-model]', (els) => els.map((e) => ({ name: e.dataset.model, text: e.textContent, here: !e.querySelector('button').disabled })));
  assert.deepEqual(rows.map((r) => r.name).sort(), ['gemma-3-270m', 'qwen2.5-coder-0.5b-instruct', 'smollm2-135m-instruct']);
  // this test server has the cache's models: every one can be loaded from it
  assert.ok(rows.every((r) => r.here), JSON.stringify(rows));
  assert.match(rows.find((r) => r.name === 'qwen2.5-coder-0.5b-instruct').text, /468\.6 MiB · Apache-2\.0 · context 32,768 · chat/);
  // a GPU memory limit marks what is over it
  await page.fill('#max-gpu-memory', '200');
  await page.waitForFunction(() => document.querySelector('#catalog li[data-model="gemma-3-270m"]')?.textContent.includes('over your GPU memory limit'));
  assert.ok(!(await page.textContent('#catalog li[data-model="smollm2-135m-instruct"]')).includes('over your'));
  await page.fill('#max-gpu-memory', '');
  await page.waitForFunction(() => !document.querySelector('#catalog').textContent.includes('over your GPU memory limit'));
  await page.click('#catalog li[data-model="smollm2-135m-instruct"] button');
  await page.waitForFunction(() => document.querySelector('#model-info').textContent.includes('layers') || !document.querySelector('#error').hidden, null, { timeout: LONG });
  assert.equal(await page.$eval('#error', (e) => (e.hidden ? '' : e.textContent)), '');
  // the catalog's recommendation for SmolLM2 (temperature 0.2, top-p 0.9), as the CLI uses it
  assert.equal(await page.inputValue('#temperature'), '0.2');
  assert.equal(await page.inputValue('#top-p'), '0.9');
  await shot(page, 'catalog');
  await page.close();
});

test('axe-core finds no serious accessibility violation', { timeout: LONG }, async () => {
  const report = [];
  // a conversation on the page: the turns, their buttons and a rendered reply are scanned too
  const setup = await openPage({ waitReady: false });
  await storeConversation(setup, { id: 'axe-check', title: 'Accessibility check', model: MODEL, messages: [{ role: 'user', content: 'Show me code' }, { role: 'assistant', content: HOSTILE_REPLY }] });
  await setup.close();
  for (const [name, viewport, colorScheme, drawer] of [
    ['desktop-light', DESKTOP, 'light', false],
    ['desktop-dark', DESKTOP, 'dark', false],
    ['phone-drawer-dark', PHONE, 'dark', true],
  ]) {
    const page = await openPage({ viewport, colorScheme });
    await page.waitForSelector('.msg.assistant .code-block');
    if (drawer) {
      await page.click('#menu-toggle');
      await page.waitForFunction(() => getComputedStyle(document.querySelector('#side')).transform === 'none');
    }
    await shot(page, `axe-${name}`);
    await page.addScriptTag({ path: AXE });
    const result = await page.evaluate(() => window.axe.run(document, { resultTypes: ['violations'] }));
    for (const v of result.violations) {
      const line = `${name}: ${v.impact} ${v.id}: ${v.help} (${v.nodes.map((n) => n.target.join(' ')).join(', ')})`;
      console.log(line);
      if (v.impact === 'serious' || v.impact === 'critical') report.push(line);
    }
    await page.close();
  }
  assert.deepEqual(report, []);
});

test('offline: with the server gone the page reopens, keeps its conversation, and the stored model replies', { timeout: LONG }, async () => {
  let page = await openPage();
  const stored = await page.evaluate(async () => (await import('./nomoat.js')).Nomoat.cachedModels());
  if (!stored.some((m) => m.url.endsWith(MODEL))) await loadModel(page); // run alone, this test stores it first
  await page.evaluate(() => navigator.serviceWorker.ready);
  await page.waitForFunction(() => !!navigator.serviceWorker.controller, null, { timeout: 30_000 });
  await storeConversation(page, { id: 'offline-check', title: 'Offline check', model: MODEL, messages: [{ role: 'user', content: 'Kept offline?' }, { role: 'assistant', content: 'Yes: **kept**.' }] });
  // installable: Chromium reads the manifest with no error and names nothing missing
  const cdp = await ctx.newCDPSession(page);
  const manifest = await cdp.send('Page.getAppManifest');
  assert.deepEqual(manifest.errors, [], 'the web app manifest has errors');
  assert.match(manifest.url, /manifest\.webmanifest$/);
  const { installabilityErrors } = await cdp.send('Page.getInstallabilityErrors');
  assert.deepEqual(installabilityErrors, []);
  await page.close();
  await server.close();
  page = await openPage();
  assert.equal(await page.textContent('.msg.assistant strong'), 'kept');
  await loadModel(page);
  assert.match(await page.textContent('#model-info'), /from the cache/);
  await page.fill('#temperature', '0');
  await page.fill('#max-tokens', '6');
  const r = await ask(page, 'Say hello.');
  assert.ok(r.source.length > 0);
  await shot(page, 'offline-desktop-light');
  await page.close();
});
