// Fine-tuning in the browser (Chromium, WebGPU on SwiftShader), on the tiny llama model with
// quantized weights (tests/data/tiny/llama-mixed-tiny.gguf: Q4_0, Q8_0, F16; SwiftShader trains
// SmolLM2 at about 1 token/s, too slow for CI; bench/README.md has that run):
// - the JS API (`engine.finetune`) with the same seed as the native CLI (`nomoat finetune
//   --seed`) gives the same first steps' losses within LOSS_REL, and its adapter, loaded by
//   the native CLI, gives the native adapter's best logits within LOGIT_ABS;
// - the Train panel: pasted examples train an adapter that appears in the adapter list, on;
//   the loss chart draws; stop ends the loop with the adapter so far and resume goes on; the
//   adapter is kept in the page's storage and comes back when the model loads again.
// Run: node --test tests/browser/finetune.test.mjs   (after scripts/build-web.sh)
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startServer, CHROMIUM_ARGS } from './server.mjs';
import { nativeBinary, nativeTopLogits } from './native.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const MODEL_DIR = path.join(ROOT, 'tests/data/tiny');
const MODEL = 'llama-mixed-tiny.gguf';
const ARTIFACTS = path.join(ROOT, 'target/browser-artifacts');
const EXAMPLES = [
  { prompt: 'The capital of Zorbia is', completion: ' Quxville.' },
  { prompt: 'The river of Quxville is', completion: ' the Blorp.' },
  { prompt: 'Quxville was founded by', completion: ' Admiral Pennywhistle.' },
  { prompt: 'Zorbians eat', completion: ' glimmerfruit.' },
].map((e) => JSON.stringify(e)).join('\n');
const RUN = { steps: 4, batchTokens: 16, seed: 11, lr: 1e-2, rank: 8 };
// Native lavapipe may run f16 kernels where SwiftShader runs f32 ones, and the two sum in other
// orders: measured on SmolLM2 the losses differed by at most 3e-7 relative, the adapters'
// logits by 1e-5 (bench/README.md); these bounds are far from the difference another seed
// makes (checked below).
const LOSS_REL = 2e-3;
const LOGIT_ABS = 1e-3;
const LONG = 600_000;

let server;
let ctx;
let userDir;
let scratch;

function nativeRun(seed, out) {
  const data = path.join(scratch, 'train.jsonl');
  fs.writeFileSync(data, EXAMPLES);
  const args = ['finetune', '-m', path.join(MODEL_DIR, MODEL), '--data', data, '-o', out, '--json'];
  args.push('--steps', String(RUN.steps), '--batch-tokens', String(RUN.batchTokens), '--seed', String(seed), '--lr', String(RUN.lr), '--rank', String(RUN.rank));
  const stdout = execFileSync(nativeBinary(), args, { cwd: ROOT, encoding: 'utf8', env: { WGPU_BACKEND: 'vulkan', ...process.env }, stdio: ['ignore', 'pipe', 'pipe'] });
  return stdout.trim().split('\n').map((l) => JSON.parse(l).loss);
}

async function openPage() {
  const page = await ctx.newPage();
  page.on('pageerror', (e) => console.log(`[page error] ${e.message}`));
  page.on('console', (m) => m.type() === 'error' && !m.text().startsWith('Failed to load resource') && console.log(`[console] ${m.text()}`));
  await page.goto(`${server.url}/`);
  await page.waitForFunction(() => window.nomoat?.ready, null, { timeout: 60_000 });
  await page.fill('#model-url', `models/${MODEL}`);
  await page.click('#load-url');
  await page.waitForFunction(() => document.querySelector('#model-info').textContent.includes('layers') || !document.querySelector('#error').hidden, null, { timeout: LONG });
  assert.equal(await page.$eval('#error', (e) => (e.hidden ? '' : e.textContent)), '', 'the model did not load');
  return page;
}

before(async () => {
  assert.ok(fs.existsSync(path.join(MODEL_DIR, MODEL)), `${MODEL} missing`);
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'nomoat-finetune-'));
  server = await startServer({ root: path.join(ROOT, 'www'), models: MODEL_DIR });
  userDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nomoat-chromium-'));
  ctx = await chromium.launchPersistentContext(userDir, { executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS, viewport: { width: 1100, height: 900 } });
});

