// What scripts/build.ts (dist/natproxy for this machine, dist/natproxy.cjs for
// npm) and scripts/release.ts (one binary per target) share: the esbuild
// bundle, the single-executable blob made by Node's own
// --experimental-sea-config, and postject's injection of that blob into a
// Node binary.
import { spawnSync } from "node:child_process";
import { chmodSync, copyFileSync, existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { builtinModules, createRequire } from "node:module";
import { dirname, join, relative } from "node:path";
import * as esbuild from "esbuild";

export class BuildError extends Error {}

export function fail(message: string): never {
  throw new BuildError(message);
}

export function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(2)} s`;
}

export function megabytes(bytes: number): string {
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

export async function step<T>(name: string, fn: () => T | Promise<T>, tag = "build"): Promise<T> {
  const t0 = performance.now();
  console.log(`${tag}: ${name}...`);
  const result = await fn();
  console.log(`${tag}: ${name} done in ${seconds(performance.now() - t0)}`);
  return result;
}

export function packageVersion(root: string): string {
  const pkg = JSON.parse(readFileSync(join(root, "package.json"), "utf8")) as { version?: unknown };
  if (typeof pkg.version !== "string" || pkg.version === "") fail('package.json has no "version"');
  return pkg.version;
}

// The published package's bin runs this bundle on whatever Node ≥ 22 the user
// has, and the binaries run it on their own Node 22: esbuild lowers syntax for
// the oldest of them.
const BUNDLE_TARGET = "node22";
// Not installed, required inside try/catch: debug (via axios → follow-redirects)
// probes for supports-color.
const OPTIONAL_REQUIRES = new Set(["supports-color"]);

/** Bundles `entry` and every dependency into one CommonJS file that needs nothing but Node. */
export async function bundleCli(opts: { root: string; entry: string; outfile: string; workDir: string; version: string; tag?: string }): Promise<void> {
  const entry = join(opts.root, opts.entry);
  if (!existsSync(entry)) fail(`entry point ${opts.entry} does not exist`);
  mkdirSync(opts.workDir, { recursive: true });
  mkdirSync(dirname(opts.outfile), { recursive: true });
  const shim = join(opts.workDir, "import-meta-shim.js");
  writeFileSync(shim, 'export const __natproxy_import_meta_url = require("node:url").pathToFileURL(__filename).href;\n');
  let result: esbuild.BuildResult;
  try {
    result = await esbuild.build({
      entryPoints: [entry],
      outfile: opts.outfile,
      bundle: true,
      platform: "node",
      format: "cjs",
      target: BUNDLE_TARGET,
      define: {
        __NATPROXY_VERSION__: JSON.stringify(opts.version),
        // CJS output has no import.meta; point it at the running file (the
        // binary itself inside the SEA) so code that uses it keeps working.
        "import.meta.url": "__natproxy_import_meta_url",
        "import.meta.filename": "__filename",
        "import.meta.dirname": "__dirname",
      },
      // A shim module rather than a banner: text before esbuild's "use strict"
      // would silently put the whole bundle in sloppy mode. (The entry's
      // "#!/usr/bin/env node" line is kept: npm's bin runs the file directly.)
      inject: [shim],
      // Keeps class/function names intact in stack traces and error messages.
      keepNames: true,
      // Module paths end up in the bundle text: keep them as node_modules/…
      // even where node_modules is a symlink, so that the same commit gives
      // the same bytes (and SHA256SUMS) wherever its dependencies live.
      preserveSymlinks: true,
      legalComments: "none",
      logLevel: "silent",
      metafile: true,
    });
  } catch (err) {
    const failure = err as Partial<esbuild.BuildFailure>;
    if (Array.isArray(failure.errors)) {
      const text = await esbuild.formatMessages(failure.errors, { kind: "error", color: false });
      fail(`esbuild failed to bundle ${opts.entry}:\n${text.join("")}`);
    }
    throw err;
  }
  if (result.warnings.length > 0) {
    const text = await esbuild.formatMessages(result.warnings, { kind: "warning", color: false });
    console.warn(text.join(""));
  }
  // A bare require() left in the bundle cannot be served inside the SEA binary
  // (its require() only knows Node built-ins), nor by the npm package, which
  // installs no dependencies: anything esbuild left external must be a
  // built-in or an optional require the caller catches.
  const builtins = new Set(builtinModules);
  const externals = new Set<string>();
  for (const input of Object.values(result.metafile!.inputs)) {
    for (const imp of input.imports) {
      const p = imp.path;
      if (imp.external && !p.startsWith("node:") && !builtins.has(p) && p !== "<runtime>" && p !== shim && !OPTIONAL_REQUIRES.has(p)) externals.add(p);
    }
  }
  if (externals.size > 0) fail(`left unbundled (would fail at run time): ${[...externals].join(", ")}`);
  console.log(`${opts.tag ?? "build"}: bundle ${relative(opts.root, opts.outfile)} is ${megabytes(statSync(opts.outfile).size)}`);
}

/**
 * Has `node` write the SEA preparation blob for `main`. The blob's format
 * belongs to the Node build that reads it, so `node` must be the very version
 * the blob is injected into. No snapshot and no code cache: both are specific
 * to the platform that made them, and one blob serves every target.
 */
export function makeSeaBlob(node: string, main: string, blob: string, workDir: string): Buffer {
  const config = join(workDir, "sea-config.json");
  // Relative paths: the blob records `main`, and an absolute one would make
  // every checkout's binaries differ.
  const paths = { main: relative(workDir, main), output: relative(workDir, blob) };
  writeFileSync(config, JSON.stringify({ ...paths, disableExperimentalSEAWarning: true, useSnapshot: false, useCodeCache: false }, null, 2));
  rmSync(blob, { force: true });
  const env: NodeJS.ProcessEnv = { PATH: process.env.PATH };
  const r = spawnSync(node, ["--experimental-sea-config", config], { cwd: workDir, env, encoding: "utf8", timeout: 120_000 });
  if (r.error) fail(`could not run ${node}: ${r.error.message}`);
  if (r.status !== 0 || !existsSync(blob)) fail(`${node} --experimental-sea-config failed (exit ${r.status ?? r.signal}):\n${r.stdout}${r.stderr}`);
  return readFileSync(blob);
}

/** The fuse Node's SEA start-up looks for; postject flips it once the blob is in. */
const SEA_FUSE = "NODE_SEA_FUSE_fce680ab2cc467b6e072b8b5df1996b2";

export type BinaryFormat = "elf" | "pe" | "macho";

/** Copies `base` to `output` and injects `blob` as the NODE_SEA_BLOB resource. */
export async function injectSea(base: string, output: string, blob: Buffer, format: BinaryFormat, tag = "build"): Promise<void> {
  const req = createRequire(import.meta.url);
  const { inject } = req("postject") as {
    inject(file: string, name: string, data: Buffer, opts: { sentinelFuse: string; machoSegmentName?: string }): Promise<void>;
  };
  mkdirSync(dirname(output), { recursive: true });
  // Unlink rather than overwrite: copying onto a binary that is still running
  // fails with ETXTBSY.
  rmSync(output, { force: true });
  copyFileSync(base, output);
  chmodSync(output, 0o755);
  // postject's wasm runtime binds console.log/console.warn when it starts (in
  // inject()); LIEF prints one line per unnamed ELF note section through
  // them. Collect and summarise instead of scrolling hundreds of lines past.
  const said = new Map<string, number>();
  const collect = (...args: unknown[]) => {
    const line = args.map(String).join(" ").trim();
    said.set(line, (said.get(line) ?? 0) + 1);
  };
  const { log, warn } = console;
  console.log = console.warn = collect;
  try {
    await inject(output, "NODE_SEA_BLOB", blob, { sentinelFuse: SEA_FUSE, machoSegmentName: format === "macho" ? "NODE_SEA" : undefined });
  } finally {
    console.log = log;
    console.warn = warn;
  }
  for (const [line, n] of said) console.log(`${tag}:   postject: ${line}${n > 1 ? ` (×${n})` : ""}`);
}

/** `bin --version` with no Node on PATH and a bare environment: the binary must stand alone. */
export function runVersion(bin: string, timeoutMs = 60_000): { out: string; ms: number } {
  const t0 = performance.now();
  const r = spawnSync(bin, ["--version"], {
    encoding: "utf8",
    timeout: timeoutMs,
    env: { PATH: "/nonexistent", HOME: dirname(bin) },
    stdio: ["ignore", "pipe", "pipe"],
  });
  const ms = performance.now() - t0;
  if (r.error) fail(`could not run ${bin}: ${r.error.message}`);
  if (r.status !== 0) fail(`"${bin} --version" exited ${r.status ?? r.signal}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  return { out: r.stdout.trim(), ms };
}

/** Fails unless `out` (a --version line) names natproxy `version` on Node `node` (e.g. "v22.23.2"). */
export function checkVersionLine(out: string, version: string, node: string, what: string): void {
  const expected = new RegExp(`^natproxy/${version.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")} \\S+ node-${node.replace(/\./g, "\\.")}$`);
  if (!expected.test(out)) fail(`${what} --version printed ${JSON.stringify(out)}, expected natproxy/${version} … node-${node}`);
}
