// Runs natproxy's three roles (from src/cli.ts, as separate processes) inside
// a NAT lab: reporter in `rep`, coordinator in `coord`, local proxies in
// `lan` (and `lan2`). One TOML file and a test PKI per run, in a fresh temp
// dir. Target names resolve inside the coord namespace through
// /etc/netns/<ns>/hosts, which `ip netns exec` bind-mounts over /etc/hosts;
// other names fail at once (a resolv.conf pointing at a closed port).
import type { ChildProcess } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync, rmdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { stringify } from "smol-toml";
import type { Lab } from "../../scripts/lib/natlab.ts";
import { generateCertificate } from "../../src/tls/certs.ts";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
export const NODE = path.join(root, "node_modules/.bin/node");
export const CLI = path.join(root, "src/cli.ts");
export const TOKEN = "lab-token-0123456789abcdef0123";
export const COORD_NAME = "coord.lab.test";
const READY_TIMEOUT_MS = 15_000;
const STOP_TIMEOUT_MS = 5_000;

export interface NatproxyInLabOptions {
  combined?: boolean;
  tunnel?: "auto" | "connect-back" | "outbound";
  family?: 4 | 6;
  localHosts?: ("lan" | "lan2")[];
  tunnelPort?: number;
  extraLocal?: Record<string, unknown>;
  extraCoordinator?: Record<string, unknown>;
  hostsEntries?: Record<string, string>;
}

export interface LabProcess {
  host: string;
  proc: ChildProcess;
  logs(): string;
  /** Resolves with the first match of `re` in this process's output (bounded by timeoutMs). */
  waitFor(re: RegExp, timeoutMs: number, what: string): Promise<RegExpMatchArray>;
}

export interface NatproxyInLab {
  proxyPort: number;
  locals: LabProcess[];
  coordinatorLogs(): string;
  reporterLogs(): string;
  /** The test CA that signed the coordinator's certificate. */
  caFile: string;
  dir: string;
  close(): Promise<void>;
}

/**
 * Collects a child's stdout and stderr (natproxy logs to stderr) and
 * resolves waits on new output, not on a timer.
 */
export class OutputLog {
  private text = "";
  private exited: string | undefined;
  private readonly waiters = new Set<() => void>();

  readonly child: ChildProcess;
  readonly name: string;

  constructor(child: ChildProcess, name: string) {
    this.child = child;
    this.name = name;
    const add = (chunk: Buffer | string): void => {
      // Bounded: a chatty process cannot exhaust the test's memory.
      this.text = (this.text + chunk.toString()).slice(-4 * 1024 * 1024);
      for (const w of [...this.waiters]) w();
    };
    child.stdout?.on("data", add);
    child.stderr?.on("data", add);
    child.once("exit", (code, sig) => {
      this.exited = `${name} exited (${code ?? sig})`;
      for (const w of [...this.waiters]) w();
    });
  }

  logs(): string {
    return this.text;
  }

  /** Resolves with the first match of `re` in everything seen so far. */
  waitFor(re: RegExp, timeoutMs: number, what: string): Promise<RegExpMatchArray> {
    return new Promise((resolve, reject) => {
      const done = (): void => {
        clearTimeout(timer);
        this.waiters.delete(check);
      };
      const check = (): void => {
        const m = this.text.match(re);
        if (m) {
          done();
          resolve(m);
        } else if (this.exited) {
          done();
          reject(new Error(`${this.exited} before ${what}; output:\n${this.text.slice(-6000)}`));
        }
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`timeout after ${timeoutMs} ms waiting for ${what} from ${this.name}; output:\n${this.text.slice(-6000)}`));
      }, timeoutMs);
      this.waiters.add(check);
      check();
    });
  }
}

const running = (c: ChildProcess): boolean => c.exitCode === null && c.signalCode === null;

