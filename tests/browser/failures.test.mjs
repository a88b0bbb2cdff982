// The page when things go wrong that a user cannot fix by retrying: a model of an architecture
// nomoat does not run, a weight type it does not run, and the GPU device lost mid-session. Each
// shows a named error on the page, and the page works after (another model loads; after a lost
// device, a reload brings the model back from the cache and it answers).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startServer, CHROMIUM_ARGS } from './server.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const TINY = path.join(ROOT, 'tests/data/tiny');
const MODELS = path.join(process.env.NOMOAT_CACHE || path.join(os.homedir(), '.cache/nomoat'), 'models');
const SMOL = 'SmolLM2-135M-Instruct.Q4_1.gguf';
const ARTIFACTS = path.join(ROOT, 'target/browser-artifacts');
const LONG = 600_000;

let tinyServer;
let smolServer;
let ctx;
let userDir;

before(async () => {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  tinyServer = await startServer({ root: path.join(ROOT, 'www'), models: TINY });
  smolServer = await startServer({ root: path.join(ROOT, 'www'), models: MODELS });
  userDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nomoat-chromium-'));
  ctx = await chromium.launchPersistentContext(userDir, { executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });
});

after(async () => {
  await ctx?.close();
  await tinyServer?.close();
  await smolServer?.close();
  if (userDir) fs.rmSync(userDir, { recursive: true, force: true });
});

async function openPage(server) {
  const page = await ctx.newPage();
  page.on('pageerror', (e) => console.log(`[page error] ${e.message}`));
  await page.goto(`${server.url}/`);
  await page.waitForFunction(() => window.nomoat?.ready, null, { timeout: 60_000 });
  return page;
}

/** Loads from the URL field; resolves to the error shown, or '' once the model is in. */
async function loadUrl(page, url) {
  await page.fill('#model-url', url);
  await page.click('#load-url');
  await page.waitForFunction(
    () => document.querySelector('#model-info').textContent.includes('layers') || !document.querySelector('#error').hidden,
    null,
    { timeout: LONG },
  );
  return page.$eval('#error', (e) => (e.hidden ? '' : e.textContent));
}

/** Loads bytes through the file input; resolves to the error shown. */
async function loadBytes(page, name, buffer) {
  await page.setInputFiles('#model-file', { name, mimeType: 'application/octet-stream', buffer });
  await page.waitForSelector('#error:not([hidden])', { timeout: LONG });
  return page.textContent('#error');
}

/** llama-tiny.gguf with one header field rewritten in place (same length). */
function patched(edit) {
  const b = Buffer.from(fs.readFileSync(path.join(TINY, 'llama-tiny.gguf')));
  edit(b);
  return b;
}

test('a model of an unknown architecture, or with a weight type nomoat does not run, is named; the page goes on', { timeout: LONG }, async () => {
  const page = await openPage(tinyServer);
  // general.architecture = "mamba": the key, its type (u32 string), its length (u64), the value
  const arch = patched((b) => {
    const at = b.indexOf('general.architecture') + 'general.architecture'.length + 4 + 8;
    assert.equal(b.toString('latin1', at, at + 5), 'llama');
    b.write('mamba', at, 'latin1');
  });
  const archErr = await loadBytes(page, 'mamba.gguf', arch);
  console.log(`unknown architecture: ${archErr}`);
  assert.match(archErr, /^UnsupportedModel: .*mamba/);
  // blk.0.attn_q.weight stored as I32 (4 bytes an element like its F32: sizes still match)
  const ty = patched((b) => {
    const name = 'blk.0.attn_q.weight';
    const at = b.indexOf(name) + name.length + 4 + 2 * 8; // n_dims, two dims, then the type
    assert.equal(b.readUInt32LE(at), 0); // F32
    b.writeUInt32LE(26, at); // I32
  });
  const tyErr = await loadBytes(page, 'i32.gguf', ty);
  console.log(`unsupported type: ${tyErr}`);
  assert.match(tyErr, /^UnsupportedModel: .*I32/);
  await page.screenshot({ path: path.join(ARTIFACTS, 'unsupported.png') });
  // the page goes on: the real model loads; a context over its training context is lowered to
  // it and the page says so (as the CLI and the server do)
  // the KV cache type chosen on the page reaches the engine: q8_0 refuses the tiny model's
  // 16-wide heads with the reason, and the page goes on with f16
  await page.selectOption('#kv', 'q8_0');
  const kvErr = await loadUrl(page, 'models/llama-tiny.gguf');
  console.log(`q8_0 on 16-wide heads: ${kvErr}`);
  assert.match(kvErr, /q8_0/);
  await page.selectOption('#kv', 'f16');
  await page.fill('#n-ctx', '4096');
  assert.equal(await loadUrl(page, 'models/llama-tiny.gguf'), '');
  assert.match(await page.textContent('#model-info'), /KV cache f16/);
  assert.match(await page.textContent('#model-info'), /context 256 \(4096 asked for: the model was trained on 256\)/);
  await page.close();
});

