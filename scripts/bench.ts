// npm run bench [-- --quick] [-- --no-delay] [-- --rounds N] [-- --only natproxy-outbound,squid] [-- --rebuild]
//
// Compares natproxy (connect-back and outbound tunnel paths) with no proxy,
// squid and shadowsocks-libev on loopback: bulk throughput, time to first
// byte, 200 concurrent tunnels, small requests per second over keep-alive,
// and CPU per GB moved. Contenders are interleaved (order rotated per round)
// and every measurement is repeated. Then TTFB again with ~20 ms RTT in the
// NAT lab (network namespaces, root; --no-delay skips it). Prints one table
// and the issue's targets, writes bench-results/bench-<timestamp>.json (raw)
// and .png (chart). scripts/bench/profile.ts profiles natproxy under one of
// the same workloads.
// Everything runs on 127.0.0.1 (or in the lab's own namespaces); every child
// process is ended on exit.
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { cpus, loadavg } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { writePki } from "./lib/pki.ts";
import type { ClientJob } from "./bench/client.ts";
import { CONTENDERS, SkipContender, loopbackPlacement, type BenchEnv, type Contender, type RunningContender } from "./bench/contenders.ts";
import { LAB_NAT, LAB_ONE_WAY_DELAY_MS, LAB_SERVER_IPS, runDelayPhase, type DelayResult } from "./bench/delay.ts";
import { cpuSeconds, guardRun, hwmKb, resetPeakRss, rssKb, sampleRss, stopAllChildren, stopChild, type Child } from "./bench/procs.ts";
import { renderSvg, renderTable, type Cell, type MetricDef, type Table } from "./bench/report.ts";
import { curlGet, runClient, startTarget, type CurlResult } from "./bench/runner.ts";
import { ensurePackages, prepareRun } from "./bench/setup.ts";
import { median, summarize } from "./bench/stats.ts";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const MiB = 1024 * 1024;
const T0 = performance.now();
const elapsedS = (): number => (performance.now() - T0) / 1000;
const log = (s: string): void => {
  process.stderr.write(`[bench ${elapsedS().toFixed(1).padStart(5)}s] ${s}\n`);
};

// ---------------------------------------------------------------- options

const { values: args } = parseArgs({
  allowNegative: true,
  options: {
    quick: { type: "boolean", default: false },
    delay: { type: "boolean", default: true },
    rounds: { type: "string" },
    only: { type: "string" },
    rebuild: { type: "boolean", default: false },
    out: { type: "string", default: "bench-results" },
    "bulk-mib": { type: "string" },
    pin: { type: "boolean", default: false },
    help: { type: "boolean", short: "h", default: false },
  },
});
if (args.help) {
  process.stdout.write(`npm run bench [-- options]
  --quick          fewer rounds and samples (under 2 minutes)
  --no-delay       skip TTFB with ~20 ms RTT in the NAT lab (network namespaces, root; ~20 s quick, ~45 s default)
  --rounds N       rounds (default 5, quick 2)
  --only a,b       contenders to run (direct always runs: it is the reference)
  --bulk-mib N     size of each bulk download (default 256, quick 128)
  --pin            natproxy trusts its coordinator by [local] fingerprint instead of [local] ca (the default, as in the README quick start)
  --rebuild        rebuild dist/natproxy even if it exists
  --out DIR        results directory (default bench-results)
contenders: ${CONTENDERS.map((c) => c.name).join(", ")}
`);
  process.exit(0);
}

const quick = args.quick;
const opts = {
  quick,
  delay: args.delay,
  rounds: Math.max(1, Math.min(20, Number(args.rounds ?? (quick ? 2 : 5)) || 1)),
  bulkBytes: Math.max(1, Number(args["bulk-mib"] ?? (quick ? 128 : 256)) || 256) * MiB,
  /** Per contender at start-up, before any round: JIT, TCP autotuning, pools. */
  warmupBytes: (quick ? 16 : 32) * MiB,
  ttfbCount: quick ? 30 : 200,
  rttCount: quick ? 100 : 200,
  concurrency: 200,
  concurrencyBytes: 1 * MiB,
  rpsConnections: 8,
  rpsSeconds: quick ? 1.5 : 5,
  delayRounds: quick ? 1 : 2,
  delayTtfbCount: quick ? 10 : 40,
  /** The loopback rounds, setup included; rounds that would not fit are not started. */
  budgetS: quick ? 88 : 470,
  /** Added to the budget for the NAT-lab phase (skipped if less than half of it is left). */
  delayExtraS: quick ? 24 : 80,
  /** Per curl download / per client operation. */
  opTimeoutS: quick ? 30 : 60,
};

// ---------------------------------------------------------------- cleanup

const guard = guardRun("bench", log);

// ---------------------------------------------------------------- setup

