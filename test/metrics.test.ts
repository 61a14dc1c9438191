import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import http from "node:http";
import https from "node:https";
import net, { type AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { startProc, type Proc } from "../scripts/lib/proc.ts";
import type { Coordinator } from "../src/coordinator/index.ts";
import type { Local } from "../src/local/index.ts";
import { MetricsEndpoint } from "../src/metrics.ts";
import { resolveConfig } from "../src/config.ts";
import { roleLogger } from "../src/log.ts";
import { startReporter, type ReporterHandle } from "../src/reporter/index.ts";
import { httpsThrough, proxiedRequest } from "../scripts/lib/proxy-client.ts";
import { testPki, type TestPki } from "../scripts/lib/pki.ts";
import { findProgram } from "./helpers/programs.ts";
import { startLocalFor, startTestCoordinator } from "../scripts/lib/stack.ts";
import { expectedSha256, startHttpsTarget, type Target } from "../scripts/lib/targets.ts";
import { freePort } from "../scripts/lib/ports.ts";

// The Prometheus endpoints of both roles: the listener's own rules first
// (paths, methods, deadlines, one registry per role), then a real Prometheus
// scraping a coordinator and two local proxies, one per tunnel path, while
// known traffic goes through them, asserted through its query API.

function get(port: number, path: string, method = "GET"): Promise<{ status: number; headers: http.IncomingHttpHeaders; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: "127.0.0.1", port, path, method, agent: false }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (c: string) => (body += c));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
    });
    req.on("error", reject);
    req.end();
  });
}

/** The value of one sample in Prometheus text format, e.g. `name{a="b"}`; undefined if absent. */
function sample(text: string, series: string): number | undefined {
  const line = text.split("\n").find((l) => l.startsWith(`${series} `));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}

describe("the metrics listener", () => {
  test("answers GET and HEAD /metrics only, closes every connection, and cuts a silent one at its deadline", async (t) => {
    const endpoint = new MetricsEndpoint();
    const addr = await endpoint.listen({ host: "127.0.0.1", port: 0 }, { timeout: 300, log: roleLogger("test") });
    t.after(() => endpoint.close());
    const ok = await get(addr.port, "/metrics");
    assert.equal(ok.status, 200);
    assert.match(String(ok.headers["content-type"]), /^text\/plain; version=0\.0\.4/);
    assert.equal(ok.headers.connection, "close");
    // prom-client's default process metrics, in this registry.
    assert.ok((sample(ok.body, "process_open_fds") ?? 0) > 0, ok.body.slice(0, 500));
    const head = await get(addr.port, "/metrics", "HEAD");
    assert.equal(head.status, 200);
    assert.equal(head.body, "");
    assert.equal((await get(addr.port, "/")).status, 404);
    assert.equal((await get(addr.port, "/metrics/x")).status, 404);
    const post = await get(addr.port, "/metrics", "POST");
    assert.equal(post.status, 405);
    assert.equal(post.headers.allow, "GET, HEAD");

    // A peer that connects and never finishes its request head is closed
    // within the timeout (plus the server's deadline check).
    const silent = net.connect(addr.port, "127.0.0.1");
    silent.on("error", () => {});
    silent.write("GET /metrics HTTP/1.1\r\n");
    const t0 = performance.now();
    await new Promise((r) => silent.once("close", r));
    const ms = performance.now() - t0;
    assert.ok(ms < 300 + 1000 + 500, `closed after ${Math.round(ms)} ms`);
  });

  test("close() releases the port, and a second close() is harmless", async () => {
    const endpoint = new MetricsEndpoint();
    const addr = await endpoint.listen({ host: "127.0.0.1", port: 0 }, { timeout: 1000, log: roleLogger("test") });
    await Promise.all([endpoint.close(), endpoint.close()]);
    await endpoint.close();
    await assert.rejects(get(addr.port, "/metrics"), { code: "ECONNREFUSED" });
  });
});

