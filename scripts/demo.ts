// npm run demo: the three roles of the built binary on this machine, a page
// fetched through them, and the session log lines that prove the path.
// With --stay it keeps running so a browser can use 127.0.0.1:8080
// (--port <n> for another port, 0 for any free one).
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { generateCertificate } from "../src/tls/certs.ts";
import { startProc, type Proc } from "./lib/proc.ts";

const BINARY = resolve(import.meta.dirname, "..", "dist", "natproxy");
const stay = process.argv.includes("--stay");
const portFlag = process.argv.indexOf("--port");
const browserPort = portFlag > 0 ? Number(process.argv[portFlag + 1]) : stay ? 8080 : 0;

function fetchThrough(proxy: number, url: string): Promise<{ status: number; text: string }> {
  const host = new URL(url).host;
  return new Promise((resolveBody, reject) => {
    http
      .get({ host: "127.0.0.1", port: proxy, path: url, headers: { Host: host } }, (res) => {
        let text = "";
        res.on("data", (c: Buffer) => (text += c));
        res.on("end", () => resolveBody({ status: res.statusCode ?? 0, text }));
      })
      .on("error", reject);
  });
}

async function main(): Promise<void> {
  if (!Number.isInteger(browserPort) || browserPort < 0 || browserPort > 65535) throw new Error("--port: expected a port number (0 = any free port)");
  if (!existsSync(BINARY)) throw new Error(`${BINARY} not found: run "npm run build" first`);
  const dir = mkdtempSync(join(tmpdir(), "natproxy-demo-"));
  const procs: Proc[] = [];
  const page = http.createServer((req, res) => res.end(`<h1>Hello through natproxy</h1><p>you asked for ${req.url}</p>\n`));
  const cleanup = async () => {
    for (const p of procs.reverse()) await p.stop();
    page.close();
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    await new Promise<void>((r) => page.listen(0, "127.0.0.1", r));
    const pagePort = (page.address() as AddressInfo).port;
    const cert = await generateCertificate({ commonName: "localhost", dnsNames: ["localhost"], ipAddresses: ["127.0.0.1"] });
    writeFileSync(join(dir, "key.pem"), `${cert.key}\n${cert.cert}`, { mode: 0o600 });
    const token = randomBytes(24).toString("hex");

    const start = async (name: string, args: string[], ready: RegExp) => {
      const p = startProc(BINARY, args);
      procs.push(p);
      const m = await p.waitFor(ready, 20_000);
      console.log(`started ${name}: ${m[0]}`);
      return Number(m[1]);
    };
    const reporter = await start("reporter", ["reporter", "--listen", "127.0.0.1:0"], /listening on 127\.0\.0\.1:(\d+)/);
    writeFileSync(
      join(dir, "proxy.toml"),
      // The demo's page and local proxy are on loopback, which a coordinator
      // refuses as a target and for connect-backs unless allowed.
        `[coordinator]\nlisten = "127.0.0.1:0"\ntokens = ["${token}"]\nallow_targets = ["127.0.0.1:${pagePort}"]\nallow_connect_back = ["127.0.0.1"]\n\n` +
        `[local]\nlisten = "127.0.0.1:${browserPort}"\ntoken = "${token}"\nreporter = "127.0.0.1:${reporter}"\nfingerprint = "${cert.fingerprint}"\n`,
    );
    const coord = await start("coordinator", ["coordinator", "-c", join(dir, "proxy.toml"), "--cert", join(dir, "key.pem")], /HTTPS API listening on 127\.0\.0\.1:(\d+)/);
    const proxy = await start("local proxy", ["local", "-c", join(dir, "proxy.toml"), "--coordinator", `https://localhost:${coord}`], /HTTP proxy listening on 127\.0\.0\.1:(\d+)/);

    const url = `http://127.0.0.1:${pagePort}/demo`;
    const ok = await fetchThrough(proxy, url);
    if (ok.status !== 200) throw new Error(`HTTP ${ok.status}: ${ok.text}`);
    console.log(`\nfetched ${url} through 127.0.0.1:${proxy}:\n${ok.text}`);
    // What a newcomer's own loopback site gets until allow_targets names it.
    const other = `http://127.0.0.1:${pagePort === 65535 ? 65534 : pagePort + 1}/`;
    const refused = await fetchThrough(proxy, other);
    if (refused.status !== 403) throw new Error(`expected 403 for ${other}, got HTTP ${refused.status}: ${refused.text}`);
    console.log(`${other} (not in allow_targets): HTTP ${refused.status} ${refused.text.trim().split("\n")[0]}`);
    const line = await procs[1].waitFor(/session=\S+ client=\S+ target=\S+ outcome=ok.*/, 5000).catch(() => undefined);
    if (line) console.log(`coordinator's session log: ${line[0]}`);
    if (stay) {
      console.log(`\nSet your browser's HTTP and HTTPS proxy to 127.0.0.1:${proxy}. Ctrl-C stops everything.`);
      await new Promise<void>((r) => process.once("SIGINT", () => r()));
    }
  } finally {
    await cleanup();
  }
}

main().then(
  () => console.log("demo finished: all three roles worked"),
  (err: Error) => {
    console.error(`demo failed: ${err.message}`);
    process.exitCode = 1;
  },
);
