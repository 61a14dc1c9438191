import { accessSync, constants } from "node:fs";
import { isIP } from "node:net";
import { parse as parseToml } from "smol-toml";
import { z } from "zod";
import { parseHostPort, type HostPort } from "./address.ts";
import type { ErrorCode } from "./errors.ts";
import { exposureWarning, fileProblem, readBoundedFile } from "./files.ts";
import { applySecretEnv, applySecretFlags, resolveCoordinatorTokens, resolveLocalToken, secretsIn } from "./config-secrets.ts";
import { validateAcme } from "./config-acme.ts";
import { fileSchema } from "./config-schema.ts";
import { parseTargetLists, parseTargetRules, type TargetRules } from "./target-rules.ts";

// Typed config with defaults filled in, then validation that reports every
// problem at once (file, key, what is expected), so a user fixes the file in
// one pass instead of one error per start.

export const ROLES = ["local", "coordinator", "reporter"] as const;
export type Role = (typeof ROLES)[number];

export type Config = z.output<typeof fileSchema>;
export type LocalConfig = Config["local"] & { reporterAddress: HostPort; coordinatorUrl: URL };
/**
 * targetRules: allow_targets and deny_targets, parsed (the lists as written
 * stay, for display). Their problems are reported for the coordinator role
 * only; createTargetPolicy refuses rules that have any.
 */
export type CoordinatorConfig = Config["coordinator"] & { targetRules: TargetRules; connectBackRules: TargetRules };
export type AcmeConfig = NonNullable<Config["coordinator"]["acme"]>;
export type ReporterConfig = Config["reporter"];
/** Config values as a user writes them (TOML / flags): every key optional. */
export type ConfigInput = z.input<typeof fileSchema>;

export class ConfigError extends Error {
  readonly code: ErrorCode = "CONFIG_INVALID";
  readonly problems: string[];
  constructor(source: string, problems: string[]) {
    super(`${source}: invalid configuration\n${problems.map((p) => `  - ${p}`).join("\n")}`);
    this.name = "ConfigError";
    this.problems = problems;
  }
}

export const DEFAULT_REPORTER_PORT = 3478;

export interface LoadOptions {
  /** TOML file; omitted means defaults + flags only. */
  path?: string;
  /** Which role will run: only its required keys are enforced. */
  role: Role;
  /** Values from command-line flags, highest precedence. */
  overrides?: ConfigInput;
  env?: NodeJS.ProcessEnv;
}

export interface ResolvedConfig {
  log_level: Config["log_level"];
  shutdown_timeout: number;
  local: LocalConfig;
  coordinator: CoordinatorConfig;
  reporter: ReporterConfig;
  /** Worth saying at start, not worth refusing to start for (files with secrets that others can read). */
  warnings: string[];
}

/** defaults < file < environment < flags; then validation of the role's needs. */
export function loadConfig(opts: LoadOptions): ResolvedConfig {
  const source = opts.path ?? "configuration";
  let raw: Record<string, unknown> = {};
  if (opts.path !== undefined) {
    let text: string;
    try {
      text = readBoundedFile(opts.path);
    } catch (err) {
      throw new ConfigError(source, [`cannot read the file: ${(err as Error).message}`]);
    }
    try {
      raw = parseToml(text) as Record<string, unknown>;
    } catch (err) {
      throw new ConfigError(source, [tomlProblem(err as Error)]);
    }
  }
  const held = secretsIn(raw);
  const exposed = opts.path !== undefined && held !== "" ? exposureWarning(opts.path, held) : undefined;
  const problems: string[] = [];
  applyEnv(raw, opts.env ?? process.env, problems);
  if (opts.overrides) {
    applySecretFlags(raw, opts.overrides as Record<string, unknown>);
    deepMerge(raw, opts.overrides as Record<string, unknown>);
  }
  const cfg = resolveConfig(raw, opts.role, source, problems);
  if (exposed) cfg.warnings.unshift(exposed);
  return cfg;
}

function tomlProblem(err: Error & { line?: number; column?: number }): string {
  const first = err.message.split("\n")[0];
  return typeof err.line === "number" ? `line ${err.line}, column ${err.column}: not valid TOML: ${first}` : `not valid TOML: ${first}`;
}

