// Child processes of the bench (all tracked, all ended on exit) and what
// /proc tells about them: CPU time, resident memory.
import { spawn, spawnSync, type ChildProcess, type SpawnOptions } from "node:child_process";
import { readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";

export const CLK_TCK = Number(spawnSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).stdout.trim()) || 100;

export interface Child {
  name: string;
  proc: ChildProcess;
  pid: number;
  /** Last 64 KiB of stderr (and stdout unless piped elsewhere). */
  log(): string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  isRunning(): boolean;
  /** "code N" / "signal S" once it has exited. */
  exitInfo(): string | undefined;
}

const children = new Set<Child>();
const LOG_KEEP = 64 * 1024;
let watchdog: ((line: string) => void) | undefined;

let shuttingDown = false;

/** From now on startChild refuses: the bench is exiting. */
export function refuseNewChildren(): void {
  shuttingDown = true;
}

/** Every child started from now on is reported to `write` ("pid" on start, "-pid" on exit). */
export function setWatchdog(write: (line: string) => void): void {
  watchdog = write;
}

/** A line for the watchdog (see watchdog.ts), e.g. "netns PREFIX" / "-netns PREFIX". */
export function tellWatchdog(line: string): void {
  watchdog?.(`${line}\n`);
}

/** Spawns a tracked child; `stdout: "pipe"` keeps stdout for the caller, otherwise it goes to the log. */
export function startChild(name: string, cmd: string, args: string[], opts: SpawnOptions & { keepStdout?: boolean } = {}): Child {
  if (shuttingDown) throw new Error(`not starting ${name}: the bench is exiting`);
  const proc = spawn(cmd, args, { stdio: ["pipe", "pipe", "pipe"], ...opts });
  let log = "";
  const append = (b: Buffer): void => {
    log += b.toString("utf8");
    if (log.length > LOG_KEEP * 2) log = log.slice(-LOG_KEEP);
  };
  proc.stderr?.on("data", append);
  if (!opts.keepStdout) proc.stdout?.on("data", append);
  let running = true;
  let exitInfo: string | undefined;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    proc.once("exit", (code, signal) => {
      running = false;
      exitInfo = signal ? `signal ${signal}` : `code ${code}`;
      resolve({ code, signal });
    });
    proc.once("error", (err) => {
      running = false;
      exitInfo = `spawn error: ${err.message}`;
      append(Buffer.from(`spawn error: ${err.message}\n`));
      resolve({ code: -1, signal: null });
    });
  });
  const child: Child = { name, proc, pid: proc.pid ?? -1, log: () => log.slice(-LOG_KEEP), exited, isRunning: () => running, exitInfo: () => exitInfo };
  children.add(child);
  if (child.pid > 0) watchdog?.(`${child.pid}\n`);
  void exited.then(() => {
    children.delete(child);
    if (child.pid > 0) watchdog?.(`-${child.pid}\n`);
  });
  return child;
}

/** SIGTERM, then SIGKILL after `graceMs`; resolves when it is gone. */
export async function stopChild(c: Child, graceMs = 2000): Promise<void> {
  if (!c.isRunning()) return;
  try {
    process.kill(c.pid, "SIGTERM");
  } catch {
    return;
  }
  const timer = setTimeout(() => {
    try {
      process.kill(c.pid, "SIGKILL");
    } catch {}
  }, graceMs);
  await c.exited;
  clearTimeout(timer);
}

export async function stopAllChildren(): Promise<void> {
  await Promise.all([...children].map((c) => stopChild(c)));
}

/** For process "exit" handlers: synchronous, by pid, no waiting. */
export function killAllChildrenNow(): void {
  for (const c of children) {
    if (!c.isRunning()) continue;
    try {
      process.kill(c.pid, "SIGKILL");
    } catch {}
  }
}

function statFields(pid: number): string[] | undefined {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, "utf8");
    // comm may hold spaces and parentheses: fields start after the last ")".
    return text.slice(text.lastIndexOf(")") + 2).split(" ");
  } catch {
    return undefined;
  }
}

/** The pid and every live descendant (squid or ss-* could fork helpers). */
export function withDescendants(pids: number[]): number[] {
  const parent = new Map<number, number>();
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    const f = statFields(Number(name));
    if (f) parent.set(Number(name), Number(f[1]));
  }
  const out = new Set(pids.filter((p) => parent.has(p)));
  let grew = true;
  while (grew) {
    grew = false;
    for (const [pid, ppid] of parent) {
      if (!out.has(pid) && out.has(ppid)) {
        out.add(pid);
        grew = true;
      }
    }
  }
  return [...out];
}

/** utime + stime of all threads of each process, in seconds. */
export function cpuSeconds(pids: number[]): number {
  let ticks = 0;
  for (const pid of pids) {
    const f = statFields(pid);
    // Fields 14 and 15 of stat; after the comm they are at index 11 and 12.
    if (f) ticks += Number(f[11]) + Number(f[12]);
  }
  return ticks / CLK_TCK;
}