log(`natproxy bench${quick ? " --quick" : ""}${opts.delay ? "" : " --no-delay"}: ${opts.rounds} rounds, budget ${opts.budgetS} s + ${opts.delay ? opts.delayExtraS : 0} s (NAT lab)`);
ensurePackages(log);
const { home, natproxyBin, origin, buildNote, release: releaseWatchdog } = prepareRun({ root: ROOT, rebuild: args.rebuild, prefix: "natproxy-bench-", guard, log });

// 127.0.0.1 for loopback; the NAT lab's coordinator and web hosts for --delay.
const pki = await writePki(home, { name: "bench", ipAddresses: ["127.0.0.1", ...LAB_SERVER_IPS] });

const target = await startTarget(pki.serverCertFile, pki.serverKeyFile, "127.0.0.1");
const targetPid = target.child.pid;
log(`target: HTTP 127.0.0.1:${target.http}, HTTPS 127.0.0.1:${target.https} (pid ${targetPid})`);

const env: BenchEnv = { tmp: home, root: ROOT, natproxyBin, caFile: pki.caFile, combinedFile: pki.combinedFile, pin: args.pin ? pki.server.fingerprint : undefined };
const wanted = args.only ? new Set(["direct", ...args.only.split(",").map((s) => s.trim())]) : undefined;
const curlOpts = (expectBytes: number) => ({ caFile: pki.caFile, expectBytes, maxTimeS: opts.opTimeoutS, home });
const job = (j: Omit<ClientJob, "host" | "httpPort" | "httpsPort" | "caFile">): ClientJob => ({ ...j, host: "127.0.0.1", httpPort: target.http, httpsPort: target.https, caFile: pki.caFile });

interface Entry {
  def: Contender;
  run?: RunningContender;
  status: "ran" | "skipped" | "failed";
  note?: string;
  /** Every process this contender ever had (restarts included), for their stderr. */
  allChildren: Child[];
  /** Processes that exited on their own during the run. */
  deaths: Array<{ when: string; process: string; exit: string; stderrTail: string }>;
  restarts: number;
}
const MAX_RESTARTS = 2;
const entries: Entry[] = [];
const placement = loopbackPlacement();

/** Starts a contender and checks with one HTTPS and one HTTP request that it carries traffic. */
async function bringUp(e: Entry): Promise<void> {
  try {
    e.run = await e.def.start(env, placement);
    e.allChildren.push(...e.run.children);
    const a = await curlGet(e.run.via, `https://127.0.0.1:${target.https}/small`, curlOpts(2));
    const b = await curlGet(e.run.via, `http://127.0.0.1:${target.http}/small`, curlOpts(2));
    if (!a.ok || !b.ok) throw new Error(`warm-up request failed: ${a.error ?? ""} ${b.error ?? ""}`.trim());
    // Warm-up, the same for everyone: a first bulk transfer costs a Node
    // process about 1.5x the CPU per byte of later ones (JIT, heap growth).
    for (const kind of ["https", "http"] as const) {
      const w = await curlGet(e.run.via, `${kind}://127.0.0.1:${kind === "https" ? target.https : target.http}/bytes/${opts.warmupBytes}`, curlOpts(opts.warmupBytes));
      if (!w.ok) throw new Error(`warm-up download (${kind}) failed: ${w.error}`);
    }
    await runClient(job({ mode: "ttfb", via: e.run.via, count: 10, timeoutMs: 10_000, deadlineMs: 20_000 }));
  } catch (err) {
    await e.run?.stop();
    e.run = undefined;
    throw err;
  }
}

/**
 * True when all of the contender's processes still run. One that exited on
 * its own (crash, or killed from outside) is recorded; the contender is then
 * restarted, at most MAX_RESTARTS times.
 */
async function alive(e: Entry, when: string): Promise<boolean> {
  if (!e.run || guard.interrupted) return false;
  const dead = e.run.children.filter((c) => !c.isRunning());
  if (dead.length === 0) return true;
  for (const c of dead) {
    const tail = c.log().trim().slice(-2000);
    e.deaths.push({ when, process: c.name, exit: c.exitInfo() ?? "?", stderrTail: tail });
    log(`  ${c.name} EXITED (${c.exitInfo()}) ${when}${tail ? `: ${tail.split("\n").slice(-3).join(" | ")}` : ", nothing on stderr"}`);
  }
  await e.run.stop();
  e.run = undefined;
  if (e.restarts >= MAX_RESTARTS) {
    log(`  ${e.def.name}: not restarted again; it is left out of the rest of the run`);
    return false;
  }
  e.restarts++;
  try {
    await bringUp(e);
    log(`  ${e.def.name}: restarted (pids ${e.run!.pids().join(" ")})`);
    return true;
  } catch (err) {
    log(`  ${e.def.name}: restart failed: ${(err as Error).message}`);
    return false;
  }
}

