// The npm package `nomoat` as a web developer gets it (packages/nomoat/README.md's steps):
// scripts/pack-npm.sh packs it, it installs from the tarball into a scratch project (no
// network), and
// - the tarball holds the module, the worker, the wasm engine and the types, nothing else;
// - tsc --noEmit (strict) passes over tests/browser/package/typed.ts, which calls every method
//   nomoat.js has, and whose `@ts-expect-error` misuses the declarations must refuse;
// - the README's page (package/index.html + main.js), bundled by esbuild with the worker and
//   pkg/ copied beside the bundle, streams a SmolLM2 reply in headless Chromium (WebGPU on
//   SwiftShader), fetching the worker and the wasm from dist/; the same main.js unbundled,
//   through an import map (package/plain.html), does too.
// Run: node --test tests/browser/package.test.mjs (after scripts/build-web.sh)
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { chromium } from 'playwright-core';
import { startServer, CHROMIUM_ARGS } from './server.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const FIXTURES = path.join(ROOT, 'tests/browser/package');
const MODEL_DIR = path.join(process.env.NOMOAT_CACHE || path.join(os.homedir(), '.cache/nomoat'), 'models');
const MODEL = 'SmolLM2-135M-Instruct.Q4_1.gguf';
const BIN = path.join(ROOT, 'node_modules/.bin');
const LONG = 300_000; // SwiftShader is a CPU

let tarball;
let scratch;
let server;
let ctx;
let userDir;

before(() => {
  assert.ok(fs.existsSync(path.join(MODEL_DIR, MODEL)), `${MODEL} is missing from ${MODEL_DIR}: run scripts/setup.sh`);
  tarball = execFileSync(path.join(ROOT, 'scripts/pack-npm.sh'), { cwd: ROOT, encoding: 'utf8' }).trim();
  scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'nomoat-npm-'));
  for (const f of fs.readdirSync(FIXTURES)) fs.copyFileSync(path.join(FIXTURES, f), path.join(scratch, f));
  fs.writeFileSync(path.join(scratch, 'package.json'), JSON.stringify({ name: 'scratch', private: true, type: 'module' }));
  // --offline: the package has no dependencies, so installing it must not need the registry
  execFileSync('npm', ['install', '--offline', '--no-audit', '--no-fund', '--silent', tarball], { cwd: scratch, stdio: ['ignore', 'inherit', 'inherit'] });
});

after(async () => {
  await ctx?.close();
  await server?.close();
  for (const d of [scratch, userDir]) if (d) fs.rmSync(d, { recursive: true, force: true });
});

test('the tarball holds the module, the worker, the wasm engine and the types', () => {
  const files = execFileSync('tar', ['tzf', tarball], { encoding: 'utf8' }).trim().split('\n').sort();
  const snippets = files.filter((f) => f.startsWith('package/pkg/snippets/'));
  assert.equal(snippets.length, 1, `one snippet (sources.js), got ${snippets}`);
  assert.match(snippets[0], /^package\/pkg\/snippets\/[^/]+\/js\/sources\.js$/);
  const expected = ['README.md', 'index.d.ts', 'nomoat.js', 'package.json', 'pkg/nomoat_web.js', 'pkg/nomoat_web_bg.wasm', 'worker.js'].map((f) => `package/${f}`);
  assert.deepEqual(files.filter((f) => !snippets.includes(f)), expected.sort());
  console.log(`${path.basename(tarball)}: ${(fs.statSync(tarball).size / 2 ** 20).toFixed(1)} MiB`);
});

