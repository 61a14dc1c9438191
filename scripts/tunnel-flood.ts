// A connection flood on the local proxy's tunnel port, against the built
// binary, on loopback only: what it costs the local proxy (peak RSS) and
// whether browsing keeps working meanwhile. Each round opens `connections`
// TCP connections to P from `from` and leaves them open (a scanner that
// never answers the ClientHello); the local proxy ends them on its own.
//
//   node scripts/tunnel-flood.ts [--binary dist/natproxy] [--connections 4000]
//        [--rounds 3] [--interval 13000] [--from 127.0.0.1]
//
// Prints one JSON line: RSS (baseline, peak, end), and per round how many
// connections got a ClientHello, how many were reset before one, and how
// many the local proxy still held once the flood was in. `from` 127.0.0.2
// (any 127/8 address) is "not the coordinator's address"; 127.0.0.1 is the
// coordinator's own (it connects back from there). Compare binaries run from
// the same directory: here the same local proxy started 20 MiB bigger from
// the worktree's dist/ than from a copy in /tmp.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { writePki } from "./lib/pki.ts";
import { startProc, type Proc } from "./lib/proc.ts";

const { values: opt } = parseArgs({
  options: {
    binary: { type: "string", default: resolve(import.meta.dirname, "..", "dist", "natproxy") },
    connections: { type: "string", default: "4000" },
    rounds: { type: "string", default: "3" },
    interval: { type: "string", default: "13000" },
    from: { type: "string", default: "127.0.0.1" },
  },
});
const N = Number(opt.connections);
const ROUNDS = Number(opt.rounds);
const INTERVAL = Number(opt.interval);
const TOKEN = "flood-token-0123456789abcdef";

const rssMiB = (pid: number) => Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] ?? 0) / 1024;

const dir = mkdtempSync(join(tmpdir(), "natproxy-flood-"));
const procs: Proc[] = [];
const target = http.createServer((req, res) => res.end(`ok ${req.url}`));
try {
  const pki = await writePki(dir, { name: "flood" });
  await new Promise<void>((r) => target.listen(0, "127.0.0.1", r));
  const webPort = (target.address() as net.AddressInfo).port;
  const start = async (args: string[], ready: RegExp) => {
    const p = startProc(opt.binary, args, { PATH: "/nonexistent", HOME: tmpdir() });
    procs.push(p);
    return { p, m: await p.waitFor(ready, 20_000) };
  };
  const rep = await start(["reporter", "--listen", "127.0.0.1:0"], /listening on 127\.0\.0\.1:(\d+)/);
  const cfg = join(dir, "proxy.toml");
  writeFileSync(
    cfg,
    `[coordinator]\nlisten = "127.0.0.1:0"\ntokens = ["${TOKEN}"]\nallow_targets = ["127.0.0.1"]\ncert = "${pki.combinedFile}"\n` +
      `[local]\nlisten = "127.0.0.1:0"\ntoken = "${TOKEN}"\nca = "${pki.caFile}"\nreporter = "127.0.0.1:${rep.m[1]}"\ntunnel = "connect-back"\n`,
  );
  const coord = await start(["coordinator", "-c", cfg], /HTTPS API listening on 127\.0\.0\.1:(\d+)/);
  const local = await start(["local", "-c", cfg, "--coordinator", `https://localhost:${coord.m[1]}`], /HTTP proxy listening on 127\.0\.0\.1:(\d+)/);
  const proxyPort = Number(local.m[1]);
  const tunnelPort = Number((await local.p.waitFor(/tunnel service listening on port (\d+)/, 5000))[1]);
  const pid = local.p.child.pid!;

  const get = (path: string) =>
    new Promise<{ ok: boolean; ms: number }>((resolveGet) => {
      const t0 = performance.now();
      const req = http.request({ host: "127.0.0.1", port: proxyPort, path: `http://127.0.0.1:${webPort}${path}`, agent: false, timeout: 15_000 }, (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () => resolveGet({ ok: Buffer.concat(chunks).toString() === `ok ${path}`, ms: Math.round(performance.now() - t0) }));
      });
      req.on("timeout", () => req.destroy());
      req.on("error", () => resolveGet({ ok: false, ms: Math.round(performance.now() - t0) }));
      req.end();
    });

  if (!(await get("/before")).ok) throw new Error("a proxied GET failed before the flood");
  const baseline = rssMiB(pid);
  let peak = baseline;
  const sampler = setInterval(() => (peak = Math.max(peak, rssMiB(pid))), 100);
  const rounds: { greeted: number; resetBeforeHello: number; heldAfterFlood: number; get: { ok: boolean; ms: number } }[] = [];
  for (let round = 0; round < ROUNDS; round++) {
    const open: net.Socket[] = [];
    // Opened 200 at a time, so the flood is not limited by the listen backlog.
    for (let i = 0; i < N; i += 200) {
      await Promise.all(
        Array.from({ length: Math.min(200, N - i) }, () =>
          new Promise<void>((done) => {
            const s = net.connect({ host: "127.0.0.1", port: tunnelPort, localAddress: opt.from });
            open.push(s);
            s.on("error", () => {});
            s.once("data", () => done());
            s.once("close", () => done());
          }),
        ),
      );
    }
    // Every connection has its ClientHello or is closed; resets still on the
    // way get half a second.
    await new Promise((r) => setTimeout(r, 500));
    const heldAfterFlood = open.filter((s) => !s.destroyed).length;
    const during = await get(`/during-${round}`);
    await new Promise((r) => setTimeout(r, INTERVAL));
    rounds.push({ greeted: open.filter((s) => s.bytesRead > 0).length, resetBeforeHello: open.filter((s) => s.bytesRead === 0).length, heldAfterFlood, get: during });
    for (const s of open) s.destroy();
  }
  clearInterval(sampler);
  const after = await get("/after");
  console.log(JSON.stringify({ binary: opt.binary, from: opt.from, connections: N, rounds: ROUNDS, intervalMs: INTERVAL, rssMiB: { baseline: Math.round(baseline), peak: Math.round(peak), end: Math.round(rssMiB(pid)) }, perRound: rounds, after, localLog: local.p.output().split("\n").filter((l) => /tunnel port|BUG/.test(l)).slice(0, 5) }));
} finally {
  for (const p of procs.reverse()) await p.stop();
  target.close();
  rmSync(dir, { recursive: true, force: true });
}