for (const def of CONTENDERS) {
  if (wanted && !wanted.has(def.name)) continue;
  const e: Entry = { def, status: "ran", allChildren: [], deaths: [], restarts: 0 };
  entries.push(e);
  try {
    await bringUp(e);
    log(`${def.name}: up (${def.describe}; pids ${e.run!.pids().join(" ") || "none"})`);
  } catch (err) {
    e.status = err instanceof SkipContender ? "skipped" : "failed";
    e.note = (err as Error).message;
    log(`${def.name}: ${e.status.toUpperCase()}: ${e.note}`);
  }
}
const active = entries.filter((e) => e.run);
if (!active.some((e) => e.def.name === "direct")) throw new Error("direct (the reference) is not in the run");

// ---------------------------------------------------------------- rounds

interface Failure {
  stage: string;
  message: string;
}
interface BulkRun extends CurlResult {
  cpuS: number | null;
  targetCpuS: number;
}
interface ConcurrentRun {
  totalMs?: number;
  ok?: number;
  failed?: number;
  failures?: Failure[];
  tunnelMs?: number[];
  firstByteMs?: number[];
  peakKb?: number;
  hwmKb?: number;
  sampledKb?: number;
  /** Sampled peak of the summed PSS (shared binary pages counted once). */
  peakPssKb?: number;
  idleKb?: number;
  hwmReset?: boolean;
  cpuS?: number | null;
  error?: string;
}
interface RpsRun {
  rps?: number;
  completed?: number;
  seconds?: number;
  connections?: number;
  latencyMs?: Record<string, number | null>;
  failureCount?: number;
  failures?: Failure[];
  cpuS?: number | null;
  error?: string;
}
interface TtfbRun {
  samples?: Array<{ tcp: number; tunnel: number; tls: number; firstByte: number; total: number }>;
  failures?: Failure[];
  error?: string;
}
interface RoundData {
  index: number;
  order: string[];
  durationS: number;
  rtt?: { samplesMs?: number[]; failures?: Failure[]; error?: string };
  bulk: Record<string, { https?: BulkRun; http?: BulkRun }>;
  ttfb: Record<string, TtfbRun>;
  concurrent: Record<string, ConcurrentRun>;
  rps: Record<string, RpsRun>;
  skippedForTime: string[];
  /** 1-minute load average at the start and end of the round: other work on the machine skews the numbers. */
  load: [number, number];
}
const rounds: RoundData[] = [];
const runNotes: string[] = buildNote ? [buildNote] : [];
const loopBudgetS = opts.budgetS;
const timeLeftMs = (): number => Math.max(1000, (loopBudgetS - elapsedS()) * 1000);
const cpuOf = (e: Entry): number | null => (e.def.name === "direct" ? null : cpuSeconds(e.run!.pids()));
const round3 = (xs: number[] | undefined): number[] | undefined => xs?.map((x) => Math.round(x * 1000) / 1000);

