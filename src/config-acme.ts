import { isIP } from "node:net";
import type { AcmeConfig, CoordinatorConfig } from "./config.ts";
import { fileProblem } from "./files.ts";

// The rules for [coordinator.acme], apart from config.ts so that the general
// config module does not grow with one feature's checks.

// RFC 1035 labels as CAs accept them (letters, digits, hyphens; IDNs in their
// xn-- form), 253 characters at most in all.
const DNS_NAME = /^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$/;

/** Checks the acme table of a coordinator that will run; lower-cases and de-duplicates its names. */
export function validateAcme(c: CoordinatorConfig, acme: AcmeConfig, problems: string[], warnings: string[]): void {
  if (c.cert !== "" || c.key !== "")
    problems.push("coordinator.acme: the certificate comes either from ACME or from coordinator.cert/key, not both; remove one of them");
  if (acme.domains.length === 0) problems.push('coordinator.acme.domains: at least one DNS name of this coordinator is required, e.g. ["coord.example.org"]');
  acme.domains = [...new Set(acme.domains.map((d) => d.trim().toLowerCase().replace(/\.$/, "")))];
  acme.domains.forEach((d, i) => {
    const key = `coordinator.acme.domains[${i}]`;
    if (d.startsWith("*.")) problems.push(`${key}: "${d}" is a wildcard; a CA issues those only through the dns-01 challenge, which natproxy does not answer`);
    else if (isIP(d.replace(/^\[|\]$/g, "")) !== 0) problems.push(`${key}: "${d}" is an IP address; ACME certificates here are for DNS names`);
    else if (!DNS_NAME.test(d)) problems.push(`${key}: "${d}" is not a DNS name`);
  });
  if (acme.email !== "" && !/^[^@\s]+@[^@\s]+$/.test(acme.email)) problems.push(`coordinator.acme.email: expected an e-mail address, got "${acme.email}"`);
  let directory: URL | undefined;
  try {
    directory = new URL(acme.directory);
  } catch {
    problems.push(`coordinator.acme.directory: not a URL: "${acme.directory}"`);
  }
  if (directory && directory.protocol !== "https:") problems.push(`coordinator.acme.directory: an ACME directory is an https:// URL (RFC 8555), got "${acme.directory}"`);
  if (acme.ca !== "") {
    const problem = fileProblem(acme.ca);
    if (problem) problems.push(`coordinator.acme.ca: cannot read "${acme.ca}" (${problem.message})`);
  }
  if (acme.cache.trim() === "") problems.push('coordinator.acme.cache: a directory is required (the default is "/var/lib/natproxy/acme")');
  if (acme.retry_max_delay < acme.retry_delay) problems.push(`coordinator.acme.retry_max_delay: must not be below coordinator.acme.retry_delay (${acme.retry_delay})`);
  if (acme.order_timeout < acme.poll_interval) problems.push(`coordinator.acme.order_timeout: must not be below coordinator.acme.poll_interval (${acme.poll_interval})`);
  // The CA always connects to the standard port; anything else must be
  // forwarded to it, which the config cannot see.
  if (acme.challenge === "tls-alpn-01" && c.listen.port !== 443)
    warnings.push(`coordinator.acme: the CA checks tls-alpn-01 on TCP port 443, and this coordinator listens on ${c.listen.port}; listen on 443 or forward 443 to it`);
  if (acme.challenge === "http-01" && acme.http_listen.port !== 80)
    warnings.push(`coordinator.acme.http_listen: the CA checks http-01 on TCP port 80, and the challenge listener is on ${acme.http_listen.port}; listen on 80 or forward 80 to it`);
}
