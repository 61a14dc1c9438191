// Builds the single self-contained executable dist/natproxy:
//   1. esbuild bundles src/cli.ts (and every dependency) into one CJS file,
//   2. @yao-pkg/pkg (SEA mode) injects it into a copy of the pinned Node binary,
//   3. the result is smoke-tested with no Node on PATH.
// Runs on the pinned Node (npm scripts put node_modules/.bin first on PATH).
import { spawnSync } from "node:child_process";
import { chmodSync, copyFileSync, existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { builtinModules, createRequire } from "node:module";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
// NATPROXY_BUILD_ENTRY lets a stand-in entry be built while src/cli.ts is not written yet.
const ENTRY = process.env.NATPROXY_BUILD_ENTRY || "src/cli.ts";
const BUILD_DIR = join(ROOT, ".build");
const BUNDLE = join(BUILD_DIR, "natproxy.cjs");
const OUTPUT = join(ROOT, "dist", "natproxy");
// pkg keeps its SEA cache at $HOME/.pkg-cache/sea (os.homedir(); PKG_CACHE_PATH is
// only read by the non-SEA pipeline), so pkg gets a project-local HOME.
const PKG_HOME = join(BUILD_DIR, "pkg-home");
const OFFLINE_GUARD = join(BUILD_DIR, "pkg-offline-guard.cjs");
const IMPORT_META_SHIM = join(BUILD_DIR, "import-meta-shim.js");
const SMOKE_TIMEOUT_MS = 30_000;
// Not installed, required inside try/catch: debug (via axios → follow-redirects)
// probes for supports-color.
const OPTIONAL_REQUIRES = new Set(["supports-color"]);

class BuildError extends Error {}

function fail(message: string): never {
  throw new BuildError(message);
}

function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(2)} s`;
}

async function step<T>(name: string, fn: () => T | Promise<T>): Promise<T> {
  const t0 = performance.now();
  console.log(`build: ${name}...`);
  const result = await fn();
  console.log(`build: ${name} done in ${seconds(performance.now() - t0)}`);
  return result;
}

function readPackageJson(): { version: string; devDependencies?: Record<string, string> } {
  const pkg = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as {
    version?: unknown;
    devDependencies?: Record<string, string>;
  };
  if (typeof pkg.version !== "string" || pkg.version === "") fail("package.json has no \"version\"");
  return { version: pkg.version, devDependencies: pkg.devDependencies };
}

// The SEA blob format changes between Node patch releases, so the binary pkg
// bakes into and the Node that generates the blob must be the very same
// build: we use the Node running this script for both.
function checkHostNode(pinned: string | undefined): void {
  if (process.platform !== "linux" || process.arch !== "x64") {
    fail(`only linux-x64 builds are set up (this is ${process.platform}-${process.arch})`);
  }
  if (pinned !== undefined && /^\d+\.\d+\.\d+$/.test(pinned) && process.version !== `v${pinned}`) {
    fail(
      `the build must run on the pinned Node ${pinned} (devDependency "node"), but this is ${process.version} ` +
        `at ${process.execPath}. Use "npm run build" (or "npx node scripts/build.ts") after "npm ci".`,
    );
  }
}

async function bundle(version: string): Promise<void> {
  const entry = join(ROOT, ENTRY);
  if (!existsSync(entry)) fail(`entry point ${ENTRY} does not exist`);
  mkdirSync(BUILD_DIR, { recursive: true });
  writeFileSync(IMPORT_META_SHIM, 'export const __natproxy_import_meta_url = require("node:url").pathToFileURL(__filename).href;\n');
  let result: esbuild.BuildResult;
  try {
    result = await esbuild.build({
      entryPoints: [entry],
      outfile: BUNDLE,
      bundle: true,
      platform: "node",
      format: "cjs",
      target: `node${process.versions.node}`,
      define: {
        __NATPROXY_VERSION__: JSON.stringify(version),
        // CJS output has no import.meta; point it at the running file (the
        // binary itself inside the SEA) so code that uses it keeps working.
        "import.meta.url": "__natproxy_import_meta_url",
        "import.meta.filename": "__filename",
        "import.meta.dirname": "__dirname",
      },
      // A shim module rather than a banner: text before esbuild's "use strict"
      // would silently put the whole bundle in sloppy mode.
      inject: [IMPORT_META_SHIM],
      // Keeps class/function names intact in stack traces and error messages.
      keepNames: true,
      legalComments: "none",
      logLevel: "silent",
      metafile: true,
    });
  } catch (err) {
    const failure = err as Partial<esbuild.BuildFailure>;
    if (Array.isArray(failure.errors)) {
      const text = await esbuild.formatMessages(failure.errors, { kind: "error", color: false });
      fail(`esbuild failed to bundle ${ENTRY}:\n${text.join("")}`);
    }
    throw err;
  }
  if (result.warnings.length > 0) {
    const text = await esbuild.formatMessages(result.warnings, { kind: "warning", color: false });
    console.warn(text.join(""));
  }
  // A bare require() left in the bundle cannot be served inside the SEA binary
  // (its require() only knows Node built-ins), so anything esbuild left
  // external must be a built-in or an optional require the caller catches.
  const builtins = new Set(builtinModules);
  const externals = new Set<string>();
  for (const input of Object.values(result.metafile!.inputs)) {
    for (const imp of input.imports) {
      const p = imp.path;
      if (imp.external && !p.startsWith("node:") && !builtins.has(p) && p !== "<runtime>" && p !== IMPORT_META_SHIM && !OPTIONAL_REQUIRES.has(p)) {
        externals.add(p);
      }
    }
  }
  if (externals.size > 0) {
    console.warn(`build: warning: left unbundled (will fail at run time if reached): ${[...externals].join(", ")}`);
  }
  console.log(`build: bundle ${relative(ROOT, BUNDLE)} is ${(statSync(BUNDLE).size / 1024 / 1024).toFixed(2)} MB`);
}

// Fills pkg's SEA download cache so that it finds the archive "downloaded and
// verified" and the node binary "extracted": pkg only checks for the *.ok
// sentinels and the files' existence, then copies bin/node as the base binary.
function seedPkgCache(): string {
  const nodeVersion = process.version; // v22.23.3
  const base = `node-${nodeVersion}-linux-x64`;
  const seaDir = join(PKG_HOME, ".pkg-cache", "sea");
  const archive = join(seaDir, `${base}.tar.gz`);
  const nodeBin = join(seaDir, base, "bin", "node");
  mkdirSync(dirname(nodeBin), { recursive: true });

  const hostSize = statSync(process.execPath).size;
  const seededSize = existsSync(nodeBin) ? statSync(nodeBin).size : -1;
  if (seededSize !== hostSize || runVersion(nodeBin) !== nodeVersion) {
    rmSync(nodeBin, { force: true });
    copyFileSync(process.execPath, nodeBin);
    chmodSync(nodeBin, 0o755);
  }
  if (runVersion(nodeBin) !== nodeVersion) fail(`seeded node binary ${nodeBin} does not report ${nodeVersion}`);
  for (const f of [archive, `${archive}.ok`, `${nodeBin}.ok`]) {
    if (!existsSync(f)) writeFileSync(f, "");
  }
  return `node${nodeVersion.slice(1)}-linux-x64`;
}

function runVersion(bin: string): string | undefined {
  if (!existsSync(bin)) return undefined;
  const r = spawnSync(bin, ["--version"], { encoding: "utf8", timeout: 10_000, env: { PATH: "/nonexistent" } });
  return r.status === 0 ? r.stdout.trim() : undefined;
}

// Loaded into the pkg process only: if the seeded cache were ever not accepted
// pkg would try to download Node, which cannot work here and would otherwise
// hang or fail with an obscure error. Make every network attempt fail at once.
const OFFLINE_GUARD_SOURCE = `"use strict";
const refuse = (what) => {
  const err = new Error(
    "natproxy build: pkg tried to reach the network (" + what + "). The seeded pkg cache under " +
    ${JSON.stringify(relative(ROOT, PKG_HOME))} + " was not accepted; check the pkg version and the cache layout in scripts/build.ts.");
  err.code = "NATPROXY_BUILD_OFFLINE";
  throw err;
};
globalThis.fetch = async (url) => refuse("fetch " + String(url && url.url ? url.url : url));
for (const mod of ["http", "https"]) {
  const m = require(mod);
  m.request = (...a) => refuse(mod + ".request " + String(a[0] && (a[0].href || a[0].host || a[0])));
  m.get = m.request;
}
const net = require("net");
net.connect = net.createConnection = () => refuse("net.connect");
require("tls").connect = () => refuse("tls.connect");
`;

function runPkg(target: string): void {
  const req = createRequire(import.meta.url);
  const pkgDir = dirname(req.resolve("@yao-pkg/pkg/package.json"));
  const pkgJson = JSON.parse(readFileSync(join(pkgDir, "package.json"), "utf8")) as { version: string; bin: { pkg: string } };
  if (!pkgJson.version.startsWith("6.23.")) {
    // The cache seeding mirrors the internals of pkg 6.23's sea.js.
    console.warn(`build: warning: @yao-pkg/pkg ${pkgJson.version} is not the 6.23 the cache seeding was written for`);
  }
  writeFileSync(OFFLINE_GUARD, OFFLINE_GUARD_SOURCE);
  mkdirSync(dirname(OUTPUT), { recursive: true });
  // Unlink rather than overwrite: copying onto a binary that is still running
  // fails with ETXTBSY.
  rmSync(OUTPUT, { force: true });
  const args = [
    "--require",
    OFFLINE_GUARD,
    join(pkgDir, pkgJson.bin.pkg),
    "--sea",
    BUNDLE,
    "--targets",
    target,
    "--output",
    OUTPUT,
  ];
  const env: NodeJS.ProcessEnv = { ...process.env, HOME: PKG_HOME, PKG_CACHE_PATH: join(PKG_HOME, ".pkg-cache") };
  delete env.NODE_OPTIONS;
  const r = spawnSync(process.execPath, args, { cwd: ROOT, env, stdio: "inherit", timeout: 10 * 60_000 });
  if (r.error) fail(`could not run pkg: ${r.error.message}`);
  if (r.status !== 0) fail(`pkg failed (exit ${r.status ?? r.signal}); see its output above`);
  if (!existsSync(OUTPUT)) fail(`pkg exited 0 but did not write ${relative(ROOT, OUTPUT)}`);
  chmodSync(OUTPUT, 0o755);
}

function smokeTest(version: string): number {
  const t0 = performance.now();
  // No Node on PATH and a bare environment: the binary must stand alone.
  const r = spawnSync(OUTPUT, ["--version"], {
    encoding: "utf8",
    timeout: SMOKE_TIMEOUT_MS,
    env: { PATH: "/nonexistent", HOME: PKG_HOME },
    stdio: ["ignore", "pipe", "pipe"],
  });
  const ms = performance.now() - t0;
  const out = `${r.stdout ?? ""}`.trim();
  if (r.error) fail(`smoke test: could not run ${relative(ROOT, OUTPUT)}: ${r.error.message}`);
  if (r.status !== 0) {
    fail(`smoke test: "${relative(ROOT, OUTPUT)} --version" exited ${r.status ?? r.signal}\nstdout: ${out}\nstderr: ${`${r.stderr ?? ""}`.trim()}`);
  }
  const escaped = version.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  if (!new RegExp(`(^|[^\\w.])v?${escaped}([^\\w.]|$)`).test(out)) {
    fail(`smoke test: "${relative(ROOT, OUTPUT)} --version" printed ${JSON.stringify(out)}, expected version ${version}`);
  }
  console.log(`build: smoke test ok: --version printed ${JSON.stringify(out)} in ${seconds(ms)}`);
  return ms;
}

async function main(): Promise<void> {
  const t0 = performance.now();
  const pkg = readPackageJson();
  checkHostNode(pkg.devDependencies?.node);
  await step(`bundle ${ENTRY} with esbuild`, () => bundle(pkg.version));
  const target = await step("seed the pkg cache", seedPkgCache);
  await step(`pkg --sea (${target})`, () => runPkg(target));
  await step("smoke test", () => smokeTest(pkg.version));
  const size = statSync(OUTPUT).size;
  console.log(
    `build: ${relative(ROOT, OUTPUT)} (natproxy ${pkg.version}) is ${(size / 1024 / 1024).toFixed(1)} MB (${size} bytes); ` +
      `built in ${seconds(performance.now() - t0)}`,
  );
}

main().catch((err: unknown) => {
  console.error(`build: FAILED: ${err instanceof BuildError ? err.message : err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
  process.exit(1);
});
