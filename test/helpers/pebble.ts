import { createSocket, type Socket as UdpSocket } from "node:dgram";
import { mkdtempSync, writeFileSync } from "node:fs";
import https from "node:https";
import { tmpdir } from "node:os";
import { join } from "node:path";
import dnsPacket from "dns-packet";
import { startProc, type Proc } from "../../scripts/lib/proc.ts";
import type { TestPki } from "../../scripts/lib/pki.ts";
import { findProgram } from "./programs.ts";
import { freePort } from "../../scripts/lib/ports.ts";

// Let's Encrypt's test CA (Debian's pebble) on loopback, validating challenges
// against ports the test names, and resolving names through a DNS responder
// the test runs: nothing of the system (resolv.conf, /etc/hosts) is touched.

export const PEBBLE = findProgram("pebble", "NATPROXY_PEBBLE");

/** Answers A 127.0.0.1 for `names`, an empty answer for their other types, NXDOMAIN for every other name; logs each question. */
export interface DnsResponder {
  port: number;
  questions: string[];
  close(): Promise<void>;
}

export async function startDnsResponder(names: string[]): Promise<DnsResponder> {
  const known = new Set(names.map((n) => n.toLowerCase()));
  const questions: string[] = [];
  const udp: UdpSocket = createSocket("udp4");
  udp.on("error", () => {});
  udp.on("message", (msg, from) => {
    let query: dnsPacket.Packet;
    try {
      query = dnsPacket.decode(msg);
    } catch {
      return;
    }
    const q = query.questions?.[0];
    if (!q) return;
    questions.push(`${q.type} ${q.name}`);
    const name = q.name.toLowerCase().replace(/\.$/, "");
    const answers: dnsPacket.Answer[] = known.has(name) && q.type === "A" ? [{ type: "A", name: q.name, ttl: 1, data: "127.0.0.1" }] : [];
    const NXDOMAIN = 3;
    const flags = dnsPacket.AUTHORITATIVE_ANSWER | (known.has(name) ? 0 : NXDOMAIN);
    udp.send(dnsPacket.encode({ type: "response", id: query.id, flags, questions: query.questions, answers }), from.port, from.address);
  });
  await new Promise<void>((resolve) => udp.bind(0, "127.0.0.1", resolve));
  return { port: udp.address().port, questions, close: () => new Promise((resolve) => udp.close(() => resolve())) };
}

export interface Pebble {
  directory: string;
  /** Where pebble validates tls-alpn-01 and http-01 (on 127.0.0.1, resolved through the DNS responder). */
  tlsPort: number;
  httpPort: number;
  dns: DnsResponder;
  proc: Proc;
  /** Requests pebble's ACME and management handlers have served so far. */
  requests(): number;
  /** PEM of the root that signs what it issues (regenerated at every pebble start). */
  root(): Promise<string>;
  close(): Promise<void>;
}

/**
 * pebble serves its API over HTTPS with `pki.server` (localhost, signed by
 * `pki.ca`: what acme.ca must name). `validity` is the lifetime of the
 * certificates it issues, in seconds.
 */
export async function startPebble(pki: TestPki, names: string[], validity: number): Promise<Pebble> {
  if (!PEBBLE) throw new Error("pebble is not installed (apt-get install pebble)");
  const dns = await startDnsResponder(names);
  const [listenPort, mgmtPort, tlsPort, httpPort] = [await freePort(), await freePort(), await freePort(), await freePort()];
  const dir = mkdtempSync(join(tmpdir(), "natproxy-pebble-"));
  const config = join(dir, "pebble.json");
  writeFileSync(
    config,
    JSON.stringify({
      pebble: {
        listenAddress: `127.0.0.1:${listenPort}`,
        managementListenAddress: `127.0.0.1:${mgmtPort}`,
        certificate: pki.serverCertFile,
        privateKey: pki.serverKeyFile,
        httpPort,
        tlsPort,
        ocspResponderURL: "",
        externalAccountBindingRequired: false,
        certificateValidityPeriod: validity,
      },
    }),
  );
  const proc = startProc(PEBBLE, ["-config", config, "-dnsserver", `127.0.0.1:${dns.port}`, "-strict=false"], {
    PATH: process.env.PATH,
    // No random sleep before a validation, real validations, no rejected
    // nonces, and every order validated anew (no reused authorizations), so a
    // renewal shows the challenge answered again.
    PEBBLE_VA_NOSLEEP: "1",
    PEBBLE_VA_ALWAYS_VALID: "0",
    PEBBLE_WFE_NONCEREJECT: "0",
    PEBBLE_AUTHZREUSE: "0",
  });
  try {
    await proc.waitFor(/Listening on: /, 15_000);
  } catch (err) {
    await proc.stop();
    await dns.close();
    throw err;
  }
  return {
    directory: `https://localhost:${listenPort}/dir`,
    tlsPort,
    httpPort,
    dns,
    proc,
    requests: () => (proc.output().match(/-> calling handler\(\)/g) ?? []).length,
    root: () =>
      new Promise((resolve, reject) => {
        const req = https.get({ host: "localhost", port: mgmtPort, path: "/roots/0", ca: pki.ca.cert, agent: false, timeout: 5000 }, (res) => {
          let body = "";
          res.setEncoding("utf8");
          res.on("data", (c: string) => (body += c));
          res.on("end", () => (res.statusCode === 200 ? resolve(body) : reject(new Error(`/roots/0: ${res.statusCode}`))));
          res.on("error", reject);
        });
        req.on("timeout", () => req.destroy(new Error("/roots/0 timed out")));
        req.on("error", reject);
      }),
    async close() {
      await proc.stop();
      await dns.close();
    },
  };
}
