// Structured output in the browser (Chromium, WebGPU on SwiftShader) through the JS API:
// `complete(prompt, { responseFormat })` with OpenAI's shapes, on the tiny llama model (random
// weights: what it writes is noise, so only the constraint can make it valid). 51 replies
// sampled at temperature 1.0 over three schemas (nested objects, arrays, enums, bounded
// numbers, optional fields) all parse and validate with Python's jsonschema; json_object
// replies that end are objects; a schema that cannot compile and a malformed response_format reject
// with BadRequest and leave the engine usable. The same engine as the server's
// (runtime/src/constrain.rs), whose native test is native/tests/structured.rs.
// Run: node --test tests/browser/structured.test.mjs (after scripts/build-web.sh)
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startServer, enginePage, launchChromium } from './server.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const TINY = path.join(ROOT, 'tests/data/tiny');
const LONG = 600_000;
const PER_SCHEMA = 17;

const SCHEMAS = {
  person: {
    type: 'object',
    properties: {
      name: { type: 'string', maxLength: 10 },
      age: { type: 'integer', minimum: 0, maximum: 120 },
      role: { enum: ['admin', 'user', 'guest'] },
      nickname: { type: 'string', maxLength: 6 },
    },
    required: ['name', 'age', 'role'],
    additionalProperties: false,
  },
  order: {
    type: 'object',
    properties: {
      id: { type: 'integer', minimum: 1, maximum: 9999 },
      items: {
        type: 'array',
        minItems: 1,
        maxItems: 3,
        items: { type: 'object', properties: { sku: { type: 'string', pattern: '^[A-Z]{3}[0-9]{2}$' }, qty: { type: 'integer', minimum: 1, maximum: 9 } }, required: ['sku', 'qty'], additionalProperties: false },
      },
      paid: { type: 'boolean' },
    },
    required: ['id', 'items', 'paid'],
    additionalProperties: false,
  },
  reading: {
    type: 'object',
    properties: {
      sensor: { enum: ['t1', 't2'] },
      value: { type: 'number', minimum: -50, maximum: 50 },
      tags: { type: 'array', maxItems: 2, items: { type: 'string', maxLength: 4 } },
      location: { type: 'object', properties: { room: { type: 'integer', minimum: 0, maximum: 20 } }, required: ['room'], additionalProperties: false },
    },
    required: ['sensor', 'value', 'location'],
    additionalProperties: false,
  },
};

let server;
let ctx;
let page;
let browser;

before(async () => {
  server = await startServer({ root: path.join(ROOT, 'www'), models: TINY });
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

/** Python's jsonschema on each reply: [{ok, error}] */
function validate(schema, replies) {
  const script = `
import json, sys, jsonschema
d = json.load(sys.stdin)
out = []
for r in d["replies"]:
    try:
        jsonschema.validate(json.loads(r), d["schema"])
        out.append({"ok": True})
    except Exception as e:
        out.append({"ok": False, "error": str(e)[:200]})
print(json.dumps(out))`;
  return JSON.parse(execFileSync('python3', ['-c', script], { input: JSON.stringify({ schema, replies }), encoding: 'utf8' }));
}

test('sampled replies fit their JSON schemas', { timeout: LONG }, async () => {
  for (const [name, schema] of Object.entries(SCHEMAS)) {
    const got = await page.evaluate(
      async ({ name, schema, n }) => {
        const replies = [];
        const t0 = performance.now();
        for (let seed = 1; seed <= n; seed++) {
          const r = await window.engine.complete('Data:', { temperature: 1, topK: 0, topP: 1, minP: 0, seed, maxTokens: 200, responseFormat: { type: 'json_schema', json_schema: { name, schema, strict: true } } }).result;
          replies.push({ text: r.text, finish: r.finish_reason, tokens: r.tokens });
        }
        return { replies, seconds: (performance.now() - t0) / 1000 };
      },
      { name, schema, n: PER_SCHEMA },
    );
    const texts = got.replies.map((r) => r.text);
    console.log(`${name}: ${PER_SCHEMA} replies in ${got.seconds.toFixed(1)} s, e.g. ${texts[0]}`);
    for (const r of got.replies) assert.equal(r.finish, 'stop', `a reply ran out of tokens: ${r.text}`);
    const checks = validate(schema, texts);
    checks.forEach((c, i) => assert.ok(c.ok, `${name} reply ${i + 1} ${texts[i]}: ${c.error}`));
    // sampling at temperature 1 explores: the constraint, not one fixed reply, makes them valid
    assert.ok(new Set(texts).size > PER_SCHEMA / 2, `${name}: only ${new Set(texts).size} distinct replies`);
  }
});

test('json_object gives objects; bad formats reject and the engine stays usable', { timeout: LONG }, async () => {
  const got = await page.evaluate(async () => {
    const e = window.engine;
    const reject = async (responseFormat) => {
      try {
        await e.complete('Data:', { maxTokens: 8, responseFormat }).result;
        return null;
      } catch (err) {
        return { name: err.name, message: err.message };
      }
    };
    const objects = [];
    for (let seed = 1; seed <= 3; seed++) {
      const r = await e.complete('Data:', { temperature: 1, seed, maxTokens: 200, responseFormat: { type: 'json_object' } }).result;
      objects.push({ text: r.text, finish: r.finish_reason });
    }
    return {
      objects,
      badSchema: await reject({ type: 'json_schema', json_schema: { name: 'x', schema: { type: 'object', properties: { a: { type: 'nonsense' } } } } }),
      badType: await reject({ type: 'xml' }),
      noName: await reject({ type: 'json_schema', json_schema: { schema: {} } }),
      after: (await e.complete('Data:', { maxTokens: 4, temperature: 0 }).result).finish_reason,
    };
  });
  console.log(JSON.stringify(got));
  // an object's keys are unbounded: a noise model may run out of tokens inside one, but a reply
  // that ends is an object
  assert.ok(got.objects.some((o) => o.finish === 'stop'));
  for (const o of got.objects) {
    assert.ok(o.text.startsWith('{'), o.text);
    if (o.finish === 'stop') assert.equal(Object.prototype.toString.call(JSON.parse(o.text)), '[object Object]');
  }
  assert.equal(got.badSchema?.name, 'BadRequest');
  assert.match(got.badSchema.message, /response_format/);
  assert.equal(got.badType?.name, 'BadRequest');
  assert.match(got.badType.message, /xml/);
  assert.equal(got.noName?.name, 'BadRequest');
  assert.match(got.noName.message, /json_schema\.name/);
  assert.equal(got.after, 'length');
});
