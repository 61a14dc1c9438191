#!/usr/bin/env node
import { cac } from "cac";
import { ConfigError, ROLES, loadConfig, type ConfigInput, type ResolvedConfig, type Role } from "./config.ts";
import { currentSearchContext, findConfig, missingConfigMessage, userConfigPath } from "./config-find.ts";
import { LOG_LEVELS, log, setLogLevel, type LogLevel } from "./log.ts";
import { reloadSignal, shutdownSignals } from "./signals.ts";
import { VERSION } from "./version.ts";

// The only module that exits the process or handles signals: roles return a
// close() and leave the decision to whoever started them.

interface Running {
  name: string;
  close(opts?: { graceMs?: number }): Promise<void>;
  /** Applies a re-read configuration; returns the keys that differ but need a restart. */
  reload?(cfg: ResolvedConfig): string[];
}

type Flags = Record<string, unknown>;

const num = (v: unknown): number | undefined => (v === undefined ? undefined : typeof v === "number" ? v : Number.isNaN(Number(v)) ? (v as number) : Number(v));
const str = (v: unknown): string | undefined => (v === undefined ? undefined : String(v));
const list = (v: unknown): string[] | undefined => (v === undefined ? undefined : (Array.isArray(v) ? v : [v]).map(String));

function common(flags: Flags): ConfigInput {
  return { log_level: flags.logLevel as LogLevel | undefined };
}

function localOverrides(f: Flags): ConfigInput {
  return {
    ...common(f),
    local: {
      listen: str(f.listen),
      coordinator: str(f.coordinator),
      token: str(f.token),
      token_file: str(f.tokenFile),
      reporter: str(f.reporter),
      tunnel_port: num(f.tunnelPort),
      allow_self_signed: f.allowSelfSigned === undefined ? undefined : Boolean(f.allowSelfSigned),
      ca: str(f.ca),
      fingerprint: str(f.fingerprint),
      connect_timeout: num(f.connectTimeout),
      tunnel: str(f.tunnel) as "auto" | undefined,
    },
  };
}

function coordinatorOverrides(f: Flags): ConfigInput {
  return {
    ...common(f),
    coordinator: { listen: str(f.listen), cert: str(f.cert), key: str(f.key), tokens: list(f.token), tokens_file: str(f.tokenFile), reporter: f.withReporter ? true : undefined },
    reporter: { listen: str(f.reporterListen) },
  };
}

function reporterOverrides(f: Flags): ConfigInput {
  return { ...common(f), reporter: { listen: str(f.listen), nat_keep_alive_interval: num(f.keepAliveInterval) } };
}

// Each role loads only its own modules: a coordinator never pays for the
// local proxy's HTTP client, nor a local proxy for certificate generation
// (in the bundle, esbuild evaluates a dynamically imported module on first use).
async function startRole(role: Role, cfg: ResolvedConfig): Promise<Running[]> {
  const { startReporter } = await import("./reporter/index.ts");
  if (role === "local") {
    const { startLocal } = await import("./local/index.ts");
    const l = await startLocal(cfg.local);
    return [{ name: "local proxy", close: (o) => l.close(o) }];
  }
  if (role === "reporter") {
    const r = await startReporter(cfg.reporter);
    return [{ name: "reporter", close: () => r.close() }];
  }
  const { startCoordinator } = await import("./coordinator/index.ts");
  const running: Running[] = [];
  try {
    const c = await startCoordinator(cfg.coordinator);
    running.push({ name: "coordinator", close: (o) => c.close(o), reload: (next) => c.reload(next.coordinator).map((k) => `[coordinator] ${k}`) });
    // The specification allows reporter and coordinator in one process; it
    // also gives address-restricted NATs a path in (same IP as the reporter).
    if (cfg.coordinator.reporter) {
      const r = await startReporter(cfg.reporter);
      running.push({ name: "reporter", close: () => r.close() });
    }
  } catch (err) {
    await Promise.allSettled(running.map((r) => r.close()));
    throw err;
  }
  return running;
}

// Without -c the first file found is used; with none, defaults and flags
// alone may still be enough (a reporter needs nothing), so only a config
// that fails validation says where it looked and how to make one.
function loadRoleConfig(role: Role, flags: Flags, overrides: ConfigInput): ResolvedConfig & { foundAt?: string } {
  const given = str(flags.config);
  const found = given === undefined ? findConfig(currentSearchContext()) : { path: given, searched: [] };
  try {
    return { ...loadConfig({ path: found.path, role, overrides }), foundAt: given === undefined ? found.path : undefined };
  } catch (err) {
    if (err instanceof ConfigError && found.path === undefined) throw new ConfigError("configuration", [...err.problems, missingConfigMessage(role, found.searched)]);
    throw err;
  }
}

