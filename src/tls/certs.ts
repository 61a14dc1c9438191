import { X509Certificate, createPrivateKey } from "node:crypto";
import { hostname } from "node:os";
import { readBoundedFile } from "../files.ts";

export interface KeyPair {
  key: string;
  cert: string;
  /** "sha256:AB:CD:..." — the form `[local] fingerprint` accepts. */
  fingerprint: string;
  subject: string;
  validFrom: Date;
  validTo: Date;
  selfSigned: boolean;
}

const KEY_BLOCK = /-----BEGIN (?:RSA |EC |ENCRYPTED )?PRIVATE KEY-----[\s\S]+?-----END (?:RSA |EC |ENCRYPTED )?PRIVATE KEY-----/;
const CERT_BLOCK = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g;

export function formatFingerprint(cert: X509Certificate): string {
  return `sha256:${cert.fingerprint256}`;
}

/** Canonical comparison form: lower-case hex without separators. */
export function normalizeFingerprint(text: string): string {
  return text.replace(/^sha256:/i, "").replace(/:/g, "").toLowerCase();
}

/**
 * Reads the user's own key pair. One PEM holding both key and certificate
 * (chain) must work, as must separate files. Every problem is reported with
 * the file it came from, because a wrong path is the common mistake.
 */
export function loadKeyPair(certPath: string, keyPath?: string): KeyPair {
  const certPem = readPem(certPath, "certificate");
  const keyPem = keyPath ? readPem(keyPath, "key") : certPem;
  const certs = certPem.match(CERT_BLOCK);
  if (!certs) throw new Error(`${certPath}: no "BEGIN CERTIFICATE" block found`);
  const keyMatch = KEY_BLOCK.exec(keyPem);
  if (!keyMatch) {
    throw new Error(keyPath ? `${keyPath}: no private key block found` : `${certPath}: holds no private key; give it with --key`);
  }
  if (keyMatch[0].includes("ENCRYPTED")) throw new Error(`${keyPath ?? certPath}: the private key is encrypted; natproxy needs it unencrypted`);
  let leaf: X509Certificate;
  try {
    leaf = new X509Certificate(certs[0]);
  } catch (err) {
    throw new Error(`${certPath}: the certificate cannot be parsed (${(err as Error).message})`);
  }
  let matches = false;
  try {
    matches = leaf.checkPrivateKey(createPrivateKey(keyMatch[0]));
  } catch (err) {
    throw new Error(`${keyPath ?? certPath}: the private key cannot be parsed (${(err as Error).message})`);
  }
  if (!matches) throw new Error(`${keyPath ?? certPath}: the private key does not belong to the certificate in ${certPath}`);
  return describe(keyMatch[0], certs.join("\n"), leaf);
}

function readPem(path: string, what: string): string {
  try {
    return readBoundedFile(path);
  } catch (err) {
    throw new Error(`${path}: cannot read the ${what} (${(err as Error).message})`, { cause: err });
  }
}

function describe(key: string, cert: string, leaf: X509Certificate): KeyPair {
  return {
    key,
    cert,
    fingerprint: formatFingerprint(leaf),
    subject: leaf.subject.replace(/\n/g, ", "),
    validFrom: new Date(leaf.validFrom),
    validTo: new Date(leaf.validTo),
    selfSigned: leaf.issuer === leaf.subject && leaf.verify(leaf.publicKey),
  };
}

export interface GenerateOptions {
  commonName?: string;
  dnsNames?: string[];
  ipAddresses?: string[];
  days?: number;
  /** Sign with this CA instead of self-signing (tests build a private CA). */
  ca?: { key: string; cert: string };
  isCa?: boolean;
  notBefore?: Date;
  notAfter?: Date;
}

/**
 * ECDSA P-256: generated in tens of milliseconds (RSA would add a second to
 * every coordinator start) and the cheapest handshake for the local proxy.
 */
export async function generateCertificate(opts: GenerateOptions = {}): Promise<KeyPair> {
  const cn = opts.commonName ?? hostname();
  const notBefore = opts.notBefore ?? new Date(Date.now() - 60_000);
  const notAfter = opts.notAfter ?? new Date(notBefore.getTime() + (opts.days ?? 365) * 86_400_000);
  const altNames = [
    ...(opts.dnsNames ?? [cn, "localhost"]).map((value) => ({ type: 2 as const, value })),
    ...(opts.ipAddresses ?? ["127.0.0.1", "::1"]).map((ip) => ({ type: 7 as const, ip })),
  ];
  const extensions: object[] = opts.isCa
    ? [{ name: "basicConstraints", cA: true, critical: true }, { name: "keyUsage", keyCertSign: true, cRLSign: true, digitalSignature: true, critical: true }]
    : [{ name: "basicConstraints", cA: false }, { name: "keyUsage", digitalSignature: true, critical: true }, { name: "extKeyUsage", serverAuth: true }, { name: "subjectAltName", altNames }];
  // Loaded here, not at start-up: most coordinators have a certificate.
  const { default: selfsigned } = await import("selfsigned");
  const pems = await selfsigned.generate([{ name: "commonName", value: cn }], {
    keyType: "ec",
    curve: "P-256",
    algorithm: "sha256",
    notBeforeDate: notBefore,
    notAfterDate: notAfter,
    extensions,
    ...(opts.ca ? { ca: opts.ca } : {}),
  } as Parameters<typeof selfsigned.generate>[1]);
  return describe(pems.private, pems.cert, new X509Certificate(pems.cert));
}
