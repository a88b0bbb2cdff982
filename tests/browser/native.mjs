// What the browser tests compare the page with, from the native CLI: the greedy reply to a
// one-message conversation (`nomoat chat --temp 0`) and the best last-position logits after
// token ids (`nomoat logits --ids`).
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

export function nativeReply({ model, question, maxTokens, loras = [] }) {
  const args = ['run', '-q', '--release', '-p', 'nomoat', '--', 'chat', '-m', model, '--temp', '0', '-n', String(maxTokens)];
  for (const l of loras) args.push('--lora', l);
  const out = execFileSync('cargo', args, {
    cwd: ROOT,
    input: `${question}\n`,
    encoding: 'utf8',
    env: { WGPU_BACKEND: 'vulkan', ...process.env },
    stdio: ['pipe', 'pipe', 'pipe'],
    maxBuffer: 1 << 24,
  });
  // stdout: "> " reply "\n" "> " (the prompt for the next turn, then EOF)
  assert.ok(out.startsWith('> ') && out.endsWith('\n> '), `unexpected native output ${JSON.stringify(out)}`);
  return out.slice(2, -3);
}

let built = null;

/** The release CLI, built once per test process (`cargo build --release -p nomoat`). */
export function nativeBinary() {
  if (!built) {
    execFileSync('cargo', ['build', '-q', '--release', '-p', 'nomoat'], { cwd: ROOT, stdio: ['ignore', 'inherit', 'inherit'] });
    built = path.join(process.env.CARGO_TARGET_DIR ? path.resolve(ROOT, process.env.CARGO_TARGET_DIR) : path.join(ROOT, 'target'), 'release/nomoat');
  }
  return built;
}

/**
 * The native CLI's `top` best last-position logits after token ids: [{id, logit}], best first;
 * with the adapters `loras` (PATH[:SCALE]) applied.
 */
export function nativeTopLogits({ model, ids, top = 2, kv = 'f32', ctx = 256, loras = [] }) {
  const args = ['logits', '-m', model, '--kv', kv, '-c', String(ctx), '--ids', ids.join(','), '--top', String(top)];
  for (const l of loras) args.push('--lora', l);
  const out = execFileSync(nativeBinary(), args, {
    cwd: ROOT,
    encoding: 'utf8',
    env: { WGPU_BACKEND: 'vulkan', ...process.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  return JSON.parse(out).top;
}
