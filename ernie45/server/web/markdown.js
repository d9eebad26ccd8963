// A small Markdown renderer for model answers: fenced code, headings, lists (nested by indentation), block quotes,
// pipe tables, rules, paragraphs; inline code, bold, italic, strike-through and http(s) links.
//
// Safety: every piece of the source is HTML-escaped before it is placed, and the only tags emitted are the ones
// written below; link targets must be http(s) or mailto. A half-streamed answer (an unclosed fence, a table
// still growing) renders as far as it goes, so it can be re-rendered on every chunk.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

function safeUrl(url) {
  return /^(https?:\/\/|mailto:)/i.test(url) ? url : null;
}

// Inline spans of one block's text (already split from the block syntax).
export function renderInline(text) {
  const codes = [];
  // Code spans first: nothing inside them is markup. \u0000 never occurs in escaped text, so it marks the slots.
  let out = text.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (_, ticks, code) => {
    codes.push(`<code>${escapeHtml(code.trim() === "" ? code : code.replace(/^ (.*) $/s, "$1"))}</code>`);
    return `\u0000${codes.length - 1}\u0000`;
  });
  out = escapeHtml(out);
  const links = [];
  out = out.replace(/\[([^\]\n]+)\]\(([^)\s]+)\)/g, (whole, label, href) => {
    const url = safeUrl(href.replace(/&amp;/g, "&"));
    if (!url) return whole;
    links.push(`<a href="${escapeHtml(url)}" target="_blank" rel="noopener noreferrer">${label}</a>`);
    return `\u0001${links.length - 1}\u0001`;
  });
  out = out.replace(/(^|[\s(])(https?:\/\/[^\s<)]+[^\s<).,;:!?'"])/g, (_, lead, url) => {
    links.push(`<a href="${url}" target="_blank" rel="noopener noreferrer">${url}</a>`);
    return `${lead}\u0001${links.length - 1}\u0001`;
  });
  out = out
    .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
    .replace(/(^|[^*\w])\*(?=[^\s*])([^*]*?[^\s*])\*(?!\*)/g, "$1<em>$2</em>")
    .replace(/(^|[^\w])_(?=[^\s_])([^_]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>")
    .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>")
    .replace(/\n/g, "<br>");
  return out
    .replace(/\u0001(\d+)\u0001/g, (_, i) => links[Number(i)])
    .replace(/\u0000(\d+)\u0000/g, (_, i) => codes[Number(i)]);
}

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^\n]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^( {0,12})([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

function codeBlock(lang, code) {
  const label = lang ? escapeHtml(lang) : "code";
  const cls = lang ? ` class="language-${escapeHtml(lang)}"` : "";
  return `<div class="code-block"><div class="code-head"><span>${label}</span>` +
    `<button type="button" class="copy-code">Copy</button></div><pre><code${cls}>${escapeHtml(code)}</code></pre></div>`;
}

function splitRow(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function table(lines) {
  const head = splitRow(lines[0]);
  const aligns = splitRow(lines[1]).map((c) => (c.startsWith(":") && c.endsWith(":") ? "center"
    : c.endsWith(":") ? "right" : c.startsWith(":") ? "left" : ""));
  const cell = (tag, text, i) => {
    const align = aligns[i] ? ` class="align-${aligns[i]}"` : ""; // classes: the page's CSP allows no inline style
    return `<${tag}${align}>${renderInline(text)}</${tag}>`;
  };
  const body = lines.slice(2).map((line) => {
    const cells = splitRow(line);
    return `<tr>${head.map((_, i) => cell("td", cells[i] ?? "", i)).join("")}</tr>`;
  });
  return `<table><thead><tr>${head.map((h, i) => cell("th", h, i)).join("")}</tr></thead>` +
    `<tbody>${body.join("")}</tbody></table>`;
}

function list(lines, start) {
  // Items of one list: lines at the first item's indent with a marker start new items; the rest (more indented,
  // or lazy continuation text) belong to the current item and are rendered as blocks of their own (nesting).
  const first = ITEM.exec(lines[start]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const items = [];
  let i = start;
  while (i < lines.length) {
    const line = lines[i];
    const m = ITEM.exec(line);
    if (m && m[1].length === indent && /\d/.test(m[2]) === ordered) {
      items.push([m[3]]);
    } else if (m && m[1].length === indent) {
      break; // the other kind of list starts here
    } else if (line.trim() === "") {
      const next = lines[i + 1];
      if (next === undefined || !(next.startsWith(" ".repeat(indent + 2)) || ITEM.test(next))) break;
      items[items.length - 1].push("");
    } else if (m && m[1].length < indent) {
      break;
    } else if (m || line.startsWith(" ".repeat(indent + 1)) || !isBlockStart(line)) {
      items[items.length - 1].push(line.slice(Math.min(indent + 2, line.length - line.trimStart().length)));
    } else {
      break;
    }
    i += 1;
  }
  const tag = ordered ? "ol" : "ul";
  const startNumber = ordered ? parseInt(first[2], 10) : 1;
  const startAttr = ordered && startNumber !== 1 ? ` start="${startNumber}"` : "";
  const html = items.map((item) => {
    const inner = renderBlocks(item);
    // a one-paragraph item renders without its <p>, as tight lists do
    return `<li>${inner.startsWith("<p>") && inner.indexOf("<p>", 1) < 0 ? inner.slice(3).replace(/<\/p>/, "") : inner}</li>`;
  }).join("");
  return [`<${tag}${startAttr}>${html}</${tag}>`, i];
}

function isBlockStart(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
}

function renderBlocks(lines) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (line.trim() === "") {
      i += 1;
    } else if ((m = FENCE.exec(line))) {
      const fence = m[1];
      const body = [];
      i += 1;
      while (i < lines.length && !new RegExp(`^ {0,3}${fence[0]}{${fence.length},}\\s*$`).test(lines[i])) {
        body.push(lines[i]);
        i += 1;
      }
      i += 1; // the closing fence (or the end of a still-streaming answer)
      out.push(codeBlock(m[2], body.join("\n")));
    } else if ((m = HEADING.exec(line))) {
      const level = m[1].length;
      out.push(`<h${level}>${renderInline(m[2])}</h${level}>`);
      i += 1;
    } else if (RULE.test(line)) {
      out.push("<hr>");
      i += 1;
    } else if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && lines[i].trim() !== "" && (m = QUOTE.exec(lines[i]) || [null, lines[i]])) {
        body.push(m[1]);
        i += 1;
      }
      out.push(`<blockquote>${renderBlocks(body)}</blockquote>`);
    } else if (ITEM.test(line)) {
      const [html, next] = list(lines, i);
      out.push(html);
      i = next;
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      const rows = [line, lines[i + 1]];
      i += 2;
      while (i < lines.length && lines[i].includes("|") && lines[i].trim() !== "") {
        rows.push(lines[i]);
        i += 1;
      }
      out.push(table(rows));
    } else {
      const para = [];
      while (i < lines.length && lines[i].trim() !== "" && (para.length === 0 || !isBlockStart(lines[i]))) {
        para.push(lines[i].trim());
        i += 1;
      }
      out.push(`<p>${renderInline(para.join("\n"))}</p>`);
    }
  }
  return out.join("");
}

export function renderMarkdown(text) {
  return renderBlocks(text.replace(/\r\n?/g, "\n").split("\n"));
}
