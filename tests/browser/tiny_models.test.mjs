// Every model family against llama.cpp in Chromium (WebGPU on SwiftShader), as
// tests/tests/tiny_models.rs does natively: each tiny seeded-random F32 model of
// tests/data/tiny/refs.json (made by tests/reference/make_tiny_models.py) is streamed into one
// engine on one page (nomoat.js → worker → Engine.logits, an F32 KV cache as the references),
// and for each case the last position's logits must be within MAX_ABS of llama.cpp's (of the
// float32 forward pass's where refs.json has them: Gemma's GELU goes through an f16 table in
// ggml-cpu) with the same argmax. The references' every-position sequence is also checked at
// each position, fed one token a call (the decode path; natively it is one batched eval).
// Greedy decoding: from the len7 case, GREEDY tokens chosen by argmax of the page's logits,
// one token a call, equal those the native CLI picks (`nomoat logits --ids`, prefill of the
// whole sequence each step), except after a near-tie (a top-2 gap within the logits bound).
// Run: node --test --test-concurrency=1 tests/browser/tiny_models.test.mjs (after scripts/build-web.sh)
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startServer, enginePage, CHROMIUM_ARGS } from './server.mjs';
import { nativeTopLogits } from './native.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const TINY = path.join(ROOT, 'tests/data/tiny');
const REFS = JSON.parse(fs.readFileSync(path.join(TINY, 'refs.json'), 'utf8'));
// The native bound (tests/tests/tiny_models.rs: natively ≤ 7.6e-6 on lavapipe; the qwen2
// weights with the wrong RoPE differ by 6.7, llama.cpp's own F16 KV cache by 4.6e-3).
// SwiftShader (no shader-f16: the f32 kernels; its own exp/sin/cos) stays within it too: see
// the max-abs this test prints per model.
const MAX_ABS = 1e-3;
const GREEDY = 8;
const GREEDY_CASE = 'len7';
const N_CTX = 256;
const LONG = 300_000;

let server;
let ctx;
let page;
let userDir;

const argmax = (v) => v.reduce((best, x, i) => (x > v[best] ? i : best), 0);

