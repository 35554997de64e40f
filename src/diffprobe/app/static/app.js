// diffprobe inspect: every page is built here from the server's JSON; nothing is loaded from
// anywhere but this server.
"use strict";

let RUNS = [];
const page = () => document.getElementById("page");

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "style") el.style.cssText = v; // CSSOM: allowed by the page's CSP
    else if (v !== null && v !== undefined) el.setAttribute(k, v);
  }
  for (const c of children.flat()) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}
const svgNS = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(svgNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "style") el.style.cssText = v;
    else el.setAttribute(k, v);
  }
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}
async function getJSON(url, options) {
  const r = await fetch(url, options);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}
const fmt = (v) => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(3)) : v ?? "–");
const fileURL = (run, rel) => `/files/${run}/${rel.split("/").map(encodeURIComponent).join("/")}`;

function table(rows, columns) {
  columns = columns || Object.keys(rows[0] || {});
  return h("table", {}, h("thead", {}, h("tr", {}, columns.map((c) => h("th", {}, c)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, columns.map((c) => {
      const v = r[c];
      const num = typeof v !== "boolean" && v !== "" && v !== null && !isNaN(Number(v));
      return h("td", num ? { class: "num" } : {}, num ? fmt(Number(v)) : String(v ?? ""));
    })))));
}
function figure(run, rel) {
  return h("img", { class: "figure", src: fileURL(run, rel), alt: rel, title: rel });
}
function stagesOf(kind) {
  const kinds = Array.isArray(kind) ? kind : [kind];
  const out = [];
  for (const run of RUNS) for (const st of run.stages) if (kinds.includes(st.kind)) out.push([run, st]);
  return out;
}
function stagePicker(kind, route, current) {
  const found = stagesOf(kind);
  if (!found.length) return null;
  const sel = h("select", { id: "stage-select", onchange: (e) => { location.hash = `${route}/${e.target.value}`; } },
    found.map(([run, st]) => h("option", { value: `${run.id}/${st.id}` }, `${run.name}/${st.name}`)));
  if (current) sel.value = current;
  return h("label", {}, `${Array.isArray(kind) ? "run" : kind + " stage"} `, sel);
}
function choose(kind, route, args) {
  const found = stagesOf(kind);
  if (!found.length) {
    page().replaceChildren(h("div", { class: "card" }, h("h2", {}, route.slice(1)),
      h("p", { class: "muted" }, `No ${[kind].flat().join(" or ")} stage in the runs given to diffprobe inspect.`)));
    return null;
  }
  if (args.length >= 2) return [Number(args[0]), Number(args[1])];
  found.sort((a, b) => (b[1].levels || 0) - (a[1].levels || 0)); // the richest grid first
  return [found[0][0].id, found[0][1].id];
}

// ---------------------------------------------------------------- runs

function runsPage() {
  const cards = RUNS.map((run) => h("div", { class: "card run" },
    h("h2", {}, run.name), h("p", { class: "where" }, run.path),
    table(run.stages.map((st) => ({ stage: st.name, kind: st.kind, figures: st.figures.length })), ["stage", "kind", "figures"]),
    run.stages.map((st) => h("div", { class: "stage" },
      h("h3", {}, `${st.kind}: ${st.name} `, link(st, run)),
      h("div", {}, st.figures.slice(0, 4).map((f) => h("img", { class: "figure preview", src: fileURL(run.id, f), alt: f, title: f })))))));
  page().replaceChildren(...cards);
}
function link(st, run) {
  const to = { extract: "features", features: "features", anomalies: "anomalies", align: "alignment", lens: "lens" }[st.kind];
  return to ? h("a", { href: `#${to}/${run.id}/${st.id}` }, `open in ${to} →`) : "";
}

// ---------------------------------------------------------------- features

