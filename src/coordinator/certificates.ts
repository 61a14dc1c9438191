import type https from "node:https";
import type { CoordinatorConfig } from "../config.ts";
import type { roleLogger } from "../log.ts";
import { generateCertificate, loadKeyPair, type KeyPair } from "../tls/certs.ts";

// Where the coordinator's key pair comes from: the user's files (cert/key),
// an ACME CA (acme), or, with neither, a self-signed one made for this run.

export interface CertificateSource {
  /** The key pair to serve now. */
  current(): KeyPair;
  /** Called with each new key pair (an ACME renewal); the servers swap it in. */
  onChange(fn: (kp: KeyPair) => void): void;
  /** Extra options for the HTTPS server (the TLS-ALPN-01 responder). */
  serverOptions: https.ServerOptions;
  /** Hooks into the HTTPS server once it exists. */
  attach(server: https.Server): void;
  /** After the HTTPS server listens: ACME's first issuance (awaited when nothing usable is cached) and its renewals. */
  start(): Promise<void>;
  /** Idempotent. */
  close(): Promise<void>;
}

export function fixedSource(kp: KeyPair): CertificateSource {
  return { current: () => kp, onChange: () => {}, serverOptions: {}, attach: () => {}, start: async () => {}, close: async () => {} };
}

export async function openCertificates(config: CoordinatorConfig, log: ReturnType<typeof roleLogger>): Promise<CertificateSource> {
  if (config.acme) {
    // Only an ACME coordinator loads this, and acme-client with it (on first use).
    const { openAcme } = await import("./acme.ts");
    return openAcme(config.acme, config, log);
  }
  return fixedSource(await obtainKeyPair(config, log));
}

async function obtainKeyPair(config: CoordinatorConfig, log: ReturnType<typeof roleLogger>): Promise<KeyPair> {
  if (config.cert !== "") return loadKeyPair(config.cert, config.key || undefined);
  const kp = await generateCertificate();
  log.warn(
    `no certificate configured: generated a self-signed one for this run (${kp.subject}). ` +
      `Local proxies must pin it: [local] fingerprint = "${kp.fingerprint}" (it changes at every start; use --cert for a stable one, or [coordinator.acme] for one from Let's Encrypt)`,
  );
  return kp;
}