after(async () => {
  await ctx?.close();
  await server?.close();
  for (const d of [userDir, scratch]) if (d) fs.rmSync(d, { recursive: true, force: true });
});

test('the same seed gives the native losses and adapter in the browser', { timeout: LONG * 2 }, async () => {
  const nativeAdapter = path.join(scratch, 'native.gguf');
  const native = nativeRun(RUN.seed, nativeAdapter);
  const otherSeed = nativeRun(RUN.seed + 1, path.join(scratch, 'other.gguf'));
  const page = await openPage();
  const got = await page.evaluate(
    async ({ examples, run }) => {
      const training = window.nomoat.engine.finetune(examples, { ...run, name: 'same-seed' });
      const steps = [];
      for await (const p of training) if (p.type === 'step') steps.push(p);
      const r = await training;
      return { losses: steps.map((p) => p.loss), tokS: steps.map((p) => p.tokensPerSecond), finished: r.finished, bytes: Array.from(r.bytes) };
    },
    { examples: EXAMPLES, run: RUN },
  );
  console.log(`native losses:     ${native.join(' ')}\nbrowser losses:    ${got.losses.join(' ')}\nother seed native: ${otherSeed.join(' ')}\nbrowser tok/s:     ${got.tokS.map((t) => t.toFixed(1)).join(' ')}`);
  assert.equal(got.losses.length, RUN.steps);
  assert.ok(got.finished);
  const rel = got.losses.map((l, i) => Math.abs(l - native[i]) / native[i]);
  console.log(`relative loss differences: ${rel.map((r) => r.toExponential(2)).join(' ')}`);
  for (const r of rel) assert.ok(r <= LOSS_REL, `browser and native losses differ by ${r} (bound ${LOSS_REL})`);
  // another seed takes the examples in another order: the bound can tell runs apart
  assert.ok(otherSeed.some((l, i) => Math.abs(l - native[i]) / native[i] > 10 * LOSS_REL), 'another seed gave the same losses');

  // the browser's adapter, in the native CLI, against the native run's adapter
  const browserAdapter = path.join(scratch, 'browser.gguf');
  fs.writeFileSync(browserAdapter, Buffer.from(got.bytes));
  const ids = [1, 40, 77, 120, 9, 200, 31];
  const logits = (lora) => nativeTopLogits({ model: path.join(MODEL_DIR, MODEL), ids, top: 5, ctx: 64, loras: lora ? [lora] : [] });
  const [fromNative, fromBrowser, base] = [logits(nativeAdapter), logits(browserAdapter), logits(null)];
  const diff = Math.max(...fromNative.map((t, i) => Math.abs(t.logit - fromBrowser[i].logit)));
  const moved = Math.max(...base.map((t, i) => Math.abs(t.logit - fromNative[i].logit)));
  console.log(`best logits: native adapter vs browser adapter max |diff| ${diff.toExponential(2)}; the adapter moved them by ${moved.toExponential(2)}`);
  assert.deepEqual(fromBrowser.map((t) => t.id), fromNative.map((t) => t.id));
  assert.ok(diff <= LOGIT_ABS, `logits differ by ${diff}`);
  assert.ok(moved > 10 * LOGIT_ABS, 'the adapter hardly changed the logits: the comparison could not fail');
  await page.close();
});