describe("a coordinator's metrics, scraped directly", () => {
  test("metrics_listen: off by default, an address when given, refused when malformed", () => {
    const base = { tokens: ["0123456789abcdef0123"] };
    assert.equal(resolveConfig({ coordinator: base }, "coordinator").coordinator.metrics_listen, undefined);
    assert.deepEqual(resolveConfig({ coordinator: { ...base, metrics_listen: "*:9464" } }, "coordinator").coordinator.metrics_listen, { host: "*", port: 9464 });
    assert.deepEqual(resolveConfig({ local: { metrics_listen: "[::1]:9465" } }, "any").local.metrics_listen, { host: "::1", port: 9465 });
    assert.throws(() => resolveConfig({ coordinator: { ...base, metrics_listen: "9464" } }, "coordinator"), /coordinator\.metrics_listen: expected "host:port"/);
  });

  test("refusals by code, unauthenticated connections held, and the listener closed with the coordinator", async () => {
    const pki = await testPki();
    const coordinator = await startTestCoordinator(pki, { metrics_listen: "127.0.0.1:0" });
    const port = coordinator.metricsAddress!.port;
    try {
      // Nothing beyond the role's own registry; nothing refused or held yet.
      const before = (await get(port, "/metrics")).body;
      assert.equal(sample(before, 'natproxy_coordinator_refused_total{code="UNAUTHORIZED"}'), undefined);
      assert.equal(sample(before, "natproxy_coordinator_unauthenticated_connections"), 0);
      assert.doesNotMatch(before, /natproxy_local_/);
      const status = await new Promise<number>((resolve, reject) => {
        const req = https.get({ host: "127.0.0.1", port: coordinator.addresses[0].port, path: "/v1/hello", ca: pki.ca.cert, servername: "localhost", agent: false, headers: { Authorization: "Bearer wrong-token-0123456789" } }, (res) => {
          res.resume();
          resolve(res.statusCode ?? 0);
        });
        req.on("error", reject);
      });
      assert.equal(status, 401);
      // The 401 closed its connection, so nothing is held; three silent TCP
      // connections (no TLS, no token) are.
      const after1 = (await get(port, "/metrics")).body;
      assert.equal(sample(after1, 'natproxy_coordinator_refused_total{code="UNAUTHORIZED"}'), 1);
      const silent = await Promise.all([1, 2, 3].map(() => new Promise<net.Socket>((resolve, reject) => {
        const s = net.connect(coordinator.addresses[0].port, "127.0.0.1", () => resolve(s));
        s.on("error", reject);
      })));
      const held = async () => sample((await get(port, "/metrics")).body, "natproxy_coordinator_unauthenticated_connections");
      for (let i = 0; i < 50 && (await held()) !== 3; i++) await new Promise((r) => setTimeout(r, 20));
      assert.equal(await held(), 3);
      // A reset, not a FIN: a half-open peer is held until handshake_timeout.
      for (const s of silent) s.resetAndDestroy();
      for (let i = 0; i < 50 && (await held()) !== 0; i++) await new Promise((r) => setTimeout(r, 20));
      assert.equal(await held(), 0);
    } finally {
      await coordinator.close();
    }
    await assert.rejects(get(port, "/metrics"), { code: "ECONNREFUSED" });
  });
});

// --- A real Prometheus --------------------------------------------------------

const PROMETHEUS = findProgram("prometheus", "NATPROXY_PROMETHEUS");
const MISSING = "prometheus (Debian package prometheus) is not installed: apt-get install -y prometheus";
// CI installs it (.ci/run), so there a missing prometheus fails the test instead.
const SKIP = PROMETHEUS === undefined && !process.env.CI ? `${MISSING}; skipped outside CI` : false;

const HTTPS_SESSIONS = 5;
const HTTP_REQUESTS = 3;
const BODY = 200_000;

