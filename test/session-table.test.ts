import assert from "node:assert/strict";
import type { TLSSocket } from "node:tls";
import { test } from "node:test";
import { NatproxyError } from "../src/errors.ts";
import { SessionTable } from "../src/local/tunnel/connect-back.ts";

const fakeSocket = {} as TLSSocket;

test("a delivered session resolves once and leaves the table", async () => {
  const t = new SessionTable();
  const p = t.expect("a", 10_000);
  assert.equal(t.size, 1);
  assert.equal(t.deliver("a", fakeSocket), true);
  assert.equal(await p, fakeSocket);
  assert.equal(t.size, 0);
  assert.equal(t.deliver("a", fakeSocket), false, "a second connect-back for the same id finds nobody");
});

test("unknown ids are refused; duplicates are refused", async () => {
  const t = new SessionTable();
  assert.equal(t.deliver("nope", fakeSocket), false);
  const p = t.expect("dup", 10_000);
  await assert.rejects(t.expect("dup", 10_000), /exists/);
  t.fail("dup", new Error("done"));
  await assert.rejects(p, /done/);
});

test("a session times out with CONNECT_BACK_TIMEOUT and is removed", async () => {
  const t = new SessionTable();
  const t0 = performance.now();
  await assert.rejects(t.expect("slow", 30), (err: NatproxyError) => err.code === "CONNECT_BACK_TIMEOUT" && err.status === 504);
  assert.ok(performance.now() - t0 >= 25);
  assert.equal(t.size, 0);
  assert.equal(t.deliver("slow", fakeSocket), false);
});

test("fail and failAll reject waiting sessions with the given reason", async () => {
  const t = new SessionTable();
  const ps = ["x", "y", "z"].map((id) => t.expect(id, 10_000));
  t.fail("x", new NatproxyError("TARGET_REFUSED", "x:1"));
  await assert.rejects(ps[0], (e: NatproxyError) => e.code === "TARGET_REFUSED");
  t.failAll(new NatproxyError("SHUTTING_DOWN"));
  for (const p of ps.slice(1)) await assert.rejects(p, (e: NatproxyError) => e.code === "SHUTTING_DOWN");
  assert.equal(t.size, 0);
});
