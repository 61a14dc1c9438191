// natproxy behind every kind of NAT: the three roles run as separate
// processes in the NAT lab's namespaces (local proxy on the LAN host behind
// the router, reporter, coordinator and web site on "internet" addresses),
// and curl on the LAN host fetches an HTTP and an HTTPS page through the
// local proxy. Each run asserts which tunnel path `auto` chose after its
// start-up probe, and that the request log shows that path. Needs root,
// iproute2 and nftables; skips without them, except under CI (which installs
// them), where it fails.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { createLab, findTool, jsonEvent, labUnavailableReason, LineReader, NAT_TYPES, type Lab, type NatType } from "../scripts/lib/natlab.ts";
import { generateCertificate } from "../src/tls/certs.ts";
import { NODE, startNatproxyInLab, type LabProcess, type NatproxyInLab, type NatproxyInLabOptions } from "./lab/natproxy-in-lab.ts";
import { MEDIA, WWW } from "./lab/site.ts";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const SITE = path.join(root, "test/lab/site.ts");
const PATH_TIMEOUT_MS = 20_000;

// What `auto` must choose (docs/NAT.md, "NAT behaviours and how the lab
// builds them"): a connect-back gets in through full-cone NAT from anywhere,
// through address-restricted NAT only from the reporter's own address
// (reporter combined with the coordinator), and never through
// port-restricted or symmetric NAT or a stateful firewall.
function expectedPath(nat: NatType, combined: boolean): "connect-back" | "outbound" {
  if (nat === "full-cone") return "connect-back";
  if (nat === "addr-restricted" && combined) return "connect-back";
  return "outbound";
}

const unavailable = await (async () => {
  const lab = await labUnavailableReason();
  if (lab) return lab;
  if (!findTool("curl")) return "curl is missing (Debian package curl)";
  return undefined;
})();
if (unavailable && process.env.CI) throw new Error(`the NAT lab must run in CI, but: ${unavailable}`);