// Extraction runs (mean over items per noise level) and activity runs of `diffprobe features
// capture` (mean over items per stored timestep; peaks, active ranges and top examples from its
// `features analyse` folder where one is served; the generated images as thumbnails).
const FEATURE_KINDS = ["extract", "features"];
const feat = { channel: 0, noise: 0, tab: "top", window: "" };
async function featuresPage(args) {
  const picked = choose(FEATURE_KINDS, "#features", args);
  if (!picked) return;
  const [run, stage] = picked;
  const axes = await getJSON(`/api/features?run=${run}&stage=${stage}`);
  const activity = axes.kind === "features";
  if (feat.key !== `${run}/${stage}`) Object.assign(feat, { key: `${run}/${stage}`, site: axes.sites[0], condition: axes.conditions[0], channel: 0, noise: 0, window: "" });
  const unit = (axes.units && axes.units[feat.site]) || "channel";
  const siteSel = h("select", { id: "site", onchange: (e) => { feat.site = e.target.value; feat.channel = 0; featuresPage(args); } }, axes.sites.map((x) => h("option", { value: x }, x)));
  siteSel.value = feat.site;
  const condSel = h("select", { id: "condition", onchange: (e) => { feat.condition = e.target.value; featuresPage(args); } }, axes.conditions.map((x) => h("option", { value: x }, x)));
  condSel.value = feat.condition;
  const act = await getJSON(`/api/activity?run=${run}&stage=${stage}&site=${encodeURIComponent(feat.site)}&condition=${encodeURIComponent(feat.condition)}`);
  feat.channel = Math.max(0, Math.min(feat.channel, act.channels - 1));
  feat.noise = Math.max(0, Math.min(feat.noise, axes.levels.length - 1));
  const chan = h("input", { id: "channel", type: "number", min: 0, max: act.channels - 1, value: feat.channel,
    onchange: (e) => { feat.channel = Number(e.target.value); featuresPage(args); } });
  const controls = h("div", { class: "controls" }, stagePicker(FEATURE_KINDS, "#features", `${run}/${stage}`),
    h("label", {}, "site ", siteSel), h("label", {}, activity ? "branch " : "condition ", condSel),
    h("button", { id: "prev", onclick: () => { feat.channel = Math.max(0, feat.channel - 1); featuresPage(args); } }, "◀ previous"),
    h("label", {}, `${unit} `, chan, h("span", { id: "unit-count" }, ` of ${act.channels} (${unit}s)`)),
    h("button", { id: "next", onclick: () => { feat.channel = Math.min(act.channels - 1, feat.channel + 1); featuresPage(args); } }, "next ▶"));
  const profile = act.mean[feat.channel];
  const nearest = (t) => axes.levels.reduce((best, v, i) => (Math.abs(v - t) < Math.abs(axes.levels[best] - t) ? i : best), 0);
  // peaks: the analysis' (timesteps on its interpolated grid) where served, else local maxima
  const analysed = act.peaks ? act.peaks[feat.channel] : null;
  const peaks = analysed ? analysed.map(nearest) : peaksOf(profile);
  const name = activity ? "t" : "p";
  const chart = activityChart(axes.levels, profile, peaks, feat.noise, (i) => { feat.noise = i; featuresPage(args); },
    { xlabel: activity ? "timestep t (denoising runs left to right)" : "noise level p (fraction of the schedule)", peakValues: analysed, unit });
  const peakButtons = h("div", { class: "controls", id: "peaks" }, analysed ? `peaks (analysis, ${act.profile || "profile"}): ` : "peaks: ",
    (analysed || peaks.map((i) => axes.levels[i])).map((v, k) => h("button", { class: "peak", onclick: () => { feat.noise = peaks[k]; featuresPage(args); } }, `go to ${name}=${v}`)),
    analysed && !analysed.length ? h("span", { class: "muted" }, "none found") : "");
  const active = act.active ? act.active[feat.channel] : null;
  const activeLine = active ? h("div", { class: "where", id: "active" }, "active timesteps: " + (active.length ? active.map(([a, b]) => (a === b ? `${a}` : `${a}–${b}`)).join(", ") : "none")) : "";
  const windowed = activity && feat.window && axes.windows.includes(feat.window);
  const top = await getJSON(`/api/top?run=${run}&stage=${stage}&site=${encodeURIComponent(feat.site)}&condition=${encodeURIComponent(feat.condition)}&channel=${feat.channel}&noise=${feat.noise}` + (windowed ? `&window=${encodeURIComponent(feat.window)}` : ""));
  const windowSel = activity && axes.windows.length ? h("label", {}, "top examples ", h("select", { id: "window", onchange: (e) => { feat.window = e.target.value; featuresPage(args); } },
    h("option", { value: "" }, `at ${name} = ${axes.levels[feat.noise]}`), axes.windows.map((w) => h("option", { value: w }, w === "overall" ? "overall (mean over timesteps)" : `window ${w.slice(1)}`)))) : "";
  if (windowSel) windowSel.querySelector("select").value = windowed ? feat.window : "";
  const tabs = h("div", { class: "controls tabs" }, ["top", "priors", "dream"].map((t) => h("button", { class: t === feat.tab ? "on" : "", id: `tab-${t}`, onclick: () => { feat.tab = t; featuresPage(args); } },
    { top: "Dataset examples", priors: `${unit[0].toUpperCase() + unit.slice(1)} priors`, dream: "Dream results" }[t])));
  let body;
  if (feat.tab === "top") {
    const src = (t) => (t.image ? fileURL(run, t.image) : `/api/item.png?run=${run}&stage=${stage}&item=${t.item}`);
    body = h("div", {}, windowSel, h("div", { class: "thumbs", id: "top-examples" }, top.map((t) => h("figure", {},
      h("img", { class: "thumb", src: src(t), alt: t.id }),
      h("figcaption", {}, `${t.caption || t.id}`, h("br"), `act ${fmt(t.value)}`)))));
  } else {
    body = await dreamTab(feat.tab, feat.channel, feat.site, unit);
  }
  const where = windowed ? (feat.window === "overall" ? "overall" : `in window ${feat.window.slice(1)}`) : `at ${activity ? "timestep t" : "noise level p"} = ${axes.levels[feat.noise]}`;
  page().replaceChildren(h("div", { class: "card" }, h("h2", { id: "feature-title" }, `Feature browser: ${feat.site} ${unit} ${feat.channel}`),
    controls, h("div", { class: "row" }, h("div", {}, h("h3", {}, `Activity profile (mean over ${axes.items} items)`), chart, peakButtons, activeLine),
      h("div", {}, h("h3", { id: "top-title" }, `${where}: top ${top.length} of ${axes.items} items`), tabs, body))));
}
function peaksOf(values) {
  const out = [];
  for (let i = 0; i < values.length; i++) {
    const left = i === 0 ? -Infinity : values[i - 1], right = i === values.length - 1 ? -Infinity : values[i + 1];
    if (values[i] >= left && values[i] > right) out.push(i);
  }
  return out;
}
function activityChart(levels, values, peaks, current, onPick, opts) {
  opts = opts || {};
  const W = 480, H = 260, L = 80, R = 14, T = 16, B = 44;
  const lo = Math.min(0, ...values), hi = Math.max(...values, lo + 1e-6);
  const span = levels[levels.length - 1] - levels[0];
  const xv = (v) => L + 12 + ((W - L - R - 24) * (v - levels[0])) / (Math.abs(span) < 1e-9 ? 1 : span);
  const x = (i) => xv(levels[i]);
  const y = (v) => T + (H - T - B) * (1 - (v - lo) / (hi - lo));
  const svg = s("svg", { width: W, height: H, id: "profile", role: "img" });
  svg.append(s("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "#555" }), s("line", { x1: L, x2: L, y1: T, y2: H - B, stroke: "#555" }));
  for (const v of [lo, (lo + hi) / 2, hi]) svg.append(s("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", "font-size": 11 }, v.toPrecision(3)));
  const every = Math.max(1, Math.ceil(levels.length / 10)); // at most ~10 tick labels
  levels.forEach((p, i) => { if (i % every === 0 || i === levels.length - 1) svg.append(s("text", { x: x(i), y: H - B + 15, "text-anchor": "middle", "font-size": 11 }, String(p))); });
  svg.append(s("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle", "font-size": 12 }, opts.xlabel || "noise level p (fraction of the schedule)"));
  svg.append(s("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle", "font-size": 12, transform: `rotate(-90 14 ${(T + H - B) / 2})` }, `mean activation of the ${opts.unit || "channel"}`));
  for (const v of opts.peakValues || []) svg.append(s("line", { class: "peak-line", x1: xv(v), x2: xv(v), y1: T, y2: H - B, stroke: "#e08a00", "stroke-width": 2, "stroke-dasharray": "6 3" }));
  svg.append(s("line", { x1: x(current), x2: x(current), y1: T, y2: H - B, stroke: "#d33", "stroke-dasharray": "4 3", id: "current" }));
  svg.append(s("polyline", { points: values.map((v, i) => `${x(i)},${y(v)}`).join(" "), fill: "none", stroke: "#1f5f99", "stroke-width": 2 }));
  values.forEach((v, i) => {
    const dot = s("circle", { cx: x(i), cy: y(v), r: peaks.includes(i) ? 6 : 4, fill: peaks.includes(i) ? "#e08a00" : "#1f5f99", style: "cursor:pointer" });
    dot.addEventListener("click", () => onPick(i));
    svg.append(dot);
  });
  const peakText = opts.peakValues ? "orange dashed lines: the analysis' activity peaks (dots: the nearest stored step)" : "● orange: peaks";
  return h("div", {}, svg, h("div", { class: "legend" }, h("span", {}, peakText), h("span", {}, "dashed red: current step (click a point)")));
}
async function dreamTab(tab, channel, site, unit) {
  unit = unit || "channel";
  // Priors: `diffprobe steer --prior` images of this channel; dreams: `diffprobe dream` results
  // with the optimisation-progress slider over the snapshots and the stats of each step.
  const box = h("div", { id: `${tab}-tab` });
  if (tab === "priors") {
    const found = await getJSON(`/api/priors?channel=${channel}&site=${encodeURIComponent(site)}`);
    if (!found.length) return h("p", { class: "muted", id: "priors-empty" }, `No prior images of ${site} ${unit} ${channel} (diffprobe steer --prior writes them).`);
    for (const f of found) box.append(h("h3", {}, `${f.stage}/${f.folder}`), h("div", { class: "thumbs" }, f.images.map((p) => h("img", { class: "thumb", src: fileURL(f.run, p), alt: p }))));
    return box;
  }
  const found = await getJSON(`/api/dreams?channel=${channel}&site=${encodeURIComponent(site)}&kind=${unit === "channel" ? "channel" : "feature"}`);
  if (!found.length) return h("p", { class: "muted", id: "dream-empty" }, `No dream results for ${site} ${unit} ${channel} (diffprobe dream writes them).`);
  for (const d of found) {
    box.append(h("h3", {}, `${d.stage}/${d.folder}` + (d.site ? ` (${d.site})` : "")));
    for (const t of d.timesteps) {
      const shots = t.snapshots.length ? t.snapshots : t.final;
      if (!shots.length) continue;
      const step = (p) => Number((p.match(/_step_(\d+)\.png$/) || [0, shots.length])[1]); // not timestep_
      const img = h("img", { class: "thumb", src: fileURL(d.run, shots[shots.length - 1]), alt: "dream" });
      const stats = h("div", { class: "where" });
      const show = (i) => {
        img.src = fileURL(d.run, shots[i]);
        // the snapshots are seed 0's; its stats row of step k holds the objective at snapshot k
        // (the last snapshot, after the last update, has none)
        const row = (t.stats || []).find((r) => r.step === step(shots[i]) && (r.seed === undefined || r.seed === 0));
        stats.textContent = `step ${step(shots[i])}` + (row ? " · " + Object.entries(row).filter(([k]) => k !== "step").map(([k, v]) => `${k} ${fmt(v)}`).join(" · ") : " · after the last update (no stats row)");
      };
      const slider = h("input", { type: "range", class: "progress", min: 0, max: shots.length - 1, value: shots.length - 1, oninput: (e) => show(Number(e.target.value)) });
      show(shots.length - 1);
      box.append(h("div", { class: "row" }, img, h("div", {}, h("div", {}, `${t.name}: optimisation progress `, slider), stats, t.final.length ? h("div", { class: "thumbs" }, t.final.map((p) => h("img", { class: "thumb", src: fileURL(d.run, p), alt: p }))) : "")));
    }
    if (d.grid) box.append(figure(d.run, d.grid));
  }
  return box;
}

