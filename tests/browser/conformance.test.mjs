// Kernel conformance in the browser: Engine.run_conformance() runs each kernel on Chromium's
// WebGPU device against nomoat_runtime::reference on random data (web/src/conformance.rs).
// Run: node --test tests/browser/   (after scripts/build-web.sh)
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startServer, CHROMIUM_ARGS } from './server.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
// Known failures (prefix of the op name → why), reported but not failing the run; none now.
const KNOWN = {};

test('every kernel matches the CPU reference in Chromium', { timeout: 600_000 }, async (t) => {
  const server = await startServer({ root: path.join(ROOT, 'www'), models: os.tmpdir() });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nomoat-chromium-'));
  const ctx = await chromium.launchPersistentContext(dir, { executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });
  try {
    const page = await ctx.newPage();
    await page.goto(`${server.url}/style.css`); // any page of the origin: a secure context
    const report = await page.evaluate(async () => {
      const { default: init, Engine } = await import('./pkg/nomoat_web.js');
      await init();
      const e = await Engine.create();
      return JSON.parse(await e.run_conformance());
    });
    console.log(`device: ${report.device}`);
    const failed = [];
    for (const r of report.results) {
      const known = Object.entries(KNOWN).find(([p]) => r.op.startsWith(p));
      console.log(`${r.ok ? 'ok  ' : known ? 'TODO' : 'FAIL'} ${r.op} ${r.error ?? `max_err ${r.max_err.toExponential(2)} (tol ${r.tol.toExponential(1)})`}`);
      if (!r.ok && !known) failed.push(r.op);
      if (!r.ok && known) t.diagnostic(`known failure ${r.op}: ${known[1]}`);
    }
    assert.ok(report.results.length >= 20);
    assert.deepEqual(failed, []);
  } finally {
    await ctx.close();
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
