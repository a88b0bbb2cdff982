// The page's Service Worker: keeps a copy of the page's own files (HTML, JS, CSS, the wasm
// engine, the vendored libraries) so the page opens offline once it has been loaded. Files come
// from the network first while it answers (a rebuilt page is never hidden behind an old copy)
// and from the copy when it does not. Models are left alone: they are in the Cache API bucket
// 'nomoat-models-v1' already (nomoat.js), and the API routes of `nomoat serve` are never cached.
const PAGE_CACHE = 'nomoat-page-v1';
const PAGE_FILES = [
  './', 'index.html', 'app.js', 'render.js', 'store.js', 'style.css', 'nomoat.js', 'worker.js',
  'manifest.webmanifest', 'icon.svg', 'icon-192.png', 'icon-512.png',
  'vendor/marked.esm.js', 'vendor/purify.es.mjs', 'pkg/nomoat_web.js', 'pkg/nomoat_web_bg.wasm',
];
const SCOPE = new URL('./', self.location.href);

/** Not the page's own files: models, the server's API, other sites. */
function passThrough(url, request) {
  if (request.method !== 'GET' || url.origin !== SCOPE.origin || !url.pathname.startsWith(SCOPE.pathname)) return true;
  const path = url.pathname.slice(SCOPE.pathname.length);
  return /^(models(\/|$)|v1\/|health$|chat\/|completions$)/.test(path) || /\.gguf$/i.test(path);
}

async function precache() {
  const cache = await caches.open(PAGE_CACHE);
  // wasm-bindgen's glue imports its JS snippets from a hashed folder: find them in the glue
  const urls = [...PAGE_FILES];
  try {
    const glue = await (await fetch('pkg/nomoat_web.js', { cache: 'no-store' })).text();
    for (const m of glue.matchAll(/from ['"]\.\/(snippets\/[^'"]+\.js)['"]/g)) urls.push(`pkg/${m[1]}`);
  } catch {
    // no engine built: the page still works offline, without models
  }
  // one missing file (an icon, say) must not cost the copy of all the others
  await Promise.all([...new Set(urls)].map((u) => cache.add(new Request(u, { cache: 'no-store' })).catch(() => {})));
}

self.addEventListener('install', (ev) => {
  ev.waitUntil(precache().then(() => self.skipWaiting()));
});

self.addEventListener('activate', (ev) => {
  ev.waitUntil(
    caches
      .keys()
      .then((keys) => Promise.all(keys.filter((k) => k.startsWith('nomoat-page-') && k !== PAGE_CACHE).map((k) => caches.delete(k))))
      .then(() => self.clients.claim()),
  );
});

self.addEventListener('fetch', (ev) => {
  const url = new URL(ev.request.url);
  if (passThrough(url, ev.request)) return;
  ev.respondWith(
    (async () => {
      const cache = await caches.open(PAGE_CACHE);
      try {
        const res = await fetch(ev.request);
        // no room for the copy (a full quota) must not cost the page the file itself
        if (res.ok && res.type === 'basic') ev.waitUntil(cache.put(ev.request, res.clone()).catch(() => {}));
        return res;
      } catch (e) {
        const copy = (await cache.match(ev.request, { ignoreSearch: true })) || (ev.request.mode === 'navigate' && (await cache.match('index.html')));
        if (copy) return copy;
        throw e;
      }
    })(),
  );
});
