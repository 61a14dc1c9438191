// Self-test of the NAT lab (scripts/lib/natlab.ts): for every NAT type, the
// mapping and filtering behaviour seen by plain Node TCP scripts running in
// the lab's namespaces must match docs/NAT.md, "NAT behaviours and how the
// lab builds them", over IPv4 and IPv6.
// Needs root, iproute2 and nftables; skips without them, except under CI,
// which installs them and so must fail loudly instead.
import { test, before, after, describe } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import {
  createLab,
  labUnavailableReason,
  LineReader,
  jsonEvent,
  jsonLine,
  listNamespaces,
  NAT_TYPES,
  HOST_NAMES,
  type HostName,
  type Lab,
  type NatType,
} from "../scripts/lib/natlab.ts";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const NODE = path.join(root, "node_modules/.bin/node");
const ECHO = path.join(root, "test/lab/echo-server.ts");
const CLIENT = path.join(root, "test/lab/client.ts");
const CRASH = path.join(root, "test/lab/crash.ts");
// A dropped SYN is only visible as silence; 1.5 s is far above the few ms a
// connect takes in the lab and below the first SYN retransmit that matters.
const INBOUND_TIMEOUT_MS = 1500;

type Fam = "v4" | "v6";
type Outcome = "connected" | "timeout" | string;

interface Observed {
  reporterSees: string;
  endpointIndependentMapping: boolean;
  lan2SamePort: string;
  fromReporterOtherPort: Outcome;
  fromReporterAltIp: Outcome;
  fromCoordinator: Outcome;
  fromReporterSameEndpoint: Outcome;
}

const IN = "connected";
const DROP = "timeout";
// From docs/NAT.md, "NAT behaviours and how the lab builds them".
// "SameEndpoint" is a TCP simultaneous open from the exact reporter IP:port
// that the LAN sends a SYN to (the LAN is not listening on that port). With
// full-cone and address-restricted NAT the reporter's SYN passes the NAT and
// the LAN host itself answers RST.
const EXPECTED: Record<NatType, Observed> = {
  open: {
    reporterSees: "lan itself",
    endpointIndependentMapping: true,
    lan2SamePort: "own address",
    fromReporterOtherPort: DROP,
    fromReporterAltIp: DROP,
    fromCoordinator: DROP,
    fromReporterSameEndpoint: IN,
  },
  "full-cone": {
    reporterSees: "router",
    endpointIndependentMapping: true,
    lan2SamePort: "remapped",
    fromReporterOtherPort: IN,
    fromReporterAltIp: IN,
    fromCoordinator: IN,
    fromReporterSameEndpoint: "ECONNREFUSED",
  },
  "addr-restricted": {
    reporterSees: "router",
    endpointIndependentMapping: true,
    lan2SamePort: "remapped",
    fromReporterOtherPort: IN,
    fromReporterAltIp: DROP,
    fromCoordinator: DROP,
    fromReporterSameEndpoint: "ECONNREFUSED",
  },
  "port-restricted": {
    reporterSees: "router",
    endpointIndependentMapping: true,
    lan2SamePort: "remapped",
    fromReporterOtherPort: DROP,
    fromReporterAltIp: DROP,
    fromCoordinator: DROP,
    fromReporterSameEndpoint: IN,
  },
  symmetric: {
    reporterSees: "router",
    endpointIndependentMapping: false,
    lan2SamePort: "remapped",
    fromReporterOtherPort: DROP,
    fromReporterAltIp: DROP,
    fromCoordinator: DROP,
    fromReporterSameEndpoint: DROP,
  },
};

interface ClientResult {
  event: "result";
  to: string;
  ms: number;
  ok: boolean;
  error?: string;
  local?: { address: string; port: number };
  server?: { name: string; peer: { address: string; port: number } };
}

const hostPort = (addr: string, port: number): string => (addr.includes(":") ? `[${addr}]:${port}` : `${addr}:${port}`);

/** A zombie waiting for its new parent to reap it counts as dead. */
function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return !/^\d+ \(.*\) [ZX]/s.test(stat);
  } catch {
    return false;
  }
}