/** A plain-HTTP target that closes after each answer, so each request is one tunnel and one session line. */
async function startClosingTarget(): Promise<Target> {
  const server = http.createServer((req, res) => {
    req.resume();
    res.writeHead(200, { "Content-Type": "application/octet-stream", "Content-Length": BODY, Connection: "close" });
    res.end(Buffer.alloc(BODY, 0x61));
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return {
    port: (server.address() as AddressInfo).port,
    close: () =>
      new Promise((r) => {
        server.closeAllConnections();
        server.close(() => r());
      }),
  };
}

interface PromResult {
  metric: Record<string, string>;
  value: [number, string];
}

class Prometheus {
  readonly port: number;
  readonly proc: Proc;
  constructor(port: number, proc: Proc) {
    this.port = port;
    this.proc = proc;
  }

  async query(q: string): Promise<PromResult[]> {
    const r = await get(this.port, `/api/v1/query?query=${encodeURIComponent(q)}`);
    const body = JSON.parse(r.body) as { status: string; data?: { resultType: string; result: PromResult[] }; error?: string };
    if (body.status !== "success" || !body.data) throw new Error(`query ${q}: ${body.error ?? r.body}`);
    return body.data.result;
  }

  /** One number from an instant query; NaN while the query has no result. */
  async value(q: string): Promise<number> {
    const result = await this.query(q);
    return result.length === 1 ? Number(result[0].value[1]) : Number.NaN;
  }

  /**
   * Polls the query until `ok` holds for its value, at most `ms`: Prometheus
   * scrapes once a second, and nothing announces that a scrape happened.
   */
  async until(q: string, ok: (v: number) => boolean, ms = 20_000): Promise<number> {
    const deadline = performance.now() + ms;
    let last = Number.NaN;
    for (;;) {
      last = await this.value(q);
      if (ok(last)) return last;
      if (performance.now() > deadline) throw new Error(`${q} was ${last} after ${ms} ms`);
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}

async function startPrometheus(bin: string, dir: string, jobs: Record<string, number>): Promise<Prometheus> {
  const scrape = Object.entries(jobs)
    .map(([job, port]) => `  - job_name: ${job}\n    static_configs:\n      - targets: ["127.0.0.1:${port}"]\n`)
    .join("");
  const config = join(dir, "prometheus.yml");
  writeFileSync(config, `global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n${scrape}`);
  const port = await freePort();
  const proc = startProc(bin, [`--config.file=${config}`, `--storage.tsdb.path=${join(dir, "data")}`, `--web.listen-address=127.0.0.1:${port}`, "--log.level=warn"]);
  const prom = new Prometheus(port, proc);
  const deadline = performance.now() + 30_000;
  for (;;) {
    const ready = await get(port, "/-/ready").catch(() => undefined);
    if (ready?.status === 200) return prom;
    if (proc.child.exitCode !== null || performance.now() > deadline) throw new Error(`prometheus did not get ready; output:\n${proc.output()}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe("a real Prometheus scraping a coordinator and a local proxy on each path", { skip: SKIP }, () => {
  let pki: TestPki;
  let dir: string;
  let secure: Target;
  let web: Target;
  let reporter: ReporterHandle;
  let coordinator: Coordinator;
  const locals = new Map<"connect-back" | "outbound", Local>();
  let prom: Prometheus;

  before(async () => {
    if (PROMETHEUS === undefined) assert.fail(`${MISSING}. CI must have it to check the metrics against a real scraper.`);
    pki = await testPki();
    dir = mkdtempSync(join(tmpdir(), "natproxy-metrics-"));
    secure = await startHttpsTarget(pki);
    web = await startClosingTarget();
    reporter = await startReporter(resolveConfig({ reporter: { listen: "127.0.0.1:0" } }, "reporter").reporter);
    coordinator = await startTestCoordinator(pki, { metrics_listen: "127.0.0.1:0" });
    for (const tunnel of ["connect-back", "outbound"] as const)
      locals.set(tunnel, await startLocalFor(coordinator.addresses[0].port, reporter.addresses[0].port, pki, { tunnel, metrics_listen: "127.0.0.1:0" }));
    const port = (a: AddressInfo | undefined) => {
      assert.ok(a, "a metrics address");
      return a.port;
    };
    prom = await startPrometheus(PROMETHEUS, dir, {
      coordinator: port(coordinator.metricsAddress),
      "local-connect-back": port(locals.get("connect-back")?.metricsAddress),
      "local-outbound": port(locals.get("outbound")?.metricsAddress),
    });
  });
  after(async () => {
    await prom?.proc.stop();
    for (const l of locals.values()) await l.close();
    await coordinator?.close();
    await reporter?.close();
    await secure?.close();
    await web?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test("sessions by path and outcome, bytes, tunnels and gauges move as the traffic did", async () => {
    // Every target is up, and each role's registry holds only its own metrics.
    for (const job of ["coordinator", "local-connect-back", "local-outbound"]) await prom.until(`up{job="${job}"}`, (v) => v === 1);
    assert.ok((await prom.value(`process_resident_memory_bytes{job="coordinator"}`)) > 0, "prom-client's default metrics");
    assert.deepEqual(await prom.query(`natproxy_coordinator_sessions_total{job=~"local-.*"}`), []);
    assert.deepEqual(await prom.query(`natproxy_local_sessions_total{job="coordinator"}`), []);
    await prom.until(`natproxy_local_path{job="local-connect-back",path="connect-back"}`, (v) => v === 1);
    await prom.until(`natproxy_local_path{job="local-outbound",path="outbound"}`, (v) => v === 1);
    await prom.until(`natproxy_local_reporter_up{job="local-connect-back"}`, (v) => v === 1);
    assert.deepEqual(await prom.query(`natproxy_local_reporter_up{job="local-outbound"}`), [], "no reporter link on a forced outbound path");

    for (const [path, local] of locals) {
      for (let i = 0; i < HTTPS_SESSIONS; i++) {
        const r = await httpsThrough(local.proxyAddress.port, "127.0.0.1", secure.port, `/bytes/${BODY}`, pki.ca.cert);
        assert.equal(r.status, 200, `${path} HTTPS ${i}`);
        assert.equal(r.sha256, expectedSha256(BODY));
      }
      for (let i = 0; i < HTTP_REQUESTS; i++) {
        const r = await proxiedRequest(local.proxyAddress.port, `http://127.0.0.1:${web.port}/`);
        assert.equal(r.status, 200, `${path} HTTP ${i}`);
        assert.equal(r.sha256, createHash("sha256").update(Buffer.alloc(BODY, 0x61)).digest("hex"));
      }
    }
    // One that the coordinator refuses: a target its policy forbids.
    const refused = await proxiedRequest(locals.get("outbound")!.proxyAddress.port, "http://10.255.255.1:80/");
    assert.equal(refused.headers["x-natproxy-error"], "FORBIDDEN");

    const sessions = HTTPS_SESSIONS + HTTP_REQUESTS;
    for (const path of locals.keys()) {
      const job = `local-${path}`;
      await prom.until(`natproxy_local_sessions_total{job="${job}",path="${path}",outcome="ok"}`, (v) => v === sessions);
      await prom.until(`natproxy_local_tunnel_open_seconds_count{job="${job}",path="${path}"}`, (v) => v === sessions);
      await prom.until(`natproxy_local_tunnel_bytes_total{job="${job}",path="${path}",direction="down"}`, (v) => v >= sessions * BODY);
      await prom.until(`natproxy_local_tunnel_bytes_total{job="${job}",path="${path}",direction="up"}`, (v) => v > 0);
      await prom.until(`natproxy_local_tunnels_open{job="${job}",path="${path}"}`, (v) => v === 0);
      // The coordinator's count for the same path: every session line, by outcome.
      await prom.until(`natproxy_coordinator_sessions_total{job="coordinator",path="${path}",outcome="ok"}`, (v) => v === sessions);
      await prom.until(`natproxy_coordinator_tunnel_duration_seconds_count{job="coordinator",path="${path}"}`, (v) => v === sessions);
      await prom.until(`natproxy_coordinator_tunnel_bytes_total{job="coordinator",path="${path}",direction="down"}`, (v) => v >= sessions * BODY);
    }
    await prom.until(`natproxy_coordinator_sessions_total{job="coordinator",path="outbound",outcome="FORBIDDEN"}`, (v) => v === 1);
    await prom.until(`natproxy_coordinator_refused_total{job="coordinator",code="FORBIDDEN"}`, (v) => v === 1);
    await prom.until(`natproxy_local_sessions_total{job="local-outbound",path="outbound",outcome="FORBIDDEN"}`, (v) => v === 1);
    // One request, one line: the refusal is not logged (and counted) twice.
    assert.equal(await prom.value(`sum(natproxy_local_sessions_total{outcome="FORBIDDEN"})`), 1);
    // Every connect-back: the probe, the sessions' and the ready ones'.
    await prom.until(`natproxy_coordinator_connect_back_seconds_count{job="coordinator"}`, (v) => v >= 1 + sessions);
    await prom.until(`natproxy_coordinator_tunnels_open{job="coordinator"}`, (v) => v === 0);
    await prom.until(`natproxy_coordinator_tunnels_max{job="coordinator"}`, (v) => v === 4096);
    // Both local proxies keep their pools filled (pool_size 4), each on its path.
    await prom.until(`natproxy_coordinator_ready_connections{job="coordinator"}`, (v) => v === 8);
    await prom.until(`natproxy_local_ready_connections{job="local-outbound",path="outbound"}`, (v) => v === 4);
    await prom.until(`natproxy_local_ready_connections{job="local-connect-back",path="connect-back"}`, (v) => v === 4);
  });
});
