import type { LogObject } from "consola";
import { roleLogger } from "../../src/log.ts";

/**
 * Collects what a role logs at info and above, instead of printing it, so a
 * test can assert on the request log (path=, outcome=) without parsing stderr.
 */
export function captureLogs(tag: "local" | "coordinator" | "reporter"): { lines: string[]; sessions(): string[]; restore(): void } {
  const logger = roleLogger(tag);
  const saved = { reporters: logger.options.reporters, level: logger.level };
  const lines: string[] = [];
  logger.setReporters([{ log: (o: LogObject) => void lines.push(o.args.map(String).join(" ")) }]);
  logger.level = 3;
  return {
    lines,
    sessions: () => lines.filter((l) => l.startsWith("session=")),
    restore() {
      logger.setReporters(saved.reporters);
      logger.level = saved.level;
    },
  };
}
