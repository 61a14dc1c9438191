import { randomBytes } from "node:crypto";
import { mkdirSync, writeFileSync } from "node:fs";
import { isIP } from "node:net";
import { hostname } from "node:os";
import path from "node:path";
import { formatHostPort } from "./address.ts";
import type { Role } from "./config.ts";
import { generateCertificate } from "./tls/certs.ts";

// `natproxy init <role>`: a first config that loads as written, so a newcomer
// edits a working file instead of assembling one from the README.

export interface InitOptions {
  role: Role;
  file: string;
  force: boolean;
  /** The name or address local proxies will dial; goes into the certificate and the printed [local] section. */
  publicHost?: string;
  pathApi?: path.PlatformPath;
}

export interface InitResult {
  written: string[];
  /** What to tell the user, line by line (the [local] section to paste, for a coordinator). */
  lines: string[];
}

export class InitError extends Error {
  readonly code = "CONFIG_INVALID";
}

// A TOML literal string: no escapes, so C:\Users\me stays as typed. A path
// holding a ' (rare) needs a basic string with its backslashes doubled.
export function tomlPath(p: string): string {
  return p.includes("'") ? JSON.stringify(p) : `'${p}'`;
}

const PLACEHOLDER_TOKEN = "paste-the-token-natproxy-init-coordinator-printed";

function localText(section: { coordinator: string; token: string; fingerprint?: string }): string {
  return `# natproxy local proxy: run "natproxy local" (this file is found by itself
# where natproxy init wrote it; elsewhere give it with -c <file>).
log_level = "info"

[local]
# The browser's proxy: set HTTP and HTTPS proxy to this address.
listen = "127.0.0.1:8080"
# Your coordinator, and one of the tokens it accepts.
coordinator = "${section.coordinator}"
token = "${section.token}"
# A self-signed coordinator: pin its certificate (natproxy init coordinator
# printed the fingerprint). A certificate from a public CA needs neither.
${section.fingerprint ? "" : "# "}fingerprint = "${section.fingerprint ?? "sha256:..."}"
# ca = 'C:\\Users\\me\\natproxy\\cert.pem'   # or trust a CA / certificate file instead
# auto: connect-back where the NAT lets the coordinator in, else outbound.
tunnel = "auto"
`;
}

function reporterText(): string {
  return `# natproxy reporter: run "natproxy reporter" (TCP 3478 must be reachable).
log_level = "info"

[reporter]
listen = "*:3478"
`;
}

function coordinatorText(token: string, cert: string, key: string): string {
  return `# natproxy coordinator: run "natproxy coordinator" on the server
# (open TCP 8443, and 3478 for the reporter).
log_level = "info"

[coordinator]
listen = "*:8443"
# Bearer tokens local proxies present; keep this file private (mode 0600).
tokens = ["${token}"]
# The certificate natproxy init generated; its fingerprint stays the same
# across restarts, so the local proxies' pin keeps matching.
cert = ${tomlPath(cert)}
key = ${tomlPath(key)}
# Run the reporter in this process too.
reporter = true
# The coordinator refuses loopback and private targets by default. To reach
# your own test site on this server or its LAN, allow it, e.g.:
# allow_targets = ["127.0.0.1:8000", "10.0.0.0/8"]

[reporter]
listen = "*:3478"
`;
}

function writeNew(file: string, text: string, force: boolean, mode: number): void {
  mkdirSync(path.dirname(file), { recursive: true });
  try {
    // "wx" refuses an existing file in the same system call that creates it.
    writeFileSync(file, text, { flag: force ? "w" : "wx", mode });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "EEXIST") throw new InitError(`${file} exists; natproxy init does not overwrite it (--force to replace it)`);
    throw new InitError(`cannot write ${file}: ${(err as Error).message}`);
  }
}

export async function runInit(opts: InitOptions): Promise<InitResult> {
  const p = opts.pathApi ?? path;
  const file = p.resolve(opts.file);
  if (opts.role === "reporter") {
    writeNew(file, reporterText(), opts.force, 0o644);
    return { written: [file], lines: [`wrote ${file}`, `start it with: natproxy reporter -c ${file}`] };
  }
  if (opts.role === "local") {
    writeNew(file, localText({ coordinator: "https://coord.example:8443", token: PLACEHOLDER_TOKEN }), opts.force, 0o600);
    return { written: [file], lines: [`wrote ${file}`, "edit coordinator, token and fingerprint (natproxy init coordinator on the server prints them), then run: natproxy local"] };
  }
  const host = opts.publicHost ?? hostname();
  const token = randomBytes(32).toString("hex");
  const certFile = p.join(p.dirname(file), "cert.pem");
  const keyFile = p.join(p.dirname(file), "key.pem");
  const ip = isIP(host) !== 0;
  const kp = await generateCertificate({
    commonName: host,
    dnsNames: ip ? ["localhost"] : [host, "localhost"],
    ipAddresses: [...new Set([...(ip ? [host] : []), "127.0.0.1", "::1"])],
    days: 3650,
  });
  // Config first: if it exists the key pair on disk stays the one it names.
  writeNew(file, coordinatorText(token, certFile, keyFile), opts.force, 0o600);
  writeNew(keyFile, kp.key, true, 0o600);
  writeNew(certFile, kp.cert, true, 0o644);
  const local = localText({ coordinator: `https://${formatHostPort(host, 8443)}`, token, fingerprint: kp.fingerprint });
  const section = local.slice(local.indexOf("[local]"));
  return {
    written: [file, keyFile, certFile],
    lines: [
      `wrote ${file} (token inside: keep it private), ${keyFile} and ${certFile}`,
      `certificate fingerprint: ${kp.fingerprint}`,
      `start it with: natproxy coordinator -c ${file}`,
      "",
      "On the PC, run natproxy init local and put this in its [local] section (the token is secret: copy it privately):",
      "",
      ...section.trimEnd().split("\n"),
    ],
  };
}
