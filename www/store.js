// Conversations kept in the browser (IndexedDB 'nomoat', store 'conversations'):
// {id, title, messages: [{role, content, tool_calls?, tool_call_id?}], model, updated (ms since 1970)}. When IndexedDB is
// not there (some private windows), they live in memory for the visit and `persistent` says so.

const DB_NAME = 'nomoat';
const STORE = 'conversations';

let dbPromise = null;
const memory = new Map();
export let persistent = typeof indexedDB !== 'undefined';

function openDb() {
  dbPromise ??= new Promise((resolve, reject) => {
    const req = indexedDB.open(DB_NAME, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE, { keyPath: 'id' }).createIndex('updated', 'updated');
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
    req.onblocked = () => reject(new Error('the conversation store is open in an older version of this page: close its other tabs'));
  });
  return dbPromise;
}

/** Runs `onDb(objectStore)` (an IDB request: its result) or, without IndexedDB, `inMemory()`. */
async function withStore(mode, onDb, inMemory) {
  if (persistent) {
    try {
      const db = await openDb();
      return await new Promise((resolve, reject) => {
        const tx = db.transaction(STORE, mode);
        const req = onDb(tx.objectStore(STORE));
        tx.oncomplete = () => resolve(req.result);
        tx.onerror = () => reject(tx.error);
        tx.onabort = () => reject(tx.error || new Error('the conversation store refused the change'));
      });
    } catch (e) {
      if (e?.name === 'QuotaExceededError') throw e;
      // IndexedDB unusable here: keep going in memory rather than losing the chat at once
      console.warn(`conversations are kept in memory only: ${e?.message || e}`);
      persistent = false;
    }
  }
  return inMemory();
}

/** All conversations, the most recently updated first. */
export async function listConversations() {
  const list = await withStore('readonly', (s) => s.getAll(), () => [...memory.values()]);
  return (list || []).sort((a, b) => b.updated - a.updated);
}

export function getConversation(id) {
  return withStore('readonly', (s) => s.get(id), () => memory.get(id));
}

/** Stores `c` (stamping `updated` unless asked not to); resolves to it. */
export async function saveConversation(c, { touch = true } = {}) {
  if (touch) c.updated = Date.now();
  // a plain copy: IndexedDB clones it, and the page keeps changing its own
  const record = { id: c.id, title: c.title, model: c.model ?? null, updated: c.updated, messages: c.messages.map(({ role, content, tool_calls, tool_call_id }) => ({ role, content, ...(tool_calls && { tool_calls }), ...(tool_call_id && { tool_call_id }) })) };
  await withStore('readwrite', (s) => s.put(record), () => memory.set(c.id, record));
  return c;
}

export function deleteConversation(id) {
  return withStore('readwrite', (s) => s.delete(id), () => memory.delete(id));
}

/** A title from the first user message: its first line, cut at a word near 48 characters. */
export function titleFrom(text) {
  const line = String(text).trim().split('\n')[0].replace(/\s+/g, ' ');
  if (line.length <= 48) return line || 'New chat';
  const cut = line.slice(0, 48);
  const space = cut.lastIndexOf(' ');
  return `${space > 24 ? cut.slice(0, space) : cut}…`;
}