describe("natproxy in the NAT lab", { skip: unavailable ? `NAT lab unavailable: ${unavailable}` : false }, () => {
  let lab: Lab;
  let dir: string;
  let caFile: string;
  // Below Linux's ephemeral range (32768-60999), so that no outgoing
  // connection of an earlier run can hold the port a run wants for P.
  let nextPort = 21001;
  const hosts: Record<string, string> = {};

  before(async () => {
    dir = mkdtempSync(path.join(tmpdir(), "natproxy-natpaths-"));
    const ca = await generateCertificate({ commonName: "natproxy lab site CA", isCa: true, days: 2 });
    const leaf = await generateCertificate({ commonName: WWW, dnsNames: [WWW, MEDIA], ipAddresses: [], ca: { key: ca.key, cert: ca.cert }, days: 2 });
    caFile = path.join(dir, "site-ca.pem");
    const certFile = path.join(dir, "site.pem");
    writeFileSync(caFile, ca.cert);
    writeFileSync(certFile, `${leaf.key}\n${leaf.cert}`, { mode: 0o600 });
    let prefix = "";
    for (let k = 0; k < 10 && (!prefix || existsSync(`/run/netns/${prefix}rtr`)); k++) prefix = `np${randomBytes(2).toString("hex")}-`;
    lab = await createLab({ nat: "open", prefix });
    const site = lab.spawn("web", [NODE, SITE, "--cert", certFile, "--media-mib", "4", "--max-seconds", "900"], { stdio: ["ignore", "pipe", "pipe"] });
    await new LineReader(site).waitFor(jsonEvent("ready"), 30_000, "the site ready");
    hosts[WWW] = lab.web.ip4;
    hosts[MEDIA] = lab.web.ip4;
  });
  after(async () => {
    await lab?.destroy();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  /** A fresh tunnel port per run: the previous run's reporter connection may linger in TIME_WAIT on the same 4-tuple. */
  const start = (opts: NatproxyInLabOptions) =>
    startNatproxyInLab(lab, {
      tunnelPort: nextPort++,
      hostsEntries: hosts,
      ...opts,
      extraLocal: { probe_timeout: 1500, nat_keep_alive_interval: 1000, ...opts.extraLocal },
    });

  async function curl(host: "lan" | "lan2", url: string, extra: string[] = []): Promise<{ code: number; status: string; body: string; stderr: string }> {
    const r = await lab.exec(host, ["curl", "-sS", "--max-time", "20", "-x", "http://127.0.0.1:8080", "--cacert", caFile, "-w", "\n%{http_code}", ...extra, url], { timeoutMs: 30_000 });
    const k = r.stdout.lastIndexOf("\n");
    return { code: r.code, status: r.stdout.slice(k + 1), body: r.stdout.slice(0, k), stderr: r.stderr };
  }

  async function chosenPath(local: LabProcess): Promise<string> {
    const m = await local.waitFor(/tunnel path: (connect-back|outbound),/, PATH_TIMEOUT_MS, "the start-up probe's path decision");
    return m[1] as string;
  }

  /** HTTP and HTTPS through the local proxy, and the session lines that show the path they took. */
  async function fetchBoth(np: NatproxyInLab, local: LabProcess, want: string, tag: string, httpWant = want): Promise<void> {
    const http = await curl(local.host as "lan", `http://${WWW}/?${tag}`);
    assert.equal(http.status, "200", `HTTP: ${http.stderr}\n${local.logs()}\n--- coordinator:\n${np.coordinatorLogs()}`);
    assert.match(http.body, /<html/i);
    const https = await curl(local.host as "lan", `https://${MEDIA}/video.bin`, ["-r", "0-65535", "-o", "/dev/null"]);
    assert.equal(https.status, "206", `HTTPS: ${https.stderr}\n${local.logs()}`);
    await local.waitFor(new RegExp(`target=${MEDIA.replace(/\./g, "\\.")}:443 path=${want} outcome=ok up=\\d+ down=\\d+`), 10_000, `an HTTPS session line with path=${want}`);
    await local.waitFor(new RegExp(`target=${WWW.replace(/\./g, "\\.")}:80 path=${httpWant} outcome=ok`), 10_000, `an HTTP session line with path=${httpWant}`);
  }

  for (const nat of NAT_TYPES) {
    for (const combined of [false, true]) {
      const want = expectedPath(nat, combined);
      test(`${nat} NAT, reporter ${combined ? "inside the coordinator" : "on its own address"}: auto chooses ${want}; HTTP and HTTPS work`, async () => {
        await lab.setNat(nat);
        const np = await start({ combined });
        try {
          const local = np.locals[0] as LabProcess;
          assert.equal(await chosenPath(local), want, local.logs());
          assert.match(local.logs(), /reachability: public address /);
          await fetchBoth(np, local, want, `${nat}-${combined}`);
        } finally {
          await np.close();
        }
      });
    }
  }

  test("natproxy local --check on the LAN host names the NAT behaviour and the path, with exit code 0", async () => {
    for (const [nat, want, verdict] of [
      ["port-restricted", "outbound", /connect-back: +blocked: [\s\S]*NAT: +behind a NAT \(port \d+ kept\) that drops connections this machine did not open/],
      ["full-cone", "connect-back", /connect-back: +ok, the coordinator connected back in \d+ ms\nNAT: +behind a full-cone NAT/],
    ] as const) {
      await lab.setNat(nat);
      const np = await start({ localHosts: [] });
      try {
        const r = await lab.exec("lan", [NODE, path.join(root, "src/cli.ts"), "local", "-c", path.join(np.dir, "natproxy.toml"), "--check"], { timeoutMs: 30_000 });
        assert.equal(r.code, 0, r.stdout + r.stderr);
        assert.match(r.stdout, new RegExp(`public address ${lab.rtr.ip4.replace(/\./g, "\\.")}:\\d+, seen from local ${lab.lan.ip4.replace(/\./g, "\\.")}:\\d+`));
        assert.match(r.stdout, verdict);
        assert.match(r.stdout, new RegExp(`tunnel path: +${want} \\(auto`));
        assert.match(r.stdout, /result: +OK/);
      } finally {
        await np.close();
      }
    }
  });

  test("IPv6 across the lab: coordinator, reporter and site reached over IPv6, through NAT66", async () => {
    await lab.setNat("full-cone");
    const v6 = { [WWW]: lab.web.ip6, [MEDIA]: lab.web.ip6 };
    for (const [nat, want] of [["full-cone", "connect-back"], ["port-restricted", "outbound"]] as const) {
      await lab.setNat(nat);
      const np = await start({ family: 6, hostsEntries: v6 });
      try {
        const local = np.locals[0] as LabProcess;
        assert.equal(await chosenPath(local), want, local.logs());
        assert.match(local.logs(), new RegExp(`public address \\[${lab.rtr.ip6.replace(/:/g, ":")}\\]:\\d+`));
        await fetchBoth(np, local, want, `v6-${nat}`);
        // The coordinator saw the local proxy's API calls from the NAT66 address.
        assert.match(local.logs(), /coordinator answered: .*sees us as \[2001:db8:51::2\]:\d+/);
      } finally {
        await np.close();
      }
    }
  });

  test("a second LAN host runs its own local proxy on the same tunnel port; the NAT remaps it and both work", async () => {
    await lab.setNat("full-cone");
    const np = await start({ localHosts: ["lan", "lan2"] });
    try {
      const [a, b] = np.locals as [LabProcess, LabProcess];
      assert.equal(await chosenPath(a), "connect-back");
      assert.equal(await chosenPath(b), "connect-back");
      const pa = (await a.waitFor(/tunnel service listening on port (\d+); public address (\S+)/, 5000, "lan's P'"))[2];
      const pb = (await b.waitFor(/tunnel service listening on port (\d+); public address (\S+)/, 5000, "lan2's P'"))[2];
      assert.notEqual(pa, pb, "the NAT gave the second host another public port");
      await fetchBoth(np, a, "connect-back", "lan");
      await fetchBoth(np, b, "connect-back", "lan2");
    } finally {
      await np.close();
    }
  });

  test("the NAT's state is flushed mid-run: the next session still works, and the local proxy re-learns P' and re-probes by itself", async () => {
    await lab.setNat("full-cone");
    const np = await start({ extraLocal: { tunnel_idle_timeout: 4000 } });
    try {
      const local = np.locals[0] as LabProcess;
      assert.equal(await chosenPath(local), "connect-back");
      await fetchBoth(np, local, "connect-back", "before-flush");
      const t0 = performance.now();
      await lab.flushNat();
      // The first session after the flush must work, whatever path it takes.
      const first = await curl("lan", `http://${WWW}/?after-flush`);
      const firstMs = Math.round(performance.now() - t0);
      assert.equal(first.status, "200", `${first.stderr}\n${local.logs()}`);
      // Then the workflow notices, re-learns P', probes again, and connect-back is back.
      await local.waitFor(/tunnel service restarting: [\s\S]*tunnel path: connect-back/, 30_000, "a restart and a new probe after the flush");
      const recoveredMs = Math.round(performance.now() - t0);
      const again = await curl("lan", `http://${WWW}/?recovered`);
      assert.equal(again.status, "200");
      console.log(`# flushed NAT: first working session after ${firstMs} ms, tunnel service re-learned and re-probed within ${recoveredMs} ms`);
    } finally {
      await np.close();
    }
  });

  test("connect-back that starts failing mid-run: auto switches to outbound at once and the browser never sees an error", async () => {
    await lab.setNat("full-cone");
    const np = await start({ extraLocal: { connect_timeout: 3000 } });
    try {
      const local = np.locals[0] as LabProcess;
      assert.equal(await chosenPath(local), "connect-back");
      await fetchBoth(np, local, "connect-back", "before-switch");
      // A firewall on the router starts dropping new connections from the
      // coordinator: the reporter link and the mapping stay up, so only a
      // failing connect-back can tell the local proxy.
      const rule = await lab.exec("rtr", ["nft", "insert", "rule", "inet", "natlab", "forward", "ip", "saddr", lab.coord.ip4, "ct", "state", "new", "drop"]);
      assert.equal(rule.code, 0, rule.stderr);
      const r = await curl("lan", `http://${WWW}/?during-switch`);
      assert.equal(r.status, "200", `${r.stderr}\n${local.logs()}`);
      // Ready connect-backs made before the rule still carry sessions; the
      // first one that fails (a session's, or a refill's within
      // connect_timeout) switches the path.
      await local.waitFor(/connect-back failed \(.*\); tunnel path: outbound until the next probe succeeds/, 3000 + 3000, "the switch to outbound");
      assert.doesNotMatch(local.logs(), /tunnel service restarting/, "the switch came from the failing session, not from a restart");
      // A new tunnel goes outbound; plain HTTP may still ride the kept-alive
      // connect-back tunnel of the requests before (it works: it is established).
      await fetchBoth(np, local, "outbound", "after-switch", "(?:outbound|connect-back)");
    } finally {
      await np.close();
    }
  });
});
