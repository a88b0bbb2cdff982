// docs/clients.md's tested recipes, run as written: every code block there marked
// `<!-- tested: NAME -->` (the official openai clients for Python and JavaScript) runs against a
// `nomoat serve` of SmolLM2 135M, with the doc's base URL replaced by the server's, and what it
// prints is checked: the streamed greedy replies of both clients are the same non-empty text,
// the structured replies parse and fit the schema, the tool recipes make one call (they set
// parallel_tool_calls false) of the tool with arguments that fit its parameters and then reply in
// words. Also: a request naming another model is answered (the doc says so).
// Run: node --test tests/browser/clients.test.mjs (builds the release CLI if needed)
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { nativeBinary } from './native.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const DOC = path.join(ROOT, 'docs/clients.md');
const DOC_URL = 'http://127.0.0.1:8080/v1';
const MODEL_ID = 'SmolLM2-135M-Instruct.Q4_1';
const MODEL = path.join(process.env.NOMOAT_CACHE || path.join(os.homedir(), '.cache/nomoat'), 'models', `${MODEL_ID}.gguf`);
// the JS recipes import 'openai' from the repository's node_modules: they run from under it
const RUN_DIR = path.join(ROOT, 'target/clients-recipes');

let server;
let baseUrl;
let log = '';
const recipes = new Map();

before(async () => {
  const t = performance.now();
  const text = fs.readFileSync(DOC, 'utf8');
  for (const m of text.matchAll(/<!-- tested: ([\w-]+) -->\n```(\w+)\n([\s\S]*?)\n```/g)) recipes.set(m[1], { lang: m[2], code: m[3] });
  assert.ok(fs.existsSync(MODEL), `${MODEL} is missing: run scripts/setup.sh`);
  server = spawn(nativeBinary(), ['serve', '-m', MODEL, '--port', '0', '--no-www'], {
    env: { WGPU_BACKEND: 'vulkan', XDG_RUNTIME_DIR: '/tmp', ...process.env },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  baseUrl = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`nomoat serve did not start:\n${log}`)), 120_000);
    server.stderr.setEncoding('utf8');
    server.stderr.on('data', (d) => {
      log += d;
      const m = log.match(/listening on (http:\/\/\S+)\s/); // a whole line: stderr comes in pieces
      if (m) {
        clearTimeout(timer);
        resolve(`${m[1]}/v1`);
      }
    });
    server.on('exit', (code) => reject(new Error(`nomoat serve exited with ${code}:\n${log}`)));
  });
  fs.mkdirSync(RUN_DIR, { recursive: true });
  console.log(`server up: ${((performance.now() - t) / 1000).toFixed(1)} s`);
});

after(() => {
  server?.kill();
});

/** Runs the recipe `name` as the doc has it, against the test's server; returns its stdout. */
function run(name) {
  const r = recipes.get(name);
  assert.ok(r, `docs/clients.md has no block marked <!-- tested: ${name} -->`);
  assert.ok(r.code.includes(DOC_URL), `${name} uses the doc's base URL`);
  const code = r.code.replaceAll(DOC_URL, baseUrl);
  const file = path.join(RUN_DIR, `${name}.${r.lang === 'python' ? 'py' : 'mjs'}`);
  fs.writeFileSync(file, code);
  const t = performance.now();
  try {
    return execFileSync(r.lang === 'python' ? 'python3' : process.execPath, [file], { cwd: RUN_DIR, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 180_000 });
  } catch (e) {
    assert.fail(`${name} failed:\n${e.stdout}\n${e.stderr}\nserver log:\n${log}`);
  } finally {
    console.log(`${name}: ${((performance.now() - t) / 1000).toFixed(1)} s`);
  }
}

test('every tested block of docs/clients.md is checked here', () => {
  assert.deepEqual([...recipes.keys()].sort(), ['js-stream', 'js-structured', 'js-tools', 'python-stream', 'python-structured', 'python-tools']);
});

test('streaming: both clients print the same greedy reply', () => {
  const py = run('python-stream');
  const js = run('js-stream');
  console.log(`streamed: ${JSON.stringify(py)}`);
  assert.ok(py.trim().length > 0);
  assert.equal(js, py);
});

test('structured output: the replies parse and fit the schema', () => {
  for (const name of ['python-structured', 'js-structured']) {
    const out = run(name).trim();
    console.log(`${name}: ${out}`);
    const city = JSON.parse(out);
    assert.deepEqual(Object.keys(city).sort(), ['country', 'name', 'population']);
    assert.equal(typeof city.name, 'string');
    assert.equal(typeof city.country, 'string');
    assert.ok(Number.isInteger(city.population), out);
  }
});

test('tools: a call of get_weather with a city, then a reply to its result', () => {
  for (const name of ['python-tools', 'js-tools']) {
    const out = run(name);
    console.log(`${name}: ${out.trim()}`);
    const calls = out.split('\n').filter((l) => l.startsWith('call '));
    assert.ok(calls.length >= 1, out);
    for (const c of calls) {
      const [, fn, args] = c.match(/^call (\S+) (.*)$/);
      assert.equal(fn, 'get_weather');
      assert.equal(typeof JSON.parse(args).city, 'string', c);
    }
    assert.equal(calls.length, 1, `parallel_tool_calls false asks for one call:\n${out}`);
    const reply = out.split('\n').find((l) => l.startsWith('reply '));
    assert.ok(reply && !['', 'None', 'null', 'undefined'].includes(reply.slice(6).trim()), `a reply in words:\n${out}`);
  }
});

test('a request may name any model: the server has one', async () => {
  const models = await (await fetch(`${baseUrl}/models`)).json();
  assert.deepEqual(models.data.map((m) => m.id), [MODEL_ID]);
  const r = await fetch(`${baseUrl}/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 2 }),
  });
  assert.equal(r.status, 200);
  assert.equal((await r.json()).model, MODEL_ID);
});