// ---------------------------------------------------------------- anomalies + labelling

const lab = { item: 0, key: null, history: [] };
async function anomaliesPage(args) {
  const picked = choose("anomalies", "#anomalies", args);
  if (!picked) return;
  const [run, stage] = picked;
  const data = await getJSON(`/api/anomalies?run=${run}&stage=${stage}`);
  if (lab.stage !== `${run}/${stage}`) Object.assign(lab, { stage: `${run}/${stage}`, key: data.keys[0], item: 0, history: [] });
  const keySel = h("select", { id: "key", onchange: (e) => { lab.key = e.target.value; draw(); } }, data.keys.map((k) => h("option", { value: k }, k.replaceAll("|", " · "))));
  keySel.value = lab.key;
  const img = h("img", { id: "normmap", alt: "token norm map" });
  const overlay = s("svg", {});
  const canvas = h("div", { class: "canvas", id: "label-canvas" }, img, overlay);
  const photo = h("img", { class: "thumb", id: "item-image", alt: "the image" });
  const info = h("p", { id: "item-info" });
  const scores = h("div", { class: "scores", id: "scores" });
  const runRef = RUNS[run], inner = runRef.stages.find((st) => st.kind === "extract" && st.name === `${runRef.stages[stage].name}/run`);
  const groupsOf = () => data.labels[`${lab.item}|${lab.key.split("|")[0]}`] || [];
  function showScores(result) {
    const rows = (result.rows || []).filter((r) => `${r.site}|${r.noise}|${r.condition}` === lab.key);
    const r = rows[0];
    scores.replaceChildren(h("div", {}, `${result.images || 0} images labelled, ${result.groups || 0} groups marked`),
      r ? h("div", {}, "detector against your labels (", r.site, "): precision ", h("b", { id: "precision" }, fmt(r.precision)), " · recall ", h("b", { id: "recall" }, fmt(r.recall)),
        ` (${r.matched} matched of ${r.detections} detections, ${r.labels} labels, tolerance ${r.tolerance} token)`) : h("div", { class: "muted" }, "no labels for this site yet"));
  }
  function draw() {
    const items = data.items, grid = data.grids[lab.key];
    lab.item = Math.max(0, Math.min(items - 1, lab.item));
    img.src = `/api/normmap.png?run=${run}&stage=${stage}&key=${encodeURIComponent(lab.key)}&item=${lab.item}`;
    const side = 512, cell = side / Math.max(grid[0], grid[1]);
    img.style.width = `${grid[1] * cell}px`; img.style.height = `${grid[0] * cell}px`;
    overlay.setAttribute("width", grid[1] * cell); overlay.setAttribute("height", grid[0] * cell);
    overlay.replaceChildren();
    for (const d of data.detections[lab.key].filter((d) => d.item === lab.item))
      overlay.append(s("rect", { x: d.x * cell + 1, y: d.y * cell + 1, width: 2 * cell - 2, height: 2 * cell - 2, fill: "none", stroke: "#1e6bff", "stroke-width": 4, "stroke-dasharray": "8 5", class: "detection" }));
    for (const g of groupsOf()) {
      overlay.append(s("rect", { x: g.x * cell + 2, y: g.y * cell + 2, width: 2 * cell - 4, height: 2 * cell - 4, fill: "none", stroke: "#000", "stroke-width": 7 }));
      overlay.append(s("rect", { x: g.x * cell + 2, y: g.y * cell + 2, width: 2 * cell - 4, height: 2 * cell - 4, fill: "none", stroke: "#2ee86a", "stroke-width": 4, class: "label" }));
    }
    if (inner) photo.src = `/api/item.png?run=${run}&stage=${inner.id}&item=${lab.item}`;
    info.textContent = `image ${lab.item + 1} of ${items} (${data.ids[lab.item] || ""}), grid ${grid[0]}×${grid[1]}, ${groupsOf().length} groups marked`;
    showScores(data.scores);
  }
  async function save(groups, remember) {
    const site = lab.key.split("|")[0];
    if (remember) lab.history.push({ item: lab.item, key: lab.key, groups: groupsOf().slice() });
    data.labels[`${lab.item}|${site}`] = groups;
    draw();  // the marks show at once; the scores follow when the server has saved them
    data.scores = await getJSON("/api/labels", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ run, stage, key: lab.key, item: lab.item, groups }) });
    draw();
  }
  img.addEventListener("click", (e) => {
    const grid = data.grids[lab.key], cell = img.clientWidth / grid[1];
    const x = Math.min(grid[1] - 2, Math.max(0, Math.floor(e.offsetX / cell)));
    const y = Math.min(grid[0] - 2, Math.max(0, Math.floor(e.offsetY / cell)));
    const groups = groupsOf().slice();
    const at = groups.findIndex((g) => Math.abs(g.x - x) <= 1 && Math.abs(g.y - y) <= 1);
    if (at >= 0) groups.splice(at, 1); else groups.push({ x, y });
    save(groups, true);
  });
  const next = () => { if (!data.labels[`${lab.item}|${lab.key.split("|")[0]}`]) save([], false); lab.item += 1; draw(); };
  canvas.addEventListener("contextmenu", (e) => { e.preventDefault(); next(); });
  const controls = h("div", { class: "controls" }, stagePicker("anomalies", "#anomalies", `${run}/${stage}`), h("label", {}, "site · noise · condition ", keySel),
    h("button", { id: "prev-image", onclick: () => { lab.item -= 1; draw(); } }, "◀ previous image"),
    h("button", { id: "next-image", onclick: next }, "next image ▶ (right-click)"),
    h("button", { id: "undo", onclick: () => { const last = lab.history.pop(); if (last) { lab.item = last.item; lab.key = last.key; keySel.value = last.key; save(last.groups, false); } } }, "undo"));
  page().replaceChildren(h("div", { class: "card" }, h("h2", {}, "Anomaly labelling"),
    h("p", {}, "Click the upper-left token of a 2×2 group of high-norm tokens to mark it (click it again to remove it); right-click or ", h("i", {}, "next image"), " moves on and records an image you looked at. Labels are saved into the stage's labels/ folder as you go."),
    controls, h("div", { class: "legend" }, h("span", {}, h("i", { class: "sw", style: "border-color:#1e6bff;border-style:dashed" }), "detector"), h("span", {}, h("i", { class: "sw", style: "border-color:#2ee86a" }), "your labels"), h("span", {}, "colour: token L2 norm ÷ the image's largest, 0 black → 1 light yellow (magma)")),
    h("div", { class: "row" }, canvas, h("div", {}, info, photo, scores))));
  draw();
}

