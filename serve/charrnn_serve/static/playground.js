// The charrnn playground: Generate (streamed), Score (surprisal per character), Neurons (one
// hidden unit at a time). It talks to the server that served it and to nothing else; the API key,
// when the server asks for one, lives in `apiKey` and nowhere else.
"use strict";

const $ = (id) => document.getElementById(id);
const LN2 = Math.log(2);
let apiKey = null;
const keyWaiters = [];  // requests waiting for the key form
let controller = null;  // the generation in flight, to abort
const last = { prompt: "", text: "", seed: null, state: null };  // the last generation, its continuation token
let trace = null;  // the last /v1/states answer

// -- the API ---------------------------------------------------------------------------------

/** fetch `path` (POST `body` as JSON if given); on 401 ask for the key and try again. */
async function api(path, body, signal) {
  for (;;) {
    const headers = body === undefined ? {} : { "Content-Type": "application/json" };
    if (apiKey !== null) headers.Authorization = `Bearer ${apiKey}`;
    const response = await fetch(path, {
      method: body === undefined ? "GET" : "POST", headers, signal,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401) {
      await askForKey(apiKey === null ? null : "That key was refused: try another.");
    } else if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try { message = (await response.json()).error.message; } catch { /* not OpenAI's error object */ }
      throw new Error(message);
    } else {
      return response;
    }
  }
}

function askForKey(message) {
  if (message) $("key-message").textContent = message;
  $("key-form").hidden = false;
  $("api-key").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = $("api-key").value.trim();
  $("api-key").value = "";
  $("key-form").hidden = true;
  keyWaiters.splice(0).forEach((resolve) => resolve());
});

/** The JSON objects of a server-sent event stream, until [DONE]. */
async function* serverEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).split("\n").filter((line) => line.startsWith("data: "))
        .map((line) => line.slice(6)).join("\n");
      buffer = buffer.slice(end + 2);
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function showError(error) {
  $("error").textContent = error.message;
}

/** An event handler running `work`, its error shown in the page. */
function action(work) {
  return (event) => {
    event.preventDefault();
    $("error").textContent = "";
    work().catch(showError);
  };
}

// -- tabs ------------------------------------------------------------------------------------

const tabs = [...document.querySelectorAll('[role="tab"]')];

function selectTab(tab) {
  for (const other of tabs) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
}

tabs.forEach((tab, i) => {
  tab.addEventListener("click", () => selectTab(tab));
  tab.addEventListener("keydown", (event) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (!step) return;
    const next = tabs[(i + step + tabs.length) % tabs.length];
    selectTab(next);
    next.focus();
  });
});

// -- generate --------------------------------------------------------------------------------

/** The generation settings of the form; a random seed when none is given, so it can be shown. */
function settings() {
  const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  const stop = $("stop").value.replaceAll("\\n", "\n").replaceAll("\\t", "\t");
  return {
    max_tokens: number("length"), temperature: number("temperature"), top_k: number("top-k"),
    top_p: number("top-p"), seed: number("seed") ?? crypto.getRandomValues(new Uint32Array(1))[0] >>> 1,
    stop: stop || undefined, stream: true, return_state: true,
  };
}

function setRunning(running) {
  $("generate-form").querySelector('[type="submit"]').disabled = running;
  $("stop-button").disabled = !running;
  $("continue").disabled = running || last.state === null;
  for (const id of ["use-output", "score-output", "trace-output"]) $(id).disabled = running || !last.text;
}

/** Stream a completion into the output; `continuing`: after what is there (from last.state). */
async function generate(body, continuing) {
  const generated = $("output").querySelector(".generated");
  if (!continuing) {
    $("output").querySelector(".echo").textContent = last.prompt = body.prompt;
    generated.textContent = last.text = "";
  }
  last.seed = body.seed;
  last.state = null;
  controller = new AbortController();
  setRunning(true);
  const started = performance.now();
  let count = 0;
  let finish = "…";
  const report = () => {
    const rate = count / Math.max((performance.now() - started) / 1000, 1e-3);
    $("generate-status").textContent = `${count} characters · ${Math.round(rate)} chars/s · seed ${body.seed}`
      + ` · finish reason: ${finish}`;
  };
  try {
    const response = await api("/v1/completions", body, controller.signal);
    for await (const event of serverEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      const [choice] = event.choices;
      generated.append(choice.text);
      last.text += choice.text;
      count += [...choice.text].length;
      last.state = choice.state ?? last.state;
      finish = choice.finish_reason ?? finish;
      report();
    }
  } catch (error) {
    if (error.name !== "AbortError") throw error;
    finish = "stopped here (the server cancels it)";
    last.state = null;
  } finally {
    generated.normalize();
    controller = null;
    report();
    setRunning(false);
  }
}