test('the types cover every export and method, and refuse misuse (tsc --noEmit)', async () => {
  const installed = path.join(scratch, 'node_modules/nomoat');
  const mod = await import(pathToFileURL(path.join(installed, 'nomoat.js')).href);
  assert.deepEqual(Object.keys(mod).sort(), ['MODEL_CACHE', 'Nomoat', 'default']);
  const typed = fs.readFileSync(path.join(scratch, 'typed.ts'), 'utf8');
  const methods = [
    ...Object.getOwnPropertyNames(mod.Nomoat).filter((m) => typeof mod.Nomoat[m] === 'function'),
    ...Object.getOwnPropertyNames(mod.Nomoat.prototype).filter((m) => m !== 'constructor'),
  ];
  assert.ok(methods.length > 20, `methods: ${methods}`);
  const unused = methods.filter((m) => !typed.includes(`.${m}(`));
  assert.deepEqual(unused, [], 'typed.ts must call every method (and index.d.ts declare it)');
  try {
    execFileSync(path.join(BIN, 'tsc'), ['-p', scratch], { cwd: scratch, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    assert.fail(`tsc found errors:\n${e.stdout}${e.stderr}`);
  }
});

/** Opens `url`, waits for main.js to finish, and returns what the page showed. */
async function chat(url) {
  const page = await ctx.newPage();
  page.on('pageerror', (e) => console.log(`[page error] ${e.message}`));
  // each text #reply shows, in order: more than one means the reply was streamed
  await page.addInitScript(() => {
    window.replyStates = [];
    new MutationObserver(() => {
      const t = document.querySelector('#reply')?.textContent;
      if (t && t !== window.replyStates.at(-1)) window.replyStates.push(t);
    }).observe(document, { subtree: true, childList: true, characterData: true });
  });
  await page.goto(url);
  await page.waitForFunction(() => /tokens\/s$|: /.test(document.querySelector('#status').textContent), null, { timeout: LONG });
  const shown = await page.evaluate(() => ({ status: document.querySelector('#status').textContent, states: window.replyStates }));
  await page.close();
  return shown;
}

function assertStreamed({ status, states }) {
  const m = status.match(/^(\d+) tokens, [\d.]+ tokens\/s$/);
  assert.ok(m, `the page says: ${status}`);
  assert.ok(Number(m[1]) >= 2, status);
  assert.ok(states.length >= 2, `the reply came in ${states.length} piece(s): ${JSON.stringify(states)}`);
  for (let i = 1; i < states.length; i++) assert.ok(states[i].startsWith(states[i - 1]), `the reply only grows: ${JSON.stringify(states)}`);
  assert.ok(states.at(-1).trim().length > 0);
}

test("the README's page, bundled by esbuild and unbundled, streams a reply in Chromium", { timeout: LONG * 2 }, async () => {
  // the README's build: bundle, then the worker and the engine beside the bundle
  execFileSync(path.join(BIN, 'esbuild'), ['main.js', '--bundle', '--format=esm', '--outdir=dist', '--log-level=warning'], { cwd: scratch, stdio: ['ignore', 'inherit', 'inherit'] });
  fs.cpSync(path.join(scratch, 'node_modules/nomoat/worker.js'), path.join(scratch, 'dist/worker.js'));
  fs.cpSync(path.join(scratch, 'node_modules/nomoat/pkg'), path.join(scratch, 'dist/pkg'), { recursive: true });
  server = await startServer({ root: scratch, models: MODEL_DIR });
  userDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nomoat-chromium-'));
  ctx = await chromium.launchPersistentContext(userDir, { executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });

  let t = performance.now();
  const bundled = await chat(`${server.url}/index.html`);
  console.log(`bundled: ${bundled.status}: ${JSON.stringify(bundled.states.at(-1))} (${((performance.now() - t) / 1000).toFixed(1)} s)`);
  assertStreamed(bundled);
  assert.ok(server.count('/dist/worker.js') >= 1 && server.count('/dist/pkg/nomoat_web_bg.wasm') >= 1, 'the worker and wasm come from beside the bundle');

  t = performance.now();
  const plain = await chat(`${server.url}/plain.html`);
  console.log(`unbundled: ${plain.status} (${((performance.now() - t) / 1000).toFixed(1)} s)`);
  assertStreamed(plain);
  assert.ok(server.count('/node_modules/nomoat/worker.js') >= 1 && server.count('/node_modules/nomoat/pkg/nomoat_web_bg.wasm') >= 1);
});
