import type { Config, CoordinatorConfig } from "./config.ts";
import { exposureWarning, readBoundedFile } from "./files.ts";

// Where the tokens come from. A token on the command line is readable by
// every user of the machine (ps, /proc/<pid>/cmdline), so each role also takes
// it from a file or from the environment (a systemd credential, a container
// secret). Each pair below names one secret two ways: a source that sets one
// key replaces the other from every source below it (defaults < file <
// environment < flags), and one source setting both is refused.

type Raw = Record<string, unknown>;

const SECRET_PAIRS = [
  ["local", "token", "token_file"],
  ["coordinator", "tokens", "tokens_file"],
] as const;

const isObject = (v: unknown): v is Raw => typeof v === "object" && v !== null && !Array.isArray(v);

function sectionOf(raw: Raw, name: string): Raw {
  if (!isObject(raw[name])) raw[name] = {};
  return raw[name] as Raw;
}

function clearKey(raw: Raw, section: string, key: string): void {
  const obj = raw[section];
  if (isObject(obj)) delete obj[key];
}

/** The secrets a parsed config file holds, in words; "" for none. */
export function secretsIn(raw: Raw): string {
  const get = (section: string, key: string) => (isObject(raw[section]) ? (raw[section] as Raw)[key] : undefined);
  const filled = (v: unknown) => (typeof v === "string" ? v !== "" : Array.isArray(v) && v.length > 0);
  const held: string[] = [];
  if (filled(get("local", "token"))) held.push("[local] token");
  if (filled(get("local", "users"))) held.push("[local] users (proxy passwords)");
  if (filled(get("coordinator", "tokens"))) held.push("[coordinator] tokens");
  return held.join(", ");
}

/** NATPROXY_TOKEN (the local proxy's token) and NATPROXY_TOKENS (the coordinator's, comma-separated). */
export function applySecretEnv(raw: Raw, env: NodeJS.ProcessEnv): void {
  if (env.NATPROXY_TOKEN) {
    clearKey(raw, "local", "token_file");
    sectionOf(raw, "local").token = env.NATPROXY_TOKEN.trim();
  }
  if (env.NATPROXY_TOKENS) {
    clearKey(raw, "coordinator", "tokens_file");
    sectionOf(raw, "coordinator").tokens = env.NATPROXY_TOKENS.split(",").map((t) => t.trim()).filter((t) => t !== "");
  }
}

/** Before flags are merged in: a flag for one key of a pair drops the other from the file and the environment. */
export function applySecretFlags(raw: Raw, overrides: Raw): void {
  for (const [section, a, b] of SECRET_PAIRS) {
    const given = overrides[section];
    if (!isObject(given)) continue;
    if (given[a] !== undefined) clearKey(raw, section, b);
    if (given[b] !== undefined) clearKey(raw, section, a);
  }
}

/** Fills local.token from local.token_file. */
export function resolveLocalToken(local: Config["local"], problems: string[], warnings: string[]): void {
  if (local.token_file === "") {
    if (local.token === "")
      problems.push("local.token: required (one of the coordinator's tokens); better from a file (token_file, --token-file) or the environment (NATPROXY_TOKEN)");
    return;
  }
  if (local.token !== "") {
    problems.push("local.token_file: set local.token or local.token_file, not both");
    return;
  }
  const tokens = readTokenFile("local.token_file", local.token_file, problems, warnings);
  if (tokens === undefined) return;
  if (tokens.length !== 1) problems.push(`local.token_file: "${local.token_file}" must hold exactly one token (one line), it holds ${tokens.length}`);
  else local.token = tokens[0];
}

/** Fills coordinator.tokens from coordinator.tokens_file. */
export function resolveCoordinatorTokens(c: CoordinatorConfig, problems: string[], warnings: string[]): void {
  if (c.tokens_file === "") return;
  if (c.tokens.length > 0) problems.push("coordinator.tokens_file: set coordinator.tokens or coordinator.tokens_file, not both");
  else c.tokens = readTokenFile("coordinator.tokens_file", c.tokens_file, problems, warnings) ?? [];
}

/**
 * One token per line; blank lines and lines starting with "#" are skipped,
 * and whitespace around a token (the file's last newline) is not part of it.
 */
function readTokenFile(key: string, path: string, problems: string[], warnings: string[]): string[] | undefined {
  let text: string;
  try {
    text = readBoundedFile(path);
  } catch (err) {
    problems.push(`${key}: cannot read "${path}" (${(err as Error).message})`);
    return undefined;
  }
  const exposed = exposureWarning(path, "tokens");
  if (exposed) warnings.push(exposed);
  return text.split(/\r?\n/).map((l) => l.trim()).filter((l) => l !== "" && !l.startsWith("#"));
}
