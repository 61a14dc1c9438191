import assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import path from "node:path";
import { test } from "node:test";

// The shape ARCHITECTURE.md describes, checked: every file and function its
// tables name exists, the roles never import each other, shared modules
// import no role, and scripts/ never imports test/.

const root = path.resolve(import.meta.dirname, "..");
const read = (p: string) => readFileSync(path.join(root, p), "utf8");

function tsFiles(dir: string): string[] {
  const out: string[] = [];
  for (const e of readdirSync(path.join(root, dir), { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...tsFiles(p));
    else if (e.name.endsWith(".ts")) out.push(p);
  }
  return out;
}

/** Relative imports of a file (static and dynamic), as repository paths. */
function importsOf(file: string): string[] {
  const text = read(file);
  const out: string[] = [];
  for (const m of text.matchAll(/(?:from\s+|import\s*\(\s*)["'](\.{1,2}\/[^"']+)["']/g)) out.push(path.join(path.dirname(file), m[1]));
  return out;
}

const ROLES = ["src/local/", "src/coordinator/", "src/reporter/"];
const roleOf = (p: string) => ROLES.find((r) => p.startsWith(r));

test("every file and function ARCHITECTURE.md names exists", () => {
  const doc = read("ARCHITECTURE.md");
  const named: [string, string][] = [];
  // Table rows: | # | src/file.ts | function | what |
  for (const m of doc.matchAll(/^\|[^|\n]*\|\s*(src\/[\w/.-]+\.ts)\s*\|\s*(\w+)\s*\|/gm)) named.push([m[1], m[2]]);
  // Prose: `src/file.ts` `function`
  for (const m of doc.matchAll(/`(src\/[\w/.-]+\.ts)`\s+`(\w+)`/g)) named.push([m[1], m[2]]);
  assert.ok(named.length >= 30, `expected the walk tables to name at least 30 functions, found ${named.length}`);
  const missing: string[] = [];
  for (const [file, name] of named) {
    if (!existsSync(path.join(root, file))) {
      missing.push(`${file} (no such file)`);
      continue;
    }
    const decl = new RegExp(`(?:function\\*?|class|const|let|interface|type)\\s+${name}\\b|\\b${name}\\s*\\(`);
    if (!decl.test(read(file))) missing.push(`${file}: ${name}`);
  }
  assert.deepEqual(missing, [], "ARCHITECTURE.md names what the code does not have");
});

test("roles never import each other; shared modules import no role", () => {
  const bad: string[] = [];
  for (const file of tsFiles("src")) {
    // The entry point starts the roles; it is nobody's dependency.
    if (file === "src/cli.ts") continue;
    const mine = roleOf(file);
    for (const dep of importsOf(file)) {
      const theirs = roleOf(dep);
      if (theirs && theirs !== mine) bad.push(`${file} imports ${dep}`);
    }
  }
  assert.deepEqual(bad, []);
});

test("scripts/ never imports test/, and src/ imports neither", () => {
  const bad: string[] = [];
  for (const file of tsFiles("scripts")) for (const dep of importsOf(file)) if (dep.startsWith("test/")) bad.push(`${file} imports ${dep}`);
  for (const file of tsFiles("src")) for (const dep of importsOf(file)) if (dep.startsWith("test/") || dep.startsWith("scripts/")) bad.push(`${file} imports ${dep}`);
  assert.deepEqual(bad, []);
});