$("generate-form").addEventListener("submit",
  action(() => generate({ ...settings(), prompt: $("prompt").value }, false)));
$("stop-button").addEventListener("click", () => controller?.abort());
// the same seed: the noise goes on where it stopped, so the text is what one longer generation gives
$("continue").addEventListener("click",
  action(() => generate({ ...settings(), prompt: "", seed: last.seed, state: last.state }, true)));
$("use-output").addEventListener("click", () => { $("prompt").value = last.prompt + last.text; });
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !controller) {
    selectTab($("tab-generate"));
    $("generate-form").requestSubmit();
  }
});

// -- characters shown one span each ----------------------------------------------------------

const visible = (char) => ({ "\n": "⏎", " ": "␣", "\t": "⇥" })[char] ?? char;

/** `chars` as spans in `container`, each painted by paint(span, i); hovering or focusing one calls
 * describe(i); the arrow keys move the focus (one tab stop for the whole text). */
function showChars(container, chars, paint, describe) {
  const spans = chars.map((char, i) => {
    const span = document.createElement("span");
    span.textContent = char === "\n" ? "⏎\n" : char;
    span.tabIndex = i === 0 ? 0 : -1;
    span.dataset.index = i;
    paint(span, i);
    return span;
  });
  container.replaceChildren(...spans);
  container.onfocusin = container.onmouseover = (event) => {
    if (event.target.dataset.index !== undefined) describe(Number(event.target.dataset.index));
  };
  container.onkeydown = (event) => {
    const i = Number(event.target.dataset.index);
    const next = spans[{ ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: spans.length - 1 }[event.key]];
    if (!next) return;
    event.preventDefault();
    event.target.tabIndex = -1;
    next.tabIndex = 0;
    next.focus();
  };
}

// -- score -----------------------------------------------------------------------------------

/** Shade `text` by each character's surprisal, from echo + logprobs with no generation. */
async function score(text) {
  if ([...text].length < 2) throw new Error("Scoring needs at least 2 characters.");
  $("score-status").textContent = "scoring…";
  const response = await api("/v1/completions", { prompt: text, max_tokens: 0, echo: true, logprobs: 5 });
  const { tokens, token_logprobs: logprobs, top_logprobs: tops } = (await response.json()).choices[0].logprobs;
  const bits = logprobs.map((logprob) => (logprob === null ? null : -logprob / LN2));
  showChars($("scored"), tokens, (span, i) => {
    span.dataset.logprob = logprobs[i] ?? "";
    if (bits[i] !== null) span.style.backgroundColor = `hsl(5 85% ${100 - 45 * Math.min(bits[i] / 8, 1)}%)`;
  }, (i) => expected(tokens, i, bits[i], tops[i]));
  const scored = bits.filter((b) => b !== null);
  $("score-status").textContent = `${(scored.reduce((a, b) => a + b, 0) / scored.length).toFixed(3)} bits per `
    + `character (mean over ${scored.length} characters; the first has no context)`;
  $("expected").textContent = "";
}

/** What the model expected at character i: its top 5 next characters after the text before it. */
function expected(tokens, i, bits, top) {
  const panel = $("expected");
  if (top === null) {
    panel.textContent = `“${visible(tokens[i])}” is the first character: nothing to predict it from.`;
    return;
  }
  const heading = document.createElement("p");
  heading.textContent = `“${visible(tokens[i])}”: ${bits.toFixed(2)} bits (p = ${(2 ** -bits).toFixed(3)}). `
    + `After “${tokens.slice(Math.max(0, i - 20), i).map(visible).join("")}” the model expected:`;
  const list = document.createElement("ol");
  for (const [char, logprob] of Object.entries(top).sort((a, b) => b[1] - a[1]).slice(0, 5)) {
    const percent = 100 * Math.exp(logprob);
    const item = document.createElement("li");
    item.textContent = `${visible(char)}  ${percent.toFixed(1)}%`;
    item.style.backgroundSize = `${percent}% 100%`;  // a bar behind the text
    item.classList.toggle("chosen", char === tokens[i]);
    list.append(item);
  }
  panel.replaceChildren(heading, list);
}

$("view-score").querySelector('[data-testid="score"]')
  .addEventListener("click", action(() => score($("prompt").value)));
$("score-output").addEventListener("click", action(() => score(last.prompt + last.text)));

// -- neurons ---------------------------------------------------------------------------------