/** Validates an in-memory config (tests, embedding); the same rules as a file. */
export function resolveConfig(raw: unknown, role: Role | "any", source = "configuration", earlier: string[] = []): ResolvedConfig {
  const problems = [...earlier];
  const parsed = fileSchema.safeParse(raw);
  if (!parsed.success) {
    for (const issue of parsed.error.issues) problems.push(describeIssue(issue, raw));
    throw new ConfigError(source, problems);
  }
  const cfg = parsed.data;
  const warnings: string[] = [];
  const local = validateLocal(cfg.local, role === "local", problems, warnings);
  const coordinator = validateCoordinator(cfg.coordinator, role === "coordinator", problems, warnings);
  if (problems.length > 0) throw new ConfigError(source, problems);
  return { log_level: cfg.log_level, shutdown_timeout: cfg.shutdown_timeout, local, coordinator, reporter: cfg.reporter, warnings };
}

function applyEnv(raw: Record<string, unknown>, env: NodeJS.ProcessEnv, problems: string[]): void {
  applySecretEnv(raw, env);
  // The specification's troubleshooting notes tell users to set this variable;
  // it applies to both sides that send keepalives.
  const text = env.NAT_KEEP_ALIVE_INTERVAL;
  if (text === undefined || text === "") return;
  if (!/^\d+$/.test(text.trim()) || Number(text) < 1 || Number(text) > 86_400_000) {
    problems.push(`NAT_KEEP_ALIVE_INTERVAL: expected whole milliseconds from 1 to 86400000, got "${text}"`);
    return;
  }
  for (const section of ["local", "reporter"]) {
    const obj = (raw[section] ??= {});
    if (typeof obj === "object" && obj !== null) (obj as Record<string, unknown>).nat_keep_alive_interval = Number(text);
  }
}

function deepMerge(target: Record<string, unknown>, source: Record<string, unknown>): void {
  for (const [k, v] of Object.entries(source)) {
    if (v === undefined) continue;
    const existing = target[k];
    if (isPlainObject(v) && isPlainObject(existing)) deepMerge(existing, v);
    else target[k] = isPlainObject(v) ? structuredClone(v) : v;
  }
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function describeIssue(issue: z.core.$ZodIssue, raw: unknown): string {
  const key = issue.path.map(String).join(".") || "(top level)";
  if (issue.code === "unrecognized_keys") {
    const where = issue.path.length ? `[${issue.path.join(".")}]` : "the top level";
    return `unknown key${issue.keys.length > 1 ? "s" : ""} ${issue.keys.map((k) => `"${k}"`).join(", ")} in ${where}`;
  }
  const got = valueAt(raw, issue.path);
  const shown = got === undefined ? "nothing" : JSON.stringify(got);
  let expected: string = issue.message;
  if (issue.code === "invalid_type") expected = `expected ${issue.expected}`;
  else if (issue.code === "too_small") expected = `expected at least ${issue.minimum}`;
  else if (issue.code === "too_big") expected = `expected at most ${issue.maximum}`;
  else if (issue.code === "invalid_value") expected = `expected one of ${issue.values.map((v) => JSON.stringify(v)).join(", ")}`;
  if (/timeout|interval|delay/.test(key) && issue.code !== "invalid_value") expected += " (whole milliseconds)";
  return `${key}: ${expected}, got ${shown}`;
}

function valueAt(raw: unknown, path: PropertyKey[]): unknown {
  let v: unknown = raw;
  for (const p of path) {
    if (typeof v !== "object" || v === null) return undefined;
    v = (v as Record<PropertyKey, unknown>)[p];
  }
  return v;
}

const FINGERPRINT = /^sha256:(?:[0-9a-f]{64}|(?:[0-9a-f]{2}:){31}[0-9a-f]{2})$/i;

function validateLocal(local: Config["local"], required: boolean, problems: string[], warnings: string[]): LocalConfig {
  let coordinatorUrl = new URL("https://invalid.invalid/");
  if (local.coordinator === "") {
    if (required) problems.push('local.coordinator: required, e.g. "https://coord.example:8443"');
  } else {
    try {
      coordinatorUrl = new URL(local.coordinator);
      if (coordinatorUrl.protocol !== "https:") problems.push(`local.coordinator: must be an https:// URL (everything to the coordinator is encrypted), got "${local.coordinator}"`);
      if (coordinatorUrl.pathname !== "/" || coordinatorUrl.search || coordinatorUrl.username)
        problems.push(`local.coordinator: expected only scheme, host and port, got "${local.coordinator}"`);
    } catch {
      problems.push(`local.coordinator: not a URL: "${local.coordinator}"`);
    }
  }
  if (required) resolveLocalToken(local, problems, warnings);
  let reporterAddress: HostPort = { host: coordinatorHost(coordinatorUrl), port: DEFAULT_REPORTER_PORT };
  if (local.reporter !== "") {
    try {
      reporterAddress = local.reporter.includes(":") || local.reporter.startsWith("[")
        ? parseHostPort(local.reporter)
        : { host: local.reporter, port: DEFAULT_REPORTER_PORT };
      if (reporterAddress.port === 0) problems.push(`local.reporter: port 0 is not a reporter port, got "${local.reporter}"`);
    } catch (err) {
      problems.push(`local.reporter: expected "host:port" or "host", ${(err as Error).message}`);
    }
  }
  if (local.fingerprint !== "" && !FINGERPRINT.test(local.fingerprint))
    problems.push(`local.fingerprint: expected "sha256:" and 64 hex digits (colons allowed), got "${local.fingerprint}"`);
  if (local.ca !== "") checkReadable("local.ca", local.ca, problems);
  local.users.forEach((u, i) => {
    if (!/^[^:]+:.+$/.test(u)) problems.push(`local.users[${i}]: expected "name:password"`);
  });
  // An open proxy on a LAN address is an open relay for everyone on that LAN.
  if (local.users.length === 0 && !isLoopback(local.listen.host))
    problems.push(`local.listen: ${local.listen.host} is reachable from other machines; set local.users = ["name:password"] so only your browsers can use the proxy`);
  if (local.retry_max_delay < local.retry_delay) problems.push(`local.retry_max_delay: must not be below local.retry_delay (${local.retry_delay})`);
  return { ...local, reporterAddress, coordinatorUrl };
}

function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || /^127\.\d+\.\d+\.\d+$/.test(host);
}

