import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { ConfigError, loadConfig, resolveConfig } from "../src/config.ts";
import { accountKey, cachedCertificate, cachePaths, prepareCache, writePrivateFile } from "../src/coordinator/acme-cache.ts";
import { explainAcmeError, type FailureContext } from "../src/coordinator/acme-errors.ts";
import { backoffDelay, renewalTime, RenewalSchedule } from "../src/coordinator/renewal.ts";
import { generateCertificate, type KeyPair } from "../src/tls/certs.ts";

// The parts of ACME that need no CA: when the coordinator asks (the renewal
// schedule, on mocked timers), what it accepts in [coordinator.acme], what it
// keeps on disk, and what a failure tells the operator. test/acme.test.ts
// runs the whole thing against pebble.

const DAY = 86_400_000;
const TOKEN = "0123456789abcdef-token";
const t0 = Date.UTC(2030, 0, 1);

function cert(fromMs: number, lifetimeMs: number, tag = "x"): KeyPair {
  return { key: "", cert: "", fingerprint: `sha256:${tag}`, subject: tag, selfSigned: false, validFrom: new Date(fromMs), validTo: new Date(fromMs + lifetimeMs) };
}

/** Lets the schedule's promise callbacks run (setImmediate is not mocked). */
const settle = () => new Promise((r) => setImmediate(r));

describe("renewal time and backoff", () => {
  test("a third of the lifetime left by default; renew_before when it is shorter than the lifetime", () => {
    const kp = cert(t0, 90 * DAY);
    assert.equal(renewalTime(kp, 0).at, t0 + 60 * DAY);
    assert.match(renewalTime(kp, 0).rule, /a third of its 7776000 s lifetime left/);
    assert.equal(renewalTime(kp, 7 * DAY).at, t0 + 83 * DAY);
    // Not shorter than the lifetime: renewing at once after every issuance would loop against the CA.
    const tooLong = renewalTime(kp, 90 * DAY);
    assert.equal(tooLong.at, t0 + 60 * DAY);
    assert.match(tooLong.rule, /renew_before 7776000000 ms is not shorter than the lifetime/);
  });

  test("backoff doubles from retry_delay up to retry_max_delay, jittered down by at most half", () => {
    assert.deepEqual([1, 2, 3, 4, 5, 6, 9].map((n) => backoffDelay(n, 1000, 10_000, () => 1)), [1000, 2000, 4000, 8000, 10_000, 10_000, 10_000]);
    assert.deepEqual([1, 2, 3, 5].map((n) => backoffDelay(n, 1000, 10_000, () => 0)), [500, 1000, 2000, 5000]);
    for (let i = 0; i < 100; i++) {
      const d = backoffDelay(3, 1000, 10_000);
      assert.ok(d >= 2000 && d <= 4000, String(d));
    }
  });
});

