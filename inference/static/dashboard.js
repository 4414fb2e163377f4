// kface dashboard: reads /api/counts (docs/data-contracts.md, "Counts") and draws it.
// No library, nothing fetched from the internet.
"use strict";
const BANDS = ["20s", "30s", "40s", "50s"];
const GENDERS = ["M", "F"];
const COLOURS = {"20s": "#4e79a7", "30s": "#59a14f", "40s": "#f28e2b", "50s": "#b07aa1"};
const GENDER_NAMES = {"M": "men", "F": "women"};
const params = new URLSearchParams(location.search);
const token = params.get("token");
const $ = (id) => document.getElementById(id);
let timer = null;

function query(extra) {
  const q = new URLSearchParams({day: $("day").value, period: $("period").value});
  if ($("camera").value) q.set("camera", $("camera").value);
  if (token) q.set("token", token);
  return q.toString();
}

function fmt(c) { return `${c.estimate.toFixed(1)} (${c.low.toFixed(0)}–${c.high.toFixed(0)})`; }
function downSeconds(p) { return Object.values(p.downtime).reduce((a, b) => a + b, 0); }
function el(tag, attrs, text) {
  const e = document.createElementNS(tag === "svg" || attrs.svg ? "http://www.w3.org/2000/svg"
                                     : "http://www.w3.org/1999/xhtml", tag);
  for (const [k, v] of Object.entries(attrs)) if (k !== "svg") e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function drawTotals(data) {
  const t = data.total, box = $("totals");
  box.replaceChildren();
  const card = (title, n, sub) => {
    const c = el("div", {class: "card"});
    c.append(el("div", {}, title), el("div", {class: "n"}, n), el("div", {class: "i"}, sub));
    box.append(c);
  };
  card("visitors", String(t.visitors), data.camera ? `camera ${data.camera}` : "all cameras");
  for (const g of GENDERS) card(GENDER_NAMES[g], t.gender[g].estimate.toFixed(1),
                                `95%: ${t.gender[g].low}–${t.gender[g].high}`);
  for (const b of BANDS) card(b, t.age_band[b].estimate.toFixed(1),
                              `95%: ${t.age_band[b].low}–${t.age_band[b].high}`);
  const down = downSeconds(t);
  card("downtime", down ? `${(down / 60).toFixed(1)} min` : "none",
       Object.keys(t.downtime).join(", ") || "every camera up");
}

function drawChart(data) {
  const ps = data.periods, W = Math.max(600, ps.length * 34), H = 220, pad = 30;
  const top = Math.max(1, ...ps.map((p) => BANDS.reduce((a, b) => a + p.age_band[b].estimate, 0)),
                       ...ps.map((p) => Math.max(...BANDS.map((b) => p.age_band[b].high))));
  const svg = el("svg", {width: W, height: H + 40, role: "img",
                         "aria-label": "visitors per period by age band"});
  const bw = (W - pad) / ps.length;
  const y = (v) => H - (v / top) * (H - 10);
  svg.append(el("line", {svg: 1, x1: pad, x2: W, y1: H, y2: H, stroke: "#999"}));
  svg.append(el("text", {svg: 1, x: 2, y: 12, "font-size": 10}, top.toFixed(0)));
  ps.forEach((p, i) => {
    const x = pad + i * bw;
    if (downSeconds(p) > 0) {
      const r = el("rect", {svg: 1, x, y: 0, width: bw, height: H, fill: "#fff3e0"});
      r.append(el("title", {svg: 1}, `downtime ${downSeconds(p).toFixed(0)} s`));
      svg.append(r);
    }
    let base = 0;
    for (const b of BANDS) {
      const v = p.age_band[b].estimate;
      if (v <= 0) continue;
      const r = el("rect", {svg: 1, x: x + 2, width: bw - 4, y: y(base + v),
                            height: y(base) - y(base + v), fill: COLOURS[b],
                            opacity: p.thin ? 0.45 : 1});
      r.append(el("title", {svg: 1}, `${p.label} ${b}: ${fmt(p.age_band[b])}`));
      svg.append(r);
      base += v;
    }
    svg.append(el("text", {svg: 1, x: x + bw / 2, y: H + 14, "font-size": 10,
                           "text-anchor": "middle"},
                  data.period === "hour" ? p.label.slice(11, 13) : p.label.slice(5)));
    if (p.visitors) svg.append(el("text", {svg: 1, x: x + bw / 2, y: y(base) - 3,
                                           "font-size": 9, "text-anchor": "middle"},
                                  String(p.visitors)));
  });
  $("chart").replaceChildren(svg);
  $("legend").replaceChildren(...BANDS.map((b) => {
    const s = el("span", {}); const i = el("i", {style: `background:${COLOURS[b]}`});
    s.append(i, document.createTextNode(b)); return s;
  }), el("span", {}, "pale: too few visitors to split by band; shaded: a camera was down"));
}

function drawTable(data) {
  const cells = BANDS.flatMap((b) => GENDERS.map((g) => `${b}_${g}`));
  const t = $("periods");
  t.replaceChildren();
  const head = el("tr", {});
  head.append(el("th", {class: "label"}, data.period), el("th", {}, "visitors"),
              ...cells.map((c) => el("th", {}, c.replace("_M", " men").replace("_F", " women"))),
              el("th", {}, "downtime"));
  t.append(head);
  const row = (p, cls) => {
    const tr = el("tr", {class: cls + (p.thin ? " thin" : "") + (downSeconds(p) ? " down" : "")
                             + (p.visitors ? "" : " empty")});
    tr.dataset.period = p.label;
    const shown = data.period === "hour" && cls !== "total" ? p.label.slice(11) : p.label;
    tr.append(el("td", {class: "label"}, shown), el("td", {class: "visitors"}, String(p.visitors)),
              ...cells.map((c) => el("td", {class: "cell", "data-cell": c}, fmt(p.joint[c]))),
              el("td", {}, downSeconds(p) ? `${downSeconds(p).toFixed(0)} s` : ""));
    t.append(tr);
  };
  data.periods.filter((p) => !p.future || p.visitors).forEach((p) => row(p, "period"));
  row({...data.total, label: "total"}, "total");
}

async function load() {
  clearTimeout(timer);
  $("csv").href = `api/counts.csv?${query()}`;
  try {
    const r = await fetch(`api/counts?${query()}`);
    const data = await r.json();
    if (!r.ok) throw new Error(data.error || r.statusText);
    const cams = $("camera"), chosen = cams.value;
    for (const c of data.cameras) if (![...cams.options].some((o) => o.value === c))
      cams.append(el("option", {value: c}, c));
    cams.value = chosen;
    drawTotals(data); drawChart(data); drawTable(data);
    $("chart-title").textContent = `Visitors: ${data.view}`;
    $("estimator").textContent = `Estimates: ${data.total.estimator || "no visitors yet"}` +
      (data.total.reference_source ? ` (reference: ${data.total.reference_source})` : "") +
      `. Times: ${data.timezone}. Store: ${data.store}.`;
    $("status").className = "";
    $("status").textContent = `${data.total.visitors} visitors · updated ${new Date().toLocaleTimeString()}`;
    $("status").dataset.loaded = "1";
    const live = data.periods.some((p) => p.future) || data.periods.length === 0;
    if (live) timer = setTimeout(load, 30000);  // the view holds now: refresh
  } catch (e) {
    $("status").className = "error";
    $("status").textContent = `Cannot read the counts: ${e.message}`;
    timer = setTimeout(load, 30000);
  }
}

$("day").value = params.get("day") || new Date().toLocaleDateString("sv");  // YYYY-MM-DD
$("period").value = params.get("period") || "hour";
for (const id of ["day", "period", "camera"]) $(id).addEventListener("change", load);
load();
