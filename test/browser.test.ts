// A real browser through natproxy in the NAT lab: Debian's chromium, headless
// in the `lan` namespace behind the lab's NAT, uses the local proxy to load
// a YouTube + Gmail shaped site (test/lab/site.ts) in the `web` namespace:
// 26 subresources from two host names, a 50 MiB media file in Range
// requests, 100 WebSocket echoes. The page reports what it got; the test
// checks that report against the site's own request log and the proxy's
// session log. Needs root, the lab's tools, chromium and certutil; skips
// without them, except under CI (which installs them), where it fails.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFile, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { createLab, findTool, jsonEvent, labUnavailableReason, LineReader, type Lab, type NatType } from "../scripts/lib/natlab.ts";
import { generateCertificate } from "../src/tls/certs.ts";
import { NODE, startNatproxyInLab, stopProcesses, type NatproxyInLab } from "./lab/natproxy-in-lab.ts";
import { waitUntil } from "./helpers/wait.ts";
import { DEFAULT_MEDIA_SIZE, MEDIA, MEDIA_PATH, mediaBytes, sha256Hex, subresourceList, WS_MESSAGES, WWW } from "./lab/site.ts";

// The NAT types the browser runs behind, with `auto`: connect-back through
// full-cone NAT, the outbound path through the commonest home NAT
// (port-restricted, plain Linux masquerade).
interface Scenario {
  nat: NatType;
  /** `[local] tunnel`; omitted from the config when undefined. */
  tunnel?: "auto" | "connect-back" | "outbound";
  /** The `path=` the local proxy's session lines must show, if checked. */
  path?: string;
}
const SCENARIOS: Scenario[] = [
  { nat: "full-cone", path: "connect-back" },
  { nat: "port-restricted", path: "outbound" },
];

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const SITE = path.join(root, "test/lab/site.ts");
const CHROMIUM = "/usr/bin/chromium";
const REPORT_TIMEOUT_MS = 120_000;
const SESSION_LINES_TIMEOUT_MS = 20_000;
const run = promisify(execFile);

interface Report {
  errors: string[];
  subresources?: { expected: number; loaded: Record<string, number>; failed: string[] };
  media?: { total: number; bytes: number; requests: number; sha256: string; ms: number };
  ws?: { opened: boolean; sent: number; echoes: number; mismatches: number; openAfterAll: boolean; closedEarly: boolean; close: { code: number; wasClean: boolean } | null; ms: number; error?: string };
  ms: number;
}
interface RequestLine {
  event: "request";
  scheme: string;
  host: string;
  method: string;
  path: string;
  range: string | null;
  status: number;
  bytes: number;
}

const escapeRe = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

async function prerequisites(): Promise<string | undefined> {
  const lab = await labUnavailableReason();
  if (lab) return lab;
  if (!existsSync(NODE)) return `${NODE} is missing (npm ci)`;
  if (!existsSync(CHROMIUM)) return `${CHROMIUM} is missing (Debian package chromium)`;
  if (!findTool("certutil")) return "certutil is missing (Debian package libnss3-tools)";
  return undefined;
}

/** A private CA and one certificate for both site names. */
async function sitePki(dir: string): Promise<{ caFile: string; certFile: string }> {
  const ca = await generateCertificate({ commonName: "natproxy lab site CA", isCa: true, days: 2 });
  const leaf = await generateCertificate({ commonName: WWW, dnsNames: [WWW, MEDIA], ipAddresses: [], ca: { key: ca.key, cert: ca.cert }, days: 2 });
  const caFile = path.join(dir, "site-ca.pem");
  const certFile = path.join(dir, "site.pem");
  writeFileSync(caFile, ca.cert);
  writeFileSync(certFile, `${leaf.key}\n${leaf.cert}`, { mode: 0o600 });
  return { caFile, certFile };
}

/** A fresh HOME whose NSS database trusts the site's CA, as a user would import it. */
async function browserHome(dir: string, caFile: string): Promise<string> {
  const home = path.join(dir, "home");
  const db = path.join(home, ".pki/nssdb");
  mkdirSync(db, { recursive: true });
  const certutil = findTool("certutil") as string;
  await run(certutil, ["-d", `sql:${db}`, "-N", "--empty-password"], { timeout: 10_000 });
  await run(certutil, ["-d", `sql:${db}`, "-A", "-t", "C,,", "-n", "natproxy-test-ca", "-i", caFile], { timeout: 10_000 });
  return home;
}