let longestRoundS = 0;
for (let r = 0; r < opts.rounds && !guard.interrupted; r++) {
  // A round is started only if it fits, with time left to write the results.
  if (r > 0 && elapsedS() + longestRoundS * 1.1 + 3 > loopBudgetS) {
    runNotes.push(`stopped after ${r} of ${opts.rounds} rounds: the next would not fit in the time budget`);
    log(runNotes[runNotes.length - 1]);
    break;
  }
  const started = elapsedS();
  const order = active.map((_, i) => active[(i + r) % active.length]);
  const rd: RoundData = { index: r, order: order.map((e) => e.def.name), durationS: 0, bulk: {}, ttfb: {}, concurrent: {}, rps: {}, skippedForTime: [], load: [loadavg()[0], 0] };
  rounds.push(rd);
  const late = (what: string): boolean => {
    if (elapsedS() < loopBudgetS - 8) return false;
    rd.skippedForTime.push(what);
    return true;
  };
  log(`round ${r + 1}/${opts.rounds}: order ${rd.order.join(", ")}`);

  // Loopback RTT: TCP connect time to the target, straight.
  rd.rtt = await runClient(job({ mode: "rtt", via: { kind: "direct" }, count: opts.rttCount, timeoutMs: 5000, deadlineMs: Math.min(20_000, timeLeftMs()) }));

  // 1 + 5: bulk downloads, with the proxies' CPU time around each.
  const each = async (what: string, fn: (e: Entry) => Promise<void>): Promise<void> => {
    for (const e of order) {
      if (guard.interrupted) return;
      if (late(`${what} ${e.def.name}`)) continue;
      if (!(await alive(e, `before ${what}, round ${r + 1}`))) continue;
      await fn(e);
      await alive(e, `during ${what}, round ${r + 1}`);
    }
  };

  await each("bulk", async (e) => {
    const b: RoundData["bulk"][string] = (rd.bulk[e.def.name] = {});
    for (const kind of ["https", "http"] as const) {
      const url = `${kind}://127.0.0.1:${kind === "https" ? target.https : target.http}/bytes/${opts.bulkBytes}`;
      const c0 = cpuOf(e);
      const t0 = cpuSeconds([targetPid]);
      const res = await curlGet(e.run!.via, url, curlOpts(opts.bulkBytes));
      const c1 = cpuOf(e);
      b[kind] = { ...res, cpuS: c0 === null || c1 === null ? null : c1 - c0, targetCpuS: cpuSeconds([targetPid]) - t0 };
      if (!res.ok) log(`  bulk ${kind} ${e.def.name}: FAILED ${res.error}`);
    }
    log(`  bulk ${e.def.name}: HTTPS ${b.https?.mbps.toFixed(0)} MB/s, HTTP ${b.http?.mbps.toFixed(0)} MB/s`);
  });

  // 2: time to first byte, a fresh connection and TLS handshake each time.
  await each("ttfb", async (e) => {
    const res = await runClient<TtfbRun>(job({ mode: "ttfb", via: e.run!.via, count: opts.ttfbCount, timeoutMs: opts.opTimeoutS * 1000, deadlineMs: Math.min(60_000, timeLeftMs()) }));
    rd.ttfb[e.def.name] = res;
    const m = median((res.samples ?? []).map((s) => s.firstByte));
    log(`  ttfb ${e.def.name}: median ${m?.toFixed(2)} ms over ${res.samples?.length ?? 0}${res.failures?.length ? `, ${res.failures.length} failed` : ""}${res.error ? ` ERROR ${res.error}` : ""}`);
  });

  // 3: 200 concurrent tunnels × 1 MiB, with the proxies' peak memory.
  await each("concurrent", async (e) => {
    const pids = e.def.name === "direct" ? [] : e.run!.memPids();
    const idleKb = rssKb(pids);
    const hwmReset = resetPeakRss(pids);
    const stopSampling = sampleRss(pids, 20);
    const c0 = cpuOf(e);
    const res = await runClient<ConcurrentRun>(job({ mode: "concurrent", via: e.run!.via, count: opts.concurrency, bytes: opts.concurrencyBytes, timeoutMs: opts.opTimeoutS * 1000, deadlineMs: Math.min(opts.opTimeoutS * 1000 + 5000, timeLeftMs()) }));
    const { rssKb: sampledKb, pssKb: peakPssKb } = stopSampling();
    const c1 = cpuOf(e);
    const hwm = hwmKb(pids);
    const peakKb = pids.length ? (hwmReset ? Math.max(hwm, sampledKb) : sampledKb) : undefined;
    rd.concurrent[e.def.name] = { ...res, tunnelMs: round3(res.tunnelMs), firstByteMs: round3(res.firstByteMs), peakKb, hwmKb: hwm, sampledKb, peakPssKb, idleKb, hwmReset, cpuS: c0 === null || c1 === null ? null : c1 - c0 };
    const kinds = [...new Set((res.failures ?? []).map((f) => f.message))].slice(0, 3).join("; ");
    log(`  concurrent ${e.def.name}: ${((res.totalMs ?? 0) / 1000).toFixed(2)} s, ${res.failed ?? "?"} failed${kinds ? ` (${kinds})` : ""}${peakKb ? `, peak RSS ${(peakKb / 1024).toFixed(0)} MiB (idle ${(idleKb / 1024).toFixed(0)})` : ""}${res.error ? ` ERROR ${res.error}` : ""}`);
  });

  // 4: small requests per second over keep-alive, plain HTTP.
  await each("rps", async (e) => {
    const c0 = cpuOf(e);
    const res = await runClient<RpsRun>(job({ mode: "rps", via: e.run!.via, count: opts.rpsConnections, seconds: opts.rpsSeconds, timeoutMs: 10_000, deadlineMs: opts.rpsSeconds * 1000 + 15_000 }));
    const c1 = cpuOf(e);
    rd.rps[e.def.name] = { ...res, cpuS: c0 === null || c1 === null ? null : c1 - c0 };
    log(`  rps ${e.def.name}: ${res.rps?.toFixed(0)} req/s${res.failureCount ? `, ${res.failureCount} failed` : ""}${res.error ? ` ERROR ${res.error}` : ""}`);
  });
  rd.durationS = elapsedS() - started;
  rd.load[1] = loadavg()[0];
  longestRoundS = Math.max(longestRoundS, rd.durationS);
  if (rd.skippedForTime.length) runNotes.push(`round ${r + 1}: skipped for time: ${rd.skippedForTime.join(", ")}`);
}

// ---------------------------------------------------------------- --delay

let delay: DelayResult | undefined;
const delayLeftS = (): number => opts.budgetS + opts.delayExtraS - 8 - elapsedS();
if (opts.delay && !guard.interrupted && delayLeftS() < opts.delayExtraS / 2) {
  delay = { measured: false, note: `skipped: ${delayLeftS().toFixed(0)} s left of the time budget`, rttSamplesMs: [], contenders: {} };
  log(`--delay: NOT measured: ${delay.note}`);
} else if (opts.delay && !guard.interrupted) {
  try {
    delay = await runDelayPhase({
      contenders: active.map((e) => e.def),
      env,
      pki,
      rounds: opts.delayRounds,
      count: opts.delayTtfbCount,
      rttCount: 50,
      opTimeoutMs: 15_000,
      timeLeftS: delayLeftS,
      log,
    });
  } catch (err) {
    delay = { measured: false, note: `the NAT lab failed: ${(err as Error).message}`, rttSamplesMs: [], contenders: {} };
  }
  if (!delay.measured || delay.note) log(`--delay: ${delay.measured ? "" : "NOT measured: "}${delay.note}`);
}