/** SIGTERM, then SIGKILL after a bound; resolves once every process exited. */
export async function stopProcesses(procs: ChildProcess[], graceMs = STOP_TIMEOUT_MS): Promise<void> {
  const live = procs.filter(running);
  const exits = live.map((c) => new Promise<void>((r) => (running(c) ? c.once("exit", () => r()) : r())));
  const bounded = (ms: number): Promise<unknown> =>
    Promise.race([Promise.all(exits), new Promise((r) => setTimeout(r, ms).unref())]);
  for (const c of live) c.kill("SIGTERM");
  await bounded(graceMs);
  for (const c of live) if (running(c)) c.kill("SIGKILL");
  await bounded(2_000);
}

const hostPort = (ip: string, port: number): string => (ip.includes(":") ? `[${ip}]:${port}` : `${ip}:${port}`);

/**
 * Writes /etc/netns/<ns>/hosts (and resolv.conf) for `ns` and returns its undo. The undo also
 * runs when the lab is torn down (destroy() or the process's exit), since a
 * stale hosts file would outlive the namespace.
 */
function installNetnsHosts(lab: Lab, ns: string, entries: Record<string, string>): () => void {
  const base = "/etc/netns";
  const dir = path.join(base, ns);
  const createdBase = !existsSync(base);
  const createdDir = !existsSync(dir);
  mkdirSync(dir, { recursive: true });
  const file = path.join(dir, "hosts");
  const lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"];
  for (const [name, ip] of Object.entries(entries)) lines.push(`${ip}\t${name}`);
  writeFileSync(file, lines.join("\n") + "\n");
  // Every other name fails at once, as on a network with a DNS server: the
  // host's resolver is unreachable from the lab and would make each lookup
  // (e.g. the browser's background requests) hang for seconds. Nothing
  // listens on port 53 of the namespace's loopback, so queries are refused.
  const resolv = path.join(dir, "resolv.conf");
  writeFileSync(resolv, "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n");
  let undone = false;
  const undo = (): void => {
    if (undone) return;
    undone = true;
    rmSync(file, { force: true });
    rmSync(resolv, { force: true });
    // Only what this call created, and only if empty (another lab may share /etc/netns).
    for (const [d, created] of [[dir, createdDir], [base, createdBase]] as const) {
      if (!created) continue;
      try {
        rmdirSync(d);
      } catch {
        // not empty or already gone
      }
    }
  };
  onLabTeardown(lab, undo);
  return undo;
}

/**
 * Runs `fn` when the lab is torn down. Lab has no hook for this, so its
 * (instance) destroySync is wrapped: both destroy() and the lab's own
 * process-exit handler end in it.
 */
function onLabTeardown(lab: Lab, fn: () => void): void {
  const labAny = lab as unknown as { destroySync: () => void };
  const original = labAny.destroySync.bind(lab);
  labAny.destroySync = () => {
    try {
      fn();
    } finally {
      original();
    }
  };
}