function coordinatorHost(url: URL): string {
  const h = url.hostname;
  return h.startsWith("[") && h.endsWith("]") ? h.slice(1, -1) : h;
}

function validateCoordinator(raw: Config["coordinator"], required: boolean, problems: string[], warnings: string[]): CoordinatorConfig {
  const back = parseTargetRules(raw.allow_connect_back, "coordinator.allow_connect_back");
  const c: CoordinatorConfig = {
    ...raw,
    targetRules: parseTargetLists(raw.allow_targets, raw.deny_targets),
    // Connect-backs are judged by the default ranges and allow_connect_back alone.
    connectBackRules: { allow: back.rules, deny: [], problems: back.problems },
  };
  if (!required) return c;
  resolveCoordinatorTokens(c, problems, warnings);
  if (c.tokens.length === 0) problems.push("coordinator.tokens: at least one token is required; the coordinator never runs open (generate one with: openssl rand -hex 32)");
  c.tokens.forEach((t, i) => {
    if (t.length < 16) problems.push(`coordinator.tokens[${i}]: a token needs at least 16 characters, got ${t.length}`);
  });
  if (c.cert !== "") checkReadable("coordinator.cert", c.cert, problems);
  if (c.key !== "") checkReadable("coordinator.key", c.key, problems);
  if (c.key !== "" && c.cert === "") problems.push("coordinator.key: set coordinator.cert as well");
  // Without a key file the certificate file must hold the key.
  const keyFile = c.key !== "" ? c.key : c.cert;
  const exposed = keyFile === "" ? undefined : exposureWarning(keyFile, "the coordinator's private key");
  if (exposed) warnings.push(exposed);
  problems.push(...c.targetRules.problems, ...c.connectBackRules.problems);
  c.own_addresses.forEach((a, i) => {
    if (isIP(a) === 0) problems.push(`coordinator.own_addresses[${i}]: expected an IP address, got "${a}"`);
  });
  if (c.acme) validateAcme(c, c.acme, problems, warnings);
  return c;
}

function checkReadable(key: string, path: string, problems: string[]): void {
  const problem = fileProblem(path);
  if (problem) {
    problems.push(`${key}: cannot read "${path}" (${problem.message})`);
    return;
  }
  try {
    accessSync(path, constants.R_OK);
  } catch (err) {
    problems.push(`${key}: cannot read "${path}" (${(err as NodeJS.ErrnoException).code ?? "error"})`);
  }
}