// ---------------------------------------------------------------- summary

const names = active.map((e) => e.def.name);
const rttAll = rounds.flatMap((rd) => rd.rtt?.samplesMs ?? []);
const rttMedianMs = median(rttAll);
const delayRttMs = delay?.measured ? median(delay.rttSamplesMs) : undefined;
const labDirectMs = median(delay?.contenders.direct?.rounds.flatMap((r) => r.samples.map((s) => s.firstByte)) ?? []);
const METRICS: MetricDef[] = [
  { key: "https", title: "HTTPS MB/s", better: "higher", spread: "range", chartRatio: true },
  { key: "http", title: "HTTP MB/s", better: "higher", spread: "range", chartRatio: true },
  { key: "ttfb", title: "TTFB ms", better: "lower", spread: "iqr", chartRatio: true },
  ...(delay?.measured
    ? ([
        { key: "ttfbDelay", title: "TTFB ms @20ms RTT", better: "lower", spread: "iqr", chartRatio: true },
        { key: "ttfbDelayRtt", title: "RTTs @20ms (+direct)", better: "lower", spread: "none" },
      ] satisfies MetricDef[])
    : []),
  { key: "conc", title: "200x1MiB s", better: "lower", spread: "range", chartRatio: true },
  { key: "concFail", title: "failed", better: "lower", spread: "none" },
  { key: "rss", title: "peak RSS MiB", better: "lower", spread: "range", proxyOnly: true },
  { key: "rps", title: "small req/s", better: "higher", spread: "range", chartRatio: true },
  { key: "cpu", title: "CPU s/GB", better: "lower", spread: "range", proxyOnly: true },
];
const cells: Record<string, Record<string, Cell>> = {};
for (const n of names) {
  const okBulk = (k: "https" | "http") => rounds.map((rd) => rd.bulk[n]?.[k]).filter((b): b is BulkRun => !!b && b.ok);
  const ttfbSamples = rounds.flatMap((rd) => (rd.ttfb[n]?.samples ?? []).map((s) => s.firstByte));
  const perRoundRtts = rounds.flatMap((rd) => {
    const t = median((rd.ttfb[n]?.samples ?? []).map((s) => s.firstByte));
    const rt = median(rd.rtt?.samplesMs ?? []);
    return t !== undefined && rt ? [t / rt] : [];
  });
  const conc = rounds.map((rd) => rd.concurrent[n]).filter((c) => c && c.totalMs !== undefined);
  const failed = conc.reduce((s, c) => s + (c.failed ?? 0), 0);
  const tried = conc.reduce((s, c) => s + (c.ok ?? 0) + (c.failed ?? 0), 0);
  const cpuPerGb = rounds.flatMap((rd) => {
    const b = rd.bulk[n];
    if (!b?.https?.ok || !b.http?.ok || b.https.cpuS === null || b.http.cpuS === null) return [];
    return [(b.https.cpuS + b.http.cpuS) / ((b.https.bytes + b.http.bytes) / 1e9)];
  });
  const idle = median(conc.map((c) => (c.idleKb ?? NaN) / 1024));
  const lab = delay?.contenders[n]?.rounds.flatMap((r) => r.samples.map((s) => s.firstByte)) ?? [];
  const labSummary = summarize(lab);
  const labRtts = labSummary && delayRttMs ? labSummary.median / delayRttMs : undefined;
  const labAdded = labSummary && delayRttMs && labDirectMs !== undefined ? (labSummary.median - labDirectMs) / delayRttMs : undefined;
  cells[n] = {
    https: { summary: summarize(okBulk("https").map((b) => b.mbps)) },
    http: { summary: summarize(okBulk("http").map((b) => b.mbps)) },
    ttfb: { summary: summarize(ttfbSamples) },
    ttfbRtt: { summary: summarize(perRoundRtts) },
    ttfbDelay: { summary: labSummary },
    ttfbDelayRtt: {
      summary: labRtts !== undefined ? summarize([labRtts]) : undefined,
      // Absolute, then what the proxy adds over direct's TCP + TLS + request.
      text: labRtts === undefined ? undefined : n === "direct" ? `${labRtts.toFixed(2)} (ref)` : `${labRtts.toFixed(2)} (+${labAdded?.toFixed(2) ?? "?"})`,
    },
    // A run with failures still has a total time; the failures column says so.
    conc: { summary: summarize(conc.map((c) => (c.totalMs ?? 0) / 1000)) },
    concFail: { text: tried ? `${failed}/${tried}` : "—" },
    rss: n === "direct" ? { text: "—" } : { summary: summarize(conc.map((c) => (c.peakKb ?? NaN) / 1024)), note: idle !== undefined ? `idle ${idle.toFixed(0)}` : undefined },
    rps: { summary: summarize(rounds.map((rd) => rd.rps[n]?.rps ?? NaN)) },
    cpu: n === "direct" ? { text: "—" } : { summary: summarize(cpuPerGb) },
  };
}
for (const m of METRICS) {
  if (m.proxyOnly || m.spread === "none" || m.key === "ttfbRtt") continue;
  const ref = cells.direct?.[m.key]?.summary?.median;
  for (const n of names) {
    const s = cells[n][m.key]?.summary;
    if (s && ref) cells[n][m.key].ratio = s.median / ref;
  }
}
const table: Table = { contenders: names, metrics: METRICS, cells };

