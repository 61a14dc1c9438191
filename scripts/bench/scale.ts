// node scripts/bench/scale.ts [--quick] [--path connect-back|outbound|both] [--steps 10,50,100,200,500,1000,2000]
//                             [--window 4] [--sample 2000] [--repeat 2] [--node-flags="--trace-gc"] [--rebuild] [--out bench-results]
//
// How natproxy scales with the number of tunnels open at once. For each tunnel
// path and each N, with the reporter, coordinator and local proxy running as
// processes of dist/natproxy on loopback: a client process (client.ts, mode
// "hold") opens N tunnels (CONNECT through the local proxy, TLS to the
// loopback HTTPS target, one GET on each), at most --window being opened at a
// time, and keeps all N open; then measures a small request's round trip on a
// sample of them one at a time, and on all of them at once ("burst"); then
// closes them and waits for the proxies' descriptors to fall back to idle
// before the next N. Reported per N: set-up latency (CONNECT sent → 200),
// request round trip, RSS and PSS of local + coordinator with N open and per
// tunnel, CPU seconds, failures, and what is left open after closing. The
// largest N is then run --repeat more times in the same processes and their
// memory watched while idle: memory kept after a step is either reused by the
// next one or grows (a leak, or freed memory the allocator keeps). Prints one
// table per path, writes bench-results/scale-<timestamp>.json (raw) and .png
// (chart). About 2 minutes; --quick (fewer steps and samples) under 1.
// Everything runs on 127.0.0.1; every child process is ended on exit.
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, readFileSync, readlinkSync, rmSync, writeFileSync } from "node:fs";
import { cpus, loadavg } from "node:os";
import { join, relative, resolve } from "node:path";
import { createInterface } from "node:readline";
import { parseArgs } from "node:util";
import { writePki } from "../lib/pki.ts";
import type { ClientJob, Via } from "./client.ts";
import { loopbackPlacement, natproxyContender, type BenchEnv, type Placement, type RunningContender } from "./contenders.ts";
import { cpuSeconds, fdCount, guardRun, hwmKb, pssKb, resetPeakRss, rssKb, sampleRss, startChild, stopAllChildren, stopChild, type Child } from "./procs.ts";
import { fmt, renderLineCharts, type LineSeries } from "./report.ts";
import { startTarget } from "./runner.ts";
import { ensurePackages, prepareRun } from "./setup.ts";
import { median, percentile } from "./stats.ts";

const ROOT = resolve(import.meta.dirname, "..", "..");
const HERE = import.meta.dirname;
const T0 = performance.now();
const elapsedS = (): number => (performance.now() - T0) / 1000;
const log = (s: string): void => {
  process.stderr.write(`[scale ${elapsedS().toFixed(1).padStart(5)}s] ${s}\n`);
};
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------- options

const { values: args } = parseArgs({
  options: {
    quick: { type: "boolean", default: false },
    path: { type: "string", default: "both" },
    steps: { type: "string" },
    window: { type: "string" },
    sample: { type: "string" },
    repeat: { type: "string" },
    "node-flags": { type: "string" },
    rebuild: { type: "boolean", default: false },
    out: { type: "string", default: "bench-results" },
    help: { type: "boolean", short: "h", default: false },
  },
});
if (args.help) {
  process.stdout.write(`node scripts/bench/scale.ts [options]
  --quick          fewer steps (10,100,500,2000) and round-trip samples (about 1 minute)
  --path P         connect-back, outbound or both (default both)
  --steps a,b,...  numbers of tunnels held open at once (default 10,50,100,200,500,1000,2000; at most 5000)
  --window W       tunnels being opened at the same time (default 4; 1 gives set-up latency without queueing)
  --sample S       tunnels that get a one-at-a-time request round trip per step (default 2000, quick 200)
  --repeat R       run the largest N R more times at the end (leak check; default 2, quick 1)
  --node-flags=F   run natproxy from src/ under this Node with flags F instead of dist/natproxy, e.g.
                   "--trace-gc --trace-gc-ignore-scavenger": each step then records each process's last full GC
  --rebuild        rebuild dist/natproxy even if it exists
  --out DIR        results directory (default bench-results)
`);
  process.exit(0);
}
const quick = args.quick;
const PATHS = args.path === "both" ? (["connect-back", "outbound"] as const) : args.path === "connect-back" || args.path === "outbound" ? ([args.path] as const) : undefined;
if (!PATHS) throw new Error(`--path: expected connect-back, outbound or both, not ${args.path}`);
const steps = [...new Set((args.steps ?? (quick ? "10,100,500,2000" : "10,50,100,200,500,1000,2000")).split(",").map((s) => Math.floor(Number(s.trim()))))].filter((n) => n >= 1 && n <= 5000).sort((a, b) => a - b);
if (!steps.length) throw new Error(`--steps: no number of tunnels between 1 and 5000 in ${args.steps}`);
const opts = {
  quick,
  paths: [...PATHS],
  steps,
  // A few at a time, as a browser opens them: set-up latency then shows the
  // cost of one tunnel with N open rather than a queue of handshakes.
  window: Math.max(1, Math.min(1000, Number(args.window ?? 4) || 4)),
  sample: Math.max(0, Number(args.sample ?? (quick ? 200 : 2000)) || 0),
  repeat: Math.max(0, Math.min(10, Number(args.repeat ?? (quick ? 1 : 2)) || 0)),
  warmupTunnels: 20,
  /** After the last step of a path: how long its memory is watched, idle. */
  idleWatchS: quick ? 5 : 10,
  /** The whole run; steps that would not fit are skipped (and said so). */
  budgetS: quick ? 80 : 280,
  /** How long to wait, after closing, for the proxies' descriptors to fall back to idle. */
  idleWaitS: quick ? 6 : 12,
  /** Descriptors above the idle count that still count as "back to idle". */
  idleSlackFds: 4,
  /** Opening one tunnel (TCP, CONNECT, TLS, first request) or one later request. */
  opTimeoutMs: 15_000,
  nofile: 65536,
};
const maxN = Math.max(...steps);

