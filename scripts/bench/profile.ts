// Where natproxy spends its CPU under one of the bench's workloads: runs the
// coordinator and local proxy (and the reporter on the connect-back path)
// from src/ under `node --cpu-prof`, drives one workload through them, stops
// them (the profiles are written at exit) and prints the functions with the
// most self time, per process, plus peak RSS while the workload ran.
//
//   node scripts/bench/profile.ts [--path connect-back|outbound] [--workload bulk-https|bulk-http|ttfb|rps|concurrent]
//                                 [--mib 256] [--count 200] [--seconds 5] [--top 25] [--keep DIR]
//
// The .cpuprofile files are kept in --keep DIR (open them in Chrome DevTools
// or speedscope) or in a temp dir that is removed at exit.
import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative, resolve } from "node:path";
import { parseArgs } from "node:util";
import { writePki } from "../lib/pki.ts";
import type { ClientJob } from "./client.ts";
import { loopbackPlacement, natproxyContender, type BenchEnv } from "./contenders.ts";
import { cpuSeconds, killAllChildrenNow, rssKb, sampleRss, startChild, stopAllChildren, stopChild } from "./procs.ts";
import { curlGet, runClient, startTarget } from "./runner.ts";

const ROOT = resolve(import.meta.dirname, "..", "..");
const MiB = 1024 * 1024;
const { values: a } = parseArgs({
  options: {
    path: { type: "string", default: "outbound" },
    workload: { type: "string", default: "bulk-https" },
    mib: { type: "string", default: "256" },
    count: { type: "string", default: "200" },
    seconds: { type: "string", default: "5" },
    top: { type: "string", default: "25" },
    keep: { type: "string" },
    perf: { type: "boolean", default: false },
    /** Trust the coordinator by [local] fingerprint instead of [local] ca (the bench's default, as in the README). */
    pin: { type: "boolean", default: false },
    /** Extra node flags for the natproxy processes, e.g. "--trace-gc" (their output goes to --keep DIR/<role>.log). */
    "node-flags": { type: "string", default: "" },
  },
});
const path = a.path === "connect-back" ? "connect-back" : "outbound";
const tmp = mkdtempSync(join(tmpdir(), "natproxy-bench-profile-"));
const profDir = a.keep ? resolve(a.keep) : join(tmp, "profiles");
mkdirSync(profDir, { recursive: true });
process.on("exit", () => {
  killAllChildrenNow();
  rmSync(tmp, { recursive: true, force: true });
});
for (const sig of ["SIGINT", "SIGTERM"] as const) process.on(sig, () => void stopAllChildren().finally(() => process.exit(130)));

const { caFile, serverCertFile: certFile, serverKeyFile: keyFile, combinedFile, server } = await writePki(tmp, { name: "profile", ipAddresses: ["127.0.0.1"] });

const target = await startTarget(certFile, keyFile, "127.0.0.1");
const env: BenchEnv = {
  tmp,
  root: ROOT,
  natproxyBin: "",
  caFile,
  combinedFile,
  natproxyCommand: (role, file) => ({
    cmd: process.execPath,
    args: ["--cpu-prof", "--cpu-prof-dir", profDir, "--cpu-prof-name", `${role}.cpuprofile`, ...(a["node-flags"] ? a["node-flags"].split(/\s+/) : []), join(ROOT, "src", "cli.ts"), role, "-c", file],
  }),
};
if (a.pin) env.pin = server.fingerprint;
const run = await natproxyContender(`natproxy-${path}`, path).start(env, loopbackPlacement());
const via = run.via;
const job = (j: Partial<ClientJob> & Pick<ClientJob, "mode" | "count">): ClientJob => ({ via, host: "127.0.0.1", httpPort: target.http, httpsPort: target.https, caFile, timeoutMs: 60_000, deadlineMs: 120_000, ...j });
// Warm up (first API call, TLS session ticket, JIT).
await runClient(job({ mode: "ttfb", count: 20 }));

const memPids = run.memPids();
const idleKb = rssKb(memPids);
const cpu0 = cpuSeconds(run.pids());
const stopSampling = sampleRss(memPids, 20);
// --perf: the whole machine sampled with call graphs while the workload runs
// (native frames: TLS, syscalls, the kernel), reported per natproxy process.
const perfData = join(profDir, "perf.data");
const perf = a.perf ? startChild("perf", "perf", ["record", "-a", "-g", "-F", "999", "-o", perfData]) : undefined;
if (perf) await new Promise((r) => setTimeout(r, 500));
const t0 = performance.now();
let summary: string;
const mib = Number(a.mib);
switch (a.workload) {
  case "bulk-https":
  case "bulk-http": {
    const https = a.workload === "bulk-https";
    const r = await curlGet(via, `${https ? "https" : "http"}://127.0.0.1:${https ? target.https : target.http}/bytes/${mib * MiB}`, { caFile, expectBytes: mib * MiB, maxTimeS: 120, home: tmp });
    summary = `${a.workload} ${mib} MiB: ${r.ok ? `${r.mbps.toFixed(0)} MB/s` : `FAILED ${r.error}`}`;
    break;
  }
  case "ttfb": {
    const r = await runClient<{ samples?: Array<{ firstByte: number }> }>(job({ mode: "ttfb", count: Number(a.count) }));
    const s = (r.samples ?? []).map((x) => x.firstByte).sort((x, y) => x - y);
    summary = `ttfb: ${s.length} samples, median ${s[Math.floor(s.length / 2)]?.toFixed(2)} ms`;
    break;
  }
  case "rps": {
    const r = await runClient<{ rps?: number }>(job({ mode: "rps", count: 8, seconds: Number(a.seconds) }));
    summary = `rps: ${r.rps?.toFixed(0)} req/s`;
    break;
  }
  case "concurrent": {
    const r = await runClient<{ totalMs?: number; failed?: number }>(job({ mode: "concurrent", count: Number(a.count), bytes: MiB }));
    summary = `concurrent ${a.count}x1MiB: ${((r.totalMs ?? 0) / 1000).toFixed(2)} s, ${r.failed} failed`;
    break;
  }
  default:
    throw new Error(`unknown workload ${a.workload}`);
}
const wallS = (performance.now() - t0) / 1000;
if (perf) {
  process.kill(perf.pid, "SIGINT");
  await perf.exited;
}
const cpuS = cpuSeconds(run.pids()) - cpu0;
const peak = stopSampling();
const perProcess = run.children.map((c) => `${c.name.replace(/^natproxy-\S+ /, "")} ${(rssKb([c.pid]) / 1024).toFixed(0)} MiB now`).join(", ");
await run.stop();
await stopChild(target.child);
for (const c of run.children) writeFileSync(join(profDir, `${c.name.split(" ").pop()}.log`), c.log());