/** Per character of `chars`, a number that a unit following the pattern would track. */
const PATTERNS = {
  quotes: (chars) => {  // "…", or '…' (an apostrophe between two letters is not a quote)
    let inside = false;
    return chars.map((char, i) => {
      const letters = /\p{L}/u.test(chars[i - 1] ?? "") && /\p{L}/u.test(chars[i + 1] ?? "");
      if (char === '"' || (char === "'" && !letters)) inside = !inside;
      return Number(inside);
    });
  },
  column: (chars) => {
    let column = 0;
    return chars.map((char) => { const at = column; column = char === "\n" ? 0 : column + 1; return at; });
  },
  "line-start": (chars) => chars.map((char, i) => Number(i > 0 && chars[i - 1] === "\n")),
  word: (chars) => { let k = 0; return chars.map((char) => (/\p{L}/u.test(char) ? ++k : (k = 0))); },
  upper: (chars) => chars.map((char) => Number(/\p{Lu}/u.test(char))),
  punctuation: (chars) => chars.map((char) => Number(/\p{P}/u.test(char))),
};

/** Trace `text` through the chosen layer (POST /v1/states), then rank and shade. */
async function traceText(text) {
  const [layer, role] = $("layer").disabled ? ["0", "hidden"] : $("layer").value.split("/");
  $("neurons-status").textContent = "tracing…";
  trace = await (await api("/v1/states", { text, layer: Number(layer), role })).json();
  $("layer").replaceChildren(...trace.layers.map((l) => new Option(`${l.layer} ${l.role} · ${l.size} units`,
    `${l.layer}/${l.role}`, false, l.layer === trace.layer && l.role === trace.role)));
  $("layer").disabled = false;
  $("unit").max = trace.size - 1;
  rankUnits();
  shadeUnit();
}

/** Units by |r|, the correlation of their value with the chosen pattern over the traced text. */
function rankUnits() {
  const pattern = PATTERNS[$("pattern").value](trace.tokens);
  const mean = pattern.reduce((a, b) => a + b, 0) / pattern.length;
  const dx = pattern.map((x) => x - mean);
  const sx = Math.sqrt(dx.reduce((a, d) => a + d * d, 0));
  const list = $("best-units");
  if (sx === 0) {
    const item = Object.assign(document.createElement("li"), { textContent: "The pattern never changes over this text." });
    list.replaceChildren(item);
    return;
  }
  const ranked = [];
  for (let unit = 0; unit < trace.size; unit++) {
    const values = trace.states.map((state) => state[unit]);
    const meanValue = values.reduce((a, b) => a + b, 0) / values.length;
    let sxy = 0;
    let syy = 0;
    values.forEach((value, i) => { sxy += (value - meanValue) * dx[i]; syy += (value - meanValue) ** 2; });
    ranked.push({ unit, r: syy ? sxy / (sx * Math.sqrt(syy)) : 0 });
  }
  ranked.sort((a, b) => Math.abs(b.r) - Math.abs(a.r));
  list.replaceChildren(...ranked.slice(0, 8).map(({ unit, r }) => {
    const button = Object.assign(document.createElement("button"), { type: "button",
      textContent: `unit ${unit}: r = ${r >= 0 ? "+" : "−"}${Math.abs(r).toFixed(2)}` });
    button.addEventListener("click", () => { $("unit").value = unit; shadeUnit(); });
    const item = document.createElement("li");
    item.append(button);
    return item;
  }));
}

/** Shade the traced text by the chosen unit: blue above zero, orange below. */
function shadeUnit() {
  const unit = Math.min(Math.max(Math.trunc(Number($("unit").value)) || 0, 0), trace.size - 1);
  const values = trace.states.map((state) => state[unit]);
  const scale = Math.max(1, ...values.map(Math.abs));  // a GRU's hidden units lie in (-1, 1); an LSTM's cells do not
  const about = `layer ${trace.layer} ${trace.role}, unit ${unit} of ${trace.size}`;
  $("neurons-status").textContent = about;
  showChars($("neurons"), trace.tokens, (span, i) => {
    const x = values[i] / scale;
    span.dataset.value = values[i];
    span.style.backgroundColor = x >= 0 ? `rgb(33 113 181 / ${0.8 * x})` : `rgb(230 85 13 / ${-0.8 * x})`;
  }, (i) => { $("neurons-status").textContent = `${about}: ${values[i]} after “${visible(trace.tokens[i])}”`; });
}

$("trace").addEventListener("click", action(() => traceText($("prompt").value)));
$("trace-output").addEventListener("click", action(() => traceText(last.prompt + last.text)));
$("layer").addEventListener("change", action(() => traceText(trace.tokens.join(""))));
$("pattern").addEventListener("change", () => trace && rankUnits());
$("unit").addEventListener("input", () => trace && shadeUnit());
$("neurons-form").addEventListener("submit", (event) => event.preventDefault());

// -- start -----------------------------------------------------------------------------------

async function connect() {
  const [model] = (await (await api("/v1/models")).json()).data;
  $("length").max = model.max_model_len;
  $("model").textContent = `${model.id} · ${model.variant} on ${model.provider}`;
}

connect().catch(showError);