// ---------------------------------------------------------------- cleanup

const guard = guardRun("scale", log);

// ---------------------------------------------------------------- setup

log(`natproxy scale${quick ? " --quick" : ""}: paths ${opts.paths.join(", ")}; N = ${steps.join(", ")}; window ${opts.window}; budget ${opts.budgetS} s`);
ensurePackages(log, [["prlimit", "util-linux"]]);
const { home, natproxyBin, origin, buildNote, release: releaseWatchdog } = prepareRun({ root: ROOT, rebuild: args.rebuild, prefix: "natproxy-bench-scale-", guard, log });

const notes: string[] = buildNote ? [buildNote] : [];
const raised: string[] = [];

// 2,000 tunnels are ~4,000 descriptors in each natproxy process and in the
// client (and 2,000 in the target); the shell's limit may be 1,024. Root with
// CAP_SYS_RESOURCE may raise the hard limit too (a container may not have
// it), anyone the soft limit up to the hard one; prlimit then execs the
// command under the same pid.
const nofileOf = (pid: number): string => /^Max open files\s+(\S+)\s+(\S+)/m.exec(readFileSync(`/proc/${pid}/limits`, "utf8"))?.slice(1, 3).join(":") ?? "?";
const ownNofile = nofileOf(process.pid);
const [softNofile, hardNofile] = ownNofile.split(":").map((x) => (x === "unlimited" ? Infinity : Number(x)));
const canSet = (n: number): boolean => spawnSync("prlimit", [`--nofile=${n}:${n}`, "--", "true"], { stdio: "ignore" }).status === 0;
const nofile = canSet(opts.nofile) ? opts.nofile : Number.isFinite(hardNofile) && canSet(hardNofile) ? hardNofile : softNofile;
const wrap = nofile > softNofile ? ["prlimit", `--nofile=${nofile}:${nofile}`, "--"] : [];
if (wrap.length) raised.push(`RLIMIT_NOFILE ${ownNofile} → ${nofile}:${nofile} (soft:hard) for natproxy, the client and the target (prlimit)`);
else notes.push(`RLIMIT_NOFILE left at ${ownNofile} (soft:hard)${nofile < opts.nofile ? `: ${opts.nofile} refused here` : ""}; each step's N needs about 2.5 N descriptors per natproxy process`);
if (2.5 * maxN + 200 > nofile) notes.push(`N=${maxN} may run out of descriptors: the limit is ${nofile}`);
const spawnWrapped = (name: string, cmd: string, a: string[], o: { keepStdout?: boolean } = {}): Child => (wrap.length ? startChild(name, wrap[0], [...wrap.slice(1), cmd, ...a], o) : startChild(name, cmd, a, o));

const pki = await writePki(home, { name: "scale", ipAddresses: ["127.0.0.1"] });
const target = await startTarget(pki.serverCertFile, pki.serverKeyFile, "127.0.0.1", wrap);
log(`target: HTTPS 127.0.0.1:${target.https} (pid ${target.child.pid}, open files ${nofileOf(target.child.pid)})`);

// natproxy's own limits, raised only where a step would reach them. The
// outbound pool and the start-up probe hold a few sessions beside the N.
const needSessions = maxN + opts.window + 16;
const coordinatorExtra: Record<string, number> = {};
if (needSessions > 1024) {
  coordinatorExtra.max_sessions_per_token = Math.max(needSessions, 2 * maxN);
  raised.push(`[coordinator] max_sessions_per_token 1024 → ${coordinatorExtra.max_sessions_per_token}`);
}
if (needSessions > 4096) {
  coordinatorExtra.max_sessions = Math.max(needSessions, 2 * maxN);
  raised.push(`[coordinator] max_sessions 4096 → ${coordinatorExtra.max_sessions}`);
} else {
  notes.push(`[coordinator] max_sessions left at 4096${needSessions > 1024 ? "" : ", max_sessions_per_token at 1024"}: enough for N=${maxN}`);
}
const localExtra: Record<string, number> = {};
// The client never has more than --window tunnels being opened at once.
if (opts.window + 4 > 256) {
  localExtra.max_pending = opts.window + 4;
  raised.push(`[local] max_pending 256 → ${localExtra.max_pending}`);
}
if (!raised.some((r) => r.startsWith("[local]"))) notes.push(`[local] max_pending left at 256: at most ${opts.window} tunnels are being opened at any time`);

