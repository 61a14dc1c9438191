import { writeFileSync } from "node:fs";
import { join } from "node:path";
import type { TestPki } from "./pki.ts";
import { startProc, type Proc } from "./proc.ts";
import { TOKEN } from "./stack.ts";

export interface RoleProc {
  p: Proc;
  port: number;
}

/**
 * The three roles as separate processes of one natproxy executable (the
 * packaged binary, or an npm install's bin), on loopback, sharing one config
 * file written into `dir`. Each process goes into `procs` as it starts, so
 * the caller's cleanup stops whatever started even when a later one fails.
 */
export async function startBinaryRoles(natproxy: string, opts: { env: NodeJS.ProcessEnv; dir: string; pki: TestPki; procs: Proc[] }): Promise<{ reporter: RoleProc; coordinator: RoleProc; local: RoleProc }> {
  const start = async (args: string[], ready: RegExp): Promise<RoleProc> => {
    const p = startProc(natproxy, args, opts.env);
    opts.procs.push(p);
    return { p, port: Number((await p.waitFor(ready, 15_000))[1]) };
  };
  const reporter = await start(["reporter", "--listen", "127.0.0.1:0"], /listening on 127\.0\.0\.1:(\d+)/);
  const cfg = join(opts.dir, "proxy.toml");
  writeFileSync(
    cfg,
    `[coordinator]\nlisten = "127.0.0.1:0"\ntokens = ["${TOKEN}"]\nallow_targets = ["127.0.0.1"]\n` +
      `[local]\nlisten = "127.0.0.1:0"\ntoken = "${TOKEN}"\nca = "${opts.pki.caFile}"\nreporter = "127.0.0.1:${reporter.port}"\n`,
  );
  const coordinator = await start(["coordinator", "-c", cfg, "--cert", opts.pki.combinedFile], /HTTPS API listening on 127\.0\.0\.1:(\d+)/);
  const local = await start(["local", "-c", cfg, "--coordinator", `https://localhost:${coordinator.port}`], /HTTP proxy listening on 127\.0\.0\.1:(\d+)/);
  return { reporter, coordinator, local };
}