const nsList = listNamespaces;

/** Runs client.ts in host's namespace and keeps reading its events. */
function client(
  lab: Lab,
  host: HostName,
  args: string[],
): { reader: LineReader; send: (line: string) => void; kill: () => void } {
  const child = lab.spawn(host, [NODE, CLIENT, ...args], { stdio: ["pipe", "pipe", "inherit"] });
  child.stdin?.on("error", () => {});
  return {
    reader: new LineReader(child),
    send: (line) => child.stdin?.write(line + "\n"),
    kill: () => child.kill("SIGTERM"),
  };
}

async function connectOnce(lab: Lab, host: HostName, args: string[]): Promise<ClientResult> {
  const c = client(lab, host, args);
  try {
    return await c.reader.waitFor(jsonEvent<ClientResult>("result"), 15_000, `result of ${host} ${args.join(" ")}`);
  } finally {
    c.kill();
  }
}

/** "connected" only if the LAN's own listener answered. */
const inbound = (r: ClientResult): Outcome => (r.ok ? (r.server?.name === "lan" ? IN : `wrong peer ${r.server?.name}`) : (r.error ?? "?"));

async function probe(lab: Lab, fam: Fam, base: number): Promise<Observed> {
  const v6 = fam === "v6";
  const rep = v6 ? lab.rep.ip6 : lab.rep.ip4;
  const repAlt = (v6 ? lab.rep.ip6Alt : lab.rep.ip4Alt) as string;
  const coord = v6 ? lab.coord.ip6 : lab.coord.ip4;
  const lanOwn = v6 ? lab.lan.ip6 : lab.lan.ip4;
  const [P, P2, P3, Y] = [base, base + 1, base + 2, base + 3];
  const running: Array<() => void> = [];
  try {
    // The LAN learns its mapping from P, then listens on P (connect first,
    // then listen: see docs/NAT.md, "One port for an outbound connection and
    // a listener").
    const main = client(lab, "lan", ["--name", "lan", "--from-port", `${P}`, "--listen", "::", "--to", hostPort(rep, 3478)]);
    running.push(main.kill);
    // Mapping behaviour from another port towards three destinations.
    const eim = client(lab, "lan", [
      "--from-port", `${P2}`, "--hold",
      "--to", hostPort(rep, 3478), "--to", hostPort(rep, 3479), "--to", hostPort(coord, 3478),
    ]);
    running.push(eim.kill);
    // Kept open so P3 stays mapped for the simultaneous-open check.
    const punch = client(lab, "lan", ["--from-port", `${P3}`, "--hold", "--to", hostPort(rep, 3478)]);
    running.push(punch.kill);

    const seen = (await main.reader.waitFor(jsonEvent<ClientResult>("result"), 15_000, "lan mapping")).server?.peer;
    assert.ok(seen, "the reporter answered the LAN");
    await main.reader.waitFor(jsonEvent("listening"), 15_000, "lan listening");
    const eimPorts: number[] = [];
    for (let k = 0; k < 3; k++) {
      const r = await eim.reader.waitFor(jsonEvent<ClientResult>("result"), 15_000, "EIM result");
      assert.ok(r.ok && r.server, `EIM connection ${r.to}: ${r.error}`);
      eimPorts.push(r.server.peer.port);
    }
    const punchSeen = (await punch.reader.waitFor(jsonEvent<ClientResult>("result"), 15_000, "punch mapping")).server?.peer;
    assert.ok(punchSeen, "the reporter answered the punching port");

    const target = hostPort(seen.address, seen.port);
    const lan2 = connectOnce(lab, "lan2", ["--from-port", `${P}`, "--to", hostPort(rep, 3478)]);
    const t = `${INBOUND_TIMEOUT_MS}`;
    const fromRep = connectOnce(lab, "rep", ["--timeout", t, "--to", target]);
    const fromRepAlt = connectOnce(lab, "rep", ["--timeout", t, "--bind", repAlt, "--to", target]);
    const fromCoord = connectOnce(lab, "coord", ["--timeout", t, "--to", target]);

    // Simultaneous open, "coordinator first" (docs/NAT.md, "TCP simultaneous
    // open"): the reporter's SYN leaves before the LAN's.
    const sameEnd = (async (): Promise<Outcome> => {
      const r = client(lab, "rep", [
        "--hello", "--name", "rep", "--timeout", "2000", "--from-port", `${Y}`, "--bind", rep,
        "--to", hostPort(punchSeen.address, punchSeen.port),
      ]);
      running.push(r.kill);
      // Peek: with an immediate RST the result can come before "connecting".
      await r.reader.waitFor((l) => jsonEvent("connecting")(l) ?? jsonEvent("result")(l), 15_000, "rep connecting", false);
      const l = client(lab, "lan", ["--hello", "--name", "lan", "--timeout", "2000", "--from-port", `${P3}`, "--to", hostPort(rep, Y)]);
      running.push(l.kill);
      return inbound(await r.reader.waitFor(jsonEvent<ClientResult>("result"), 15_000, "rep simultaneous open"));
    })();

    const r2 = await lan2;
    assert.ok(r2.ok && r2.server, `lan2 connection: ${r2.error}`);
    return {
      reporterSees:
        seen.address === lanOwn ? "lan itself" : seen.address === (v6 ? lab.rtr.ip6 : lab.rtr.ip4) ? "router" : seen.address,
      endpointIndependentMapping: eimPorts.every((p) => p === eimPorts[0]),
      lan2SamePort:
        r2.server.peer.address === (v6 ? lab.lan2.ip6 : lab.lan2.ip4) && r2.server.peer.port === P
          ? "own address"
          : r2.server.peer.port !== seen.port
            ? "remapped"
            : `collided on ${r2.server.peer.port}`,
      fromReporterOtherPort: inbound(await fromRep),
      fromReporterAltIp: inbound(await fromRepAlt),
      fromCoordinator: inbound(await fromCoord),
      fromReporterSameEndpoint: await sameEnd,
    };
  } finally {
    for (const k of running) k();
  }
}