const nodeFlags = args["node-flags"]?.split(/\s+/).filter(Boolean);
const env: BenchEnv = {
  tmp: home,
  root: ROOT,
  natproxyBin,
  caFile: pki.caFile,
  combinedFile: pki.combinedFile,
  natproxyCommand: nodeFlags ? (role, file) => ({ cmd: process.execPath, args: [...nodeFlags, join(ROOT, "src", "cli.ts"), role, "-c", file] }) : undefined,
};
if (nodeFlags) notes.push(`natproxy ran from src/ (the working tree as it was) under node ${process.version} ${nodeFlags.join(" ")}, not dist/natproxy`);
const base = loopbackPlacement();
const site = { ...base.near, spawn: (name: string, cmd: string, a: string[]) => spawnWrapped(name, cmd, a) };
const placement: Placement = { ...base, near: site, far: site, reporter: site };

// ---------------------------------------------------------------- one step

interface Failure {
  stage: string;
  message: string;
}
interface OpenPhase {
  openSeconds: number;
  tried: number;
  ok: number;
  failed: number;
  failures: Failure[];
  setupMs: number[];
  tlsMs: number[];
  firstRequestMs: number[];
}
interface MeasuredPhase {
  lostBeforeMeasure: number;
  rttMs: number[];
  rttFailed: number;
  burstMs: number[];
  burstFailed: number;
  failures: Failure[];
}
interface ClosedPhase {
  closeSeconds: number;
  notClosedIn5s: number;
  lostWhileHeld: number;
  lostReasons: string[];
}
interface Snapshot {
  rssKb: number;
  pssKb: number;
  fds: number;
  /** RSS of each process (local, coordinator), KiB. */
  rssByProcess: Record<string, number>;
}
interface StepResult {
  n: number;
  /** 0 for the step in the ascending series; 1, 2, ... for the repeats of the largest N. */
  repeat: number;
  seconds: number;
  open?: OpenPhase;
  measured?: MeasuredPhase;
  closed?: ClosedPhase;
  error?: string;
  idleBefore: Snapshot;
  withOpen?: Snapshot;
  /** Sampled every 50 ms from the first tunnel to the last burst response (and VmHWM, reset before the step). */
  peakRssKb?: number;
  peakPssKb?: number;
  afterClose?: Snapshot & { settleSeconds: number; backToIdle: boolean; left: Record<string, Record<string, number>> };
  /** With --node-flags --trace-gc: each process's last full GC line at the end of the step. */
  lastFullGc?: Record<string, string>;
  cpuS: { open: number; measure: number; closeAndSettle: number; total: number };
  failures: number;
}

const snapshot = (run: RunningContender): Snapshot => {
  const pids = run.memPids();
  const named = run.children.filter((c) => pids.includes(c.pid)).map((c) => [c.name.split(" ").pop() ?? c.name, rssKb([c.pid])] as const);
  return { rssKb: rssKb(pids), pssKb: pssKb(pids), fds: fdCount(pids), rssByProcess: Object.fromEntries(named) };
};

/** JSON lines of a child's stdout, read one at a time with a time limit. */
function lineReader(c: Child): (timeoutMs: number) => Promise<Record<string, unknown> | undefined> {
  const lines: string[] = [];
  let ended = false;
  let wake: (() => void) | undefined;
  const rl = createInterface({ input: c.proc.stdout! });
  rl.on("line", (l) => {
    lines.push(l);
    wake?.();
  });
  rl.on("close", () => {
    ended = true;
    wake?.();
  });
  return async (timeoutMs) => {
    const until = Date.now() + timeoutMs;
    while (!lines.length && !ended && Date.now() < until) {
      await new Promise<void>((r) => {
        wake = r;
        setTimeout(r, Math.min(1000, Math.max(1, until - Date.now())));
      });
    }
    const l = lines.shift();
    if (l === undefined) return undefined;
    try {
      return JSON.parse(l) as Record<string, unknown>;
    } catch {
      return { error: `not JSON: ${l.slice(0, 200)}` };
    }
  };
}

/** Socket inode → ports and TCP state, for this network namespace. */
function tcpTable(): Map<string, { lport: number; rport: number; state: string }> {
  const STATES: Record<string, string> = { "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING" };
  const out = new Map<string, { lport: number; rport: number; state: string }>();
  for (const f of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    let text = "";
    try {
      text = readFileSync(f, "utf8");
    } catch {
      continue;
    }
    for (const line of text.split("\n").slice(1)) {
      const p = line.trim().split(/\s+/);
      if (p.length < 10) continue;
      out.set(p[9], { lport: parseInt(p[1].split(":")[1], 16), rport: parseInt(p[2].split(":")[1], 16), state: STATES[p[3]] ?? p[3] });
    }
  }
  return out;
}

/**
 * What each process still holds: its descriptors by kind ("to coordinator",
 * "accepted on local:PORT", ...), named by the processes' listening ports.
 */
