import { existsSync } from "node:fs";
import { homedir } from "node:os";
import path from "node:path";

// Where a config file is looked for when -c is not given. Kept apart from
// config.ts so the order is one pure function that tests drive with any
// platform, environment and executable path.

export const CONFIG_NAME = "proxy.toml";

export interface SearchContext {
  platform: NodeJS.Platform;
  env: NodeJS.ProcessEnv;
  /** The running binary; a config beside natproxy.exe is the Windows habit of unzipping and running. */
  execPath: string;
  cwd: string;
  home: string;
  /** True when the process is the packaged binary, not `node src/cli.ts` (then execPath is node itself). */
  packaged: boolean;
}

export function currentSearchContext(): SearchContext {
  // pkg sets process.pkg; a Node single-executable application answers isSea().
  const packaged = (process as { pkg?: unknown }).pkg !== undefined || isSea();
  return { platform: process.platform, env: process.env, execPath: process.execPath, cwd: process.cwd(), home: homedir(), packaged };
}

function isSea(): boolean {
  try {
    return (process.getBuiltinModule("node:sea") as { isSea?: () => boolean } | undefined)?.isSea?.() === true;
  } catch {
    return false;
  }
}

/** The per-user config file: what `natproxy init` writes without -c. */
export function userConfigPath(ctx: SearchContext): string {
  if (ctx.platform === "win32") {
    const p = path.win32;
    const appData = ctx.env.APPDATA || p.join(ctx.home, "AppData", "Roaming");
    return p.join(appData, "natproxy", CONFIG_NAME);
  }
  // XDG: a relative XDG_CONFIG_HOME is invalid and must be ignored.
  const xdg = ctx.env.XDG_CONFIG_HOME;
  const base = xdg && path.posix.isAbsolute(xdg) ? xdg : path.posix.join(ctx.home, ".config");
  return path.posix.join(base, "natproxy", CONFIG_NAME);
}

/**
 * Candidates, first match wins: the working directory (what the quick start
 * and most how-tos assume), beside the executable, then the per-user file.
 */
export function configCandidates(ctx: SearchContext): string[] {
  const p = ctx.platform === "win32" ? path.win32 : path.posix;
  const out = [p.join(ctx.cwd, CONFIG_NAME)];
  if (ctx.packaged) out.push(p.join(p.dirname(ctx.execPath), CONFIG_NAME));
  out.push(userConfigPath(ctx));
  return [...new Set(out)];
}

export interface FoundConfig {
  path: string | undefined;
  searched: string[];
}

export function findConfig(ctx: SearchContext, exists: (file: string) => boolean = existsSync): FoundConfig {
  const searched = configCandidates(ctx);
  return { path: searched.find((f) => exists(f)), searched };
}

export function missingConfigMessage(role: string, searched: string[]): string {
  return [
    `no configuration file: none of these exists:`,
    ...searched.map((f) => `  ${f}`),
    `Create one with "natproxy init ${role}" (it writes the last of these; -c <file> to choose), or give one with -c <file>.`,
  ].join("\n");
}
