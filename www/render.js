// Model replies as Markdown: marked turns the text into HTML and DOMPurify cleans that HTML
// before it touches the page, so a reply can format text and code but never run anything.
// Raw HTML in a reply is shown as the text it is (as the chat apps people know do), images
// become their alt text (an image would be a request to wherever the model pointed), and a link
// is kept only for http(s) and mailto addresses.
import { Marked } from './vendor/marked.esm.js';
import DOMPurify from './vendor/purify.es.mjs';

const ESCAPES = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => ESCAPES[c]);
const SAFE_LINK = /^(https?:|mailto:)/i;

const markdown = new Marked({
  gfm: true,
  breaks: true, // a model's single newlines are lines (haiku, addresses), as chat apps show them
  renderer: {
    html({ text, block }) {
      return block ? `<p class="raw">${escapeHtml(text)}</p>` : escapeHtml(text);
    },
    image({ text }) {
      return escapeHtml(text);
    },
    link({ href, title, tokens }) {
      const inner = this.parser.parseInline(tokens);
      if (!SAFE_LINK.test(String(href).trim())) return inner;
      const t = title ? ` title="${escapeHtml(title)}"` : '';
      return `<a href="${escapeHtml(href)}"${t}>${inner}</a>`;
    },
  },
});

const PURIFY = {
  RETURN_DOM_FRAGMENT: true,
  // the marked output above needs none of these; a sanitiser bug elsewhere should find nothing
  FORBID_TAGS: ['img', 'svg', 'math', 'style', 'form', 'input', 'button', 'textarea', 'select', 'iframe', 'video', 'audio', 'source', 'picture'],
  FORBID_ATTR: ['style', 'id', 'name'],
};

// links from a reply open in a new tab without handing it this page
DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.tagName === 'A') {
    node.setAttribute('target', '_blank');
    node.setAttribute('rel', 'noopener noreferrer');
  }
});

/** Copies `text` to the clipboard; false when the browser refuses. */
export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // a page without clipboard permission (or an old browser) copies through a selection
    const area = document.createElement('textarea');
    area.value = text;
    area.setAttribute('readonly', '');
    area.style.position = 'fixed';
    area.style.opacity = '0';
    document.body.append(area);
    area.select();
    const ok = document.execCommand('copy');
    area.remove();
    return ok;
  }
}

/** A copy button (its label comes from CSS, so a message's text stays the reply's text). */
export function copyButton(label, text) {
  const b = document.createElement('button');
  b.type = 'button';
  b.className = 'copy';
  b.setAttribute('aria-label', label);
  b.onclick = async () => {
    const ok = await copyText(typeof text === 'function' ? text() : text);
    b.classList.toggle('copied', ok);
    b.classList.toggle('copy-failed', !ok);
    setTimeout(() => b.classList.remove('copied', 'copy-failed'), 1500);
  };
  return b;
}

/**
 * `text` (a reply, complete or still streaming) as sanitised DOM nodes: Markdown formatting,
 * code blocks with their language and a copy button.
 */
export function renderMarkdown(text) {
  const html = markdown.parse(String(text ?? ''));
  const frag = DOMPurify.sanitize(html, PURIFY);
  // marked puts newlines between blocks: they would add to the message's text, not its look
  for (const n of [...frag.childNodes]) if (n.nodeType === Node.TEXT_NODE && !n.textContent.trim()) n.remove();
  for (const pre of frag.querySelectorAll('pre')) {
    const code = pre.querySelector('code');
    const lang = /language-([\w+#.-]+)/.exec(code?.className || '')?.[1] || '';
    const box = document.createElement('div');
    box.className = 'code-block';
    if (lang) box.dataset.lang = lang;
    pre.replaceWith(box);
    box.append(copyButton(lang ? `Copy ${lang} code` : 'Copy code', () => (code || pre).textContent), pre);
  }
  return frag;
}