function heldDescriptors(procs: Array<{ name: string; pid: number }>, targetPort: number): Record<string, Record<string, number>> {
  const table = tcpTable();
  const fdsOf = (pid: number): string[] => {
    try {
      return readdirSync(`/proc/${pid}/fd`).map((fd) => {
        try {
          return readlinkSync(`/proc/${pid}/fd/${fd}`);
        } catch {
          return "gone";
        }
      });
    } catch {
      return [];
    }
  };
  const links = new Map(procs.map((p) => [p.name, fdsOf(p.pid)]));
  const listening = new Map<number, string>([[targetPort, "target"]]);
  for (const p of procs) {
    for (const l of links.get(p.name) ?? []) {
      const s = table.get(/^socket:\[(\d+)\]$/.exec(l)?.[1] ?? "");
      if (s?.state === "LISTEN") listening.set(s.lport, `${p.name}:${s.lport}`);
    }
  }
  const out: Record<string, Record<string, number>> = {};
  for (const p of procs) {
    const kinds: Record<string, number> = {};
    for (const l of links.get(p.name) ?? []) {
      const m = /^socket:\[(\d+)\]$/.exec(l);
      const s = m ? table.get(m[1]) : undefined;
      let kind: string;
      if (!m) kind = "not a socket";
      else if (!s) kind = "socket (not TCP)";
      else if (s.state === "LISTEN") kind = "listening";
      else {
        const own = listening.get(s.lport);
        kind = own?.startsWith(`${p.name}:`) ? `accepted on ${own}` : `to ${listening.get(s.rport) ?? `port ${s.rport}`}`;
        if (s.state !== "ESTABLISHED") kind += ` (${s.state})`;
      }
      kinds[kind] = (kinds[kind] ?? 0) + 1;
    }
    out[p.name] = kinds;
  }
  return out;
}

/** Waits until the descriptors are back near `idleFds`, stop falling, or `maxS` passes. */
async function settle(pids: number[], idleFds: number, maxS: number): Promise<{ fds: number; seconds: number; backToIdle: boolean }> {
  const t0 = Date.now();
  let last = fdCount(pids);
  let lastChange = Date.now();
  while (Date.now() - t0 < maxS * 1000) {
    const f = fdCount(pids);
    if (f <= idleFds + opts.idleSlackFds) return { fds: f, seconds: (Date.now() - t0) / 1000, backToIdle: true };
    if (f !== last) {
      last = f;
      lastChange = Date.now();
    } else if (Date.now() - lastChange > 3000) {
      break;
    }
    await sleep(200);
  }
  const f = fdCount(pids);
  return { fds: f, seconds: (Date.now() - t0) / 1000, backToIdle: f <= idleFds + opts.idleSlackFds };
}

/** One N: open, hold, measure, close, settle. */
async function step(run: RunningContender, n: number, record: boolean, repeat = 0): Promise<StepResult> {
  const t0 = elapsedS();
  const memPids = run.memPids();
  const allPids = run.pids();
  const procs = run.children.map((c) => ({ name: c.name.split(" ").pop() ?? c.name, pid: c.pid }));
  const idleBefore = snapshot(run);
  const cpuStart = cpuSeconds(allPids);
  let cpuOpened: number | undefined;
  let cpuMeasured: number | undefined;
  const hwmReset = resetPeakRss(memPids);
  const stopSampling = sampleRss(memPids, 50);
  const timeouts = { open: 20_000 + n * 60, measure: 20_000 + n * 30, close: 15_000 };
  const job: ClientJob = {
    mode: "hold",
    via: run.via as Via,
    host: "127.0.0.1",
    httpPort: target.http,
    httpsPort: target.https,
    caFile: pki.caFile,
    count: n,
    window: opts.window,
    sample: record ? opts.sample : 10,
    timeoutMs: opts.opTimeoutMs,
    deadlineMs: timeouts.open + timeouts.measure + timeouts.close,
  };
  const client = spawnWrapped(`client hold ${n}`, process.execPath, [join(HERE, "client.ts"), JSON.stringify(job)], { keepStdout: true });
  const next = lineReader(client);
  const r: StepResult = { n, repeat, seconds: 0, idleBefore, cpuS: { open: 0, measure: 0, closeAndSettle: 0, total: 0 }, failures: 0 };
  const fail = (what: string, got: Record<string, unknown> | undefined): void => {
    r.error ??= `${what}: ${got ? String(got.error ?? JSON.stringify(got)).slice(0, 500) : `no answer (client ${client.isRunning() ? "still running" : `exited, ${client.exitInfo()}`}): ${client.log().trim().slice(-500)}`}`;
  };
  try {
    const open = await next(timeouts.open);
    cpuOpened = cpuSeconds(allPids);
    if (open?.phase !== "open") return (fail("opening", open), r);
    r.open = open as unknown as OpenPhase;
    // Read before any request moves the heap again.
    r.withOpen = snapshot(run);
    client.proc.stdin?.write("measure\n");
    const measured = await next(timeouts.measure);
    cpuMeasured = cpuSeconds(allPids);
    const peak = stopSampling();
    r.peakRssKb = Math.max(peak.rssKb, hwmReset ? hwmKb(memPids) : 0);
    r.peakPssKb = peak.pssKb;
    if (measured?.phase !== "measured") return (fail("measuring", measured), r);
    r.measured = measured as unknown as MeasuredPhase;
    client.proc.stdin?.write("close\n");
    const closed = await next(timeouts.close);
    if (closed?.phase !== "closed") return (fail("closing", closed), r);
    r.closed = closed as unknown as ClosedPhase;
    return r;
  } finally {
    stopSampling();
    const exited = await Promise.race([client.exited.then(() => true), sleep(5000).then(() => false)]);
    if (!exited) await stopChild(client, 1000);
    const s = await settle(memPids, idleBefore.fds, opts.idleWaitS);
    const cpuEnd = cpuSeconds(allPids);
    const after = snapshot(run);
    r.afterClose = { ...after, settleSeconds: s.seconds, backToIdle: s.backToIdle, left: s.backToIdle ? {} : heldDescriptors(procs, target.https) };
    if (nodeFlags) {
      r.lastFullGc = Object.fromEntries(run.children.map((c) => [c.name.split(" ").pop() ?? c.name, (c.log().match(/^.*Mark-Compact.*$/gm) ?? []).pop()?.trim() ?? "none"]));
    }
    r.cpuS = {
      open: (cpuOpened ?? cpuEnd) - cpuStart,
      measure: cpuOpened !== undefined && cpuMeasured !== undefined ? cpuMeasured - cpuOpened : 0,
      closeAndSettle: cpuEnd - (cpuMeasured ?? cpuOpened ?? cpuStart),
      total: cpuEnd - cpuStart,
    };
    r.failures = (r.open?.failed ?? 0) + (r.open ? r.open.tried - r.open.ok - r.open.failed : 0) + (r.measured?.rttFailed ?? 0) + (r.measured?.burstFailed ?? 0) + (r.closed?.lostWhileHeld ?? 0) + (r.error ? 1 : 0);
    r.seconds = elapsedS() - t0;
  }
}

