// Kernel conformance in the browser: Engine.run_conformance() runs the runtime's shared suite
// (nomoat_runtime::conformance: the same cases and bounds as tests/tests/kernels.rs natively)
// on Chromium's WebGPU device.
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

test('every kernel matches the CPU reference in Chromium, with the native bounds', { timeout: 900_000 }, async () => {
  const server = await startServer({ root: path.join(ROOT, 'www'), models: os.tmpdir() });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nomoat-chromium-'));
  const ctx = await chromium.launchPersistentContext(dir, { executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });
  try {
    const page = await ctx.newPage();
    await page.goto(`${server.url}/style.css`); // any page of the origin: a secure context
    // NOMOAT_CONFORMANCE=rope_kv runs the ops whose names contain it, as the native filter does
    const filter = process.env.NOMOAT_CONFORMANCE || '';
    const report = await page.evaluate(async (filter) => {
      const { default: init, Engine } = await import('./pkg/nomoat_web.js');
      await init();
      const e = await Engine.create();
      return JSON.parse(await e.run_conformance(filter || undefined));
    }, filter);
    console.log(`device: ${report.device} (${report.variant})`);
    const failed = [];
    let n = 0;
    for (const o of report.ops) {
      if (o.error) failed.push(`${o.op}: ${o.error}`);
      const bad = o.checks.filter((c) => !(c.error <= c.bound));
      n += o.checks.length;
      const worst = o.checks.reduce((m, c) => Math.max(m, c.bound > 0 ? c.error / c.bound : c.error), 0);
      console.log(`${bad.length || o.error ? 'FAIL' : 'ok  '} ${o.op} (${o.shader}; ${o.bound}): ${o.checks.length} cases, worst error/bound ${worst.toExponential(2)}`);
      for (const c of bad) failed.push(`${c.case}: ${c.metric} ${c.error} > ${c.bound}`);
    }
    if (filter) {
      assert.ok(report.ops.length > 0 && report.ops.every((o) => o.op.includes(filter)), `ops for '${filter}': ${report.ops.map((o) => o.op)}`);
    } else {
      // every op ran, and as many cases as natively (a shrunken suite would also pass)
      assert.equal(report.ops.length, 23);
      assert.ok(n >= 300, `${n} cases`);
    }
    assert.deepEqual(failed, []);
  } finally {
    await ctx.close();
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
