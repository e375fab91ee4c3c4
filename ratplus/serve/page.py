"""The playground page (``GET /``): one prompt, every loaded pattern side by side, each streaming
its own completion from ``/v1/completions``, with the request's KV bytes (``/v1/patterns``) and its
tokens per second. Plain HTML and JavaScript, no external files. A server started with
``--api-key`` needs the key in the page's key field: it is sent as ``Authorization: Bearer`` with
every ``/v1`` request and kept in the page only (never stored, never sent elsewhere)."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>ratplus serve</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5em; max-width: 72em; }
  textarea { width: 100%; height: 6em; font: inherit; }
  #outputs { display: flex; gap: 1em; margin-top: 1em; }
  .col { flex: 1; border: 1px solid #bbb; border-radius: 6px; padding: 0.6em; min-width: 0; }
  .col h3 { margin: 0 0 0.4em 0; font-size: 1em; }
  .out { white-space: pre-wrap; min-height: 8em; font-family: ui-monospace, monospace; }
  .stats { color: #555; font-size: 0.85em; margin-top: 0.5em; }
</style>
</head>
<body>
<h1>ratplus serve</h1>
<p>One prompt, every loaded attention pattern side by side (greedy unless you raise the temperature).</p>
<textarea id="prompt" placeholder="Type a prompt">Once upon a time</textarea>
<div>
  <label>max tokens <input id="max_tokens" type="number" value="64" min="1" style="width:5em"></label>
  <label>temperature <input id="temperature" type="number" value="0" min="0" max="2" step="0.1"
    style="width:4em"></label>
  <label>API key <input id="api_key" type="password" autocomplete="off" placeholder="if the server has one"
    style="width:12em"></label>
  <button id="submit">Generate</button>
</div>
<div id="notice" class="stats"></div>
<div id="outputs"></div>
<script>
const outputs = document.getElementById("outputs");
const notice = document.getElementById("notice");
const keyField = document.getElementById("api_key");
let patterns = [];

// /v1 requests carry the key field's value when it has one (servers started with --api-key)
function api(path, options = {}) {
  const headers = {...(options.headers || {})};
  if (keyField.value) headers["Authorization"] = "Bearer " + keyField.value;
  return fetch(path, {...options, headers});
}

async function loadPatterns() {
  const r = await api("/v1/patterns");
  outputs.innerHTML = "";
  patterns = [];
  if (!r.ok) {
    notice.textContent = r.status === 401
      ? "this server needs an API key: type it in the key field"
      : "error: " + (await r.json()).error.message;
    return;
  }
  notice.textContent = "";
  patterns = (await r.json()).data;
  for (const p of patterns) {
    const col = document.createElement("div");
    col.className = "col";
    col.dataset.pattern = p.pattern;
    col.innerHTML = `<h3></h3><div class="out"></div><div class="stats"></div>`;
    col.querySelector("h3").textContent = p.id;
    outputs.appendChild(col);
  }
}

async function run(p, prompt, maxTokens, temperature) {
  const col = outputs.querySelector(`[data-pattern="${CSS.escape(p.pattern)}"]`);
  const out = col.querySelector(".out"), stats = col.querySelector(".stats");
  out.textContent = ""; stats.textContent = "waiting";
  const t0 = performance.now();
  let first = null, tokens = 0, usage = null;
  const r = await api("/v1/completions", {
    method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({model: p.id, prompt, max_tokens: maxTokens, temperature, stream: true,
                          stream_options: {include_usage: true}}),
  });
  if (!r.ok) {
    stats.textContent = "error: " + (await r.json()).error.message;
    col.dataset.done = "1";
    return;
  }
  const reader = r.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let i;
    while ((i = buffer.indexOf("\\n\\n")) >= 0) {
      const line = buffer.slice(0, i).replace(/^data: /, "");
      buffer = buffer.slice(i + 2);
      if (line === "[DONE]") continue;
      const msg = JSON.parse(line);
      if (msg.error) { stats.textContent = "error: " + msg.error.message; col.dataset.done = "1"; return; }
      if (msg.usage) usage = msg.usage;
      for (const c of msg.choices) {
        if (c.text) { out.textContent += c.text; tokens += 1; if (first === null) first = performance.now(); }
      }
    }
  }
  const secs = (performance.now() - (first ?? t0)) / 1000;
  const n = usage ? usage.completion_tokens : tokens;
  let kv = "";
  if (usage) {
    const q = await api(`/v1/patterns?prompt_tokens=${usage.prompt_tokens}&max_tokens=${maxTokens}`);
    const row = (await q.json()).data.find(x => x.pattern === p.pattern);
    kv = `KV ${(row.kv_bytes / 1024).toFixed(1)} KiB, `;
  }
  stats.textContent = `${kv}${n} tokens, ${(n > 1 ? (n - 1) / Math.max(secs, 1e-6) : 0).toFixed(1)} tokens/s`;
  col.dataset.done = "1";
}

// A number field left empty (or not a number) means its default: the value the page was served
// with, written back so the field shows what is sent (never null: the server would read "the rest
// of the context" for max_tokens).
function numberField(id, parse) {
  const input = document.getElementById(id);
  let value = parse(input.value);
  if (!Number.isFinite(value) || value < Number(input.min || -Infinity)) {
    input.value = input.defaultValue;
    value = parse(input.defaultValue);
  }
  return value;
}

const button = document.getElementById("submit");
let running = false;  // one run at a time: a second click (a double click) while running is ignored
button.addEventListener("click", async () => {
  if (running) return;
  running = true;
  button.disabled = true;
  try {
    const prompt = document.getElementById("prompt").value;
    const maxTokens = numberField("max_tokens", v => parseInt(v, 10));
    const temperature = numberField("temperature", parseFloat);
    if (!patterns.length) await loadPatterns();
    for (const col of outputs.children) delete col.dataset.done;
    await Promise.allSettled(patterns.map(p => run(p, prompt, maxTokens, temperature)));
  } finally {
    running = false;
    button.disabled = false;
  }
});
keyField.addEventListener("change", loadPatterns);
loadPatterns();
</script>
</body>
</html>
"""