// ---------------------------------------------------------------- paths

interface PathResult {
  path: "connect-back" | "outbound";
  describe: string;
  started: boolean;
  note?: string;
  pids?: Record<string, number>;
  openFiles?: Record<string, string>;
  idleAtStart?: Snapshot;
  /** After the last step: memory sampled while idle. */
  idleWatch?: Array<{ afterS: number } & Snapshot>;
  steps: StepResult[];
  skippedForTime: number[];
  deaths: string[];
  stderr: Record<string, string>;
  slope?: { rssKibPerTunnel?: number; pssKibPerTunnel?: number };
}

/** Least-squares slope of y over x; undefined with fewer than two distinct x. */
function slope(points: Array<[number, number]>): number | undefined {
  const ps = points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  if (new Set(ps.map(([x]) => x)).size < 2) return undefined;
  const mx = ps.reduce((s, [x]) => s + x, 0) / ps.length;
  const my = ps.reduce((s, [, y]) => s + y, 0) / ps.length;
  const sxy = ps.reduce((s, [x, y]) => s + (x - mx) * (y - my), 0);
  const sxx = ps.reduce((s, [x]) => s + (x - mx) ** 2, 0);
  return sxy / sxx;
}

const results: PathResult[] = [];
for (const [pi, path] of opts.paths.entries()) {
  if (guard.interrupted) break;
  const def = natproxyContender(`natproxy-${path}`, path, localExtra, undefined, coordinatorExtra);
  const pr: PathResult = { path, describe: def.describe, started: false, steps: [], skippedForTime: [], deaths: [], stderr: {} };
  results.push(pr);
  // This path's share of what is left of the budget, less its idle watch.
  const pathDeadlineS = elapsedS() + (opts.budgetS - elapsedS() - 4) / (opts.paths.length - pi) - opts.idleWatchS;
  let run: RunningContender | undefined;
  try {
    run = await def.start(env, placement);
    pr.started = true;
    pr.pids = Object.fromEntries(run.children.map((c) => [c.name.split(" ").pop() ?? c.name, c.pid]));
    pr.openFiles = Object.fromEntries(run.children.map((c) => [c.name.split(" ").pop() ?? c.name, nofileOf(c.pid)]));
    log(`${path}: up (${def.describe}; pids ${run.pids().join(" ")}; open files ${Object.values(pr.openFiles).join(", ")})`);
    // JIT, TLS contexts, the outbound pool, API connections: not counted.
    const w = await step(run, opts.warmupTunnels, false);
    if (w.error || w.failures) throw new Error(`warm-up (${opts.warmupTunnels} tunnels) failed: ${w.error ?? `${w.failures} failures: ${JSON.stringify([...(w.open?.failures ?? []), ...(w.measured?.failures ?? [])].slice(0, 3))}`}`);
    pr.idleAtStart = snapshot(run);
    let perTunnelS = 0;
    const plan = [...steps.map((n) => ({ n, repeat: 0 })), ...Array.from({ length: opts.repeat }, (_, i) => ({ n: maxN, repeat: i + 1 }))];
    for (const { n, repeat } of plan) {
      if (guard.interrupted) break;
      const dead = run.children.filter((c) => !c.isRunning());
      if (dead.length) {
        for (const c of dead) pr.deaths.push(`${c.name} EXITED (${c.exitInfo()}) before N=${n}: ${c.log().trim().split("\n").slice(-3).join(" | ").slice(0, 600)}`);
        log(`${path}: ${pr.deaths.join("; ")}; the rest of this path is skipped`);
        break;
      }
      const predictedS = perTunnelS * n + opts.idleWaitS / 2 + 1;
      if (elapsedS() + predictedS > pathDeadlineS) {
        pr.skippedForTime.push(n);
        continue;
      }
      const r = await step(run, n, true, repeat);
      pr.steps.push(r);
      // From the largest step so far: a small one is mostly the client's start-up.
      perTunnelS = Math.max(0, r.seconds - (r.afterClose?.settleSeconds ?? 0) - 1) / n;
      const s = r.open?.setupMs ?? [];
      const kinds = [...new Set([...(r.open?.failures ?? []), ...(r.measured?.failures ?? [])].map((f) => f.message))].slice(0, 3).join("; ");
      log(
        `${path} N=${n}${repeat ? ` (again, ${repeat})` : ""}: ${r.open?.ok ?? 0}/${n} open in ${r.open?.openSeconds.toFixed(1) ?? "?"} s, setup median ${median(s)?.toFixed(2) ?? "—"} ms p99 ${percentile(s, 0.99)?.toFixed(1) ?? "—"}, RTT median ${median(r.measured?.rttMs ?? [])?.toFixed(2) ?? "—"} ms, ` +
          `RSS ${((r.withOpen?.rssKb ?? NaN) / 1024).toFixed(0)} MiB (idle ${(r.idleBefore.rssKb / 1024).toFixed(0)}), fds ${r.withOpen?.fds ?? "?"} → ${r.afterClose?.fds ?? "?"} (idle ${r.idleBefore.fds}${r.afterClose?.backToIdle ? "" : ", NOT back"}), CPU ${r.cpuS.total.toFixed(1)} s, ` +
          `${r.failures} failed${kinds ? ` (${kinds})` : ""}${r.error ? ` ERROR ${r.error}` : ""}`,
      );
    }
    if (pr.skippedForTime.length) notes.push(`${path}: skipped for time: N = ${pr.skippedForTime.join(", ")}`);
    // V8 (its memory reducer) and malloc give memory back only after some idle time, if at all.
    pr.idleWatch = [];
    const watchStart = elapsedS();
    for (let i = 0; i < 100 && !guard.interrupted && run.children.every((c) => c.isRunning()); i++) {
      const afterS = elapsedS() - watchStart;
      if (afterS > opts.idleWatchS) break;
      pr.idleWatch.push({ afterS, ...snapshot(run) });
      await sleep(Math.min(2000, (opts.idleWatchS - afterS) * 1000 + 1));
    }
  } catch (err) {
    pr.note = (err as Error).message;
    log(`${path}: FAILED: ${pr.note}`);
  } finally {
    if (run) {
      for (const c of run.children) {
        if (!c.isRunning() && !pr.deaths.some((d) => d.startsWith(c.name))) pr.deaths.push(`${c.name} EXITED (${c.exitInfo()}): ${c.log().trim().split("\n").slice(-3).join(" | ").slice(0, 600)}`);
      }
      await run.stop();
      for (const c of run.children) pr.stderr[c.name] = c.log().trim().slice(-8000);
    }
  }
  const ok = pr.steps.filter((s) => s.withOpen && s.open?.ok && !s.repeat);
  pr.slope = {
    rssKibPerTunnel: slope(ok.map((s) => [s.open!.ok, s.withOpen!.rssKb])),
    pssKibPerTunnel: slope(ok.map((s) => [s.open!.ok, s.withOpen!.pssKb])),
  };
}