test('the WebGPU implementation running out of memory is named on the page; the page goes on', { timeout: LONG }, async () => {
  // A real out-of-memory from the implementation, not the page's own limit: SwiftShader cannot
  // allocate a buffer of its whole 1 GiB limit (vkAllocateMemory: VK_ERROR_OUT_OF_DEVICE_MEMORY),
  // and an f32 KV cache of 2^23 tokens gives the tiny model (2 kv heads of 16) layers of exactly
  // 1 GiB. No limit is set on the page, so nothing refuses it before the device does.
  const page = await openPage(tinyServer);
  const long = patched((b) => {
    const at = b.indexOf('llama.context_length') + 'llama.context_length'.length + 4;
    assert.equal(b.readUInt32LE(at), 256);
    b.writeUInt32LE(1 << 23, at);
  });
  await page.selectOption('#kv', 'f32');
  await page.fill('#n-ctx', String(1 << 23));
  const err = await loadBytes(page, 'long-context.gguf', long);
  console.log(`out of GPU memory: ${err}`);
  assert.match(err, /^OutOfMemory: out of GPU memory while allocating k cache \(1073741824 bytes requested\) — try a smaller model or a smaller context$/);
  await page.screenshot({ path: path.join(ARTIFACTS, 'out-of-memory.png') });
  // the page goes on: the same model with a context that fits loads (the tiny model has no chat
  // template to reply with; the lost-device test below has the page reply after a failure)
  await page.fill('#n-ctx', '256');
  await page.setInputFiles('#model-file', { name: 'long-context.gguf', mimeType: 'application/octet-stream', buffer: long });
  await page.waitForFunction(() => document.querySelector('#model-info').textContent.includes('context 256') || !document.querySelector('#error').hidden, null, { timeout: LONG });
  assert.equal(await page.$eval('#error', (e) => (e.hidden ? '' : e.textContent)), '');
  assert.match(await page.textContent('#model-info'), /KV cache f32/);
  await page.close();
});

test('a lost GPU device is named on the page, and a reload brings the model back', { timeout: LONG }, async () => {
  let page = await openPage(smolServer);
  await page.click('#new-chat');
  assert.equal(await loadUrl(page, `models/${SMOL}`), '');
  await page.evaluate(() => window.nomoat.engine.worker.postMessage({ id: 1e9, op: 'simulateDeviceLoss' }));
  await page.fill('#input', 'What is the capital of France?');
  await page.press('#input', 'Enter');
  await page.waitForSelector('#error:not([hidden])', { timeout: LONG });
  const err = await page.textContent('#error');
  console.log(`device lost: ${err}`);
  assert.match(err, /DeviceLost: .*reload the page/);
  await page.screenshot({ path: path.join(ARTIFACTS, 'device-lost.png') });
  await page.close();
  // a reload: a new device, the model from the cache (with a q8_0 KV cache), a reply
  page = await openPage(smolServer);
  await page.click('#new-chat');
  await page.selectOption('#kv', 'q8_0');
  assert.equal(await loadUrl(page, `models/${SMOL}`), '');
  assert.match(await page.textContent('#model-info'), /KV cache q8_0/);
  await page.fill('#max-tokens', '8');
  await page.fill('#input', 'What is the capital of France?');
  await page.press('#input', 'Enter');
  await page.waitForFunction(() => document.querySelector('#stats').textContent.includes('tok/s') || !document.querySelector('#error').hidden, null, { timeout: LONG });
  assert.equal(await page.$eval('#error', (e) => (e.hidden ? '' : e.textContent)), '');
  await page.close();
});
