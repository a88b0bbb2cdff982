// Several conversations over one loaded model in the browser (Chromium, WebGPU on SwiftShader),
// on the tiny llama model: `complete(prompt, { session })` keeps each name's KV cache apart over
// the same weights.
// - Two conversations taken in turn keep their own caches (each continuation reuses its whole
//   prompt so far) and give, token for token, what one conversation alone gives.
// - Asked at once, replies run one after another (no Busy, no interleaving): the same tokens.
// - Aborting a request that waits its turn cancels it alone; the running one goes on.
// - sessions() / closeSession(); at most 8; a bad name is refused.
// Run: node --test tests/browser/sessions.test.mjs (after scripts/build-web.sh)
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startServer, enginePage, launchChromium } from './server.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const LONG = 300_000;

let server;
let ctx;
let page;
let browser;

before(async () => {
  server = await startServer({ root: path.join(ROOT, 'www'), models: path.join(ROOT, 'tests/data/tiny') });
  browser = await launchChromium();
  ctx = browser.ctx;
  ({ page } = await enginePage(ctx, server));
  await page.evaluate(() => window.engine.loadUrl('models/llama-tiny.gguf', { nCtx: 256, cache: false }));
});

after(async () => {
  await page?.evaluate(() => window.engine?.terminate()).catch(() => {});
  await browser?.close();
  await server?.close();
});

test('conversations keep their own caches and give what one alone gives', { timeout: LONG }, async () => {
  const got = await page.evaluate(async () => {
    const e = window.engine;
    const greedy = { temperature: 0, maxTokens: 12 };
    const turns = { a: ['Once upon a time', ' and then'], b: ['The quick brown fox', ' but later'] };
    // alone: each conversation's two turns on the default cache, one conversation after the other
    const alone = {};
    for (const [name, [first, second]] of Object.entries(turns)) {
      await e.closeSession('default');
      const r1 = await e.complete(first, greedy).result;
      const r2 = await e.complete(first + r1.text + second, greedy).result;
      alone[name] = [r1.token_ids, r2.token_ids];
    }
    // together: a's first turn, b's first turn, a's second, b's second
    const together = { a: [], b: [] };
    const reused = { a: [], b: [] };
    const text = {};
    for (const i of [0, 1]) {
      for (const name of ['a', 'b']) {
        const prompt = i === 0 ? turns[name][0] : turns[name][0] + text[name] + turns[name][1];
        const r = await e.complete(prompt, { ...greedy, session: name }).result;
        if (i === 0) text[name] = r.text;
        together[name].push(r.token_ids);
        reused[name].push({ reused: r.reused_tokens, prompt: r.prompt_tokens });
      }
    }
    // asked at once: both second turns again, from fresh caches, neither awaited before the other
    await e.closeSession('a');
    await e.closeSession('b');
    const at = (name) => e.complete(turns[name][0] + text[name] + turns[name][1], { ...greedy, session: name }).result;
    const [ra, rb] = await Promise.all([at('a'), at('b')]);
    return { alone, together, reused, atOnce: { a: ra.token_ids, b: rb.token_ids }, sessions: await e.sessions() };
  });
  console.log(JSON.stringify(got.reused));
  assert.deepEqual(got.together, got.alone, 'two conversations taken in turn give what each gives alone');
  for (const name of ['a', 'b']) {
    // the second turn's prompt starts with the first's (the reply's text may tokenize anew):
    // its own cache still holds that, though the other conversation ran in between
    const [first, second] = got.reused[name];
    assert.equal(first.reused, 0);
    assert.ok(second.reused >= first.prompt, `${name}: ${JSON.stringify(got.reused[name])}`);
    assert.deepEqual(got.atOnce[name], got.alone[name][1], `${name} asked at once`);
  }
  assert.deepEqual(got.sessions.map((s) => s.name), ['default', 'a', 'b']);
  assert.ok(got.sessions.every((s) => s.n_ctx === 256));
});

test('aborting a waiting request cancels it alone; names and the limit are checked', { timeout: LONG }, async () => {
  const got = await page.evaluate(async () => {
    const e = window.engine;
    const running = e.complete('Once upon a time', { temperature: 0, maxTokens: 40, session: 'a' });
    const stop = new AbortController();
    const waiting = e.complete('The quick brown fox', { temperature: 0, maxTokens: 40, session: 'b', signal: stop.signal });
    stop.abort();
    const [r, w] = [await running.result, await waiting.result];
    const refuse = async (session) => {
      try {
        await e.complete('x', { maxTokens: 1, session }).result;
        return null;
      } catch (err) {
        return { name: err.name, message: err.message };
      }
    };
    const empty = await refuse('');
    for (const n of ['c', 'd', 'e', 'f', 'g']) await e.complete('x', { maxTokens: 1, session: n }).result;
    const ninth = await refuse('h');
    const closed = await e.closeSession('c');
    const afterClose = (await e.complete('x', { maxTokens: 1, session: 'h' }).result).finish_reason;
    const unknown = await e.closeSession('nope').then(() => null, (err) => err.name);
    return { running: { finish: r.finish_reason, tokens: r.tokens }, waiting: { finish: w.finish_reason, tokens: w.tokens }, empty, ninth, closed: closed.map((s) => s.name), afterClose, unknown };
  });
  console.log(JSON.stringify(got));
  assert.deepEqual(got.running, { finish: 'length', tokens: 40 }, 'the running request goes on');
  assert.deepEqual(got.waiting, { finish: 'cancelled', tokens: 0 });
  assert.equal(got.empty?.name, 'BadRequest');
  assert.equal(got.ninth?.name, 'BadRequest');
  assert.match(got.ninth.message, /8 conversations/);
  assert.deepEqual(got.closed, ['default', 'a', 'b', 'd', 'e', 'f', 'g']);
  assert.equal(got.afterClose, 'length');
  assert.equal(got.unknown, 'BadRequest');
});
