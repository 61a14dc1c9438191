// Runs the measuring clients (curl, scripts/bench/client.ts) and the target
// as tracked child processes.
import { join } from "node:path";
import type { ClientJob, Via } from "./client.ts";
import { startChild, stopChild, type Child } from "./procs.ts";

const HERE = import.meta.dirname;

export interface CurlResult {
  ok: boolean;
  code: number;
  bytes: number;
  seconds: number;
  ttfbS: number;
  mbps: number;
  error?: string;
}

/** curl's proxy options for a contender. */
function curlVia(via: Via): string[] {
  const host = via.host ?? "127.0.0.1";
  if (via.kind === "http") return ["-x", `http://${host}:${via.port}`];
  if (via.kind === "socks5") return ["--socks5", `${host}:${via.port}`];
  return ["--noproxy", "*"];
}

/** One GET with curl (HTTP/1.1, body to /dev/null); for https through an HTTP proxy curl uses CONNECT. */
export async function curlGet(via: Via, url: string, o: { caFile: string; expectBytes: number; maxTimeS: number; home: string }): Promise<CurlResult> {
  // No *_proxy variables from the environment, and no ~/.curlrc.
  const env: NodeJS.ProcessEnv = { PATH: process.env.PATH, HOME: o.home };
  const c = startChild("curl", "curl", ["-sS", "--http1.1", "-o", "/dev/null", "--max-time", String(o.maxTimeS), "--cacert", o.caFile, "-w", "%{json}", ...curlVia(via), url], { env, keepStdout: true });
  let out = "";
  c.proc.stdout?.on("data", (b: Buffer) => (out += b.toString()));
  c.proc.stdin?.end();
  const { code } = await c.exited;
  let j: Record<string, unknown> = {};
  try {
    j = JSON.parse(out) as Record<string, unknown>;
  } catch {}
  const bytes = Number(j.size_download ?? 0);
  const seconds = Number(j.time_total ?? 0);
  const http = Number(j.http_code ?? 0);
  const ok = code === 0 && http === 200 && bytes === o.expectBytes;
  return {
    ok,
    code: http,
    bytes,
    seconds,
    ttfbS: Number(j.time_starttransfer ?? 0),
    mbps: seconds > 0 ? bytes / seconds / 1e6 : 0,
    error: ok ? undefined : `curl exit ${code}, HTTP ${http}, ${bytes} bytes: ${String(j.errormsg ?? c.log().trim())}`,
  };
}

/**
 * Runs scripts/bench/client.ts as its own process (`wrap` goes first, e.g.
 * "ip netns exec NS"), returns its JSON answer; killed if it overruns its deadline.
 */
export async function runClient<T>(job: ClientJob, wrap: string[] = []): Promise<T & { error?: string }> {
  const argv = [...wrap, process.execPath, join(HERE, "client.ts"), JSON.stringify(job)];
  const c = startChild(`client ${job.mode}`, argv[0], argv.slice(1), { keepStdout: true });
  c.proc.stdin?.end();
  let out = "";
  c.proc.stdout?.on("data", (b: Buffer) => (out += b.toString()));
  const kill = setTimeout(() => void stopChild(c, 500), job.deadlineMs + 15_000);
  await c.exited;
  clearTimeout(kill);
  const last = out.trim().split("\n").pop() ?? "";
  try {
    return JSON.parse(last) as T & { error?: string };
  } catch {
    return { error: `client printed no result: ${c.log().trim().slice(-500)}` } as T & { error?: string };
  }
}

export interface Target {
  http: number;
  https: number;
  child: Child;
}

/** Starts scripts/bench/target.ts (after `wrap`), listening on `host`; it also exits when our pipe to it closes. */
export async function startTarget(certFile: string, keyFile: string, host: string, wrap: string[] = []): Promise<Target> {
  const argv = [...wrap, process.execPath, join(HERE, "target.ts"), certFile, keyFile, host];
  const child = startChild("target", argv[0], argv.slice(1), { keepStdout: true });
  const ports = await new Promise<{ http: number; https: number }>((resolve, reject) => {
    let out = "";
    const timer = setTimeout(() => reject(new Error(`the target did not start: ${child.log()}`)), 15_000);
    child.proc.stdout?.on("data", (b: Buffer) => {
      out += b.toString();
      const nl = out.indexOf("\n");
      if (nl >= 0) {
        clearTimeout(timer);
        resolve(JSON.parse(out.slice(0, nl)) as { http: number; https: number });
      }
    });
    void child.exited.then(() => {
      clearTimeout(timer);
      reject(new Error(`the target exited: ${child.log()}`));
    });
  });
  return { ...ports, child };
}
