// --delay: time to first byte with a real round-trip time, in the NAT lab
// (scripts/lib/natlab.ts: network namespaces, a full-cone NAT, 10 ms each way on
// the router's uplink, so ~20 ms RTT from the LAN host to everything outside).
// Full cone, not "open": the lab's "open" type is a stateful firewall that
// drops unsolicited inbound SYNs, so natproxy's connect-back cannot arrive
// there (every CONNECT ends in 504); a full-cone NAT lets it in.
// The client, natproxy's local proxy and ss-local run on the LAN host; the
// coordinator, squid and ss-server on the coordinator host; the target on the
// web host; natproxy's reporter on the reporter host. Only TTFB is measured
// here (the lab's delay line is a userspace relay, not made for bulk).
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import type { ClientJob } from "./client.ts";
import { SkipContender, type BenchEnv, type Contender, type Placement, type RunningContender, type Site } from "./contenders.ts";
import { startChild, stopChild, tellWatchdog } from "./procs.ts";
import { runClient, startTarget, type Target } from "./runner.ts";
import { median } from "./stats.ts";

/** The lab's coordinator and web addresses: the server certificate must name them. */
export const LAB_SERVER_IPS = ["203.0.113.20", "203.0.113.30"];
export const LAB_ONE_WAY_DELAY_MS = 10;
export const LAB_NAT = "full-cone";

export interface TtfbSample {
  tcp: number;
  tunnel: number;
  tls: number;
  firstByte: number;
  total: number;
}

export interface DelayResult {
  measured: boolean;
  note: string;
  rttSamplesMs: number[];
  contenders: Record<string, { status: "ran" | "skipped" | "failed"; note?: string; stderr?: Record<string, string>; rounds: Array<{ samples: TtfbSample[]; failures: unknown[]; error?: string }> }>;
}

