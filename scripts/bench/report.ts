// The results table (text) and its chart (SVG, turned into PNG by rsvg-convert).
import type { Summary } from "./stats.ts";

export interface MetricDef {
  key: string;
  /** Column header, short. */
  title: string;
  better: "higher" | "lower";
  /** How the spread is shown: min–max over rounds, or IQR of pooled samples. */
  spread: "range" | "iqr" | "none";
  /** Only proxies have it (memory, CPU): no ratio to direct. */
  proxyOnly?: boolean;
  /** Drawn in the chart's ratio panel. */
  chartRatio?: boolean;
}

export interface Cell {
  summary?: Summary;
  /** summary.median / direct's median. */
  ratio?: number;
  /** Shown instead of a number (e.g. "0/400"). */
  text?: string;
  /** Added to the spread line (e.g. "idle 390"). */
  note?: string;
}

export interface Table {
  contenders: string[];
  metrics: MetricDef[];
  cells: Record<string, Record<string, Cell>>;
}

export function fmt(v: number | undefined): string {
  if (v === undefined || !Number.isFinite(v)) return "—";
  const a = Math.abs(v);
  if (a >= 1000) return Math.round(v).toString();
  if (a >= 100) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  if (a >= 1) return v.toFixed(2);
  return v.toFixed(3);
}

const fmtRatio = (r: number | undefined): string => (r === undefined || !Number.isFinite(r) ? "" : `×${r >= 10 ? r.toFixed(1) : r.toFixed(2)}`);

function cellLines(m: MetricDef, c: Cell | undefined): [string, string] {
  if (!c) return ["—", ""];
  if (c.text !== undefined) return [c.text, ""];
  const s = c.summary;
  if (!s) return ["—", ""];
  const first = `${fmt(s.median)}${c.ratio !== undefined ? ` ${fmtRatio(c.ratio)}` : ""}`;
  const spread = m.spread === "range" ? (s.n > 1 ? `${fmt(s.min)}–${fmt(s.max)}` : "") : m.spread === "iqr" ? `IQR ${fmt(s.q1)}–${fmt(s.q3)}` : "";
  return [first, [spread, c.note].filter(Boolean).join(", ")];
}

/** Rows = contenders, two lines each: median and ratio to direct, then the spread. */
export function renderTable(t: Table): string {
  const header = ["contender", ...t.metrics.map((m) => m.title)];
  const rows: string[][] = [];
  for (const name of t.contenders) {
    const cells = t.metrics.map((m) => cellLines(m, t.cells[name]?.[m.key]));
    rows.push([name, ...cells.map((c) => c[0])]);
    rows.push(["", ...cells.map((c) => c[1])]);
  }
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (r: string[]): string => r.map((x, i) => (i === 0 ? x.padEnd(widths[i]) : x.padStart(widths[i]))).join(" | ");
  const sep = widths.map((w) => "-".repeat(w)).join("-+-");
  const out = [line(header), sep];
  rows.forEach((r, i) => {
    out.push(line(r));
    if (i % 2 === 1 && i < rows.length - 1) out.push(sep.replace(/[-+]/g, (ch) => (ch === "+" ? "+" : "-")));
  });
  return out.join("\n");
}

const esc = (s: string): string => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
const COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948"];

/**
 * Left: ratio to direct for each measurement (log scale, 1 = as fast as no
 * proxy), one bar per proxy. Right: what the proxies cost (CPU per GB, peak
 * memory), absolute.
 */
