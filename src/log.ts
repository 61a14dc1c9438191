import { createConsola, type ConsolaInstance } from "consola";

export const LOG_LEVELS = ["silent", "error", "warn", "info", "debug", "trace"] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

const numeric: Record<LogLevel, number> = { silent: -999, error: 0, warn: 1, info: 3, debug: 4, trace: 5 };

// One logger for the process; roles take tagged children so a combined
// coordinator+reporter process still says which part spoke.
export const log: ConsolaInstance = createConsola({
  level: numeric.info,
  // Logs go to stderr so that stdout stays free for machine-readable output (--check, --version).
  stdout: process.stderr,
  stderr: process.stderr,
  formatOptions: { date: true, colors: wantColors(process.env, process.stderr), compact: true },
});

/** NO_COLOR (no-color.org) wins, then FORCE_COLOR, then what the console says it can show (an old Windows console or a pipe: none). */
export function wantColors(env: NodeJS.ProcessEnv, stream: { isTTY?: boolean; hasColors?: () => boolean }): boolean {
  if (env.NO_COLOR !== undefined && env.NO_COLOR !== "") return false;
  if (env.FORCE_COLOR !== undefined) return env.FORCE_COLOR !== "0" && env.FORCE_COLOR !== "false";
  return stream.isTTY === true && (stream.hasColors?.() ?? false);
}

// withTag() copies the level at creation, so children are remembered and a
// later setLogLevel() reaches them too.
const children = new Map<string, ConsolaInstance>();

export function setLogLevel(level: LogLevel): void {
  log.level = numeric[level];
  for (const child of children.values()) child.level = numeric[level];
}

export function roleLogger(tag: string): ConsolaInstance {
  let child = children.get(tag);
  if (!child) {
    child = log.withTag(tag);
    child.level = log.level;
    children.set(tag, child);
  }
  return child;
}