async function run(role: Role, flags: Flags, overrides: ConfigInput): Promise<void> {
  const cfg = loadRoleConfig(role, flags, overrides);
  setLogLevel(cfg.log_level);
  if (cfg.foundAt !== undefined && !flags.check) log.info(`configuration: ${cfg.foundAt}`);
  if (flags.token !== undefined)
    log.warn("--token puts the token on the command line, where every user of this machine can read it (ps, /proc/<pid>/cmdline); use --token-file, the config file or the environment (NATPROXY_TOKEN for local, NATPROXY_TOKENS for the coordinator)");
  for (const w of cfg.warnings) log.warn(w);
  if (role === "local" && flags.check) {
    // The report is the output; the workflow's own log lines stay on stderr
    // and only when something is wrong.
    if (flags.logLevel === undefined) setLogLevel("error");
    const { runCheck } = await import("./local/check.ts");
    const report = await runCheck(cfg.local);
    process.stdout.write(`${report.lines.join("\n")}\n`);
    process.exit(report.ok ? 0 : 1);
  }
  // Handlers first: a signal that arrives while a role is still starting
  // must shut down what has started, not kill the process mid-way.
  let running: Running[] = [];
  let stopping = false;
  let graceMs = cfg.shutdown_timeout;
  const stop = (signal: NodeJS.Signals) => {
    if (stopping) {
      log.warn(`${signal} again: exiting now`);
      process.exit(130);
    }
    stopping = true;
    // Stop accepting at once, let live tunnels finish up to shutdown_timeout,
    // then cut what is left; a second signal cuts at once.
    log.info(`${signal}: shutting down (live tunnels get up to ${graceMs} ms; ${signal} again to stop now)`);
    Promise.allSettled(running.map((r) => r.close({ graceMs }))).then(() => process.exit(0));
  };
  for (const signal of shutdownSignals(process.platform)) process.on(signal, stop);
  // SIGHUP (systemctl reload) re-reads the file with the same flags and
  // environment and the same checks as at start; a file that fails them
  // changes nothing. (On Windows SIGHUP is the console closing: a shutdown.)
  const reload = reloadSignal(process.platform);
  if (reload) process.on(reload, () => {
    if (stopping) return;
    if (running.length === 0) {
      log.warn("SIGHUP while starting: ignored; send it again once the role is up");
      return;
    }
    let next: ResolvedConfig;
    const restart: string[] = [];
    try {
      next = loadConfig({ path: str(flags.config), role, overrides });
      for (const r of running) restart.push(...(r.reload?.(next) ?? []));
    } catch (err) {
      log.error(`SIGHUP: configuration not reloaded; the running one stays in force. ${(err as Error).message}`);
      return;
    }
    for (const w of next.warnings) log.warn(w);
    setLogLevel(next.log_level);
    graceMs = next.shutdown_timeout;
    // Sections whose role applies its configuration only at start.
    const fixed = role === "coordinator" ? (cfg.coordinator.reporter ? (["reporter"] as const) : []) : ([role] as const);
    for (const section of fixed) restart.push(...changedKeys(section, cfg[section], next[section]));
    if (restart.length) log.warn(`SIGHUP: changed, but takes a restart to apply: ${restart.join(", ")}`);
    const from = str(flags.config) ?? "the environment";
    if (running.some((r) => r.reload)) log.info(`SIGHUP: configuration reloaded from ${from}`);
    else log.info(`SIGHUP: log_level and shutdown_timeout reloaded from ${from}; the ${running[0].name} takes its other settings only at start`);
  });
  const started = await startRole(role, cfg);
  running = started;
  if (stopping) await Promise.allSettled(started.map((r) => r.close())).then(() => process.exit(0));
}