// ---------------------------------------------------------------- output

const version = spawnSync(natproxyBin, ["--version"], { encoding: "utf8" }).stdout.trim();
const totalS = elapsedS();
const MiBof = (kb: number | undefined): string => (kb === undefined ? "—" : (kb / 1024).toFixed(0));
const label = (s: StepResult): string => `N=${s.n}${s.repeat ? ` (again, ${s.repeat})` : ""}`;
const ms = (xs: number[] | undefined, p: number): string => fmt(xs?.length ? percentile(xs, p) : undefined);

function table(pr: PathResult): string {
  const header = ["N", "open", "setup ms med", "p99", "RTT ms med", "p99", "burst ms med", "p99", "RSS MiB", "PSS MiB", "KiB/tunnel", "fds/tunnel", "CPU s", "failed", "after close: fds (idle), RSS MiB"];
  const rows = pr.steps.map((s) => {
    const okN = s.open?.ok ?? 0;
    const perTunnel = s.withOpen && okN ? (s.withOpen.rssKb - s.idleBefore.rssKb) / okN : undefined;
    const fdsPer = s.withOpen && okN ? (s.withOpen.fds - s.idleBefore.fds) / okN : undefined;
    const after = s.afterClose ? `${s.afterClose.fds} (${s.idleBefore.fds})${s.afterClose.backToIdle ? "" : " NOT idle"}, ${MiBof(s.afterClose.rssKb)}` : "—";
    return [
      s.repeat ? `${s.n} again` : String(s.n),
      `${okN}/${s.n}`,
      ms(s.open?.setupMs, 0.5),
      ms(s.open?.setupMs, 0.99),
      ms(s.measured?.rttMs, 0.5),
      ms(s.measured?.rttMs, 0.99),
      ms(s.measured?.burstMs, 0.5),
      ms(s.measured?.burstMs, 0.99),
      MiBof(s.withOpen?.rssKb),
      MiBof(s.withOpen?.pssKb),
      fmt(perTunnel),
      fmt(fdsPer),
      s.cpuS.total.toFixed(2),
      String(s.failures),
      after,
    ];
  });
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (r: string[]): string => r.map((x, i) => (i === r.length - 1 ? x : x.padStart(widths[i]))).join(" | ");
  // The repeats of the largest N follow a separator: they are the leak check, not part of the series.
  const firstRepeat = pr.steps.findIndex((s) => s.repeat);
  if (firstRepeat > 0) rows.splice(firstRepeat, 0, widths.map((w) => "·".repeat(w)));
  return [line(header), widths.map((w) => "-".repeat(w)).join("-+-"), ...rows.map(line)].join("\n");
}