// ------------------------------------------------------------ profiles

interface ProfNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}
interface Profile {
  nodes: ProfNode[];
  samples: number[];
  timeDeltas: number[];
}
const top = Number(a.top);
const short = (url: string): string => {
  if (!url) return "";
  const p = url.replace(/^file:\/\//, "");
  return p.startsWith("/") ? relative(ROOT, p) : p;
};
const lines: string[] = [`natproxy ${path}${a.pin ? " (fingerprint pin)" : " ([local] ca)"}, ${summary}; wall ${wallS.toFixed(2)} s, natproxy CPU ${cpuS.toFixed(2)} s; peak RSS (local+coordinator) ${(peak.rssKb / 1024).toFixed(0)} MiB, PSS ${(peak.pssKb / 1024).toFixed(0)} MiB, idle ${(idleKb / 1024).toFixed(0)} MiB; ${perProcess}`];
for (const f of readdirSync(profDir).filter((x) => x.endsWith(".cpuprofile")).sort()) {
  const prof = JSON.parse(readFileSync(join(profDir, f), "utf8")) as Profile;
  const byId = new Map(prof.nodes.map((n) => [n.id, n]));
  const self = new Map<number, number>();
  prof.samples.forEach((id, i) => self.set(id, (self.get(id) ?? 0) + (prof.timeDeltas[i] ?? 0)));
  const parent = new Map<number, number>();
  for (const n of prof.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const total = [...self.values()].reduce((x, y) => x + y, 0);
  const idle = [...self].filter(([id]) => byId.get(id)?.callFrame.functionName === "(idle)").reduce((x, [, v]) => x + v, 0);
  const fn = new Map<string, number>();
  const file = new Map<string, number>();
  // Inclusive time of the first src/ frame on each sample's stack: which of natproxy's own functions the time is spent under.
  const srcIncl = new Map<string, number>();
  for (const [id, us] of self) {
    const n = byId.get(id)!;
    const cf = n.callFrame;
    if (cf.functionName === "(idle)") continue;
    const key = `${cf.functionName || "(anonymous)"} ${short(cf.url)}${cf.url ? `:${cf.lineNumber + 1}` : ""}`;
    fn.set(key, (fn.get(key) ?? 0) + us);
    const fk = short(cf.url) || cf.functionName;
    file.set(fk, (file.get(fk) ?? 0) + us);
    let cur: number | undefined = id;
    while (cur !== undefined) {
      const c = byId.get(cur)!.callFrame;
      if (c.url.includes("/src/")) {
        const k = `${c.functionName || "(anonymous)"} ${short(c.url)}:${c.lineNumber + 1}`;
        srcIncl.set(k, (srcIncl.get(k) ?? 0) + us);
        break;
      }
      cur = parent.get(cur);
    }
  }
  const busy = total - idle;
  const pct = (us: number): string => `${((us / busy) * 100).toFixed(1).padStart(5)}%`;
  const list = (m: Map<string, number>, n: number): string[] => [...m].sort((x, y) => y[1] - x[1]).slice(0, n).map(([k, us]) => `    ${pct(us)} ${(us / 1000).toFixed(0).padStart(6)} ms  ${k}`);
  lines.push("", `== ${f}: ${(busy / 1000).toFixed(0)} ms busy of ${(total / 1000).toFixed(0)} ms profiled`);
  lines.push("  self time by function:", ...list(fn, top));
  lines.push("  self time by file:", ...list(file, 12));
  lines.push("  time under natproxy's own functions (innermost src/ frame on the stack):", ...list(srcIncl, 12));
}
if (perf) {
  for (const c of run.children) {
    const r = spawnSync("perf", ["report", "-i", perfData, "--pid", String(c.pid), "--no-children", "--sort", "dso,sym", "--percent-limit", "1.5", "--stdio", "-g", "none"], { encoding: "utf8", maxBuffer: 64 * MiB });
    lines.push("", `== perf, ${c.name} (pid ${c.pid}): self samples by library and symbol`, ...r.stdout.split("\n").filter((l) => l.trim() && !l.startsWith("#")).slice(0, Number(a.top)));
  }
}
lines.push("", a.keep ? `profiles kept in ${profDir}` : "profiles removed (use --keep DIR to keep them)");
process.stdout.write(`${lines.join("\n")}\n`);
await stopAllChildren();
process.exit(0);
