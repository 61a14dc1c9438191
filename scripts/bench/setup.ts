// What the bench needs on the machine: Debian packages (installed when
// missing, their system services stopped and disabled: the bench runs its own
// instances) and the natproxy binary (built when missing).
import { spawnSync } from "node:child_process";
import { chmodSync, copyFileSync, existsSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { setWatchdog, startChild } from "./procs.ts";

const has = (cmd: string): boolean => spawnSync("sh", ["-c", `command -v ${cmd}`], { stdio: "ignore" }).status === 0;

/** Command → Debian package that provides it. */
const NEEDED: Array<[string, string]> = [
  ["curl", "curl"],
  ["squid", "squid"],
  ["ss-server", "shadowsocks-libev"],
  ["ss-local", "shadowsocks-libev"],
];
/** Nice to have: without it the chart stays an SVG. */
const OPTIONAL: Array<[string, string]> = [["rsvg-convert", "librsvg2-bin"]];
/** Packages that come with a system service the bench must not leave running. */
const SERVICES: Record<string, string> = { squid: "squid", "shadowsocks-libev": "shadowsocks-libev" };

function run(cmd: string, args: string[], env?: NodeJS.ProcessEnv): { status: number | null; out: string } {
  const r = spawnSync(cmd, args, { encoding: "utf8", env: { ...process.env, ...env }, timeout: 9 * 60_000 });
  return { status: r.status, out: `${r.stdout ?? ""}${r.stderr ?? ""}` };
}

/** `needed`: command → package pairs a script needs (by default the bench's); the optional ones are always tried. */
export function ensurePackages(log: (s: string) => void, needed: Array<[string, string]> = NEEDED): void {
  const missing = [...new Set(needed.filter(([cmd]) => !has(cmd)).map(([, pkg]) => pkg))];
  const optional = [...new Set(OPTIONAL.filter(([cmd]) => !has(cmd)).map(([, pkg]) => pkg))];
  if (missing.length === 0 && (optional.length === 0 || process.getuid?.() !== 0)) return;
  if (missing.length && process.getuid?.() !== 0) throw new Error(`missing ${missing.join(", ")}; install them (apt-get install --no-install-recommends ${missing.join(" ")}) or run as root`);
  if (missing.length) install(missing, log);
  if (optional.length) {
    try {
      install(optional, log);
    } catch (err) {
      log(`could not install ${optional.join(", ")} (the chart stays an SVG): ${(err as Error).message.split("\n")[0]}`);
    }
  }
  const still = needed.filter(([cmd]) => !has(cmd)).map(([cmd]) => cmd);
  if (still.length) throw new Error(`still missing after install: ${still.join(", ")}`);
}

function install(pkgs: string[], log: (s: string) => void): void {
  log(`installing ${pkgs.join(", ")} (apt-get)...`);
  // Keep Debian's postinst from starting the services at all; our own
  // policy-rc.d only while installing, and only if there is none already.
  const policy = "/usr/sbin/policy-rc.d";
  const ownPolicy = !existsSync(policy);
  if (ownPolicy) writeFileSync(policy, "#!/bin/sh\nexit 101\n", { mode: 0o755 });
  try {
    const env = { DEBIAN_FRONTEND: "noninteractive" };
    const args = ["install", "-y", "--no-install-recommends", ...pkgs];
    let r = run("apt-get", args, env);
    if (r.status !== 0) {
      log("apt-get install failed; running apt-get update once and retrying...");
      run("apt-get", ["update"], env);
      r = run("apt-get", args, env);
    }
    if (r.status !== 0) throw new Error(`apt-get install ${pkgs.join(" ")} failed:\n${r.out.trim().split("\n").slice(-15).join("\n")}`);
  } finally {
    if (ownPolicy) rmSync(policy, { force: true });
  }
  for (const pkg of pkgs) {
    const svc = SERVICES[pkg];
    if (svc) log(disableService(svc));
  }
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

/** Newest modification time (ms) of the files the binary is built from. */
function newestSource(root: string): { mtime: number; file: string } {
  let best = { mtime: 0, file: "" };
  const visit = (p: string): void => {
    let st;
    try {
      st = statSync(p);
    } catch {
      return;
    }
    if (st.isDirectory()) {
      for (const name of readdirSync(p)) visit(join(p, name));
    } else if (st.mtimeMs > best.mtime) {
      best = { mtime: st.mtimeMs, file: p };
    }
  };
  for (const p of ["src", "package.json", "package-lock.json", join("scripts", "build.ts")]) visit(join(root, p));
  return best;
}

/**
 * dist/natproxy, built (npm run build) when it is missing, older than any
 * file under src/ (or the build inputs), or `force`. If a rebuild of a stale
 * binary fails (sources in the middle of an edit), the existing binary is
 * used and the returned note says so.
 */
export function ensureBinary(root: string, force: boolean, log: (s: string) => void): { bin: string; note?: string } {
  const bin = join(root, "dist", "natproxy");
  const exists = existsSync(bin);
  const newest = newestSource(root);
  const stale = exists && statSync(bin).mtimeMs < newest.mtime;
  if (exists && !force && !stale) return { bin };
  const why = !exists ? "building" : force ? "rebuilding (--rebuild)" : `rebuilding (${newest.file.slice(root.length + 1)} is newer than the binary)`;
  log(`${why} dist/natproxy (npm run build)...`);
  const r = spawnSync(process.execPath, [join(root, "scripts", "build.ts")], { cwd: root, encoding: "utf8", timeout: 5 * 60_000 });
  if (r.status === 0 && existsSync(bin)) return { bin };
  const tail = `${r.stdout ?? ""}${r.stderr ?? ""}`.trim().split("\n").slice(-8).join("\n");
  if (!existsSync(bin)) throw new Error(`the build failed (exit ${r.status ?? r.signal}):\n${tail}`);
  const note = `the rebuild failed (exit ${r.status ?? r.signal}); measured the existing dist/natproxy, built before the latest source changes`;
  log(`${note}:\n${tail}`);
  return { bin, note };
}

export interface RunDir {
  /** The run's temp dir: removed at exit, and by the watchdog should this process be killed outright. */
  home: string;
  /**
   * A private copy of dist/natproxy: a build running meanwhile (npm test
   * rebuilds it) must not swap or remove the binary under a running bench.
   */
  natproxyBin: string;
  /** Where the copy came from, for the output: "copy of dist/natproxy built <time>". */
  origin: string;
  /** Why the binary was (re)built, if it was. */
  buildNote?: string;
  /** Lets the watchdog go once the run has stopped its children itself. */
  release(): void;
}

/** The binary built if needed, a temp dir with a private copy of it, and a watchdog for the children. */
export function prepareRun(opts: { root: string; rebuild: boolean; prefix: string; guard: { setTmp(dir: string): void }; log: (s: string) => void }): RunDir {
  const { bin, note } = ensureBinary(opts.root, opts.rebuild, opts.log);
  const home = mkdtempSync(join(tmpdir(), opts.prefix));
  opts.guard.setTmp(home);
  const natproxyBin = join(home, "natproxy");
  copyFileSync(bin, natproxyBin);
  chmodSync(natproxyBin, 0o755);
  const origin = `copy of ${relative(opts.root, bin)} built ${statSync(bin).mtime.toISOString()}`;
  // Kills our children should this process die without cleaning up (SIGKILL).
  const watchdog = startChild("watchdog", process.execPath, [join(import.meta.dirname, "watchdog.ts")]);
  setWatchdog((line) => {
    if (watchdog.isRunning()) watchdog.proc.stdin?.write(line);
  });
  watchdog.proc.stdin?.write(`dir ${home}\n`);
  return { home, natproxyBin, origin, buildNote: note, release: () => watchdog.proc.stdin?.end() };
}