const lines: string[] = [];
lines.push("");
lines.push(`natproxy scale${quick ? " --quick" : ""}: ${cpus().length} CPUs (${cpus()[0]?.model.trim()}), run time ${totalS.toFixed(0)} s, 1-min load ${loadavg()[0].toFixed(1)} at the end`);
lines.push(`natproxy ${version} (${origin}); node ${process.version}; window ${opts.window} tunnels being opened at a time; RTT sample ${opts.sample} per step`);
lines.push(`raised for the run: ${raised.length ? raised.join("; ") : "nothing"}`);
for (const pr of results) {
  lines.push("");
  lines.push(`${pr.path}: ${pr.describe}${pr.idleAtStart ? `; after warm-up: RSS ${MiBof(pr.idleAtStart.rssKb)} MiB, PSS ${MiBof(pr.idleAtStart.pssKb)} MiB, ${pr.idleAtStart.fds} fds (local + coordinator)` : ""}`);
  if (pr.note) lines.push(`  FAILED: ${pr.note}`);
  if (pr.steps.length) lines.push(table(pr));
  const sl = pr.slope;
  const cpuPerTunnel = median(pr.steps.filter((s) => s.open?.ok).map((s) => (s.cpuS.open * 1000) / s.open!.ok));
  if (pr.steps.length) lines.push(`  memory slope over the steps (least squares, RSS/PSS with N open vs N): ${fmt(sl?.rssKibPerTunnel)} / ${fmt(sl?.pssKibPerTunnel)} KiB per tunnel; CPU while opening: median ${fmt(cpuPerTunnel)} ms per tunnel (natproxy processes)`);
  const big = pr.steps.filter((s) => s.n === maxN && s.afterClose);
  if (big.length > 1) {
    const first = big[0].afterClose!.rssKb;
    const last = big[big.length - 1].afterClose!.rssKb;
    const growth = (last - first) / (big.length - 1);
    lines.push(
      `  leak check, N=${maxN} ${big.length} times in the same processes: RSS after closing ${big.map((s) => MiBof(s.afterClose!.rssKb)).join(" → ")} MiB ` +
        `(${Object.keys(big[0].afterClose!.rssByProcess).map((p) => `${p} ${big.map((s) => MiBof(s.afterClose!.rssByProcess[p])).join(" → ")}`).join(", ")}), with N open ${big.map((s) => MiBof(s.withOpen?.rssKb)).join(" → ")} MiB; ` +
        (growth > 0.05 * first
          ? `RSS GROWS by ${(growth / 1024).toFixed(0)} MiB a round on average (${fmt(growth / maxN)} KiB per tunnel opened): a leak, or freed memory the allocator keeps` +
            (nodeFlags ? "" : ` (--node-flags="--trace-gc --trace-gc-ignore-scavenger" shows whether the JS heap grows too)`)
          : "no growth from round to round: the memory kept after a step is reused, not leaked"),
    );
    // "Mark-Compact 49.4 (74.4) -> 42.3 (76.7) MB": live JS heap (committed) after the last full GC.
    const heap = (line: string | undefined): string => /-> ([\d.]+) \(([\d.]+)\) MB/.exec(line ?? "")?.slice(1, 3).join(" (") ?? "?";
    if (big[0].lastFullGc) {
      lines.push(`  JS heap after each round's last full GC, MB live (committed): ${Object.keys(big[0].lastFullGc).filter((p) => p !== "reporter").map((p) => `${p} ${big.map((s) => `${heap(s.lastFullGc?.[p])})`).join(" → ")}`).join("; ")}`);
    }
  }
  if (pr.idleWatch?.length) {
    const w = pr.idleWatch;
    lines.push(`  idle after the last step: RSS ${w.map((x) => `${MiBof(x.rssKb)} @${x.afterS.toFixed(0)}s`).join(", ")} MiB; PSS ${MiBof(w[w.length - 1].pssKb)} MiB, ${w[w.length - 1].fds} fds (at start: RSS ${MiBof(pr.idleAtStart?.rssKb)}, PSS ${MiBof(pr.idleAtStart?.pssKb)}, ${pr.idleAtStart?.fds} fds)`);
  }
  for (const s of pr.steps) {
    const fl = [...(s.open?.failures ?? []), ...(s.measured?.failures ?? [])];
    if (fl.length || s.error || s.closed?.lostWhileHeld) {
      const grouped = new Map<string, number>();
      for (const f of fl) grouped.set(`${f.stage}: ${f.message}`, (grouped.get(`${f.stage}: ${f.message}`) ?? 0) + 1);
      lines.push(`  ${label(s)} failures: ${[...grouped].map(([m, c]) => `${c}× ${m}`).join("; ")}${s.closed?.lostWhileHeld ? `; ${s.closed.lostWhileHeld} tunnel(s) lost while held (${s.closed.lostReasons.join(", ")})` : ""}${s.error ? `; ${s.error}` : ""}`);
    }
    if (s.afterClose && !s.afterClose.backToIdle) {
      const left = Object.entries(s.afterClose.left).map(([p, k]) => `${p}: ${Object.entries(k).filter(([kind]) => kind !== "not a socket").map(([kind, c]) => `${c}× ${kind}`).join(", ")}`).join("; ");
      lines.push(`  ${label(s)}: ${s.afterClose.settleSeconds.toFixed(1)} s after closing, ${s.afterClose.fds} fds vs ${s.idleBefore.fds} idle; held: ${left}`);
    }
    if (s.closed?.notClosedIn5s) lines.push(`  ${label(s)}: ${s.closed.notClosedIn5s} tunnel(s) not closed by the proxy within 5 s of the client's close`);
  }
  for (const d of pr.deaths) lines.push(`  note: ${d}`);
  for (const [name, text] of Object.entries(pr.stderr)) {
    const interesting = text.split("\n").filter((l) => /warn|error|bug|fail|fatal/i.test(l));
    if (interesting.length) lines.push(`  stderr of ${name}: ${interesting.length} warning/error line(s) (of the last 8 KB), e.g. ${interesting.slice(0, 3).join(" | ").slice(0, 400)}`);
  }
}
const legend = [
  "How each number is made (Node client in its own process, as in npm run bench; memory and CPU are natproxy's):",
  `  open          tunnels up / asked for; at most ${opts.window} are being opened at a time, all stay open until the step ends`,
  "  setup ms      CONNECT written → \"200\" read from the local proxy (the whole tunnel set-up on either path), over all N tunnels; median and p99",
  "  RTT ms        with all N open: GET /small over the tunnel's TLS connection (kept alive), one request at a time, on an even sample of the tunnels",
  "  burst ms      with all N open: each tunnel sends GET /small at the same moment; time from then to each response",
  "  RSS / PSS MiB VmRSS / PSS (smaps_rollup) summed over local + coordinator (not the reporter), read right after the last tunnel opened",
  "  KiB/tunnel    (RSS with N open − RSS idle just before the step) / N; fds/tunnel likewise for open descriptors",
  "  CPU s         utime+stime of all natproxy processes from the first tunnel to the end of settling after the close",
  "  failed        tunnels not opened + requests that failed + tunnels that closed while held",
  `  N again       the largest N run again in the same processes (${opts.repeat}×, leak check; not in the chart or the slope)`,
  `  after close   descriptors of local + coordinator once they stop falling (at most ${opts.idleWaitS} s; \"idle\" = before the step, within ${opts.idleSlackFds}) and RSS then`,
];
lines.push("");
lines.push(...legend);
for (const n of notes) lines.push(`note: ${n}`);

