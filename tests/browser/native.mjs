// The native CLI's greedy reply to a one-message conversation (`nomoat chat --temp 0`), what the
// browser tests compare the page's replies with.
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