function maxAbs(a, b) {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

before(async () => {
  server = await startServer({ root: path.join(ROOT, 'www'), models: TINY });
  userDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nomoat-chromium-'));
  ctx = await chromium.launchPersistentContext(userDir, { executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });
  let device;
  ({ page, device } = await enginePage(ctx, server));
  console.log(`device: ${device}`);
});

after(async () => {
  await page?.evaluate(() => window.engine?.terminate()).catch(() => {});
  await ctx?.close();
  await server?.close();
  if (userDir) fs.rmSync(userDir, { recursive: true, force: true });
});

/** Loads `file` in the page and evaluates everything the checks need there. */
function inPage(m) {
  const allCase = m.cases.find((c) => c.name === m.all_positions.case);
  const greedyCase = m.cases.find((c) => c.name === GREEDY_CASE);
  const args = { file: m.file, nCtx: N_CTX, cases: m.cases.map((c) => ({ name: c.name, ids: c.ids })), allIds: allCase.ids, greedyIds: greedyCase.ids, n: GREEDY };
  return page.evaluate(async ({ file, nCtx, cases, allIds, greedyIds, n }) => {
    const e = window.engine;
    const t0 = performance.now();
    const info = await e.loadUrl(`models/${file}`, { nCtx, kv: 'f32', cache: false });
    const last = {};
    for (const c of cases) last[c.name] = Array.from(await e.logits(c.ids)); // from an empty cache
    const positions = [];
    for (let p = 0; p < allIds.length; p++) positions.push(Array.from(await e.logits(allIds.slice(0, p + 1), { reusePrefix: true })));
    const ids = [...greedyIds];
    const greedy = [];
    for (let i = 0; i < n; i++) {
      const l = Array.from(await e.logits(ids, { reusePrefix: i > 0 }));
      const order = l.map((x, id) => [x, id]).sort((a, b) => b[0] - a[0]);
      greedy.push({ id: order[0][1], margin: order[0][0] - order[1][0] });
      ids.push(order[0][1]);
    }
    await e.unload();
    return { info, last, positions, greedy, seconds: (performance.now() - t0) / 1000 };
  }, args);
}

/** The native CLI's greedy tokens from `ids`, with each step's top-2 gap. */
function nativeGreedy(file, start) {
  const ids = [...start];
  const out = [];
  for (let i = 0; i < GREEDY; i++) {
    const [a, b] = nativeTopLogits({ model: path.join(TINY, file), ids, top: 2, kv: 'f32', ctx: N_CTX });
    out.push({ id: a.id, margin: a.logit - b.logit });
    ids.push(a.id);
  }
  return out;
}

for (const m of REFS.models) {
  test(`${m.file} matches llama.cpp in Chromium (logits, argmax, greedy as native)`, { timeout: LONG }, async () => {
    const got = await inPage(m);
    const failures = [];
    const nVocab = m.cases[0].last.length;
    assert.equal(got.info.n_vocab, nVocab);
    assert.equal(got.info.architecture, m.arch);

    const notes = [];
    for (const c of m.cases) {
      const v = got.last[c.name];
      const d = maxAbs(v, c.f32_last ?? c.last);
      notes.push(`${c.name} ${d.toExponential(1)}`);
      if (!(d <= MAX_ABS)) failures.push(`${c.name}: max abs ${d} > ${MAX_ABS}`);
      if (argmax(v) !== argmax(c.last)) failures.push(`${c.name}: argmax ${argmax(v)} but llama.cpp ${argmax(c.last)}`);
    }
    const ap = m.all_positions;
    const tight = ap.f32_logits ?? ap.logits;
    assert.equal(got.positions.length, ap.logits.length);
    let worst = 0;
    ap.logits.forEach((want, p) => {
      const v = got.positions[p];
      const d = maxAbs(v, tight[p]);
      worst = Math.max(worst, d);
      if (!(d <= MAX_ABS)) failures.push(`${ap.case} position ${p}: max abs ${d} > ${MAX_ABS}`);
      if (argmax(v) !== argmax(want)) failures.push(`${ap.case} position ${p}: argmax ${argmax(v)} but llama.cpp ${argmax(want)}`);
    });
    notes.push(`all ${ap.logits.length} positions ${worst.toExponential(1)}`);

    // greedy: the first token is llama.cpp's argmax; then the page's tokens are the native CLI's
    const start = m.cases.find((c) => c.name === GREEDY_CASE);
    const native = nativeGreedy(m.file, start.ids);
    if (native[0].id !== argmax(start.last)) failures.push(`native greedy starts with ${native[0].id}, llama.cpp's argmax is ${argmax(start.last)}`);
    let compared = GREEDY;
    for (let i = 0; i < GREEDY; i++) {
      if (got.greedy[i].id === native[i].id) continue;
      if (native[i].margin < 2 * MAX_ABS) {
        // a near-tie: both picks are within the logits bound of the best; later tokens may differ
        console.log(`${m.file}: greedy step ${i} is a near-tie (native gap ${native[i].margin.toExponential(1)}): page ${got.greedy[i].id}, native ${native[i].id}`);
        compared = i;
        break;
      }
      failures.push(`greedy step ${i}: page ${got.greedy[i].id} (gap ${got.greedy[i].margin}), native ${native[i].id} (gap ${native[i].margin})`);
      compared = i;
      break;
    }
    const gap = (g) => Math.min(...g.slice(0, Math.max(compared, 1)).map((x) => x.margin)).toExponential(1);
    console.log(
      `${failures.length ? 'FAIL' : 'ok  '} ${m.file} (${got.seconds.toFixed(1)} s in the page): max abs ${notes.join(', ')}; ` +
        `greedy ${JSON.stringify(got.greedy.map((g) => g.id))} ${compared === GREEDY ? '= native' : `(native ${JSON.stringify(native.map((g) => g.id))})`}, ` +
        `smallest top-2 gap page ${gap(got.greedy)} / native ${gap(native)}`,
    );
    assert.deepEqual(failures, []);
  });
}
