// Builds natproxy for this machine, offline:
//   dist/natproxy.cjs  esbuild's bundle of src/cli.ts and every dependency (the npm package's bin),
//   dist/natproxy      a single executable: that bundle as a Node SEA blob, injected by postject
//                      into a copy of the Node running this script, then smoke-tested with no
//                      Node on PATH.
// `--bundle-only` stops after dist/natproxy.cjs (what `npm pack` needs).
// scripts/release.ts makes the binaries for the other platforms the same way.
// Runs on the pinned Node (npm scripts put node_modules/.bin first on PATH).
import { readFileSync, statSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { BuildError, bundleCli, checkVersionLine, fail, injectSea, makeSeaBlob, megabytes, packageVersion, runVersion, seconds, step } from "./lib/sea.ts";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
// NATPROXY_BUILD_ENTRY lets a stand-in entry be built while src/cli.ts is not written yet.
const ENTRY = process.env.NATPROXY_BUILD_ENTRY || "src/cli.ts";
const BUILD_DIR = join(ROOT, ".build");
const BUNDLE = join(ROOT, "dist", "natproxy.cjs");
const BLOB = join(BUILD_DIR, "natproxy.blob");
const OUTPUT = join(ROOT, "dist", "natproxy");

// The SEA blob must be made by the very Node build it is injected into, so
// this uses the Node running this script for both, and that must be the
// project's pinned one rather than whatever `node` a shell found first.
function checkHostNode(): void {
  if (process.platform !== "linux" || process.arch !== "x64") {
    fail(`only linux-x64 builds are set up (this is ${process.platform}-${process.arch}); scripts/release.ts makes the others`);
  }
  const pkg = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as { devDependencies?: Record<string, string> };
  const pinned = pkg.devDependencies?.node;
  if (pinned !== undefined && /^\d+\.\d+\.\d+$/.test(pinned) && process.version !== `v${pinned}`) {
    fail(
      `the build must run on the pinned Node ${pinned} (devDependency "node"), but this is ${process.version} ` +
        `at ${process.execPath}. Use "npm run build" (or "npx node scripts/build.ts") after "npm ci".`,
    );
  }
}

async function main(): Promise<void> {
  const t0 = performance.now();
  const version = packageVersion(ROOT);
  const bundleOnly = process.argv.includes("--bundle-only");
  if (!bundleOnly) checkHostNode();
  await step(`bundle ${ENTRY} with esbuild`, () => bundleCli({ root: ROOT, entry: ENTRY, outfile: BUNDLE, workDir: BUILD_DIR, version }));
  if (bundleOnly) return;
  const blob = await step("make the SEA blob", () => makeSeaBlob(process.execPath, BUNDLE, BLOB, BUILD_DIR));
  await step(`inject it into Node ${process.version} (linux-x64)`, () => injectSea(process.execPath, OUTPUT, blob, "elf"));
  await step("smoke test", () => {
    const { out, ms } = runVersion(OUTPUT);
    checkVersionLine(out, version, process.version, relative(ROOT, OUTPUT));
    console.log(`build: smoke test ok: --version printed ${JSON.stringify(out)} in ${seconds(ms)}`);
  });
  const size = statSync(OUTPUT).size;
  console.log(`build: ${relative(ROOT, OUTPUT)} (natproxy ${version}) is ${megabytes(size)} (${size} bytes); built in ${seconds(performance.now() - t0)}`);
}

main().catch((err: unknown) => {
  console.error(`build: FAILED: ${err instanceof BuildError ? err.message : err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
  process.exit(1);
});