// ---------------------------------------------------------------- alignment, lens

function parseCSV(text) {
  const lines = text.split("\n").filter((l) => l && !l.startsWith("#"));
  const head = lines[0].split(",");
  return lines.slice(1).map((l) => Object.fromEntries(l.split(",").map((v, i) => [head[i], v])));
}
async function alignmentPage(args) {
  const picked = choose("align", "#alignment", args);
  if (!picked) return;
  const [run, stage] = picked;
  const st = RUNS[run].stages[stage], prefix = st.name === "." ? "" : `${st.name}/`;
  const rows = parseCSV(await (await fetch(fileURL(run, `${prefix}alignment.csv`))).text());
  rows.sort((a, b) => Number(b.accuracy) - Number(a.accuracy));
  const cols = ["site", "noise", "condition", "accuracy", "normalised", "ceiling", "rsa"].filter((c) => rows[0] && c in rows[0]);
  page().replaceChildren(h("div", { class: "card" }, h("h2", {}, "Alignment: odd-one-out accuracy"), h("div", { class: "controls" }, stagePicker("align", "#alignment", `${run}/${stage}`)),
    h("div", { class: "row" }, h("div", {}, h("h3", {}, `best of ${rows.length} feature sets (chance 0.333)`), table(rows.slice(0, 15), cols)),
      h("div", {}, st.figures.map((f) => figure(run, f))))));
}
async function lensPage(args) {
  const picked = choose("lens", "#lens", args);
  if (!picked) return;
  const [run, stage] = picked;
  const st = RUNS[run].stages[stage], prefix = st.name === "." ? "" : `${st.name}/`;
  const meta = await getJSON(fileURL(run, `${prefix}lens.json`));
  const shown = Object.entries(meta).filter(([k, v]) => typeof v !== "object").map(([k, v]) => ({ key: k, value: v }));
  page().replaceChildren(h("div", { class: "card" }, h("h2", {}, "Diffusion Lens"), h("div", { class: "controls" }, stagePicker("lens", "#lens", `${run}/${stage}`)),
    h("div", { class: "row" }, table(shown, ["key", "value"]), h("div", {}, st.figures.filter((f) => /grid|emergence/.test(f)).map((f) => figure(run, f))))));
}

