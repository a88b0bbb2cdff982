// A tiny static server for the browser tests: www/ at /, model files at /models/, on 127.0.0.1.
// It counts requests per path so tests can assert that a cached model made none.
// Chromium's WebGPU needs only --enable-unsafe-webgpu on Linux (it picks SwiftShader when there
// is no GPU) and a secure origin (127.0.0.1 is one); the rest keeps it off the network.
export const CHROMIUM_ARGS = [
  '--enable-unsafe-webgpu',
  '--no-sandbox',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

import http from 'node:http';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.wasm': 'application/wasm',
  '.json': 'application/json',
  '.gguf': 'application/octet-stream',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
  '.webmanifest': 'application/manifest+json',
};

export async function startServer({ root, models }) {
  const counts = new Map();
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://x');
    const p = decodeURIComponent(url.pathname);
    // downloads are counted: the page's HEAD requests (is this model here?) are not
    if (req.method !== 'HEAD') counts.set(p, (counts.get(p) || 0) + 1);
    let file;
    if (p.startsWith('/models/')) file = path.join(models, path.basename(p));
    else file = path.join(root, path.normalize(p === '/' ? '/index.html' : p));
    if (!file.startsWith(root) && !file.startsWith(models)) {
      res.writeHead(403).end();
      return;
    }
    fs.stat(file, (err, st) => {
      if (err || !st.isFile()) {
        res.writeHead(404, { 'content-type': 'text/plain' }).end('not found');
        return;
      }
      res.writeHead(200, {
        'content-type': TYPES[path.extname(file)] || 'application/octet-stream',
        'content-length': st.size,
        'cache-control': 'no-store',
      });
      if (req.method === 'HEAD') res.end();
      else fs.createReadStream(file).pipe(res);
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  return {
    url: `http://127.0.0.1:${port}`,
    count: (p) => counts.get(p) || 0,
    close: () => new Promise((resolve) => { server.closeAllConnections?.(); server.close(resolve); }),
  };
}

/**
 * A page of the server's origin (a secure context) with a nomoat.js engine at window.engine;
 * the page's errors and the engine's (not the missing favicon's) are logged. Returns
 * {page, device}.
 */
export async function enginePage(ctx, server) {
  const page = await ctx.newPage();
  page.on('pageerror', (e) => console.log(`[page error] ${e.message}`));
  page.on('console', (m) => m.type() === 'error' && !m.text().startsWith('Failed to load resource') && console.log(`[console] ${m.text()}`));
  await page.goto(`${server.url}/style.css`);
  const device = await page.evaluate(async () => {
    const { Nomoat } = await import('./nomoat.js');
    window.engine = await Nomoat.create();
    return window.engine.device;
  });
  return { page, device };
}

/**
 * Headless Chromium (the CHROMIUM env var, else Debian's) in a fresh profile: {ctx, close};
 * close() also removes the profile.
 */
export async function launchChromium() {
  const userDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nomoat-chromium-'));
  const ctx = await chromium.launchPersistentContext(userDir, { executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });
  return {
    ctx,
    close: async () => {
      await ctx.close();
      fs.rmSync(userDir, { recursive: true, force: true });
    },
  };
}