function statusKb(pid: number, key: string): number {
  try {
    const m = new RegExp(`^${key}:\\s+(\\d+) kB`, "m").exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) : 0;
  } catch {
    return 0;
  }
}

export const rssKb = (pids: number[]): number => pids.reduce((sum, p) => sum + statusKb(p, "VmRSS"), 0);
export const hwmKb = (pids: number[]): number => pids.reduce((sum, p) => sum + statusKb(p, "VmHWM"), 0);

/** Open file descriptors, summed over the processes (0 for one that is gone). */
export function fdCount(pids: number[]): number {
  let n = 0;
  for (const pid of pids) {
    try {
      n += readdirSync(`/proc/${pid}/fd`).length;
    } catch {}
  }
  return n;
}

/** Resets VmHWM to the current RSS (Linux ≥ 4.0, root); false where refused. */
export function resetPeakRss(pids: number[]): boolean {
  let ok = pids.length > 0;
  for (const pid of pids) {
    try {
      writeFileSync(`/proc/${pid}/clear_refs`, "5");
    } catch {
      ok = false;
    }
  }
  return ok;
}

/** Proportional set size: shared pages (the same binary in several processes) split among their users. */
export function pssKb(pids: number[]): number {
  let sum = 0;
  for (const pid of pids) {
    try {
      const m = /^Pss:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/smaps_rollup`, "utf8"));
      if (m) sum += Number(m[1]);
    } catch {}
  }
  return sum;
}

/**
 * Samples the summed VmRSS every `everyMs` (and the summed PSS every fifth
 * time: it costs more to read) until stopped; returns the maxima seen.
 */
export function sampleRss(pids: number[], everyMs = 20): () => { rssKb: number; pssKb: number } {
  let rss = rssKb(pids);
  let pss = pssKb(pids);
  let n = 0;
  const t = setInterval(() => {
    rss = Math.max(rss, rssKb(pids));
    if (++n % 5 === 0) pss = Math.max(pss, pssKb(pids));
  }, everyMs);
  return () => {
    clearInterval(t);
    return { rssKb: Math.max(rss, rssKb(pids)), pssKb: Math.max(pss, pssKb(pids)) };
  };
}

/** A TCP connect to host:port from this process; true if it was accepted. */
export function tcpProbe(host: string, port: number): Promise<boolean> {
  return new Promise<boolean>((resolve) => {
    const s = net.connect({ host, port });
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}

/**
 * Polls `probe` (by default a TCP connect to 127.0.0.1:port) until it
 * succeeds, the child exits, or `timeoutMs` passes.
 */
export async function waitForPort(port: number, child: Child | undefined, timeoutMs: number, probe: () => Promise<boolean> = () => tcpProbe("127.0.0.1", port)): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (Date.now() < until) {
    if (child && !child.isRunning()) {
      const { code, signal } = await child.exited;
      throw new Error(`${child.name} exited (${signal ?? `code ${code}`}) before listening on ${port}:\n${child.log().trim()}`);
    }
    if (await probe()) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`${child?.name ?? "port"}: nothing listens on port ${port} after ${timeoutMs} ms${child ? `\n${child.log().trim()}` : ""}`);
}

/**
 * Ends every child process and removes the run's temp dir however a bench
 * script ends: normally (cleanup()), on a signal (a second one exits at
 * once), or on an uncaught error (exit 1 with the stack, as `<name>: FAILED`).
 */
export function guardRun(name: string, log: (s: string) => void): { readonly interrupted: boolean; setTmp(dir: string): void; cleanup(): void } {
  let tmp: string | undefined;
  let interrupted = false;
  const cleanup = (): void => {
    killAllChildrenNow();
    if (tmp) rmSync(tmp, { recursive: true, force: true });
    tmp = undefined;
  };
  process.on("exit", cleanup);
  for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
    process.on(sig, () => {
      if (interrupted) process.exit(130);
      interrupted = true;
      refuseNewChildren();
      log(`${sig}: stopping every child process and exiting`);
      void stopAllChildren().finally(() => {
        cleanup();
        process.exit(130);
      });
      setTimeout(() => process.exit(130), 4000).unref();
    });
  }
  for (const ev of ["uncaughtException", "unhandledRejection"] as const) {
    process.on(ev, (err: unknown) => {
      if (interrupted) return; // the signal handler is already ending the run
      process.stderr.write(`${name}: FAILED: ${(err as Error)?.stack ?? String(err)}\n`);
      cleanup();
      process.exit(1);
    });
  }
  return {
    get interrupted() {
      return interrupted;
    },
    setTmp(dir) {
      tmp = dir;
    },
    cleanup,
  };
}
