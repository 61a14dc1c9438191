// What the bench needs on the machine: Debian packages (installed when
// missing, their system services stopped and disabled: the bench runs its own
// instances) and the natproxy binary (built when missing).
import { spawnSync } from "node:child_process";
import { existsSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const has = (cmd: string): boolean => spawnSync("sh", ["-c", `command -v ${cmd}`], { stdio: "ignore" }).status === 0;

/** Command → Debian package that provides it. */
const NEEDED: Array<[string, string]> = [
  ["curl", "curl"],
  ["squid", "squid"],
  ["ss-server", "shadowsocks-libev"],
  ["ss-local", "shadowsocks-libev"],
  ["rsvg-convert", "librsvg2-bin"],
];
/** Packages that come with a system service the bench must not leave running. */
const SERVICES: Record<string, string> = { squid: "squid", "shadowsocks-libev": "shadowsocks-libev" };

function run(cmd: string, args: string[], env?: NodeJS.ProcessEnv): { status: number | null; out: string } {
  const r = spawnSync(cmd, args, { encoding: "utf8", env: { ...process.env, ...env }, timeout: 9 * 60_000 });
  return { status: r.status, out: `${r.stdout ?? ""}${r.stderr ?? ""}` };
}

export function ensurePackages(log: (s: string) => void): void {
  const missing = [...new Set(NEEDED.filter(([cmd]) => !has(cmd)).map(([, pkg]) => pkg))];
  if (missing.length === 0) return;
  if (process.getuid?.() !== 0) throw new Error(`missing ${missing.join(", ")}; install them (apt-get install --no-install-recommends ${missing.join(" ")}) or run as root`);
  log(`installing ${missing.join(", ")} (apt-get)...`);
  // Keep Debian's postinst from starting the services at all; our own
  // policy-rc.d only while installing, and only if there is none already.
  const policy = "/usr/sbin/policy-rc.d";
  const ownPolicy = !existsSync(policy);
  if (ownPolicy) writeFileSync(policy, "#!/bin/sh\nexit 101\n", { mode: 0o755 });
  try {
    const env = { DEBIAN_FRONTEND: "noninteractive" };
    const args = ["install", "-y", "--no-install-recommends", ...missing];
    let r = run("apt-get", args, env);
    if (r.status !== 0) {
      log("apt-get install failed; running apt-get update once and retrying...");
      run("apt-get", ["update"], env);
      r = run("apt-get", args, env);
    }
    if (r.status !== 0) throw new Error(`apt-get install ${missing.join(" ")} failed:\n${r.out.trim().split("\n").slice(-15).join("\n")}`);
  } finally {
    if (ownPolicy) rmSync(policy, { force: true });
  }
  for (const pkg of missing) {
    const svc = SERVICES[pkg];
    if (svc) log(disableService(svc));
  }
  const still = NEEDED.filter(([cmd]) => !has(cmd)).map(([cmd]) => cmd);
  if (still.length) throw new Error(`still missing after install: ${still.join(", ")}`);
}

/** Stops the Debian service if its init script says it runs, and disables it for boot. */
function disableService(svc: string): string {
  const done: string[] = [];
  const init = `/etc/init.d/${svc}`;
  if (existsSync(init) && run(init, ["status"]).status === 0) {
    const r = run(init, ["stop"]);
    done.push(`stopped (${r.status === 0 ? "ok" : `exit ${r.status}`})`);
  }
  if (has("systemctl")) {
    const r = run("systemctl", ["disable", svc]);
    done.push(`systemctl disable: ${r.status === 0 ? "ok" : `exit ${r.status}`}`);
  }
  if (has("update-rc.d")) {
    const r = run("update-rc.d", [svc, "disable"]);
    done.push(`update-rc.d disable: ${r.status === 0 ? "ok" : `exit ${r.status}`}`);
  }
  return `system service ${svc}: ${done.join(", ") || "nothing to do"}`;
}

export function ensureBinary(root: string, force: boolean, log: (s: string) => void): string {
  const bin = join(root, "dist", "natproxy");
  if (existsSync(bin) && !force) return bin;
  log(`${force ? "rebuilding" : "building"} dist/natproxy (npm run build)...`);
  const r = spawnSync(process.execPath, [join(root, "scripts", "build.ts")], { cwd: root, stdio: "inherit", timeout: 5 * 60_000 });
  if (r.status !== 0 || !existsSync(bin)) throw new Error(`the build failed (exit ${r.status ?? r.signal})`);
  return bin;
}