export async function runDelayPhase(o: {
  contenders: Contender[];
  env: BenchEnv;
  pki: { caFile: string; serverCertFile: string; serverKeyFile: string };
  rounds: number;
  count: number;
  rttCount: number;
  opTimeoutMs: number;
  timeLeftS: () => number;
  log: (s: string) => void;
}): Promise<DelayResult> {
  const result: DelayResult = { measured: false, note: "", rttSamplesMs: [], contenders: {} };
  // Loaded only here: the lab module installs its own exit handlers.
  const { createLab, labUnavailableReason, removeLeftovers } = await import("../lib/natlab.ts");
  const reason = await labUnavailableReason();
  if (reason) {
    result.note = `the NAT lab cannot run here (${reason})`;
    return result;
  }
  o.log(`--delay: building the NAT lab (${LAB_NAT} NAT, ${LAB_ONE_WAY_DELAY_MS} ms each way)...`);
  // Our own prefix, told to the watchdog before the first namespace exists:
  // if the bench is killed (SIGKILL) mid-way, the watchdog removes the lab.
  let prefix = "";
  do prefix = `nb${randomBytes(3).toString("hex")}-`;
  while (existsSync(`/run/netns/${prefix}rtr`) || existsSync(`/var/run/netns/${prefix}rtr`));
  tellWatchdog(`netns ${prefix}`);
  let lab: Awaited<ReturnType<typeof createLab>>;
  try {
    lab = await createLab({ nat: LAB_NAT, delayMs: LAB_ONE_WAY_DELAY_MS, prefix });
  } catch (err) {
    removeLeftovers(prefix);
    tellWatchdog(`-netns ${prefix}`);
    throw err;
  }
  const started: RunningContender[] = [];
  let target: Target | undefined;
  try {
    if (lab.coord.ip4 !== LAB_SERVER_IPS[0] || lab.web.ip4 !== LAB_SERVER_IPS[1]) {
      result.note = `the lab's addresses changed (coord ${lab.coord.ip4}, web ${lab.web.ip4}); update LAB_SERVER_IPS in scripts/bench/delay.ts`;
      return result;
    }
    const wrap = (host: "lan" | "coord" | "rep" | "web"): string[] => ["ip", "netns", "exec", lab.netns(host)];
    const site = (host: "lan" | "coord" | "rep", ip: string): Site => {
      let next = 20_000;
      return {
        ip,
        spawn: (name, cmd, args) => {
          const argv = [...wrap(host), cmd, ...args];
          return startChild(`${name} (lab ${host})`, argv[0], argv.slice(1));
        },
        probe: (pip, port) =>
          new Promise((resolve) => {
            const argv = [...wrap(host), "bash", "-c", `exec 3<>/dev/tcp/${pip}/${port}`];
            execFile(argv[0], argv.slice(1), { timeout: 3000 }, (err) => resolve(!err));
          }),
        port: async () => next++,
      };
    };
    const where: Placement = { name: "lab", near: site("lan", "127.0.0.1"), far: site("coord", lab.coord.ip4), reporter: site("rep", lab.rep.ip4), nearSeenAs: lab.publicIp4 };
    target = await startTarget(o.pki.serverCertFile, o.pki.serverKeyFile, lab.web.ip4, wrap("web"));
    const tgt = target;
    const job = (mode: ClientJob["mode"], via: ClientJob["via"], count: number, deadlineMs: number): ClientJob => ({
      mode,
      via,
      count,
      host: lab.web.ip4,
      httpPort: tgt.http,
      httpsPort: tgt.https,
      caFile: o.pki.caFile,
      timeoutMs: o.opTimeoutMs,
      deadlineMs,
    });
    const up: Array<{ c: Contender; run: RunningContender }> = [];
    for (const c of o.contenders) {
      const entry: DelayResult["contenders"][string] = (result.contenders[c.name] = { status: "ran", rounds: [] });
      let run: RunningContender | undefined;
      try {
        run = await c.start(o.env, where);
        started.push(run);
        // Warm-up (natproxy's first API call opens its keep-alive connection).
        const w = await runClient<{ samples?: TtfbSample[]; failures?: unknown[] }>(job("ttfb", run.via, 2, 20_000), wrap("lan"));
        if (!w.samples?.length) throw new Error(`warm-up failed: ${JSON.stringify(w.failures ?? w.error).slice(0, 300)}`);
        up.push({ c, run });
        o.log(`  lab ${c.name}: up`);
      } catch (err) {
        entry.status = err instanceof SkipContender ? "skipped" : "failed";
        entry.note = (err as Error).message;
        if (run) entry.stderr = Object.fromEntries(run.children.map((ch) => [ch.name, ch.log().trim().slice(-4000)]));
        o.log(`  lab ${c.name}: ${entry.status.toUpperCase()}: ${entry.note.split("\n")[0]}`);
      }
    }
    const rtt = await runClient<{ samplesMs?: number[] }>(job("rtt", { kind: "direct" }, o.rttCount, 30_000), wrap("lan"));
    result.rttSamplesMs = rtt.samplesMs ?? [];
    for (let r = 0; r < o.rounds; r++) {
      for (let i = 0; i < up.length; i++) {
        const { c, run } = up[(i + r) % up.length];
        if (o.timeLeftS() < 5) {
          result.note = "stopped early: time budget";
          break;
        }
        const res = await runClient<{ samples?: TtfbSample[]; failures?: unknown[] }>(job("ttfb", run.via, o.count, Math.min(60_000, o.timeLeftS() * 1000)), wrap("lan"));
        result.contenders[c.name].rounds.push({ samples: res.samples ?? [], failures: res.failures ?? [], error: res.error });
        o.log(`  lab ttfb ${c.name}: median ${median((res.samples ?? []).map((s) => s.firstByte))?.toFixed(1)} ms over ${res.samples?.length ?? 0}`);
      }
    }
    result.measured = up.length > 0;
    return result;
  } finally {
    for (const run of started.reverse()) await run.stop();
    if (target) await stopChild(target.child);
    await lab.destroy();
    tellWatchdog(`-netns ${prefix}`);
  }
}