export async function startNatproxyInLab(lab: Lab, opts: NatproxyInLabOptions = {}): Promise<NatproxyInLab> {
  const family = opts.family ?? 4;
  const localHosts = opts.localHosts ?? ["lan"];
  // Below Linux's ephemeral range (32768-60999): no outgoing connection can hold it.
  const tunnelPort = opts.tunnelPort ?? 20001;
  const proxyPort = 8080;
  const coordIp = family === 6 ? lab.coord.ip6 : lab.coord.ip4;
  const repIp = opts.combined ? coordIp : family === 6 ? lab.rep.ip6 : lab.rep.ip4;

  const dir = mkdtempSync(path.join(tmpdir(), "natproxy-lab-"));
  const ca = await generateCertificate({ commonName: "natproxy lab CA", isCa: true, days: 2 });
  const server = await generateCertificate({
    commonName: COORD_NAME,
    dnsNames: [COORD_NAME],
    ipAddresses: [lab.coord.ip4, lab.coord.ip6],
    ca: { key: ca.key, cert: ca.cert },
    days: 2,
  });
  const caFile = path.join(dir, "ca.pem");
  const certFile = path.join(dir, "coordinator.pem");
  writeFileSync(caFile, ca.cert);
  writeFileSync(certFile, `${server.key}\n${server.cert}`, { mode: 0o600 });

  const local: Record<string, unknown> = {
    listen: `127.0.0.1:${proxyPort}`,
    coordinator: `https://${hostPort(coordIp, 8443)}`,
    reporter: hostPort(repIp, 3478),
    token: TOKEN,
    ca: caFile,
    tunnel_port: tunnelPort,
    connect_timeout: 5000,
    ...(opts.tunnel ? { tunnel: opts.tunnel } : {}),
    ...opts.extraLocal,
  };
  const coordinator: Record<string, unknown> = {
    listen: "*:8443",
    tokens: [TOKEN],
    ...(opts.combined ? { reporter: true } : {}),
    ...opts.extraCoordinator,
  };
  const config = {
    log_level: "info",
    local,
    coordinator,
    reporter: { listen: "*:3478", nat_keep_alive_interval: 2000 },
  };
  const cfgFile = path.join(dir, "natproxy.toml");
  writeFileSync(cfgFile, stringify(config) + "\n");

  const procs: ChildProcess[] = [];
  const spawnRole = (host: "rep" | "coord" | "lan" | "lan2", args: string[]): OutputLog => {
    const child = lab.spawn(host, [NODE, CLI, ...args], { stdio: ["ignore", "pipe", "pipe"] });
    procs.push(child);
    return new OutputLog(child, `${args[0]} in ${host}`);
  };

  const localProcs: LabProcess[] = [];
  const undoHosts = installNetnsHosts(lab, lab.netns("coord"), opts.hostsEntries ?? {});
  // A lab destroyed without close() still loses its keys and config.
  onLabTeardown(lab, () => rmSync(dir, { recursive: true, force: true }));
  let closing: Promise<void> | undefined;
  const close = (): Promise<void> => {
    closing ??= (async () => {
      // Locals first, so their last session lines are written while the far end still exists.
      await stopProcesses(localProcs.map((l) => l.proc));
      await stopProcesses(procs);
      undoHosts();
      rmSync(dir, { recursive: true, force: true });
    })();
    return closing;
  };

  try {
    let reporter: OutputLog | undefined;
    if (!opts.combined) reporter = spawnRole("rep", ["reporter", "-c", cfgFile]);
    const coord = spawnRole("coord", ["coordinator", "-c", cfgFile, "--cert", certFile]);
    const waits: Promise<unknown>[] = [coord.waitFor(/HTTPS API listening on/, READY_TIMEOUT_MS, "the coordinator's HTTPS API")];
    if (reporter) waits.push(reporter.waitFor(/listening on .*:(\d+)/, READY_TIMEOUT_MS, "the reporter"));
    else waits.push(coord.waitFor(/listening on \S*:3478 \(STUN/, READY_TIMEOUT_MS, "the coordinator's reporter"));
    await Promise.all(waits);

    const started = localHosts.map((host) => {
      const out = spawnRole(host, ["local", "-c", cfgFile]);
      localProcs.push({ host, proc: out.child, logs: () => out.logs(), waitFor: (re, ms, what) => out.waitFor(re, ms, what) });
      return out.waitFor(/HTTP proxy listening on/, READY_TIMEOUT_MS, `the local proxy in ${host}`);
    });
    // Every process's log in the error, whatever failed.
    try {
      await Promise.all(started);
    } catch (err) {
      const all = [
        reporter ? `--- reporter:\n${reporter.logs()}` : "",
        `--- coordinator:\n${coord.logs()}`,
        ...localProcs.map((l) => `--- local in ${l.host}:\n${l.logs()}`),
      ].join("\n");
      throw new Error(`${(err as Error).message.split("\n")[0]}\n${all}`);
    }
    return {
      proxyPort,
      locals: localProcs,
      coordinatorLogs: () => coord.logs(),
      reporterLogs: () => reporter?.logs() ?? coord.logs(),
      caFile,
      dir,
      close,
    };
  } catch (err) {
    await close();
    throw err;
  }
}
