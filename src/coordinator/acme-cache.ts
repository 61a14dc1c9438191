import { X509Certificate, createPrivateKey, randomBytes } from "node:crypto";
import { closeSync, fsyncSync, mkdirSync, openSync, renameSync, rmSync, writeSync } from "node:fs";
import { join } from "node:path";
import type { AcmeConfig } from "../config.ts";
import { exposureWarning, readBoundedFile } from "../files.ts";
import { loadKeyPair, type KeyPair } from "../tls/certs.ts";

// What ACME leaves on disk: the account key and the latest key and
// certificate chain, so that a restart neither registers anew nor orders a
// certificate it already has. Per directory, so that a staging certificate is
// never served after switching to production.

export interface AcmeCache {
  dir: string;
  accountKeyFile: string;
  /** Key and chain in one PEM (the form `cert` takes), replaced in one rename. */
  certificateFile: string;
}

export function cachePaths(acme: AcmeConfig): AcmeCache {
  const url = new URL(acme.directory);
  const slug = `${url.host}${url.pathname}`.replace(/[^A-Za-z0-9.-]+/g, "_").replace(/^_+|_+$/g, "");
  const dir = join(acme.cache, slug);
  return { dir, accountKeyFile: join(dir, "account-key.pem"), certificateFile: join(dir, `${acme.domains[0]}.pem`) };
}

/** Creates the cache directory (0700); throws a sentence naming the directory and the fix. */
export function prepareCache(cache: AcmeCache): void {
  try {
    mkdirSync(cache.dir, { recursive: true, mode: 0o700 });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? "error";
    throw new Error(
      `coordinator.acme.cache: cannot create "${cache.dir}" (${code}); create it, owned by the user natproxy runs as ` +
        "(systemd: StateDirectory=natproxy), or set acme.cache to a directory that user may write",
      { cause: err },
    );
  }
}

/**
 * Writes a file only its owner can read (0600), atomically: a crash or a full
 * disk leaves the previous version, never half a key.
 */
export function writePrivateFile(path: string, text: string): void {
  const tmp = `${path}.${randomBytes(6).toString("hex")}.tmp`;
  const fd = openSync(tmp, "wx", 0o600);
  try {
    writeSync(fd, text);
    fsyncSync(fd);
  } catch (err) {
    closeSync(fd);
    rmSync(tmp, { force: true });
    throw err;
  }
  closeSync(fd);
  try {
    renameSync(tmp, path);
  } catch (err) {
    rmSync(tmp, { force: true });
    throw err;
  }
}

/** The cached account key, or a new one from `create`, written to the cache first. */
export async function accountKey(cache: AcmeCache, create: () => Promise<string>, warn: (line: string) => void): Promise<{ pem: string; created: boolean }> {
  let pem: string | undefined;
  try {
    pem = readBoundedFile(cache.accountKeyFile);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw new Error(`${cache.accountKeyFile}: cannot read the ACME account key (${(err as Error).message})`, { cause: err });
  }
  if (pem !== undefined) {
    try {
      createPrivateKey(pem);
    } catch (err) {
      throw new Error(`${cache.accountKeyFile}: not a private key (${(err as Error).message}); remove it to register a new ACME account`, { cause: err });
    }
    const exposed = exposureWarning(cache.accountKeyFile, "the ACME account key");
    if (exposed) warn(exposed);
    return { pem, created: false };
  }
  pem = await create();
  writePrivateFile(cache.accountKeyFile, pem);
  return { pem, created: true };
}

/**
 * The cached certificate if it is usable for `domains` now: readable, its key
 * matching, covering every name and not expired. Otherwise undefined and why.
 */
export function cachedCertificate(cache: AcmeCache, domains: string[]): { kp?: KeyPair; why: string } {
  let kp: KeyPair;
  try {
    kp = loadKeyPair(cache.certificateFile);
  } catch (err) {
    const missing = (err as Error).message.includes("ENOENT");
    return { why: missing ? "none cached yet" : `the cached one is unusable (${(err as Error).message})` };
  }
  const leaf = new X509Certificate(kp.cert);
  const uncovered = domains.filter((d) => leaf.checkHost(d, { subject: "never", wildcards: false }) === undefined);
  if (uncovered.length > 0) return { why: `the cached one does not cover ${uncovered.join(", ")}` };
  if (kp.validTo.getTime() <= Date.now()) return { why: `the cached one expired on ${kp.validTo.toISOString()}` };
  return { kp, why: "" };
}