describe("RenewalSchedule on mocked timers", () => {
  test("no certificate: the first attempt is awaited; failures back off; success schedules the renewal at a third left, which then runs", async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: t0 });
    // An Error fails the attempt; a name is a 30-day certificate issued then.
    const outcomes: (string | Error)[] = [new Error("CA unreachable"), new Error("CA unreachable"), "first", "second"];
    const calls: number[] = [];
    const failed: [number, number][] = [];
    const issued: string[] = [];
    const s = new RenewalSchedule(undefined, {
      renewBefore: 0,
      retryDelay: 1000,
      retryMaxDelay: 60_000,
      random: () => 1,
      issue: async () => {
        calls.push(Date.now() - t0);
        const next = outcomes.shift()!;
        if (next instanceof Error) throw next;
        return cert(Date.now(), 30 * DAY, next);
      },
      onIssued: (kp) => issued.push(kp.subject),
      onFailed: (_err, failures, retryIn) => failed.push([failures, retryIn]),
    });
    await s.start();
    assert.deepEqual(calls, [0]);
    assert.deepEqual(failed, [[1, 1000]]);
    t.mock.timers.tick(999);
    assert.equal(calls.length, 1, "not before retry_delay");
    t.mock.timers.tick(1);
    await settle();
    assert.deepEqual(failed, [[1, 1000], [2, 2000]]);
    t.mock.timers.tick(2000);
    await settle();
    assert.deepEqual(calls, [0, 1000, 3000]);
    assert.deepEqual(issued, ["first"]);
    assert.equal(s.failures, 0, "a success resets the backoff");
    // 30 days: renewal 20 days after issuance, a wait longer than one setTimeout can hold (24.8 days is its limit; this is chained anyway).
    assert.equal(s.dueAt, t0 + 3000 + 20 * DAY);
    t.mock.timers.tick(20 * DAY - 1);
    await settle();
    assert.equal(calls.length, 3);
    t.mock.timers.tick(1);
    await settle();
    assert.equal(calls.length, 4);
    assert.deepEqual(issued, ["first", "second"]);
    assert.equal(s.dueAt, t0 + 3000 + 40 * DAY);
    s.close();
  });

  test("waits longer than 2^31 - 1 ms are chained, not fired at once", async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: t0 });
    // The mocked setTimeout has no such limit (Node's fires at once past it), so the delays asked for are what is checked.
    const mocked = globalThis.setTimeout;
    const delays: number[] = [];
    t.mock.method(globalThis, "setTimeout", ((fn: () => void, ms: number) => {
      delays.push(ms);
      return mocked(fn, ms);
    }) as typeof setTimeout);
    let calls = 0;
    const s = new RenewalSchedule(cert(t0, 90 * DAY), {
      renewBefore: 0,
      retryDelay: 1000,
      retryMaxDelay: 1000,
      issue: async () => {
        calls += 1;
        return cert(Date.now(), 90 * DAY);
      },
      onIssued: () => {},
      onFailed: () => {},
    });
    await s.start();
    assert.equal(calls, 0, "a cached certificate that is not due is used as it is");
    assert.equal(s.dueAt, t0 + 60 * DAY);
    t.mock.timers.tick(2 ** 31);
    await settle();
    assert.equal(calls, 0);
    t.mock.timers.tick(60 * DAY - 2 ** 31 - 1);
    await settle();
    assert.equal(calls, 0);
    t.mock.timers.tick(1);
    await settle();
    assert.equal(calls, 1);
    assert.ok(delays.length >= 3 && Math.max(...delays) <= 2 ** 31 - 1, `delays asked for: ${delays.join(", ")}`);
    s.close();
  });

  test("a cached certificate that is due renews in the background; close() stops every timer", async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: t0 + 25 * DAY });
    let release: (kp: KeyPair) => void = () => {};
    let calls = 0;
    const s = new RenewalSchedule(cert(t0, 30 * DAY), {
      renewBefore: 0,
      retryDelay: 1000,
      retryMaxDelay: 1000,
      issue: () => {
        calls += 1;
        return new Promise((r) => (release = r));
      },
      onIssued: () => assert.fail("closed: nothing is handed on"),
      onFailed: () => assert.fail("closed: nothing is retried"),
    });
    await s.start();
    assert.equal(calls, 1, "started without being awaited");
    s.close();
    release(cert(Date.now(), 30 * DAY));
    await settle();
    t.mock.timers.tick(40 * DAY);
    await settle();
    assert.equal(calls, 1);
    assert.equal(s.dueAt, undefined);
  });
});

