// Lab helper for the cleanup test: builds a lab, starts a process inside it,
// prints {"prefix","pid"} and then dies the way argv[3] says ("throw" or
// "wait" for a signal), so the test can check nothing is left behind.
// Usage: crash.ts PREFIX throw|wait
import path from "node:path";
import { fileURLToPath } from "node:url";
import { createLab, LineReader } from "../../scripts/lib/natlab.ts";

const [prefix, mode] = process.argv.slice(2);
const here = path.dirname(fileURLToPath(import.meta.url));
const lab = await createLab({ nat: "port-restricted", prefix });
const server = lab.spawn("web", [process.execPath, path.join(here, "echo-server.ts"), "web", "203.0.113.30:80"]);
await new LineReader(server).waitFor((l) => l.includes('"listening"'), 10_000, "web server");
process.stdout.write(JSON.stringify({ prefix: lab.prefix, pid: server.pid }) + "\n");
if (mode === "throw") {
  throw new Error("deliberate crash with a live lab");
}
// Bounded: the test sends a signal well before this.
setTimeout(() => process.exit(3), 30_000);