test('the Train panel trains, stops, resumes and keeps the adapter', { timeout: LONG * 2 }, async () => {
  let page = await openPage();
  await page.fill('#train-data', EXAMPLES);
  await page.fill('#train-name', 'zorbia');
  await page.fill('#train-epochs', '2'); // 4 short examples, 2048-token batches: 1 step an epoch
  await page.fill('#train-lr', '0.001');
  await page.click('#train-start');
  await page.waitForFunction(() => /trained|stopped|failed/.test(document.querySelector('#train-status').textContent) || !document.querySelector('#error').hidden, null, { timeout: LONG });
  assert.equal(await page.$eval('#error', (e) => (e.hidden ? '' : e.textContent)), '', 'training failed');
  const status = await page.$eval('#train-status', (e) => e.textContent);
  console.log(`status: ${status}`);
  assert.match(status, /^trained after 2 steps/);
  assert.equal(await page.$eval('#train-chart', (c) => c.hidden), false);
  const row = page.locator('#adapters li[data-name="zorbia"]');
  assert.equal(await row.locator('.adapter-on').isChecked(), true, 'the trained adapter is on in the chat');
  assert.equal(await row.locator('.adapter-download').isVisible(), true);
  const list = await page.evaluate(() => window.nomoat.engine.adapters());
  assert.deepEqual(list.filter((a) => a.active).map((a) => a.name), ['zorbia']);
  await page.screenshot({ path: path.join(ARTIFACTS, 'finetune-panel.png') });

  // stop after the first step of a longer run, then resume to the end
  await page.fill('#train-name', 'zorbia-long');
  await page.fill('#train-epochs', '100');
  await page.click('#train-start');
  await page.waitForFunction(() => document.querySelector('#train-status').textContent.startsWith('step '), null, { timeout: LONG });
  await page.click('#train-stop');
  await page.waitForFunction(() => document.querySelector('#train-status').textContent.startsWith('stopped'), null, { timeout: LONG });
  const stopped = await page.$eval('#train-status', (e) => e.textContent);
  const at = Number(stopped.match(/^stopped after (\d+) steps/)?.[1]);
  assert.ok(at >= 1 && at < 100, `stopped: ${stopped}`);
  assert.equal(await page.$eval('#train-resume', (b) => b.disabled), false);
  await page.click('#train-resume');
  await page.waitForFunction(() => /^(trained|stopped|training failed)/.test(document.querySelector('#train-status').textContent) && !document.querySelector('#train-status').textContent.startsWith('stopped after'), null, { timeout: LONG });
  assert.match(await page.$eval('#train-status', (e) => e.textContent), /^trained after 100 steps/);
  await page.close();

  // a new page: the adapters come back from storage when the model loads
  page = await openPage();
  await page.waitForSelector('#adapters li[data-name="zorbia"]', { timeout: LONG });
  await page.waitForSelector('#adapters li[data-name="zorbia-long"]', { timeout: LONG });
  const again = await page.evaluate(() => window.nomoat.engine.adapters());
  assert.deepEqual(again.map((a) => [a.name, a.active]).sort(), [['zorbia', false], ['zorbia-long', false]]);
  await page.close();
});

test('a run over the page\'s GPU memory limit is refused before it allocates; a smaller one then trains', { timeout: LONG }, async () => {
  // the engine loads through the API alone: the page's own load brings back the adapters the
  // tests before kept in its storage, and the engine is busy meanwhile
  const page = await ctx.newPage();
  await page.goto(`${server.url}/`);
  await page.waitForFunction(() => window.nomoat?.ready, null, { timeout: 60_000 });
  const got = await page.evaluate(
    async ({ examples, model }) => {
      const e = window.nomoat.engine;
      // the tiny model takes under 1 MiB; rank 64 on every projection takes about 3 MiB more
      for (let t = 0; ; t++) {
        try {
          await e.loadUrl(model, { maxGpuMemory: 2, nCtx: 64 });
          break;
        } catch (err) {
          if (err.name !== 'Busy' || t > 300) throw err;
          await new Promise((r) => setTimeout(r, 200));
        }
      }
      const outcome = async (rank) => {
        const run = e.finetune(examples, { steps: 1, batchTokens: 16, seed: 1, rank, name: `r${rank}` });
        let start = null;
        try {
          for await (const p of run) if (p.type === 'start') start = p;
          const r = await run;
          return { ok: true, start, bytes: r.bytes?.length ?? 0 };
        } catch (err) {
          return { ok: false, name: err.name, message: err.message };
        }
      };
      return { big: await outcome(64), small: await outcome(8) };
    },
    { examples: EXAMPLES, model: `models/${MODEL}` },
  );
  console.log(JSON.stringify(got));
  assert.equal(got.big.ok, false);
  assert.equal(got.big.name, 'OutOfMemory');
  assert.match(got.big.message, /^fine-tuning needs \d+ MiB of GPU memory beside the model .* over the 2 MiB allowed: lower the rank/);
  assert.ok(got.small.ok, JSON.stringify(got.small));
  assert.ok(got.small.start.memory_mib.adapters >= 1 && got.small.bytes > 0);
  await page.close();
});