describe("[coordinator.acme] validation", () => {
  const coordinator = (acme: Record<string, unknown>, extra: Record<string, unknown> = {}) => resolveConfig({ coordinator: { tokens: [TOKEN], acme, ...extra } }, "coordinator");
  const problems = (fn: () => unknown): string => {
    try {
      fn();
    } catch (err) {
      assert.ok(err instanceof ConfigError, String(err));
      return err.problems.join("\n");
    }
    assert.fail("expected a ConfigError");
  };

  test("defaults: Let's Encrypt, tls-alpn-01, the cache under /var/lib, renewal at a third left", () => {
    const c = coordinator({ domains: ["Coord.Example.org.", "coord.example.org"] }, { listen: "*:443" });
    assert.deepEqual(c.coordinator.acme, {
      domains: ["coord.example.org"],
      email: "",
      directory: "https://acme-v02.api.letsencrypt.org/directory",
      ca: "",
      cache: "/var/lib/natproxy/acme",
      challenge: "tls-alpn-01",
      http_listen: { host: "*", port: 80 },
      renew_before: 0,
      request_timeout: 30_000,
      poll_interval: 2_000,
      order_timeout: 300_000,
      retry_delay: 120_000,
      retry_max_delay: 3_600_000,
    });
    assert.deepEqual(c.warnings, []);
    assert.equal(resolveConfig({}, "reporter").coordinator.acme, undefined, "no table, no ACME");
  });

  test("acme and cert are mutually exclusive; names, directory, e-mail and timers are checked", () => {
    const text = problems(() =>
      coordinator({ domains: ["*.example.org", "192.0.2.1", "bad_name.example", ""], email: "nobody", directory: "http://ca.example/dir", ca: "/nonexistent/ca.pem", retry_delay: 5000, retry_max_delay: 1000, order_timeout: 100, poll_interval: 200 }, { cert: "/nonexistent/cert.pem" }),
    );
    for (const want of [
      /coordinator.acme: the certificate comes either from ACME or from coordinator.cert\/key, not both/,
      /domains\[0\]: "\*\.example\.org" is a wildcard; .*dns-01/,
      /domains\[1\]: "192\.0\.2\.1" is an IP address/,
      /domains\[2\]: "bad_name\.example" is not a DNS name/,
      /domains\[3\]: "" is not a DNS name/,
      /acme.email: expected an e-mail address, got "nobody"/,
      /acme.directory: an ACME directory is an https:\/\/ URL/,
      /acme.ca: cannot read "\/nonexistent\/ca.pem"/,
      /acme.retry_max_delay: must not be below coordinator.acme.retry_delay/,
      /acme.order_timeout: must not be below coordinator.acme.poll_interval/,
    ])
      assert.match(text, want);
    assert.match(problems(() => coordinator({})), /acme.domains: at least one DNS name/);
    assert.match(problems(() => coordinator({ domains: ["a.example"], challenge: "dns-01" })), /acme.challenge: expected one of "tls-alpn-01", "http-01"/);
    assert.match(problems(() => coordinator({ domains: ["a.example"], renew_after: 1 })), /unknown key "renew_after" in \[coordinator.acme\]/);
  });

  test("a warning when the CA's port (443 or 80) is not the one listened on", () => {
    assert.match(coordinator({ domains: ["a.example"] }).warnings.join(), /checks tls-alpn-01 on TCP port 443, and this coordinator listens on 8443/);
    assert.match(coordinator({ domains: ["a.example"], challenge: "http-01", http_listen: "*:8080" }).warnings.join(), /checks http-01 on TCP port 80, and the challenge listener is on 8080/);
    assert.deepEqual(coordinator({ domains: ["a.example"], challenge: "http-01" }).warnings, []);
  });

  test("the example file's [coordinator.acme] block, uncommented, is valid", () => {
    const example = readFileSync(join(import.meta.dirname, "..", "proxy.toml.example"), "utf8");
    const block = /^# \[coordinator\.acme\]\n(?:#.*\n)+/m.exec(example)?.[0];
    assert.ok(block, "proxy.toml.example has a commented [coordinator.acme] block");
    const toml = block.split("\n").map((l) => l.replace(/^# ?/, "")).filter((l) => !/^\s/.test(l) && /^(\[|[a-z_]+ =)/.test(l)).join("\n");
    const p = join(mkdtempSync(join(tmpdir(), "natproxy-acme-example-")), "acme.toml");
    writeFileSync(p, `[coordinator]\ntokens = ["${TOKEN}"]\nlisten = "*:443"\n${toml}\n`);
    const c = loadConfig({ path: p, role: "coordinator", env: {} });
    assert.deepEqual(c.coordinator.acme?.domains, ["coord.example.org"]);
    assert.equal(c.coordinator.acme?.challenge, "tls-alpn-01");
  });
});

describe("the cache", () => {
  const acme = (cache: string) => resolveConfig({ coordinator: { tokens: [TOKEN], listen: "*:443", acme: { domains: ["coord.example.org", "www.coord.example.org"], cache, directory: "https://ca.example:14000/acme/dir" } } }, "coordinator").coordinator.acme!;

  test("per directory, 0700; files 0600 and replaced whole; the account key made once", async () => {
    const root = mkdtempSync(join(tmpdir(), "natproxy-acme-cache-"));
    const paths = cachePaths(acme(join(root, "acme")));
    assert.equal(paths.dir, join(root, "acme", "ca.example_14000_acme_dir"));
    prepareCache(paths);
    assert.equal(statSync(paths.dir).mode & 0o777, 0o700);
    let made = 0;
    const create = async () => {
      made += 1;
      return (await generateCertificate()).key;
    };
    const first = await accountKey(paths, create, () => assert.fail("no warning for a 0600 key"));
    assert.equal(first.created, true);
    assert.equal(statSync(paths.accountKeyFile).mode & 0o777, 0o600);
    const second = await accountKey(paths, create, () => {});
    assert.deepEqual([second.created, second.pem, made], [false, first.pem, 1]);
    writePrivateFile(paths.certificateFile, "old");
    writePrivateFile(paths.certificateFile, "new");
    assert.equal(readFileSync(paths.certificateFile, "utf8"), "new");
    assert.equal(statSync(paths.certificateFile).mode & 0o777, 0o600);
  });

  test("a cached certificate is used only if it covers every name, matches its key and has not expired", async () => {
    const paths = cachePaths(acme(mkdtempSync(join(tmpdir(), "natproxy-acme-cache-"))));
    prepareCache(paths);
    const names = ["coord.example.org", "www.coord.example.org"];
    assert.equal(cachedCertificate(paths, names).why, "none cached yet");
    const good = await generateCertificate({ dnsNames: names, ipAddresses: [] });
    writePrivateFile(paths.certificateFile, `${good.key}\n${good.cert}`);
    assert.equal(cachedCertificate(paths, names).kp?.fingerprint, good.fingerprint);
    const partial = await generateCertificate({ dnsNames: ["coord.example.org"], ipAddresses: [] });
    writePrivateFile(paths.certificateFile, `${partial.key}\n${partial.cert}`);
    assert.equal(cachedCertificate(paths, names).why, "the cached one does not cover www.coord.example.org");
    const old = await generateCertificate({ dnsNames: names, ipAddresses: [], notBefore: new Date(Date.now() - 2 * DAY), notAfter: new Date(Date.now() - DAY) });
    writePrivateFile(paths.certificateFile, `${old.key}\n${old.cert}`);
    assert.match(cachedCertificate(paths, names).why, /^the cached one expired on /);
    writePrivateFile(paths.certificateFile, `${partial.key}\n${good.cert}`);
    assert.match(cachedCertificate(paths, names).why, /^the cached one is unusable \(.*does not belong to the certificate/);
  });

  test("a cache directory that cannot be made is refused with the fix", () => {
    const file = join(mkdtempSync(join(tmpdir(), "natproxy-acme-cache-")), "a-file");
    writeFileSync(file, "");
    assert.throws(() => prepareCache(cachePaths(acme(file))), /coordinator.acme.cache: cannot create ".*" \(ENOTDIR\); create it, owned by the user natproxy runs as \(systemd: StateDirectory=natproxy\)/);
  });
});

test("failures name what to fix", () => {
  const ctx: FailureContext = { stage: "account", problems: [], acme: { directory: "https://ca.example/dir", challenge: "tls-alpn-01", order_timeout: 300_000, request_timeout: 30_000 }, cacheFile: "/c/x.pem", timedOut: false };
  const say = (err: unknown, more: Partial<FailureContext> = {}) => explainAcmeError(err, { ...ctx, ...more }).message;
  assert.match(say(Object.assign(new Error("getaddrinfo ENOTFOUND ca.example"), { code: "ENOTFOUND" })), /^CA unreachable: ca\.example does not resolve here \(ENOTFOUND\)/);
  assert.match(say(Object.assign(new Error("timeout of 30000ms exceeded"), { code: "ECONNABORTED" })), /^CA unreachable: ca\.example did not answer within acme\.request_timeout \(30000 ms\)/);
  assert.match(say(new Error("Error creating new order :: too many certificates already issued"), { stage: "order" }), /^rate limit: /);
  assert.match(say(Object.assign(new Error("EACCES"), { code: "EACCES" }), { stage: "cache" }), /^cache: cannot write \/c\/x\.pem \(EACCES\)/);
  assert.match(say(new Error("x"), { stage: "challenge", problems: [{ domain: "a.example", type: "connection", detail: "Timeout during connect (likely firewall problem)" }] }), /^port: the CA could not connect to a\.example on TCP port 443 .*listen = "\*:443"/);
  assert.match(
    say(new Error("x"), { stage: "challenge", acme: { ...ctx.acme, challenge: "http-01" }, problems: [{ domain: "a.example", type: "connection", detail: "Connection refused" }] }),
    /^port: the CA could not connect to a\.example on TCP port 80 .*acme\.http_listen/,
  );
  assert.match(say(new Error("x"), { problems: [{ domain: "a.example", type: "dns", detail: "DNS problem: NXDOMAIN looking up A for a.example" }] }), /^DNS: the CA cannot resolve a\.example/);
  assert.match(say(new Error("x"), { problems: [{ domain: "a.example", type: "unauthorized", detail: "Incorrect validation certificate for tls-alpn-01 challenge" }] }), /^wrong answer: the CA reached a\.example:443/);
  assert.match(say(new Error("aborted"), { timedOut: true, stage: "challenge" }), /^no certificate within order_timeout \(300000 ms; still at the challenge step\)/);
});
