#!/usr/bin/env node
// nomoat vs llama.cpp's Vulkan backend on the same device, in one run: pp128 and tg128 tok/s for
// both test models, model load time and time to first token for a 32-token prompt, the ratio
// nomoat / llama.cpp, and the device's decode ceiling (weight bytes read per token ÷ the GB/s
// of the plain f32 matvec kernel, measured by `nomoat bench` in this run) with the fraction of
// it nomoat's tg128 reaches. A benchmark, not a test: it prints, it does not judge.
//
// The peer runs without compiling anything: npm node-llama-cpp ships a prebuilt Vulkan build
// (installed on first use under $NOMOAT_CACHE/llama-node). llama.cpp skips CPU-type Vulkan
// devices (lavapipe) unless GGML_VK_VISIBLE_DEVICES=0 is set, which this script does.
//
//   cargo build --release -p nomoat && node bench/compare.mjs [--pp 128] [--tg 128] [--reps 1]
//   [--models a.gguf,b.gguf] [--json out.json]
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const CACHE = process.env.NOMOAT_CACHE || path.join(os.homedir(), '.cache/nomoat');
const PEER_DIR = path.join(CACHE, 'llama-node');
const PEER_VERSION = '3.22.1';
const { values: opt } = parseArgs({
  options: {
    pp: { type: 'string', default: '128' },
    tg: { type: 'string', default: '128' },
    reps: { type: 'string', default: '1' },
    models: { type: 'string', default: ['SmolLM2-135M-Instruct.Q4_1.gguf', 'gemma-3-270m-q4_k_m.gguf'].map((m) => path.join(CACHE, 'models', m)).join(',') },
    json: { type: 'string' },
  },
});
const [PP, TG, REPS] = [Number(opt.pp), Number(opt.tg), Number(opt.reps)];
const mean = (v) => v.reduce((a, b) => a + b, 0) / v.length;
// the same prompt ids nomoat's bench feeds (generate::bench_ids)
const benchIds = (n, vocab) => Array.from({ length: n }, (_, i) => Number((BigInt(i) * 2654435761n + 12345n) % BigInt(vocab)));

async function peer() {
  const entry = path.join(PEER_DIR, 'node_modules/node-llama-cpp');
  if (!fs.existsSync(entry)) {
    fs.mkdirSync(PEER_DIR, { recursive: true });
    if (!fs.existsSync(path.join(PEER_DIR, 'package.json'))) fs.writeFileSync(path.join(PEER_DIR, 'package.json'), '{"name":"nomoat-bench-peer","private":true}\n');
    console.error(`installing node-llama-cpp@${PEER_VERSION} into ${PEER_DIR} ...`);
    execFileSync('npm', ['install', '--no-audit', '--no-fund', '--silent', `node-llama-cpp@${PEER_VERSION}`], { cwd: PEER_DIR, stdio: 'inherit' });
  }
  const require = createRequire(path.join(PEER_DIR, 'package.json'));
  return import(pathToFileURL(require.resolve('node-llama-cpp')).href);
}