// The issue's targets for natproxy, checked against the medians above.
interface TargetCheck {
  contender: string;
  target: string;
  value: string;
  met: boolean | null;
}
const targetChecks: TargetCheck[] = [];
for (const n of names.filter((x) => x.startsWith("natproxy"))) {
  const c = cells[n];
  const check = (target: string, v: number | undefined, fmtV: (v: number) => string, ok: (v: number) => boolean, extra = ""): void => {
    targetChecks.push({ contender: n, target, value: v === undefined ? "not measured" : `${fmtV(v)}${extra}`, met: v === undefined ? null : ok(v) });
  };
  check("HTTPS bulk >= 0.6x direct", c.https?.ratio, (v) => `${v.toFixed(2)}x`, (v) => v >= 0.6);
  check("CPU <= 4 s/GB", c.cpu?.summary?.median, (v) => `${v.toFixed(2)} s/GB`, (v) => v <= 4);
  const outbound = n.includes("outbound");
  const labS = summarize(delay?.contenders[n]?.rounds.flatMap((r) => r.samples.map((x) => x.firstByte)) ?? []);
  // Round trips as the issue counts them (direct measures about 3): the
  // median first byte over the lab's RTT, CPU time on the way included.
  const rtts = labS && delayRttMs ? labS.median / delayRttMs : undefined;
  const directRtts = labDirectMs !== undefined && delayRttMs ? labDirectMs / delayRttMs : undefined;
  check(
    `first byte <= ${outbound ? "2.0" : "4.0"} round trips @20ms${outbound ? " (warm pool)" : ""}`,
    rtts,
    (v) => `${v.toFixed(2)} RTT`,
    (v) => v <= (outbound ? 2.0 : 4.0),
    labS ? ` (${labS.median.toFixed(1)} ms; direct ${labDirectMs?.toFixed(1)} ms = ${directRtts?.toFixed(2)} RTT; RTT ${delayRttMs?.toFixed(1)} ms)` : "",
  );
  const conc = rounds.map((rd) => rd.concurrent[n]).filter((x) => x && x.totalMs !== undefined);
  const failed = conc.reduce((sum, x) => sum + (x.failed ?? 0), 0);
  const peakMb = conc.length ? Math.max(...conc.map((x) => ((x.peakKb ?? NaN) * 1024) / 1e6)) : undefined;
  check("200x1MiB: 0 failed", conc.length ? failed : undefined, (v) => `${v} failed`, (v) => v === 0);
  check("200x1MiB: local+coordinator peak RSS <= 150 MB", peakMb, (v) => `${v.toFixed(0)} MB (worst round)`, (v) => v <= 150);
  check("keep-alive req/s >= 0.5x direct", c.rps?.ratio, (v) => `${v.toFixed(2)}x`, (v) => v >= 0.5);
}
const targetLines = targetChecks.length
  ? [
      "Targets (issue \"Fast\"), natproxy on this machine:",
      ...targetChecks.map((t) => `  ${t.met === null ? "n/a " : t.met ? "MET " : "MISS"}  ${t.contender.padEnd(22)} ${t.target.padEnd(52)} ${t.value}`),
    ]
  : [];

// Where the time goes: medians of the TTFB phases, CPU per request.
const diagnostics = names.map((n) => {
  const s = rounds.flatMap((rd) => rd.ttfb[n]?.samples ?? []);
  const med = (k: "tcp" | "tunnel" | "tls" | "firstByte"): string => median(s.map((x) => x[k]))?.toFixed(2) ?? "—";
  const rps = rounds.map((rd) => rd.rps[n]).filter((x) => x?.completed && x.cpuS != null);
  const cpuPerReq = median(rps.map((x) => ((x.cpuS ?? 0) * 1e6) / (x.completed ?? 1)));
  const conc = rounds.map((rd) => rd.concurrent[n]).filter((c) => c?.cpuS != null);
  const concCpu = median(conc.map((c) => c.cpuS ?? NaN));
  const pss = median(conc.map((c) => (c.peakPssKb ?? NaN) / 1024));
  const lab = delay?.contenders[n]?.rounds.flatMap((x) => x.samples) ?? [];
  const labMed = (k: "tcp" | "tunnel" | "tls" | "firstByte"): string => median(lab.map((x) => x[k]))?.toFixed(1) ?? "—";
  return `  ${n.padEnd(18)} TTFB phases (ms from start, medians): TCP ${med("tcp")}, tunnel ready ${med("tunnel")}, TLS done ${med("tls")}, first byte ${med("firstByte")}` +
    (lab.length ? `; @20ms RTT: TCP ${labMed("tcp")}, tunnel ${labMed("tunnel")}, TLS ${labMed("tls")}, first byte ${labMed("firstByte")}` : "") +
    (n === "direct" ? "" : `; CPU ${cpuPerReq?.toFixed(0) ?? "—"} µs per small request, ${concCpu?.toFixed(2) ?? "—"} s in the 200-tunnel test; peak PSS ${pss?.toFixed(0) ?? "—"} MiB`);
});

