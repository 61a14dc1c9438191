import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { test } from "node:test";
import { findProgram } from "./helpers/programs.ts";

const root = resolve(import.meta.dirname, "..");
const python = findProgram("python3", "NATPROXY_PYTHON3");

// The log-in files are parsed by real parsers (plistlib is what plutil checks
// against; ElementTree for the Task Scheduler XML), not pattern-matched.
test("the launchd agent is a valid plist that runs natproxy local at load", { skip: python ? false : "python3 not installed" }, () => {
  const r = spawnSync(python!, ["-c", "import plistlib,sys,json; print(json.dumps(plistlib.load(open(sys.argv[1],'rb'))))", resolve(root, "contrib/macos/org.natproxy.local.plist")], { encoding: "utf8" });
  assert.equal(r.status, 0, r.stderr);
  const plist = JSON.parse(r.stdout) as { Label: string; ProgramArguments: string[]; RunAtLoad: boolean };
  assert.equal(plist.Label, "org.natproxy.local");
  assert.deepEqual(plist.ProgramArguments.slice(1, 3), ["local", "-c"]);
  assert.equal(plist.RunAtLoad, true);
});

test("the Task Scheduler task is well-formed XML with a log-on trigger running natproxy local", { skip: python ? false : "python3 not installed" }, () => {
  const script = "import sys,xml.etree.ElementTree as E; ns={'t':'http://schemas.microsoft.com/windows/2004/02/mit/task'}; r=E.parse(sys.argv[1]).getroot(); print(r.find('t:Triggers/t:LogonTrigger',ns) is not None, r.find('t:Actions/t:Exec/t:Arguments',ns).text)";
  const r = spawnSync(python!, ["-c", script, resolve(root, "contrib/windows/natproxy-local.xml")], { encoding: "utf8" });
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /^True local -c /);
});

test("the systemd user unit runs natproxy local and does not restart on a bad configuration", () => {
  const unit = readFileSync(resolve(root, "contrib/systemd/natproxy-local.service"), "utf8");
  assert.match(unit, /^ExecStart=\S*natproxy local /m);
  assert.match(unit, /^RestartPreventExitStatus=2$/m);
  assert.match(unit, /^WantedBy=default\.target$/m);
});