export function renderSvg(t: Table, title: string, subtitle: string): string {
  const proxies = t.contenders.filter((c) => c !== "direct");
  const color = (c: string): string => COLORS[proxies.indexOf(c) % COLORS.length];
  const W = 1400;
  const H = 640;
  const parts: string[] = [];
  const text = (x: number, y: number, s: string, opts: { size?: number; anchor?: string; weight?: string; fill?: string; rotate?: number } = {}): void => {
    const tr = opts.rotate ? ` transform="rotate(${opts.rotate} ${x} ${y})"` : "";
    parts.push(
      `<text x="${x.toFixed(1)}" y="${y.toFixed(1)}" font-family="DejaVu Sans, sans-serif" font-size="${opts.size ?? 12}" text-anchor="${opts.anchor ?? "start"}" font-weight="${opts.weight ?? "normal"}" fill="${opts.fill ?? "#222"}"${tr}>${esc(s)}</text>`,
    );
  };
  parts.push(`<rect width="${W}" height="${H}" fill="white"/>`);
  text(24, 32, title, { size: 18, weight: "bold" });
  text(24, 52, subtitle, { size: 12, fill: "#555" });

  // Legend.
  proxies.forEach((p, i) => {
    const x = 24 + i * 190;
    parts.push(`<rect x="${x}" y="66" width="14" height="14" fill="${color(p)}"/>`);
    text(x + 20, 78, p, { size: 13 });
  });

  // Left panel: ratios, log2 scale.
  const ratioMetrics = t.metrics.filter((m) => m.chartRatio);
  const L = { x: 70, y: 110, w: 860, h: 430 };
  const ratios = ratioMetrics.flatMap((m) => proxies.map((p) => t.cells[p]?.[m.key]?.ratio).filter((r): r is number => r !== undefined && r > 0 && Number.isFinite(r)));
  const lo = Math.min(0.5, ...ratios.map((r) => 2 ** Math.floor(Math.log2(r))));
  const hi = Math.max(2, ...ratios.map((r) => 2 ** Math.ceil(Math.log2(r))));
  const yOf = (r: number): number => L.y + L.h - ((Math.log2(r) - Math.log2(lo)) / (Math.log2(hi) - Math.log2(lo))) * L.h;
  text(L.x, L.y - 12, "ratio to direct (log scale; 1 = same as no proxy)", { size: 13, weight: "bold" });
  for (let e = Math.log2(lo); e <= Math.log2(hi); e++) {
    const r = 2 ** e;
    const y = yOf(r);
    parts.push(`<line x1="${L.x}" y1="${y}" x2="${L.x + L.w}" y2="${y}" stroke="${r === 1 ? "#333" : "#ddd"}" stroke-width="${r === 1 ? 1.5 : 1}"/>`);
    text(L.x - 8, y + 4, r >= 1 ? `${r}×` : `1/${1 / r}×`, { size: 11, anchor: "end", fill: "#555" });
  }
  const gw = L.w / Math.max(1, ratioMetrics.length);
  const bw = Math.min(36, (gw - 24) / Math.max(1, proxies.length));
  ratioMetrics.forEach((m, gi) => {
    const gx = L.x + gi * gw + (gw - bw * proxies.length) / 2;
    proxies.forEach((p, pi) => {
      const r = t.cells[p]?.[m.key]?.ratio;
      const x = gx + pi * bw;
      if (r === undefined || !(r > 0) || !Number.isFinite(r)) {
        text(x + bw / 2, yOf(1) - 4, "n/a", { size: 9, anchor: "middle", fill: "#999" });
        return;
      }
      const y1 = yOf(1);
      const y2 = yOf(r);
      parts.push(`<rect x="${(x + 2).toFixed(1)}" y="${Math.min(y1, y2).toFixed(1)}" width="${(bw - 4).toFixed(1)}" height="${Math.max(1, Math.abs(y2 - y1)).toFixed(1)}" fill="${color(p)}"/>`);
      text(x + bw / 2, r >= 1 ? y2 - 4 : y2 + 12, r >= 10 ? r.toFixed(0) : r.toFixed(2), { size: 10, anchor: "middle" });
    });
    const cx = L.x + gi * gw + gw / 2;
    text(cx, L.y + L.h + 20, m.title, { size: 12, anchor: "middle", weight: "bold" });
    text(cx, L.y + L.h + 36, m.better === "higher" ? "higher is better" : "lower is better", { size: 11, anchor: "middle", fill: "#666" });
  });

  // Right panel: absolute costs of the proxies.
  const costMetrics = t.metrics.filter((m) => m.proxyOnly);
  const R = { x: 990, y: 110, w: 370 };
  const panelH = 430 / Math.max(1, costMetrics.length);
  costMetrics.forEach((m, mi) => {
    const top = R.y + mi * panelH;
    text(R.x, top - 12 + (mi ? 24 : 0), `${m.title} (lower is better)`, { size: 13, weight: "bold" });
    const vals = proxies.map((p) => t.cells[p]?.[m.key]?.summary?.median);
    const max = Math.max(1e-9, ...vals.filter((v): v is number => v !== undefined));
    const rowH = Math.min(30, (panelH - 40) / Math.max(1, proxies.length));
    proxies.forEach((p, pi) => {
      const y = top + (mi ? 24 : 0) + pi * rowH;
      const v = vals[pi];
      text(R.x + 120, y + rowH * 0.65, p, { size: 11, anchor: "end" });
      if (v === undefined) {
        text(R.x + 128, y + rowH * 0.65, "n/a", { size: 11, fill: "#999" });
        return;
      }
      const w = (v / max) * (R.w - 190);
      parts.push(`<rect x="${R.x + 128}" y="${(y + 3).toFixed(1)}" width="${Math.max(1, w).toFixed(1)}" height="${(rowH - 6).toFixed(1)}" fill="${color(p)}"/>`);
      text(R.x + 132 + w, y + rowH * 0.65, fmt(v), { size: 11 });
    });
  });
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">\n${parts.join("\n")}\n</svg>\n`;
}

