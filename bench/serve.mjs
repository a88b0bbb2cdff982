// nomoat serve under concurrent streaming clients: aggregate decode tok/s with 1, 2, 4 and 8
// clients and time to first token (p50 / p95), against a --parallel 1 server (one request at a
// time, as before continuous batching) for the same single-client run.
//
//   node bench/serve.mjs [--model PATH] [--bin target/release/nomoat] [--clients 1,2,4,8] [--parallel 8]
//                        [--tokens 64] [--rounds 2] [--ctx 1024] [--model-penalty]
//
// Each client sends `rounds` greedy streaming completions one after another (distinct prompts
// of about 20 tokens, `max_tokens` tokens each, `ignore_eos`-free: a prompt whose reply ends
// early counts the tokens it had); aggregate tok/s is every client's generated tokens (the
// streams' usage) over the wall time from the first request to the last reply. TTFT is from
// sending a request to its first text chunk, prompt evaluation included. The server is
// started once per --parallel value and warmed with one request.

import { spawn } from "node:child_process";
import { homedir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";

const { values: o } = parseArgs({
  options: {
    model: { type: "string", default: join(process.env.NOMOAT_CACHE ?? join(homedir(), ".cache/nomoat"), "models/SmolLM2-135M-Instruct.Q4_1.gguf") },
    bin: { type: "string", default: "target/release/nomoat" },
    clients: { type: "string", default: "1,2,4,8" },
    parallel: { type: "string", default: "8" },
    tokens: { type: "string", default: "64" },
    rounds: { type: "string", default: "2" },
    ctx: { type: "string", default: "1024" },
    "model-penalty": { type: "boolean", default: false },
  },
});
const clients = o.clients.split(",").map(Number);
const maxTokens = Number(o.tokens);
const rounds = Number(o.rounds);
// Greedy decoding reads back the GPU's argmax; a model's recommended repetition penalty
// (SmolLM2's catalog entry has 1.1) makes each step a top-(1 + recent tokens) selection
// instead, a different cost measured with --model-penalty.
const penalty = o["model-penalty"] ? {} : { repeat_penalty: 1 };

const SUBJECTS = ["the sea", "a lighthouse", "winter mornings", "an old library", "the first train", "a mountain village", "bread baking", "a chess game", "the night sky", "a river delta", "a violin maker", "city rain", "a long walk", "the desert", "a garden in spring", "a ship's cook"];
const prompt = (i) => `Write a short story about ${SUBJECTS[i % SUBJECTS.length]}, in plain words, for a child of ten. Once upon a time`;

function startServer(parallel) {
  return new Promise((resolve, reject) => {
    const child = spawn(o.bin, ["serve", "--port", "0", "-c", o.ctx, "--parallel", String(parallel), "--no-www", "-m", o.model], { stdio: ["ignore", "ignore", "pipe"] });
    let log = "";
    child.stderr.on("data", (d) => {
      log += d;
      const m = log.match(/listening on http:\/\/(\S+)\s*\n/); // a whole line: stderr comes in pieces
      if (m) resolve({ child, addr: m[1] });
    });
    child.on("exit", (code) => reject(new Error(`nomoat serve exited (${code}):\n${log}`)));
  });
}

// One streaming completion: TTFT and generated tokens.
async function stream(addr, text) {
  const t0 = performance.now();
  const res = await fetch(`http://${addr}/v1/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ prompt: text, max_tokens: maxTokens, temperature: 0, ...penalty, stream: true, stream_options: { include_usage: true } }),
  });
  if (!res.ok) throw new Error(`${res.status} ${await res.text()}`);
  let ttft = null;
  let tokens = 0;
  let buf = "";
  const decoder = new TextDecoder();
  for await (const chunk of res.body) {
    buf += decoder.decode(chunk, { stream: true });
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl).trim();
      buf = buf.slice(nl + 1);
      if (!line.startsWith("data: {")) continue;
      const v = JSON.parse(line.slice(6));
      if (ttft === null && v.choices?.[0]?.text) ttft = performance.now() - t0;
      if (v.usage) tokens = v.usage.completion_tokens;
    }
  }
  return { ttft: ttft ?? performance.now() - t0, tokens };
}

const pct = (xs, p) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
};

async function measure(addr, n) {
  const ttfts = [];
  let tokens = 0;
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: n }, async (_, c) => {
      for (let r = 0; r < rounds; r++) {
        const s = await stream(addr, prompt(c * rounds + r));
        ttfts.push(s.ttft);
        tokens += s.tokens;
      }
    }),
  );
  const secs = (performance.now() - t0) / 1000;
  return { n, tokens, secs, tps: tokens / secs, p50: pct(ttfts, 50), p95: pct(ttfts, 95) };
}

const rows = [];
for (const parallel of [1, Number(o.parallel)]) {
  const { child, addr } = await startServer(parallel);
  try {
    await stream(addr, "Hello");
    for (const n of parallel === 1 ? [1] : clients) {
      const r = await measure(addr, n);
      rows.push({ parallel, ...r });
      console.error(`--parallel ${parallel}, ${n} clients: ${r.tps.toFixed(2)} tok/s aggregate (${r.tokens} tokens in ${r.secs.toFixed(1)} s), TTFT p50 ${r.p50.toFixed(0)} ms p95 ${r.p95.toFixed(0)} ms`);
    }
  } finally {
    child.kill();
  }
}
// the batching server's own single client, else the one-at-a-time server's
const base = (rows.find((r) => r.parallel > 1 && r.n === 1) ?? rows[0]).tps;
console.log(`model ${o.model.split("/").pop()}, ${maxTokens} tokens a request, ${rounds} requests a client, -c ${o.ctx}, ${o["model-penalty"] ? "the model's sampling" : "greedy, no repetition penalty"}`);
console.log("| server | clients | aggregate tok/s | × 1 client | TTFT p50 ms | TTFT p95 ms |");
console.log("| --- | ---: | ---: | ---: | ---: | ---: |");
for (const r of rows) {
  console.log(`| --parallel ${r.parallel} | ${r.n} | ${r.tps.toFixed(2)} | ${(r.tps / base).toFixed(2)}× | ${r.p50.toFixed(0)} | ${r.p95.toFixed(0)} |`);
}