function nomoat(model) {
  const bin = path.join(process.env.CARGO_TARGET_DIR || path.join(ROOT, 'target'), 'release/nomoat');
  if (!fs.existsSync(bin)) throw new Error(`${bin} missing: cargo build --release -p nomoat`);
  const env = { WGPU_BACKEND: 'vulkan', XDG_RUNTIME_DIR: '/tmp', ...process.env };
  const out = execFileSync(bin, ['bench', '-m', model, '-p', String(PP), '-n', String(TG), '-r', String(REPS), '--json'], { env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
  const r = JSON.parse(out.trim().split('\n').pop());
  const get = (t) => mean(r.tests.find((x) => x.test === t).samples);
  return { device: r.backend, pp: get(`pp${PP}`), tg: get(`tg${TG}`), load_s: r.load_s, ttft_ms: r.ttft32_ms, ceiling: r.decode_ceiling_tok_s, ceiling_std: r.decode_ceiling_tok_s_std, gbs: r.matvec_f32_gbs, gbs_std: r.matvec_f32_gbs_std, bytes: r.decode_bytes_per_token, n_vocab: r.n_vocab };
}

async function llamaCpp(lib, model, nVocab) {
  process.env.GGML_VK_VISIBLE_DEVICES ??= '0';
  // nomoat gives llvmpipe two pool threads per core unless LP_NUM_THREADS is set (see
  // native/src/main.rs); the peer gets the same setting, so that the ratio compares the two
  // runtimes on one driver configuration
  process.env.LP_NUM_THREADS ??= String(2 * os.availableParallelism());
  const llama = await lib.getLlama({ gpu: 'vulkan', build: 'never', logLevel: 'error' });
  const devices = await llama.getGpuDeviceNames();
  let t = performance.now();
  const m = await llama.loadModel({ modelPath: model, gpuLayers: 'max' });
  const load_s = (performance.now() - t) / 1000;
  const ctx = await m.createContext({ contextSize: PP + TG + 64, batchSize: Math.max(PP, 32), sequences: 1 });
  const seq = ctx.getSequence();
  const prompt = benchIds(PP, nVocab);
  const short = benchIds(32, nVocab);
  const time = async (f) => {
    const s = performance.now();
    await f();
    return (performance.now() - s) / 1000;
  };
  // warm-up: the first evaluation compiles the device's pipelines
  await seq.evaluateWithoutGeneratingNewTokens(short.slice(0, 8));
  await seq.clearHistory();
  const pp = [], tg = [];
  let ttft_ms = 0;
  {
    const s = performance.now();
    const it = seq.evaluate(short, { temperature: 0 });
    await it.next();
    ttft_ms = performance.now() - s;
    await it.return();
    await seq.clearHistory();
  }
  for (let r = 0; r < REPS; r++) {
    pp.push(PP / (await time(() => seq.evaluateWithoutGeneratingNewTokens(prompt))));
    await seq.clearHistory();
    // tg: one token at a time from an empty cache, greedy, each id back on the CPU
    let count = 0;
    const s = performance.now();
    for await (const _ of seq.evaluate([1], { temperature: 0 })) {
      if (++count >= TG) break;
    }
    tg.push(TG / ((performance.now() - s) / 1000));
    await seq.clearHistory();
  }
  await ctx.dispose();
  await m.dispose();
  return { device: devices.join(', '), pp: mean(pp), tg: mean(tg), load_s, ttft_ms };
}

const lib = await peer();
const rows = [];
for (const model of opt.models.split(',')) {
  if (!fs.existsSync(model)) throw new Error(`${model} missing: scripts/setup.sh fetches the test models`);
  const name = path.basename(model);
  console.error(`${name}: nomoat ...`);
  const a = nomoat(model);
  console.error(`${name}: llama.cpp (Vulkan) ...`);
  const b = await llamaCpp(lib, model, a.n_vocab);
  rows.push({ name, nomoat: a, llama: b });
}

const f = (x, d = 2) => x.toFixed(d);
console.log(`${new Date().toISOString().slice(0, 10)} · nomoat: ${rows[0].nomoat.device} · llama.cpp: node-llama-cpp ${PEER_VERSION}, Vulkan on ${rows[0].llama.device} · ${REPS} repetition(s)`);
console.log('');
console.log('| model | test | nomoat | llama.cpp Vulkan | nomoat / llama.cpp |');
console.log('| --- | --- | ---: | ---: | ---: |');
for (const { name, nomoat: a, llama: b } of rows) {
  console.log(`| ${name} | pp${PP} tok/s | ${f(a.pp)} | ${f(b.pp)} | ${f(a.pp / b.pp)}× |`);
  console.log(`| ${name} | tg${TG} tok/s | ${f(a.tg)} | ${f(b.tg)} | ${f(a.tg / b.tg)}× |`);
  console.log(`| ${name} | load s | ${f(a.load_s)} | ${f(b.load_s)} | ${f(b.load_s / a.load_s)}× faster |`);
  console.log(`| ${name} | TTFT (32-token prompt) ms | ${f(a.ttft_ms, 0)} | ${f(b.ttft_ms, 0)} | ${f(b.ttft_ms / a.ttft_ms)}× faster |`);
}
console.log('');
console.log('| model | weight MB read per token | plain f32 matvec GB/s (mean ± sd of 6) | decode ceiling tok/s | nomoat tg | of ceiling (within one sd) |');
console.log('| --- | ---: | ---: | ---: | ---: | ---: |');
for (const { name, nomoat: a } of rows) {
  console.log(`| ${name} | ${f(a.bytes / 1e6, 1)} | ${f(a.gbs)} ± ${f(a.gbs_std)} | ${f(a.ceiling, 1)} ± ${f(a.ceiling_std, 1)} | ${f(a.tg)} | ${f((100 * a.tg) / (a.ceiling + a.ceiling_std), 0)} to ${f((100 * a.tg) / (a.ceiling - a.ceiling_std), 0)}% |`);
}
if (opt.json) fs.writeFileSync(opt.json, JSON.stringify(rows, null, 2));
