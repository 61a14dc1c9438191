import { resolveConfig, type ConfigInput } from "../../src/config.ts";
import { startCoordinator, type Coordinator } from "../../src/coordinator/index.ts";
import { startLocal, type Local } from "../../src/local/index.ts";
import { setLogLevel } from "../../src/log.ts";
import { startReporter } from "../../src/reporter/index.ts";
import { testPki, type TestPki } from "./pki.ts";

export const TOKEN = "test-token-0123456789abcdef";
/** The tests' targets live on loopback, which the coordinator refuses by default. */
export const LOOPBACK_TARGETS = ["127.0.0.1", "::1"];
/** The tests' local proxies, too, are on loopback, where the coordinator refuses to connect back by default. */
export const LOOPBACK_CONNECT_BACK = ["127.0.0.1", "::1"];

// Tests read results, not logs; NATPROXY_TEST_LOG=debug shows them.
setLogLevel((process.env.NATPROXY_TEST_LOG as "debug") ?? "silent");

export interface Stack {
  pki: TestPki;
  reporter: { addresses: { port: number }[]; close(): Promise<void> };
  coordinator: Coordinator;
  local: Local;
  proxyPort: number;
  close(): Promise<void>;
}

export interface StackOptions {
  local?: ConfigInput["local"];
  coordinator?: ConfigInput["coordinator"];
  reporter?: ConfigInput["reporter"];
}

/** A coordinator on loopback with the test PKI and token, allowed to dial the tests' loopback targets and connect back to loopback. */
export function startTestCoordinator(pki: TestPki, coordinator: ConfigInput["coordinator"] = {}): Promise<Coordinator> {
  return startCoordinator(
    resolveConfig({ coordinator: { listen: "127.0.0.1:0", cert: pki.combinedFile, tokens: [TOKEN], allow_targets: LOOPBACK_TARGETS, allow_connect_back: LOOPBACK_CONNECT_BACK, ...coordinator } }, "coordinator").coordinator,
  );
}

/** All three roles on loopback, through their startX(config) entry points. */
export async function startStack(opts: StackOptions = {}): Promise<Stack> {
  const pki = await testPki();
  const started: { close(): Promise<void> }[] = [];
  try {
    const rcfg = resolveConfig({ reporter: { listen: "127.0.0.1:0", nat_keep_alive_interval: 2000, ...opts.reporter } }, "reporter");
    const reporter = await startReporter(rcfg.reporter);
    started.push(reporter);
    const coordinator = await startTestCoordinator(pki, opts.coordinator);
    started.push(coordinator);
    const local = await startLocalFor(coordinator.addresses[0].port, reporter.addresses[0].port, pki, opts.local);
    started.push(local);
    return {
      pki,
      reporter,
      coordinator,
      local,
      proxyPort: local.proxyAddress.port,
      async close() {
        for (const s of started.reverse()) await s.close();
      },
    };
  } catch (err) {
    for (const s of started.reverse()) await s.close();
    throw err;
  }
}

export async function startLocalFor(coordinatorPort: number, reporterPort: number, pki: TestPki, local: ConfigInput["local"] = {}): Promise<Local> {
  const cfg = resolveConfig(
    {
      local: {
        listen: "127.0.0.1:0",
        coordinator: `https://localhost:${coordinatorPort}`,
        token: TOKEN,
        reporter: `127.0.0.1:${reporterPort}`,
        ca: pki.caFile,
        connect_timeout: 5000,
        reporter_retries: 0,
        ...local,
      },
    },
    "local",
  );
  return startLocal(cfg.local);
}