const outDir = resolve(ROOT, args.out);
mkdirSync(outDir, { recursive: true });
const stamp = new Date().toISOString().replace(/[:.]/g, "-");
const baseName = join(outDir, `scale-${stamp}`);
const json = {
  meta: {
    started: new Date(Date.now() - totalS * 1000).toISOString(),
    runSeconds: totalS,
    options: opts,
    raised,
    notes,
    legend,
    machine: { cpus: cpus().length, model: cpus()[0]?.model, kernel: spawnSync("uname", ["-r"], { encoding: "utf8" }).stdout.trim() },
    versions: { natproxy: `${version} (${origin})`, node: process.version },
  },
  paths: results,
};
writeFileSync(`${baseName}.json`, `${JSON.stringify(json, null, 1)}\n`);

const groups = results.map((r) => r.path);
const series = (pick: (s: StepResult) => number | undefined, dashed = false): LineSeries[] =>
  results.map((r, gi) => ({ group: gi, dashed, points: r.steps.filter((s) => !s.repeat).map((s) => [s.n, pick(s) ?? NaN] as [number, number]) }));
const q = (xs: number[] | undefined, p: number): number | undefined => (xs?.length ? percentile(xs, p) : undefined);
const svg = renderLineCharts({
  title: `natproxy: tunnels held open at once${quick ? " (--quick)" : ""}`,
  subtitle: `loopback, ${cpus().length} CPUs; ${opts.window} opened at a time; local + coordinator as separate processes of dist/natproxy; ${stamp}`,
  xLabel: "tunnels open at once (log scale)",
  xTicks: steps,
  groups,
  styleNote: "solid: median (memory: RSS), dashed: p99 (memory: PSS)",
  panels: [
    { title: "tunnel set-up: CONNECT → 200", yLabel: "ms (log scale)", yLog: true, series: [...series((s) => q(s.open?.setupMs, 0.5)), ...series((s) => q(s.open?.setupMs, 0.99), true)] },
    { title: "request round trip with N open", note: "one at a time on a sample of the tunnels", yLabel: "ms (log scale)", yLog: true, series: [...series((s) => q(s.measured?.rttMs, 0.5)), ...series((s) => q(s.measured?.rttMs, 0.99), true)] },
    {
      title: "memory of local + coordinator, N open",
      note: results.map((r) => `${r.path}: ${fmt(r.slope?.rssKibPerTunnel)} KiB/tunnel RSS`).join(", "),
      yLabel: "MiB",
      series: [...series((s) => (s.withOpen ? s.withOpen.rssKb / 1024 : undefined)), ...series((s) => (s.withOpen ? s.withOpen.pssKb / 1024 : undefined), true)],
    },
  ],
});
writeFileSync(`${baseName}.svg`, svg);
const conv = spawnSync("rsvg-convert", ["-o", `${baseName}.png`, `${baseName}.svg`], { encoding: "utf8" });
const pngOk = conv.status === 0 && existsSync(`${baseName}.png`);
if (pngOk) rmSync(`${baseName}.svg`);
lines.push(`results: ${relative(ROOT, baseName)}.json (raw), ${pngOk ? `${relative(ROOT, baseName)}.png (chart)` : `chart NOT converted to PNG (${conv.stderr?.trim() || conv.error?.message}); SVG at ${relative(ROOT, baseName)}.svg`}`);
process.stdout.write(`${lines.join("\n")}\n`);

await stopChild(target.child);
releaseWatchdog();
await stopAllChildren();
guard.cleanup();
log(`done in ${elapsedS().toFixed(1)} s`);
