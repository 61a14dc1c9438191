import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { generateCertificate, type KeyPair } from "../../src/tls/certs.ts";

export interface TestPki {
  dir: string;
  ca: KeyPair;
  caFile: string;
  /** localhost / 127.0.0.1 / ::1, signed by `ca`. */
  server: KeyPair;
  serverCertFile: string;
  serverKeyFile: string;
  /** Key and certificate in one PEM, as `--cert key.pem` takes it. */
  combinedFile: string;
}

let cached: Promise<TestPki> | undefined;

/**
 * A private CA and a server certificate for localhost (plus `ipAddresses`)
 * signed by it, written to `dir`: what the tests, the benchmark and the
 * profiler trust and serve.
 */
export async function writePki(dir: string, opts: { name?: string; ipAddresses?: string[] } = {}): Promise<TestPki> {
  const ca = await generateCertificate({ commonName: `natproxy ${opts.name ?? "test"} CA`, isCa: true, days: 2 });
  const server = await generateCertificate({ commonName: "localhost", dnsNames: ["localhost"], ipAddresses: opts.ipAddresses ?? ["127.0.0.1", "::1"], ca: { key: ca.key, cert: ca.cert }, days: 2 });
  const caFile = join(dir, "ca.pem");
  const serverCertFile = join(dir, "server.crt");
  const serverKeyFile = join(dir, "server.key");
  const combinedFile = join(dir, "key.pem");
  writeFileSync(caFile, ca.cert);
  writeFileSync(serverCertFile, server.cert);
  writeFileSync(serverKeyFile, server.key, { mode: 0o600 });
  writeFileSync(combinedFile, `${server.key}\n${server.cert}`, { mode: 0o600 });
  return { dir, ca, caFile, server, serverCertFile, serverKeyFile, combinedFile };
}

/** A private CA and a server certificate, made once per test process. */
export function testPki(): Promise<TestPki> {
  if (!cached) {
    const dir = mkdtempSync(join(tmpdir(), "natproxy-pki-"));
    // Shared by every test of the process, so it goes when the process does.
    process.once("exit", () => rmSync(dir, { recursive: true, force: true }));
    cached = writePki(dir);
  }
  return cached;
}