// ---------------------------------------------------------------- output

const version = (cmd: string, a: string[], re: RegExp): string => {
  const r = spawnSync(cmd, a, { encoding: "utf8" });
  return re.exec(`${r.stdout}${r.stderr}`)?.[0] ?? "?";
};
const versions = {
  natproxy: `${spawnSync(natproxyBin, ["--version"], { encoding: "utf8" }).stdout.trim()} (${origin})`,
  squid: version("squid", ["-v"], /Version \S+/).replace("Version", "squid"),
  shadowsocks: version("ss-server", ["-h"], /shadowsocks-libev \S+/),
  curl: version("curl", ["--version"], /curl \S+/),
  node: process.version,
};
const totalS = elapsedS();
const notMeasured = delay?.measured
  ? []
  : [opts.delay ? `TTFB with ~20 ms RTT was NOT measured: ${delay?.note ?? "interrupted"}` : "TTFB with ~20 ms RTT was not measured (--no-delay)"];
const legend = [
  "How each number is made. The client does the same work for every contender; only the way in differs:",
  "  direct = TCP to the target; squid, natproxy = HTTP proxy (CONNECT for HTTPS, absolute-form request for HTTP); shadowsocks = SOCKS5 to ss-local.",
  `  HTTPS/HTTP MB/s  ${versions.curl} --http1.1 -o /dev/null: one ${opts.bulkBytes / MiB} MiB GET per round (after one ${opts.warmupBytes / MiB} MiB warm-up of each at start) (HTTPS: TLS end to end through CONNECT/SOCKS5); bytes / curl's time_total; median, min–max over rounds`,
  `  TTFB ms          Node client: ${opts.ttfbCount} sequential HTTPS GET /small per round, each a new TCP connection + tunnel + full TLS handshake (no session reuse); clock from before TCP connect to the first response byte; median, IQR of all samples`,
  `                   (loopback RTT, TCP connect time to the target: median ${rttMedianMs?.toFixed(3)} ms, so on loopback TTFB counts CPU, not round trips; see @20ms RTT)`,
  ...(delay?.measured
    ? [
        `  TTFB @20ms RTT   NAT lab (${LAB_NAT} NAT, ${LAB_ONE_WAY_DELAY_MS} ms each way): client, local proxy and ss-local on the LAN host; coordinator, squid, ss-server on the coordinator host; ${opts.delayTtfbCount} requests × ${opts.delayRounds} round(s); RTT median ${delayRttMs?.toFixed(1)} ms`,
        "  RTTs @20ms       median TTFB / RTT; (+x) = (median TTFB − direct's) / RTT: the round trips the proxy adds to direct's TCP + TLS + request",
      ]
    : []),
  `  200x1MiB s       Node client: ${opts.concurrency} tunnels opened at once, each HTTPS GET /bytes/${opts.concurrencyBytes} (content checked); time until the last is done; failed = failed/tried over all rounds`,
  "  peak RSS MiB     sum over the proxy's processes (natproxy: local + coordinator, not the reporter) of VmHWM (reset through clear_refs before the 200-tunnel test) or of VmRSS sampled every 20 ms, whichever is higher; idle = before the test.",
  "                   A sum of RSS counts pages shared by several processes (natproxy's processes map the same ~120 MB binary) once per process; the diagnostics give the sampled peak PSS, which counts them once.",
  `  small req/s      Node client: ${opts.rpsConnections} keep-alive connections, each sending plain-HTTP GET /small (2-byte body) one at a time, for ${opts.rpsSeconds} s`,
  "  CPU s/GB         utime+stime of all the proxy's processes (/proc/<pid>/stat) across both bulk downloads / GB moved",
  "  ×ratio           median / direct's median (MB/s, req/s: higher is better; ms, s: lower is better)",
];

