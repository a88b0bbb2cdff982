// LoRA adapters on the chat page (Chromium, WebGPU on SwiftShader): add adapter files, toggle
// them and set their scales while chatting; the greedy replies equal the native CLI's with the
// same adapters and scales (`nomoat chat --lora FILE:SCALE`), switching them off gives the base
// model's reply again, and an adapter made for another model is refused on the page.
// Run: node --test tests/browser/   (after scripts/build-web.sh)
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startServer, CHROMIUM_ARGS } from './server.mjs';
import { nativeReply as nativeReplyOf } from './native.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const CACHE = process.env.NOMOAT_CACHE || path.join(os.homedir(), '.cache/nomoat');
const MODEL_DIR = path.join(CACHE, 'models');
const MODEL = 'SmolLM2-135M-Instruct.Q4_1.gguf';
const LORA = path.join(ROOT, 'tests/data/lora');
const ATTN = path.join(LORA, 'SmolLM2-135M-Instruct.Q4_1.attn_r8.gguf');
const FFN = path.join(LORA, 'SmolLM2-135M-Instruct.Q4_1.ffn_r16.gguf');
const OTHER_MODEL = path.join(LORA, 'gemma-3-270m-q4_k_m.attn_r8.gguf');
const ARTIFACTS = path.join(ROOT, 'target/browser-artifacts');
const QUESTION = 'Write a haiku about rain.'; // the random test adapters change this reply
const N = 12;
const LONG = 600_000;

let server;
let ctx;
let userDir;

const nativeReply = (loras) => nativeReplyOf({ model: path.join(MODEL_DIR, MODEL), question: QUESTION, maxTokens: N, loras });

async function replyTo(page) {
  await page.click('#new-chat');
  await page.fill('#input', QUESTION);
  await page.press('#input', 'Enter');
  await page.waitForFunction(
    () => document.querySelector('#stats').textContent.includes('tok/s') || !document.querySelector('#error').hidden,
    null,
    { timeout: LONG },
  );
  assert.equal(await page.$eval('#error', (e) => (e.hidden ? '' : e.textContent)), '', 'the reply failed');
  return page.$eval('.msg.assistant', (e) => e.dataset.source); // the reply's text, not its Markdown rendering
}

/** What the engine says is active: [[name, scale]] */
async function active(page) {
  const list = await page.evaluate(() => window.nomoat.engine.adapters());
  return list.filter((a) => a.active).map((a) => [a.name, a.scale]);
}

async function settle(page) {
  await page.waitForFunction(() => !document.querySelector('#adapter-file').disabled, null, { timeout: LONG });
}

async function setAdapter(page, name, { on, scale }) {
  const row = page.locator(`#adapters li[data-name="${name}"]`);
  if (scale != null) {
    await row.locator('.adapter-scale').fill(String(scale));
    await row.locator('.adapter-scale').dispatchEvent('change');
    await settle(page);
  }
  if (on != null) {
    await row.locator('.adapter-on').setChecked(on);
    await settle(page);
  }
}

before(async () => {
  for (const f of [ATTN, FFN, OTHER_MODEL, path.join(MODEL_DIR, MODEL)]) assert.ok(fs.existsSync(f), `${f} missing`);
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  server = await startServer({ root: path.join(ROOT, 'www'), models: MODEL_DIR });
  userDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nomoat-chromium-'));
  ctx = await chromium.launchPersistentContext(userDir, { executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS, viewport: { width: 1100, height: 800 } });
});

after(async () => {
  await ctx?.close();
  await server?.close();
  if (userDir) fs.rmSync(userDir, { recursive: true, force: true });
});

test('adapters added, toggled and scaled on the page give the native replies', { timeout: LONG * 3 }, async () => {
  const base = nativeReply([]);
  const stacked = nativeReply([`${ATTN}:2`, `${FFN}:2`]);
  const ffnOnly = nativeReply([`${FFN}:2`]);
  console.log(`native base:    ${JSON.stringify(base)}\nnative stacked: ${JSON.stringify(stacked)}\nnative ffn:     ${JSON.stringify(ffnOnly)}`);
  // the adapters must change the reply, or the comparisons below could not fail
  assert.notEqual(stacked, base);
  assert.notEqual(ffnOnly, base);
  assert.notEqual(ffnOnly, stacked);

  const page = await ctx.newPage();
  page.on('pageerror', (e) => console.log(`[page error] ${e.message}`));
  await page.goto(`${server.url}/`);
  await page.waitForFunction(() => window.nomoat?.ready, null, { timeout: 60_000 });
  await page.fill('#model-url', `models/${MODEL}`);
  await page.click('#load-url');
  await page.waitForFunction(() => document.querySelector('#model-info').textContent.includes('layers') || !document.querySelector('#error').hidden, null, { timeout: LONG });
  await page.fill('#temperature', '0');
  await page.fill('#max-tokens', String(N));

  await page.setInputFiles('#adapter-file', ATTN);
  await page.waitForSelector('#adapters li[data-name$="attn_r8"]', { timeout: LONG });
  await page.setInputFiles('#adapter-file', FFN);
  await page.waitForSelector('#adapters li[data-name$="ffn_r16"]', { timeout: LONG });
  await settle(page);
  assert.deepEqual(await active(page), []); // added adapters start inactive
  const attn = path.basename(ATTN, '.gguf');
  const ffn = path.basename(FFN, '.gguf');

  await setAdapter(page, attn, { scale: 2, on: true });
  await setAdapter(page, ffn, { scale: 2, on: true });
  assert.deepEqual(await active(page), [[attn, 2], [ffn, 2]]);
  const gotStacked = await replyTo(page);
  await page.screenshot({ path: path.join(ARTIFACTS, 'lora-stacked.png') });
  assert.equal(gotStacked, stacked);

  await setAdapter(page, attn, { on: false });
  assert.equal(await replyTo(page), ffnOnly);

  await setAdapter(page, ffn, { on: false });
  assert.equal(await replyTo(page), base);

  // removing frees the adapter; the page stays usable
  await page.click(`#adapters li[data-name="${attn}"] .adapter-remove`);
  await page.waitForSelector(`#adapters li[data-name="${attn}"]`, { state: 'detached', timeout: LONG });

  // an adapter for another model is refused with the tensor that does not fit
  await page.setInputFiles('#adapter-file', OTHER_MODEL);
  await page.waitForSelector('#error:not([hidden])', { timeout: LONG });
  const err = await page.textContent('#error');
  console.log(`other model's adapter: ${err}`);
  assert.match(err, /InvalidAdapter: .*(gemma3|architecture|blk\.)/);
  await page.screenshot({ path: path.join(ARTIFACTS, 'lora-wrong-model.png') });
  await settle(page);
  assert.equal(await page.isDisabled('#send'), false);
  assert.equal(await replyTo(page), base);
  await page.close();
});