async function main(argv: string[]): Promise<void> {
  const cli = cac("natproxy");
  cli.option("-c, --config <file>", "TOML configuration file (see proxy.toml.example)");
  cli.option("--log-level <level>", `one of ${LOG_LEVELS.join(", ")}`);

  cli
    .command("local", "run the local proxy: an HTTP proxy for your browser, tunnelled through the coordinator")
    .option("--listen <host:port>", "browser-facing proxy address (default 127.0.0.1:8080)")
    .option("--coordinator <url>", "coordinator URL, https://host:port")
    .option("--token <token>", "token the coordinator accepts (visible in ps: prefer --token-file, token_file or NATPROXY_TOKEN)")
    .option("--token-file <file>", "file holding the token (one line)")
    .option("--reporter <host:port>", "STUN-over-TCP reporter (default: coordinator host, port 3478)")
    .option("--tunnel-port <port>", "local tunnel port P (0 = any)")
    .option("--allow-self-signed", "accept a coordinator certificate no trusted CA signed")
    .option("--ca <file>", "extra CA bundle (PEM) to trust for the coordinator")
    .option("--fingerprint <sha256:...>", "pin the coordinator certificate")
    .option("--connect-timeout <ms>", "how long a browser connection waits for its tunnel, connect-back or outbound, start to answer ([local] connect_timeout)")
    .option("--tunnel <mode>", "auto (default), connect-back or outbound")
    .option("--check", "run the start-up workflow once, print what it found (address, NAT, path, problems) and exit: 0 = a working path, 1 = none")
    .example("natproxy local -c proxy.toml")
    .example("natproxy local -c proxy.toml --check")
    .action((flags: Flags) => run("local", flags, localOverrides(flags)));

  cli
    .command("coordinator", "run the coordinator: the HTTPS server outside the firewall")
    .option("--cert <file>", "certificate PEM (may also hold the key); without one, a self-signed certificate is generated")
    .option("--key <file>", "private key PEM, if not inside --cert")
    .option("--listen <host:port>", "HTTPS API address (default *:8443)")
    .option("--token <token>", "accepted token (repeatable; visible in ps: prefer --token-file, tokens_file or NATPROXY_TOKENS)")
    .option("--token-file <file>", "file holding the accepted tokens, one per line")
    .option("--with-reporter", "also run the reporter in this process")
    .option("--reporter-listen <host:port>", "reporter address when run inside the coordinator")
    .example("natproxy coordinator --cert cert.pem --key key.pem -c proxy.toml")
    .action((flags: Flags) => run("coordinator", flags, coordinatorOverrides(flags)));

  cli
    .command("reporter", "run the IP:port reporter (STUN Binding over TCP, with NAT keepalives)")
    .option("--listen <host:port>", "address (default *:3478)")
    .option("--keep-alive-interval <ms>", "keepalive period (env NAT_KEEP_ALIVE_INTERVAL also sets it)")
    .example("natproxy reporter")
    .action((flags: Flags) => run("reporter", flags, reporterOverrides(flags)));

  cli
    .command("init <role>", "write a commented first config for local, coordinator or reporter (a coordinator also gets a token and a certificate)")
    .option("--force", "replace an existing file")
    .option("--public-host <name>", "coordinator only: the name or address local proxies dial (default: this host's name)")
    .example("natproxy init coordinator --public-host coord.example.net")
    .example("natproxy init local")
    .action(async (role: string, flags: Flags) => {
      if (!(ROLES as readonly string[]).includes(role)) throw new UsageError(`init: unknown role "${role}"; expected local, coordinator or reporter`);
      const { runInit, InitError } = await import("./init.ts");
      const file = str(flags.config) ?? userConfigPath(currentSearchContext());
      try {
        const r = await runInit({ role: role as Role, file, force: Boolean(flags.force), publicHost: str(flags.publicHost) });
        process.stdout.write(`${r.lines.join("\n")}\n`);
      } catch (err) {
        if (err instanceof InitError) throw new ConfigError("natproxy init", [err.message]);
        throw err;
      }
    });

  cli.usage("<local|coordinator|reporter|init> [options]");
  cli.help();
  cli.version(VERSION);
  cli.parse(argv, { run: false });
  if (cli.options.help || cli.options.version) return;
  if (!cli.matchedCommand) {
    if (cli.args.length) throw new UsageError(`unknown command "${cli.args[0]}"; the commands are local, coordinator, reporter and init`);
    cli.outputHelp();
    throw new UsageError("a command is required");
  }
  await cli.runMatchedCommand();
}

class UsageError extends Error {}

/** The keys of one section that differ between two configurations, as "[section] key". */
function changedKeys(section: string, was: object, now: object): string[] {
  const a = was as Record<string, unknown>;
  const b = now as Record<string, unknown>;
  return Object.keys(b)
    .filter((k) => JSON.stringify(a[k]) !== JSON.stringify(b[k]))
    .map((k) => `[${section}] ${k}`);
}

function handleError(err: unknown): never {
  if (err instanceof ConfigError) {
    process.stderr.write(`natproxy: ${err.message}\n`);
    process.exit(2);
  }
  if (err instanceof UsageError || (err as Error)?.name === "CACError") {
    process.stderr.write(`natproxy: ${(err as Error).message}\nRun "natproxy --help" for usage.\n`);
    process.exit(2);
  }
  const e = err as NodeJS.ErrnoException;
  const msg = e?.code === "EADDRINUSE" || e?.code === "EACCES" ? `cannot listen: ${e.message}` : (e?.message ?? String(err));
  log.error(msg);
  if (process.env.NATPROXY_DEBUG) log.error(err);
  process.exit(1);
}

// One misbehaving peer must never take the process down; anything that still
// escapes is a bug, logged loudly, and the process keeps serving.
process.on("uncaughtException", (err) => log.error("BUG, uncaught exception (please report):", err));
process.on("unhandledRejection", (err) => log.error("BUG, unhandled rejection (please report):", err));

main(process.argv).catch(handleError);
