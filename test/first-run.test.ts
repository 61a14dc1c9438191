import assert from "node:assert/strict";
import { test } from "node:test";
import type { ConsolaInstance } from "consola";
import { rejectedTokenLog } from "../src/coordinator/rejected-tokens.ts";
import { NatproxyError, type ErrorCode } from "../src/errors.ts";
import { describeReachability } from "../src/local/tunnel/path.ts";

const noNat = { localPort: 40000, publicAddress: { host: "203.0.113.5", port: 40000 }, localAddress: "203.0.113.5", reporter: { host: "198.51.100.1", port: 3478 }, since: new Date() };

test("a probe the coordinator never got does not blame the network", () => {
  for (const code of ["COORDINATOR_REFUSED", "COORDINATOR_UNREACHABLE", "CERT_UNTRUSTED", "CERT_PIN_MISMATCH", "UNAUTHORIZED"] as ErrorCode[]) {
    const r = describeReachability(noNat, { ok: false, ms: 5, error: new NatproxyError(code, "x") }, "198.51.100.1");
    assert.doesNotMatch(r.behaviour, /firewall|\bNAT\b/, code);
    assert.match(r.behaviour, new RegExp(`could not be asked.*${code}`), code);
  }
  // A real silence after a delivered probe still points at the firewall.
  const timedOut = describeReachability(noNat, { ok: false, ms: 3000, error: new NatproxyError("CONNECT_BACK_TIMEOUT", "x") }, "198.51.100.1");
  assert.match(timedOut.behaviour, /firewall drops inbound/);
});

test("refused tokens: logged once per caller address per window, never the token", (t) => {
  t.mock.timers.enable({ apis: ["Date"] });
  const lines: string[] = [];
  const log = { warn: (m: string) => lines.push(m) } as unknown as ConsolaInstance;
  const rejected = rejectedTokenLog(log, 60_000);
  rejected("192.0.2.1", "API request GET /hello");
  rejected("192.0.2.1", "API request GET /hello");
  rejected("192.0.2.2", "outbound tunnel");
  assert.equal(lines.length, 2);
  assert.match(lines[0], /192\.0\.2\.1 refused: missing or invalid token/);
  t.mock.timers.tick(60_001);
  rejected("192.0.2.1", "API request GET /hello");
  assert.equal(lines.length, 3);
});
