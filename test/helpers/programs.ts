import { accessSync, constants } from "node:fs";
import { delimiter, join } from "node:path";

function executable(path: string): boolean {
  try {
    accessSync(path, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/**
 * A peer program the tests run (haproxy, turnserver): the environment
 * variable `override` names it outright (another build, or a wrong path to
 * check the skip); otherwise PATH and the sbin directories Debian installs to.
 */
export function findProgram(name: string, override: string): string | undefined {
  const named = process.env[override];
  if (named) return executable(named) ? named : undefined;
  const dirs = [...(process.env.PATH ?? "").split(delimiter), "/usr/sbin", "/usr/bin", "/usr/local/bin"];
  return dirs.filter(Boolean).map((d) => join(d, name)).find(executable);
}
