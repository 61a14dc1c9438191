// Ends the bench's children if the bench itself dies without cleaning up
// (SIGKILL, crash): the bench writes each child's pid as a line on our stdin;
// when stdin closes, every pid still listed gets SIGKILL. A line "-PID" takes
// a pid off the list (the bench stopped it itself); "dir PATH" names the
// bench's temp dir, removed last ("dir" alone: the bench removed it);
// "netns PREFIX" names a NAT lab being built, whose namespaces (and what runs
// in them) are removed ("-netns PREFIX": the bench removed it). Ctrl-C
// reaches the whole process group: we ignore it and wait for the pipe to close.
import { spawnSync } from "node:child_process";
import { rmSync } from "node:fs";
import { join } from "node:path";

const labs = new Set<string>();
const pids = new Set<number>();
let dir: string | undefined;
let buf = "";
process.on("SIGINT", () => {});
process.on("SIGTERM", () => {});
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk: string) => {
  buf += chunk;
  let nl: number;
  while ((nl = buf.indexOf("\n")) >= 0) {
    const line = buf.slice(0, nl).trim();
    buf = buf.slice(nl + 1);
    if (line.startsWith("netns ")) {
      labs.add(line.slice(6));
      continue;
    }
    if (line.startsWith("-netns ")) {
      labs.delete(line.slice(7));
      continue;
    }
    if (line.startsWith("dir")) {
      dir = line.slice(4) || undefined;
      continue;
    }
    const n = Number(line);
    if (!Number.isInteger(n) || n === 0) continue;
    if (n > 0) pids.add(n);
    else pids.delete(-n);
  }
});
const finish = (): void => {
  for (const pid of pids) {
    try {
      process.kill(pid, "SIGKILL");
    } catch {}
  }
  for (const prefix of labs) {
    if (/^[a-z0-9][a-z0-9-]{0,9}$/.test(prefix)) spawnSync(process.execPath, [join(import.meta.dirname, "..", "natlab.ts"), "down", "--prefix", prefix], { stdio: "ignore", timeout: 20_000 });
  }
  // Give the killed processes a moment to let go of their files.
  setTimeout(() => {
    if (dir?.includes("natproxy-bench-")) rmSync(dir, { recursive: true, force: true });
    process.exit(0);
  }, pids.size ? 300 : 0);
};
process.stdin.on("end", finish);
process.stdin.on("close", finish);
