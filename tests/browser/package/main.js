import { Nomoat } from 'nomoat';

const reply = document.querySelector('#reply');
const status = document.querySelector('#status');
try {
  const engine = await Nomoat.create();
  await engine.loadUrl('models/SmolLM2-135M-Instruct.Q4_1.gguf', {
    // 'download' then 'upload' (to the GPU); 'cache' if the browser has no room to keep a copy
    onProgress: (p) => (status.textContent = p.phase === 'cache' ? 'not cached' : `${p.phase} ${Math.round((100 * p.done) / p.total)}%`),
  });
  status.textContent = 'writing…';
  const answer = engine.chat([{ role: 'user', content: 'What is the capital of France?' }], { temperature: 0, maxTokens: 64 });
  for await (const piece of answer) reply.textContent += piece;
  const { tokens, gen_tps } = await answer.result;
  status.textContent = `${tokens} tokens, ${gen_tps.toFixed(1)} tokens/s`;
} catch (e) {
  status.textContent = `${e.name}: ${e.message}`;
}