/** A bounded tail of a child's output, for failure messages. */
function tail(child: ChildProcess, max = 8000): () => string {
  let text = "";
  const add = (d: Buffer): void => {
    text = (text + d.toString()).slice(-max);
  };
  child.stdout?.on("data", add);
  child.stderr?.on("data", add);
  return () => text;
}

function exited(child: ChildProcess, what: string, output: () => string): Promise<never> {
  return new Promise((_, reject) => {
    child.once("exit", (code, sig) => reject(new Error(`${what} exited (${code ?? sig}) early; output:\n${output()}`)));
  });
}

async function browse(t: import("node:test").TestContext, s: Scenario): Promise<void> {
  const t0 = performance.now();
  const dir = mkdtempSync(path.join(tmpdir(), "natproxy-browser-"));
  let lab: Lab | undefined;
  let np: NatproxyInLab | undefined;
  let chromium: ChildProcess | undefined;
  let diagnostics = (): string => "";
  try {
    const pki = await sitePki(dir);
    const home = await browserHome(dir, pki.caFile);
    let prefix = "";
    for (let k = 0; k < 10 && (!prefix || existsSync(`/run/netns/${prefix}rtr`)); k++) prefix = `br${randomBytes(2).toString("hex")}-`;
    lab = await createLab({ nat: s.nat, prefix });

    const site = lab.spawn("web", [NODE, SITE, "--cert", pki.certFile, "--max-seconds", "240"], { stdio: ["ignore", "pipe", "pipe"] });
    const siteLines = new LineReader(site);
    let siteErr = "";
    site.stderr?.on("data", (d: Buffer) => (siteErr = (siteErr + d.toString()).slice(-4000)));
    const ready = await siteLines
      .waitFor(jsonEvent<{ mediaSize: number; mediaSha256: string }>("ready"), 30_000, "the site ready")
      .catch((e: Error) => Promise.reject(new Error(`${e.message}\nstderr: ${siteErr}`)));

    np = await startNatproxyInLab(lab, {
      tunnel: s.tunnel,
      hostsEntries: { [WWW]: lab.web.ip4, [MEDIA]: lab.web.ip4 },
    });
    const local = np.locals[0] as NatproxyInLab["locals"][number];
    const tStarted = performance.now();

    chromium = lab.spawn(
      "lan",
      [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        `--user-data-dir=${path.join(dir, "profile")}`,
        `--proxy-server=http://127.0.0.1:${np.proxyPort}`,
        `https://${WWW}/`,
      ],
      { env: { ...process.env, HOME: home }, stdio: ["ignore", "pipe", "pipe"] },
    );
    const chromiumOut = tail(chromium);
    const npRef = np;
    diagnostics = () =>
      [
        `--- page log:\n${siteLines.lines.filter((l) => /"page-log"|"tls-error"|"ws"/.test(l)).slice(-30).join("\n")}`,
        `--- local proxy:\n${local.logs().slice(-6000)}`,
        `--- coordinator:\n${npRef.coordinatorLogs().slice(-6000)}`,
        `--- chromium:\n${chromiumOut().slice(-3000)}`,
      ].join("\n");

    const report = await Promise.race([
      siteLines.waitFor(jsonEvent<{ report: Report }>("report"), REPORT_TIMEOUT_MS, "the page's report").then((e) => e.report),
      exited(chromium, "chromium", chromiumOut),
    ]);
    const tReport = performance.now();

    // What the page saw.
    assert.deepEqual(report.errors, [], "the page reports no errors");
    const list = subresourceList();
    const sub = report.subresources;
    assert.ok(sub, "the page checked its subresources");
    assert.deepEqual(sub.failed, [], "every subresource loaded");
    assert.equal(sub.expected, list.length);
    const loaded = Object.values(sub.loaded).reduce((a, b) => a + b, 0);
    assert.ok(loaded >= 24 && loaded === list.length, `${loaded} subresources loaded`);
    assert.ok(Object.keys(sub.loaded).length >= 2, `from ${Object.keys(sub.loaded).join(", ")}`);
    for (const host of [WWW, MEDIA]) {
      assert.equal(sub.loaded[host], list.filter((r) => r.host === host).length, `all of ${host}'s subresources`);
    }

    const expectedSha = sha256Hex(mediaBytes(DEFAULT_MEDIA_SIZE));
    assert.equal(ready.mediaSha256, expectedSha, "the site serves the deterministic media content");
    assert.ok(report.media, "the page streamed the media file");
    assert.equal(report.media.total, DEFAULT_MEDIA_SIZE);
    assert.equal(report.media.bytes, DEFAULT_MEDIA_SIZE, "all 50 MiB arrived");
    assert.equal(report.media.sha256, expectedSha, "the media file's SHA-256 matches");
    assert.ok(report.media.requests >= 2, `${report.media.requests} Range requests`);

    assert.ok(report.ws, "the page used the WebSocket");
    assert.equal(report.ws.error, undefined, `WebSocket: ${report.ws.error}`);
    assert.equal(report.ws.sent, WS_MESSAGES);
    assert.equal(report.ws.echoes, WS_MESSAGES, `${report.ws.echoes} matching echoes (${report.ws.mismatches} mismatches)`);
    assert.ok(report.ws.openAfterAll && !report.ws.closedEarly, "the socket stayed open for every echo");
    assert.deepEqual(report.ws.close, { code: 1000, reason: "", wasClean: true }, "clean close handshake");

    // What the site served.
    const requests = siteLines.lines.map(jsonEvent<RequestLine>("request")).filter((r): r is RequestLine => r !== undefined);
    for (const r of list) {
      assert.ok(
        requests.some((q) => q.scheme === "https" && q.host === r.host && q.method === "GET" && q.path === r.path && q.status === 200),
        `the site served https://${r.host}${r.path}`,
      );
    }
    const ranges = requests.filter((q) => q.host === MEDIA && q.path === MEDIA_PATH && q.method === "GET");
    assert.ok(ranges.length >= 2, `${ranges.length} media requests`);
    for (const q of ranges) {
      assert.equal(q.status, 206, `media request ${q.range} answered 206`);
      assert.match(q.range ?? "", /^bytes=\d+-\d+$/, "every media request has a Range header");
    }
    assert.equal(ranges.reduce((a, q) => a + q.bytes, 0), DEFAULT_MEDIA_SIZE, "the 206 bodies add up to the whole file");
    // The site writes its WebSocket line when its socket closes, which can
    // come after the page's report (a separate request) has arrived.
    const wsLine = () => siteLines.lines.map(jsonEvent<{ messages: number; closeCode: number | null }>("ws")).filter((w) => w !== undefined);
    await waitUntil(() => wsLine().some((w) => w.messages === WS_MESSAGES && w.closeCode === 1000), 10_000, `the site's line for a WebSocket that echoed ${WS_MESSAGES} messages`);
    const wsSeen = wsLine();
    assert.ok(wsSeen.some((w) => w.messages === WS_MESSAGES && w.closeCode === 1000), `the site echoed ${WS_MESSAGES} messages`);
    assert.equal(siteLines.lines.filter((l) => jsonEvent("report")(l)).length, 1, "one report");

    // What the local proxy logged: a session line (written when a tunnel
    // ends: the site closes idle keep-alive connections after 5 s, the page
    // closes its WebSocket) with outcome=ok and data both ways for each host
    // name (a speculative preconnect that carried nothing does not count).
    const pathRe = s.path ? escapeRe(s.path) : "\\S+";
    for (const host of [WWW, MEDIA]) {
      const re = new RegExp(`session=\\S+ client=\\S+ target=${escapeRe(host)}:443 path=${pathRe} outcome=ok up=[1-9]\\d* down=[1-9]\\d*`);
      await local.waitFor(re, SESSION_LINES_TIMEOUT_MS, `an outcome=ok session line for ${host}:443`);
    }
    t.diagnostic(
      `${s.nat}${s.tunnel ? ` tunnel=${s.tunnel}` : ""}: set-up ${Math.round(tStarted - t0)} ms, page report after ${Math.round(tReport - tStarted)} ms ` +
        `(page ${report.ms} ms, media ${report.media.ms} ms in ${report.media.requests} requests, ws ${report.ws.ms} ms)`,
    );
  } catch (err) {
    const more = diagnostics();
    if (more && err instanceof Error) err.message += `\n${more}`;
    throw err;
  } finally {
    if (chromium) await stopProcesses([chromium], 3_000);
    await np?.close();
    await lab?.destroy();
    rmSync(dir, { recursive: true, force: true });
  }
}

const unavailable = await prerequisites();
if (unavailable !== undefined) {
  if (process.env.CI) {
    test("browser through natproxy in the NAT lab: prerequisites", () => {
      assert.fail(`the browser test cannot run on this CI machine: ${unavailable}`);
    });
  } else {
    test(`browser through natproxy in the NAT lab (skipped: ${unavailable})`, { skip: `unavailable: ${unavailable}` }, () => {});
  }
} else {
  for (const s of SCENARIOS) {
    test(`chromium loads a site through natproxy behind a ${s.nat} NAT${s.tunnel ? ` (tunnel = ${s.tunnel})` : ""}`, { timeout: 170_000 }, (t) => browse(t, s));
  }
}
