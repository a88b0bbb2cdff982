// web/js/sources.js's StreamSource under Node (no browser): a body that delivers faster than
// its reader consumes is paused once `maxBuffered` bytes wait, and read on whenever the reader
// waits for bytes not yet here; without the cap the whole body piles up.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { StreamSource } from '../../web/js/sources.js';

const CHUNK = 64 << 10;
const SIZE = 8 << 20;

/** A body of SIZE bytes in CHUNK pieces, each as soon as asked for; counts what was pulled. */
function body() {
  let sent = 0;
  const stream = new ReadableStream({
    pull(c) {
      if (sent >= SIZE) return c.close();
      const n = Math.min(CHUNK, SIZE - sent);
      c.enqueue(new Uint8Array(n).fill(sent / CHUNK & 0xff));
      sent += n;
    },
  }, { highWaterMark: 0 });
  return { stream, pulled: () => sent };
}

/** Reads the whole source in 256 KiB pieces, in order, yielding to the event loop between. */
async function consume(src) {
  let peak = 0;
  for (let at = 0; at < SIZE; at += 256 << 10) {
    const got = await src.read(at, 256 << 10);
    assert.equal(got.length, 256 << 10);
    assert.equal(got[0], (at / CHUNK) & 0xff);
    for (let i = 0; i < 5; i++) await new Promise((r) => setTimeout(r, 0));
    peak = Math.max(peak, src.held);
  }
  await src.finish();
  return Math.max(peak, src.peakHeld);
}

for (const [cap, expectSmall] of [[1 << 20, true], [1 << 30, false]]) {
  test(`held bytes with a cap of ${cap >> 20} MiB`, async () => {
    const b = body();
    const src = new StreamSource('http://x/m.gguf', b.stream, SIZE, null, null, null, new AbortController(), cap);
    src.plan([0, SIZE]);
    const peak = await consume(src);
    console.log(`cap ${cap}: peak ${src.peakHeld} bytes held`);
    if (expectSmall) {
      // the cap, one read's worth that the reader waits for, and one chunk in flight
      assert.ok(peak <= cap + (256 << 10) + CHUNK, `peak ${peak}`);
    } else {
      assert.ok(peak > SIZE / 2, `uncapped peak ${peak}: the body was not read ahead, so this test shows nothing`);
    }
    assert.equal(b.pulled(), SIZE);
  });
}

test('a reader waiting past the cap is never left waiting', async () => {
  const b = body();
  const src = new StreamSource('http://x/m.gguf', b.stream, SIZE, null, null, null, new AbortController(), 1 << 20);
  src.plan([0, SIZE]);
  // the end first: everything before it is held (planned, not yet read) far over the cap
  const tail = await src.read(SIZE - 1024, 1024);
  assert.equal(tail.length, 1024);
  assert.ok(src.held > 1 << 20);
  const head = await src.read(0, 1024);
  assert.equal(head.length, 1024);
});