const unavailable: string | undefined =
  (await labUnavailableReason()) ?? (existsSync(NODE) ? undefined : `${NODE} is missing (npm ci)`);

if (unavailable !== undefined) {
  if (process.env.CI) {
    test("NAT lab prerequisites", () => {
      assert.fail(`the NAT lab cannot run on this CI machine: ${unavailable}`);
    });
  } else {
    test(`NAT lab (skipped: ${unavailable})`, { skip: `NAT lab unavailable: ${unavailable}` }, () => {});
  }
} else {
  describe("NAT lab", { timeout: 180_000 }, () => {
    let lab: Lab;

    before(async () => {
      lab = await createLab({ nat: "open" });
      const rep = new LineReader(
        lab.spawn("rep", [NODE, ECHO, "rep",
          hostPort(lab.rep.ip4, 3478), hostPort(lab.rep.ip4, 3479),
          hostPort(lab.rep.ip6, 3478), hostPort(lab.rep.ip6, 3479)]),
      );
      const coord = new LineReader(
        lab.spawn("coord", [NODE, ECHO, "coord", hostPort(lab.coord.ip4, 3478), hostPort(lab.coord.ip6, 3478)]),
      );
      await rep.waitFor(jsonEvent("listening"), 15_000, "reporter listening");
      await coord.waitFor(jsonEvent("listening"), 15_000, "coordinator listening");
    });

    after(async () => {
      if (!lab) return;
      await lab.destroy();
      await lab.destroy();
      const left = nsList().filter((n) => n.startsWith(lab.prefix));
      assert.deepEqual(left, [], "the lab's namespaces are gone");
    });

    test("exec() and spawn() run inside the lab's namespaces", async () => {
      assert.equal(lab.netns("lan"), `${lab.prefix}lan`);
      const addrs = await lab.exec("lan", ["ip", "-o", "addr", "show"]);
      assert.equal(addrs.code, 0, addrs.stderr);
      assert.match(addrs.stdout, /inet 192\.168\.77\.2\/24/);
      assert.doesNotMatch(addrs.stdout, /203\.0\.113\./);
      const failed = await lab.exec("rep", ["ip", "link", "show", "dev", "no-such-dev"]);
      assert.notEqual(failed.code, 0);
      assert.ok(failed.stderr.length > 0);
      const slow = await lab.exec("web", ["sleep", "5"], { timeoutMs: 200 });
      assert.equal(slow.timedOut, true);
      const child = lab.spawn("coord", ["cat"]);
      const exited = new Promise((r) => child.once("exit", r));
      child.stdin?.end();
      await exited;
    });

    NAT_TYPES.forEach((type, i) => {
      test(`${type}: mapping and filtering over IPv4 and IPv6`, async (t) => {
        await lab.setNat(type);
        assert.equal(lab.nat, type);
        const rules = await lab.exec("rtr", ["nft", "list", "table", "inet", "natlab"]);
        assert.equal(rules.code, 0, rules.stderr);
        assert.equal(/masquerade/.test(rules.stdout), type !== "open", "masquerade only for NAT types");
        assert.equal(/fully-random/.test(rules.stdout), type === "symmetric");
        assert.equal(/@eif4/.test(rules.stdout), type === "full-cone" || type === "addr-restricted");
        assert.equal(/@adf4/.test(rules.stdout), type === "addr-restricted");
        const base = 40000 + i * 100;
        const [v4, v6] = await Promise.all([probe(lab, "v4", base), probe(lab, "v6", base + 50)]);
        t.diagnostic(`${type} v4 ${JSON.stringify(v4)}`);
        t.diagnostic(`${type} v6 ${JSON.stringify(v6)}`);
        assert.deepEqual(v4, EXPECTED[type], `${type} over IPv4`);
        assert.deepEqual(v6, EXPECTED[type], `${type} over IPv6`);
      });
    });

    test("flushNat() breaks established connections and learned mappings", async () => {
      // full-cone, so both the conntrack state and the learned maps must go.
      await lab.setNat("full-cone");
      const echoed = (text: string) => (l: string) => jsonEvent<{ line: string }>("echo")(l)?.line === text || undefined;
      const sessions: Array<{ fam: Fam; c: ReturnType<typeof client>; target: string; rep: string }> = [];
      try {
        await Promise.all(
          (["v4", "v6"] as const).map(async (fam, k) => {
            const rep = fam === "v6" ? lab.rep.ip6 : lab.rep.ip4;
            const c = client(lab, "lan", ["--name", "lan", "--from-port", `${40900 + k * 10}`, "--listen", "::", "--to", hostPort(rep, 3478)]);
            sessions.push({ fam, c, target: "", rep });
            const seen = (await c.reader.waitFor(jsonEvent<ClientResult>("result"), 15_000, `${fam} mapping`)).server?.peer;
            assert.ok(seen, `${fam}: the reporter answered`);
            await c.reader.waitFor(jsonEvent("listening"), 15_000, `${fam} listening`);
            const target = hostPort(seen.address, seen.port);
            (sessions.find((x) => x.c === c) as { target: string }).target = target;
            c.send("before");
            await c.reader.waitFor(echoed("before"), 5000, `${fam} echo before the flush`);
            const r = await connectOnce(lab, "coord", ["--timeout", `${INBOUND_TIMEOUT_MS}`, "--to", target]);
            assert.equal(inbound(r), IN, `${fam}: the coordinator gets in before the flush`);
          }),
        );
        await lab.flushNat();
        await Promise.all(
          sessions.map(async ({ fam, c, target, rep }) => {
            c.send("after");
            await assert.rejects(
              c.reader.waitFor(echoed("after"), INBOUND_TIMEOUT_MS, `${fam} echo after the flush`),
              /timeout/,
              `${fam}: the held connection must be dead after flushNat()`,
            );
            const r = await connectOnce(lab, "coord", ["--timeout", `${INBOUND_TIMEOUT_MS}`, "--to", target]);
            assert.equal(inbound(r), DROP, `${fam}: the old mapping must be gone after flushNat()`);
            const fresh = await connectOnce(lab, "lan", ["--to", hostPort(rep, 3478)]);
            assert.ok(fresh.ok, `${fam}: a new connection works after the flush: ${fresh.error}`);
          }),
        );
      } finally {
        for (const { c } of sessions) c.kill();
      }
    });

    test("two labs run side by side (the second with a delay line when python3 exists)", async (t) => {
      const python = ["/usr/bin/python3", "/usr/local/bin/python3"].some((p) => existsSync(p)) ||
        (process.env.PATH ?? "").split(":").some((d) => d && existsSync(path.join(d, "python3")));
      if (!python) t.diagnostic("python3 missing: the second lab runs without a delay line");
      const delayMs = python ? 20 : 0;
      const lab2 = await createLab({ nat: "port-restricted", delayMs });
      try {
        assert.notEqual(lab2.prefix, lab.prefix);
        const names = nsList();
        for (const h of HOST_NAMES) {
          assert.ok(names.includes(lab.netns(h)) && names.includes(lab2.netns(h)), `both labs have ${h}`);
        }
        // The same addresses and ports in both labs: nothing may collide.
        const webs = [lab, lab2].map((l) => new LineReader(l.spawn("web", [NODE, ECHO, "web", hostPort(l.web.ip4, 80), hostPort(l.web.ip6, 80)])));
        await Promise.all(webs.map((w) => w.waitFor(jsonEvent("listening"), 15_000, "web listening")));
        const runs = await Promise.all(
          [lab, lab2].flatMap((l) => [l.web.ip4, l.web.ip6].map((ip) => connectOnce(l, "lan", ["--from-port", "45000", "--to", hostPort(ip, 80)]))),
        );
        for (const r of runs) assert.ok(r.ok, `${r.to}: ${r.error}`);
        const [a4, a6, b4, b6] = runs as [ClientResult, ClientResult, ClientResult, ClientResult];
        assert.equal(b4.server?.peer.address, lab2.rtr.ip4);
        assert.equal(b6.server?.peer.address, lab2.rtr.ip6);
        t.diagnostic(`connect + first byte: lab1 ${a4.ms}/${a6.ms} ms, lab2 (delay ${delayMs} ms each way) ${b4.ms}/${b6.ms} ms`);
        if (delayMs > 0) {
          // SYN, SYN-ACK, then the server's first line: at least 3 one-way trips.
          assert.ok(b4.ms >= 3 * delayMs && b6.ms >= 3 * delayMs, `delay line adds latency (${b4.ms}, ${b6.ms} ms)`);
        }
      } finally {
        await lab2.destroy();
      }
      const left = nsList();
      assert.deepEqual(left.filter((n) => n.startsWith(lab2.prefix)), [], "lab2 is gone");
      assert.ok(left.includes(lab.netns("rtr")), "lab1 survives lab2's destroy()");
      const again = await connectOnce(lab, "lan", ["--to", hostPort(lab.rep.ip4, 3478)]);
      assert.ok(again.ok, `lab1 still works: ${again.error}`);
    });
  });

  test("a process that dies with a live lab leaves nothing behind", { timeout: 60_000 }, async () => {
    for (const mode of ["throw", "wait"] as const) {
      const prefix = `nlc${Math.floor(Math.random() * 0xffff).toString(16).padStart(4, "0")}-`;
      const child = spawn(NODE, [CRASH, prefix, mode], { stdio: ["ignore", "pipe", "pipe"] });
      let stderr = "";
      child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
      const exited = new Promise<number | string | null>((r) => child.once("exit", (code, sig) => r(code ?? sig)));
      const reader = new LineReader(child);
      const info = await reader.waitFor((l) => jsonLine(l) as { prefix: string; pid: number } | undefined, 30_000, "crash.ts ready");
      assert.ok(nsList().includes(`${prefix}rtr`), "the lab was up");
      if (mode === "wait") child.kill("SIGTERM");
      const how = await exited;
      assert.equal(how, mode === "throw" ? 1 : "SIGTERM", `crash.ts ${mode}: ${stderr}`);
      assert.deepEqual(nsList().filter((n) => n.startsWith(prefix)), [], `${mode}: namespaces removed`);
      assert.equal(alive(info.pid), false, `${mode}: the process inside the lab was killed`);
    }
  });
}