const lines: string[] = [];
const loads = rounds.flatMap((rd) => rd.load);
lines.push("");
lines.push(`natproxy bench${quick ? " --quick" : ""}${opts.delay ? "" : " --no-delay"}: ${rounds.length} round(s), ${cpus().length} CPUs (${cpus()[0]?.model.trim()}), run time ${totalS.toFixed(0)} s`);
lines.push(`1-min load average during the rounds: ${loads.length ? `${Math.min(...loads).toFixed(1)}–${Math.max(...loads).toFixed(1)}` : "?"}; the bench itself keeps about 2 runnable; other work on the machine shows up as more, with noisier numbers`);
lines.push(`versions: natproxy ${versions.natproxy}; ${versions.squid}; ${versions.shadowsocks}; ${versions.curl}; node ${versions.node}`);
lines.push("");
lines.push(renderTable(table));
if (targetLines.length) lines.push("", ...targetLines);
lines.push("");
lines.push(...legend);
lines.push("");
lines.push("Diagnostics:");
lines.push(...diagnostics);
lines.push("");
for (const e of entries) {
  lines.push(`${e.def.name.padEnd(18)} ${e.status === "ran" ? e.def.describe : `${e.status.toUpperCase()}: ${e.note}`}${e.run?.notes.length ? ` [${e.run.notes.join("; ")}]` : ""}`);
}
for (const e of entries) {
  for (const d of e.deaths) lines.push(`note: ${d.process} EXITED on its own (${d.exit}) ${d.when}${d.stderrTail ? `; stderr: ${d.stderrTail.split("\n").slice(-2).join(" | ").slice(0, 300)}` : "; nothing on stderr"}${e.restarts ? ` (restarted ${e.restarts}×)` : ""}`);
}
for (const n of [...runNotes, ...notMeasured]) lines.push(`note: ${n}`);
for (const [n, c] of Object.entries(delay?.contenders ?? {})) if (c.status !== "ran") lines.push(`note: --delay ${n}: ${c.status}: ${c.note?.split("\n")[0]}`);
// What the proxies wrote on stderr (natproxy runs at "warn": anything here is worth a look).
for (const e of active) {
  for (const c of e.allChildren) {
    const interesting = c.log().trim().split("\n").filter((l) => /warn|error|bug|fail|fatal/i.test(l));
    if (interesting.length) lines.push(`stderr of ${c.name}: ${interesting.length} warning/error line(s), e.g. ${interesting.slice(0, 3).join(" | ").slice(0, 400)}`);
  }
}

const outDir = resolve(ROOT, args.out);
mkdirSync(outDir, { recursive: true });
const stamp = new Date().toISOString().replace(/[:.]/g, "-");
const base = join(outDir, `bench-${stamp}`);
const results = {
  meta: {
    started: new Date(Date.now() - totalS * 1000).toISOString(),
    runSeconds: totalS,
    options: opts,
    machine: { cpus: cpus().length, model: cpus()[0]?.model, kernel: spawnSync("uname", ["-r"], { encoding: "utf8" }).stdout.trim() },
    versions,
    rttMedianMs,
    notes: [...runNotes, ...notMeasured],
    legend,
    diagnostics,
  },
  contenders: entries.map((e) => ({ name: e.def.name, describe: e.def.describe, status: e.status, note: e.note, via: e.run?.via, notes: e.run?.notes, restarts: e.restarts, deaths: e.deaths })),
  summary: table,
  targets: targetChecks,
  rounds,
  delay: delay ?? { measured: false, note: notMeasured[0] },
  // The tail of what each proxy process wrote (natproxy at "warn").
  stderr: Object.fromEntries(active.flatMap((e) => e.allChildren.map((c, i) => [`${c.name} #${i}`, c.log().trim().slice(-8000)]))),
};
writeFileSync(`${base}.json`, `${JSON.stringify(results, null, 1)}\n`);
const svg = renderSvg(
  table,
  `natproxy bench${quick ? " (--quick)" : ""}: ${rounds.length} round(s), ${cpus().length} CPUs, loopback${delay?.measured ? " + NAT lab" : ""}`,
  `medians; bulk ${opts.bulkBytes / MiB} MiB; TTFB over ${opts.ttfbCount}/round; ${opts.concurrency}×${opts.concurrencyBytes / MiB} MiB concurrent; ${opts.rpsConnections} conns × ${opts.rpsSeconds} s req/s; ${stamp}`,
);
writeFileSync(`${base}.svg`, svg);
const conv = spawnSync("rsvg-convert", ["-o", `${base}.png`, `${base}.svg`], { encoding: "utf8" });
const pngOk = conv.status === 0 && existsSync(`${base}.png`);
if (pngOk) rmSync(`${base}.svg`);
lines.push(`results: ${relative(ROOT, base)}.json (raw), ${pngOk ? `${relative(ROOT, base)}.png (chart)` : `chart NOT converted to PNG (${conv.stderr?.trim() || conv.error?.message}); SVG at ${relative(ROOT, base)}.svg`}`);
process.stdout.write(`${lines.join("\n")}\n`);

// ---------------------------------------------------------------- stop

for (const e of [...active].reverse()) await e.run?.stop();
await stopChild(target.child);
releaseWatchdog();
await stopAllChildren();
guard.cleanup();
log(`done in ${elapsedS().toFixed(1)} s`);