export interface LineSeries {
  /** Index into the chart's groups: the colour (e.g. one per tunnel path). */
  group: number;
  /** E.g. medians solid, p99 dashed; the chart's styleNote says which is which. */
  dashed?: boolean;
  points: Array<[number, number]>;
}

export interface LinePanel {
  title: string;
  yLabel: string;
  yLog?: boolean;
  series: LineSeries[];
  /** Drawn under the panel's title. */
  note?: string;
}

/** "Nice" ticks: 1-2-5 steps covering lo..hi. */
function niceTicks(lo: number, hi: number, log: boolean): number[] {
  if (log) {
    const out: number[] = [];
    for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) for (const m of [1, 2, 5]) out.push(m * 10 ** e);
    return out.filter((v) => v >= lo * 0.999 && v <= hi * 1.001);
  }
  const span = hi - lo || 1;
  const raw = span / 6;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? raw;
  const out: number[] = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9 && out.length < 50; v += step) out.push(v);
  return out;
}

/**
 * Panels side by side, one shared x axis kind (log scale, ticks at `xTicks`,
 * e.g. the numbers of tunnels measured), one colour per group.
 */
export function renderLineCharts(c: { title: string; subtitle: string; xLabel: string; xTicks: number[]; groups: string[]; styleNote: string; panels: LinePanel[] }): string {
  const PW = 440;
  const W = 60 + c.panels.length * (PW + 70);
  const H = 560;
  const parts: string[] = [`<rect width="${W}" height="${H}" fill="white"/>`];
  const text = (x: number, y: number, s: string, o: { size?: number; anchor?: string; weight?: string; fill?: string; rotate?: number } = {}): void => {
    const tr = o.rotate ? ` transform="rotate(${o.rotate} ${x} ${y})"` : "";
    parts.push(`<text x="${x.toFixed(1)}" y="${y.toFixed(1)}" font-family="DejaVu Sans, sans-serif" font-size="${o.size ?? 12}" text-anchor="${o.anchor ?? "start"}" font-weight="${o.weight ?? "normal"}" fill="${o.fill ?? "#222"}"${tr}>${esc(s)}</text>`);
  };
  text(24, 32, c.title, { size: 18, weight: "bold" });
  text(24, 52, c.subtitle, { size: 12, fill: "#555" });
  c.groups.forEach((g, i) => {
    const x = 24 + i * 200;
    parts.push(`<line x1="${x}" y1="73" x2="${x + 24}" y2="73" stroke="${COLORS[i % COLORS.length]}" stroke-width="3"/>`);
    text(x + 30, 78, g, { size: 13 });
  });
  text(24 + c.groups.length * 200, 78, c.styleNote, { size: 12, fill: "#555" });

  const xs = c.xTicks.filter((x) => x > 0);
  const xlo = Math.min(...xs);
  const xhi = Math.max(...xs);
  c.panels.forEach((p, pi) => {
    const box = { x: 80 + pi * (PW + 70), y: 130, w: PW, h: 340 };
    text(box.x, box.y - 22, p.title, { size: 14, weight: "bold" });
    if (p.note) text(box.x, box.y - 7, p.note, { size: 11, fill: "#555" });
    const ys = p.series.flatMap((s) => s.points.map(([, y]) => y)).filter((y) => Number.isFinite(y) && (!p.yLog || y > 0));
    if (!ys.length) {
      text(box.x + box.w / 2, box.y + box.h / 2, "no data", { anchor: "middle", fill: "#999" });
      return;
    }
    let ylo = Math.min(...ys);
    let yhi = Math.max(...ys);
    if (p.yLog) {
      ylo = 10 ** Math.floor(Math.log10(ylo));
      yhi = 10 ** Math.ceil(Math.log10(yhi));
    } else {
      ylo = 0;
      yhi = yhi * 1.08 || 1;
    }
    const xOf = (x: number): number => box.x + (xhi === xlo ? 0.5 : (Math.log10(x) - Math.log10(xlo)) / (Math.log10(xhi) - Math.log10(xlo))) * box.w;
    const yOf = (y: number): number => box.y + box.h - (p.yLog ? (Math.log10(y) - Math.log10(ylo)) / (Math.log10(yhi) - Math.log10(ylo) || 1) : (y - ylo) / (yhi - ylo)) * box.h;
    for (const t of niceTicks(ylo, yhi, !!p.yLog)) {
      const y = yOf(t);
      parts.push(`<line x1="${box.x}" y1="${y.toFixed(1)}" x2="${box.x + box.w}" y2="${y.toFixed(1)}" stroke="#e4e4e4"/>`);
      text(box.x - 6, y + 4, String(Number(t.toPrecision(3))), { size: 11, anchor: "end", fill: "#555" });
    }
    for (const t of xs) {
      const x = xOf(t);
      parts.push(`<line x1="${x.toFixed(1)}" y1="${box.y}" x2="${x.toFixed(1)}" y2="${box.y + box.h}" stroke="#eee"/>`);
      text(x, box.y + box.h + 16, String(t), { size: 11, anchor: "middle", fill: "#555" });
    }
    parts.push(`<rect x="${box.x}" y="${box.y}" width="${box.w}" height="${box.h}" fill="none" stroke="#999"/>`);
    text(box.x + box.w / 2, box.y + box.h + 36, c.xLabel, { size: 12, anchor: "middle" });
    text(box.x - 50, box.y + box.h / 2, p.yLabel, { size: 12, anchor: "middle", rotate: -90 });
    for (const s of p.series) {
      const pts = s.points.filter(([x, y]) => x > 0 && Number.isFinite(y) && (!p.yLog || y > 0)).sort((a, b) => a[0] - b[0]);
      if (!pts.length) continue;
      const color = COLORS[s.group % COLORS.length];
      const d = pts.map(([x, y], i) => `${i ? "L" : "M"}${xOf(x).toFixed(1)},${yOf(y).toFixed(1)}`).join(" ");
      parts.push(`<path d="${d}" fill="none" stroke="${color}" stroke-width="2.2"${s.dashed ? ' stroke-dasharray="7,5"' : ""}/>`);
      for (const [x, y] of pts) parts.push(`<circle cx="${xOf(x).toFixed(1)}" cy="${yOf(y).toFixed(1)}" r="3.2" fill="${s.dashed ? "white" : color}" stroke="${color}" stroke-width="1.5"/>`);
    }
  });
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">\n${parts.join("\n")}\n</svg>\n`;
}
