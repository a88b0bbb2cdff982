#!/usr/bin/env node
// Browser vs native on the same device: Chromium's WebGPU runs on SwiftShader, and wgpu native
// can drive the very same SwiftShader through Chromium's Vulkan ICD. Both sides run the one
// benchmark routine (nomoat_runtime::generate::bench_once: pp from an empty cache, tg with each
// argmax read back) with the portable kernel variant (no shader-f16, no subgroups: what
// Chromium's SwiftShader offers), and this prints tok/s side by side with browser ÷ native.
// A benchmark, not a test: nothing here fails on speed.
//
//   scripts/build-web.sh && cargo build --release -p nomoat && node bench/browser-vs-native.mjs
// Options: --model FILE (default SmolLM2 in the model cache) --pp 32 --tg 16 --reps 2
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';
import { startServer, CHROMIUM_ARGS } from '../tests/browser/server.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const CACHE = process.env.NOMOAT_CACHE || path.join(os.homedir(), '.cache/nomoat');
const SWIFTSHADER_ICD = '/usr/lib/chromium/vk_swiftshader_icd.json';
const { values: opt } = parseArgs({
  options: {
    model: { type: 'string', default: path.join(CACHE, 'models/SmolLM2-135M-Instruct.Q4_1.gguf') },
    pp: { type: 'string', default: '32' },
    tg: { type: 'string', default: '16' },
    reps: { type: 'string', default: '2' },
  },
});
const [pp, tg, reps] = [Number(opt.pp), Number(opt.tg), Number(opt.reps)];
const mean = (v) => v.reduce((a, b) => a + b, 0) / v.length;

async function browser() {
  const server = await startServer({ root: path.join(ROOT, 'www'), models: path.dirname(path.resolve(opt.model)) });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nomoat-bench-'));
  const ctx = await chromium.launchPersistentContext(dir, { executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });
  try {
    const page = await ctx.newPage();
    await page.goto(`${server.url}/style.css`);
    const url = `${server.url}/models/${path.basename(opt.model)}`;
    return await page.evaluate(async ({ url, pp, tg, reps }) => {
      const { default: init, Engine } = await import('./pkg/nomoat_web.js');
      await init();
      const e = await Engine.create();
      await e.load_from_url(url, null, JSON.stringify({ n_ctx: pp + tg + 16, cache: false }));
      return JSON.parse(await e.bench(pp, tg, reps));
    }, { url, pp, tg, reps });
  } finally {
    await ctx.close();
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

function native() {
  const bin = path.join(process.env.CARGO_TARGET_DIR || path.join(ROOT, 'target'), 'release/nomoat');
  if (!fs.existsSync(bin)) throw new Error(`${bin} missing: cargo build --release -p nomoat`);
  const env = { ...process.env, VK_DRIVER_FILES: SWIFTSHADER_ICD, VK_ICD_FILENAMES: SWIFTSHADER_ICD, WGPU_BACKEND: 'vulkan', XDG_RUNTIME_DIR: process.env.XDG_RUNTIME_DIR || '/tmp' };
  const out = execFileSync(bin, ['bench', '-m', opt.model, '--portable', '-p', String(pp), '-n', String(tg), '-r', String(reps), '--json'], { env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
  const r = JSON.parse(out.trim().split('\n').pop());
  const get = (t) => r.tests.find((x) => x.test === t).samples;
  return { device: r.backend, prompt_tps: get(`pp${pp}`), gen_tps: get(`tg${tg}`) };
}

if (!fs.existsSync(SWIFTSHADER_ICD)) throw new Error(`${SWIFTSHADER_ICD} missing: apt-get install chromium`);
const n = native();
const b = await browser();
const row = (name, bv, nv) => `| ${name} | ${mean(bv).toFixed(2)} | ${mean(nv).toFixed(2)} | ${(mean(bv) / mean(nv)).toFixed(2)} |`;
console.log(`model: ${path.basename(opt.model)}, ${reps} repetitions, ${new Date().toISOString().slice(0, 10)}`);
console.log(`browser: ${b.device}`);
console.log(`native:  ${n.device}`);
console.log('| test | browser tok/s | native tok/s | browser / native |');
console.log('| --- | ---: | ---: | ---: |');
console.log(row(`pp${pp}`, b.prompt_tps, n.prompt_tps));
console.log(row(`tg${tg}`, b.gen_tps, n.gen_tps));