// ---------------------------------------------------------------- compare

const cmp = { a: 0, b: 1 };
function comparePage() {
  if (RUNS.length < 2) {
    page().replaceChildren(h("div", { class: "card" }, h("h2", {}, "Compare two runs"), h("p", { class: "muted" }, "Give diffprobe inspect two runs to compare them side by side.")));
    return;
  }
  const pick = (which) => { const sel = h("select", { id: `compare-${which}`, onchange: (e) => { cmp[which] = Number(e.target.value); comparePage(); } }, RUNS.map((r) => h("option", { value: r.id }, r.name))); sel.value = cmp[which]; return sel; };
  const A = RUNS[cmp.a], B = RUNS[cmp.b];
  const withFigures = (run, k) => run.stages.some((x) => x.kind === k && x.figures.length);
  const kinds = [...new Set(A.stages.map((x) => x.kind).filter((k) => withFigures(A, k) && withFigures(B, k)))];
  const blocks = kinds.map((kind) => {
    const sa = A.stages.filter((x) => x.kind === kind), sb = B.stages.filter((x) => x.kind === kind);
    const name = (f) => f.split("/").pop();
    const names = [...new Set([...sa.flatMap((x) => x.figures.map(name)), ...sb.flatMap((x) => x.figures.map(name))])];
    return h("div", { class: "card" }, h("h3", {}, kind), names.slice(0, 8).map((n) => {
      const fa = sa.flatMap((x) => x.figures).find((f) => name(f) === n), fb = sb.flatMap((x) => x.figures).find((f) => name(f) === n);
      return h("div", { class: "side" }, h("div", {}, fa ? figure(A.id, fa) : h("p", { class: "muted" }, `${n}: not in ${A.name}`)), h("div", {}, fb ? figure(B.id, fb) : h("p", { class: "muted" }, `${n}: not in ${B.name}`)));
    }));
  });
  page().replaceChildren(h("div", { class: "card" }, h("h2", {}, "Compare two runs"), h("div", { class: "controls" }, h("label", {}, "left ", pick("a")), h("label", {}, "right ", pick("b"))),
    h("p", { class: "muted" }, `stage kinds with figures in both: ${kinds.join(", ") || "none"}; left ${A.path}, right ${B.path}`)), ...blocks);
}

// ---------------------------------------------------------------- router

const ROUTES = { runs: runsPage, features: featuresPage, anomalies: anomaliesPage, alignment: alignmentPage, lens: lensPage, compare: comparePage };
async function route() {
  const [name, ...args] = (location.hash.slice(1) || "runs").split("/");
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("current", a.getAttribute("href") === `#${name}`);
  try {
    await (ROUTES[name] || runsPage)(args);
  } catch (err) {
    page().replaceChildren(h("div", { class: "card" }, h("h2", {}, "Error"), h("p", { id: "error" }, String(err.message || err))));
  }
  document.body.dataset.ready = name;
}
window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", async () => {
  RUNS = await getJSON("/api/runs");
  route();
});
