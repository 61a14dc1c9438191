import { readFileSync } from "node:fs";

// The bundle for the single binary has this replaced by esbuild; running from
// source reads package.json instead.
declare const __NATPROXY_VERSION__: string | undefined;

function readPackageVersion(): string {
  try {
    const pkg = JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8")) as { version?: string };
    return pkg.version ?? "0.0.0";
  } catch {
    return "0.0.0";
  }
}

export const VERSION: string = typeof __NATPROXY_VERSION__ === "string" ? __NATPROXY_VERSION__ : readPackageVersion();
export const SOFTWARE = `natproxy/${VERSION}`;
