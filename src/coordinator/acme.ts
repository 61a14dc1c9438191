import http from "node:http";
import https from "node:https";
import tls from "node:tls";
import type { Authorization, Client, Order } from "acme-client";
import type { AcmeConfig } from "../config.ts";
import { exposureWarning, readBoundedFile } from "../files.ts";
import { closeServer, deadlineCheckInterval, listen } from "../listen.ts";
import type { roleLogger } from "../log.ts";
import { generateCertificate, loadKeyPair, type KeyPair } from "../tls/certs.ts";
import { accountKey, cachedCertificate, cachePaths, prepareCache, writePrivateFile, type AcmeCache } from "./acme-cache.ts";
import { explainAcmeError, type ChallengeProblem } from "./acme-errors.ts";
import { RenewalSchedule } from "./renewal.ts";
import type { CertificateSource } from "./certificates.ts";

// The coordinator as its own ACME client (RFC 8555, through acme-client): it
// orders a certificate for acme.domains, answers the CA's challenge itself
// (TLS-ALPN-01 on its HTTPS port, RFC 8737, or HTTP-01 on http_listen) and
// hands every new certificate to the servers without a restart.

type Log = ReturnType<typeof roleLogger>;
type AcmeModule = typeof import("acme-client");
/** Challenge responses being served: TLS-ALPN-01 by domain, HTTP-01 by token. */
interface Answers {
  alpnAnswers: Map<string, tls.SecureContext>;
  httpAnswers: Map<string, string>;
}

export const ACME_TLS_ALPN = "acme-tls/1";

/** What the challenge listener needs from [coordinator] (an HTTP request's deadlines, as on the API). */
export interface ChallengeTimeouts {
  request_timeout: number;
  handshake_timeout: number;
  keep_alive_timeout: number;
}

export async function openAcme(acme: AcmeConfig, timeouts: ChallengeTimeouts, log: Log): Promise<CertificateSource> {
  const cache = cachePaths(acme);
  prepareCache(cache);
  const cached = cachedCertificate(cache, acme.domains);
  // Until the CA has issued one, the HTTPS port must still complete handshakes
  // (TLS-ALPN-01 validation arrives there): local proxies refuse this one.
  const placeholder = cached.kp ? undefined : await generateCertificate({ commonName: acme.domains[0], dnsNames: acme.domains, ipAddresses: [], days: 7 });
  let current = cached.kp ?? placeholder!;
  const exposed = cached.kp ? exposureWarning(cache.certificateFile, "the coordinator's private key") : undefined;
  if (exposed) log.warn(exposed);
  if (cached.kp) log.info(`ACME: using the cached certificate for ${acme.domains.join(", ")} (${cached.kp.fingerprint}, valid until ${cached.kp.validTo.toISOString()})`);
  else log.info(`ACME: no certificate for ${acme.domains.join(", ")} yet (${cached.why}); serving a self-signed placeholder until ${acme.directory} issues one`);

  const listeners = new Set<(kp: KeyPair) => void>();
  const alpnAnswers = new Map<string, tls.SecureContext>();
  const httpAnswers = new Map<string, string>();
  const issuer = new AcmeIssuer(acme, cache, log, { alpnAnswers, httpAnswers });
  const schedule = new RenewalSchedule(cached.kp, {
    renewBefore: acme.renew_before,
    retryDelay: acme.retry_delay,
    retryMaxDelay: acme.retry_max_delay,
    issue: () => issuer.issue(),
    onIssued(kp, next) {
      current = kp;
      log.info(`ACME: certificate issued in ${issuer.lastMs} ms for ${acme.domains.join(", ")} (${kp.fingerprint}, valid until ${kp.validTo.toISOString()}); serving it now; renewal at ${new Date(next.at).toISOString()} (${next.rule})`);
      for (const fn of listeners) fn(kp);
    },
    onFailed(err, failures, retryIn) {
      const unusable = current === placeholder || current.validTo.getTime() <= Date.now();
      const serving = current === placeholder ? "local proxies refuse the placeholder until then" : unusable ? "the served certificate has EXPIRED" : `still serving the current certificate (valid until ${current.validTo.toISOString()})`;
      (unusable ? log.error : log.warn)(`ACME: no certificate for ${acme.domains.join(", ")} (attempt ${failures}): ${err.message}; retrying in ${retryIn < 10_000 ? `${retryIn} ms` : `${Math.round(retryIn / 1000)} s`}; ${serving}`);
    },
  });
  let httpServer: http.Server | undefined;
  let closed = false;
  return {
    current: () => current,
    onChange: (fn) => void listeners.add(fn),
    serverOptions: acme.challenge === "tls-alpn-01" ? { ALPNCallback: alpnCallback(alpnAnswers) } : {},
    attach(server) {
      if (acme.challenge !== "tls-alpn-01") return;
      // RFC 8737: the validator sends nothing after the handshake and closes.
      server.on("secureConnection", function closeAcmeValidation(socket: tls.TLSSocket) {
        if (socket.alpnProtocol === ACME_TLS_ALPN) socket.end();
      });
    },
    async start() {
      if (acme.challenge === "http-01") {
        httpServer = challengeServer(httpAnswers, timeouts, log);
        const at = await listen(httpServer, acme.http_listen).catch((err: NodeJS.ErrnoException) => {
          throw new Error(`coordinator.acme.http_listen: cannot listen on ${acme.http_listen.host}:${acme.http_listen.port} for http-01 (${err.code ?? err.message}); ${err.code === "EACCES" ? "ports below 1024 need root or CAP_NET_BIND_SERVICE, or use " : "free the port, or use "}challenge = "tls-alpn-01"`, { cause: err });
        });
        log.info(`ACME: http-01 challenge listener on ${at.map((a) => `${a.address}:${a.port}`).join(", ")}`);
      }
      await schedule.start();
    },
    async close() {
      if (closed) return;
      closed = true;
      schedule.close();
      issuer.abort();
      if (httpServer) {
        const closing = closeServer(httpServer);
        httpServer.closeAllConnections();
        await closing;
      }
    },
  };
}

/**
 * Picks acme-tls/1 only for a name with a pending challenge and gives that
 * one handshake the challenge certificate (tlsSocket.setKeyCert, made for
 * this); every other client gets http/1.1 and the served certificate.
 */
function alpnCallback(answers: Map<string, tls.SecureContext>) {
  return function selectProtocol(this: tls.TLSSocket, { servername, protocols }: { servername: string; protocols: string[] }): string | undefined {
    const answer = servername ? answers.get(servername.toLowerCase()) : undefined;
    if (answer && protocols.includes(ACME_TLS_ALPN)) {
      this.setKeyCert(answer);
      return ACME_TLS_ALPN;
    }
    // The API speaks nothing else; a client that offers only other protocols
    // gets the no_application_protocol alert, as without this callback.
    return protocols.includes("http/1.1") ? "http/1.1" : undefined;
  };
}

function challengeServer(answers: Map<string, string>, t: ChallengeTimeouts, log: Log): http.Server {
  const headersTimeout = Math.min(t.request_timeout, t.handshake_timeout);
  const server = http.createServer(
    { requestTimeout: t.request_timeout, headersTimeout, keepAliveTimeout: t.keep_alive_timeout, connectionsCheckingInterval: deadlineCheckInterval(headersTimeout) },
    function answerHttpChallenge(req, res) {
      const token = /^\/\.well-known\/acme-challenge\/([A-Za-z0-9_-]+)$/.exec(req.url ?? "")?.[1];
      const answer = token && (req.method === "GET" || req.method === "HEAD") ? answers.get(token) : undefined;
      req.resume();
      res.writeHead(answer ? 200 : 404, { "Content-Type": "text/plain", "Content-Length": Buffer.byteLength(answer ?? "not found\n") });
      res.end(req.method === "HEAD" ? undefined : (answer ?? "not found\n"));
      if (answer) log.debug(`ACME: answered the http-01 challenge for ${req.socket.remoteAddress}`);
    },
  );
  server.on("clientError", function dropBadChallengeClient(_err, socket) {
    socket.destroy();
  });
  return server;
}

class AcmeIssuer {
  readonly #acme: AcmeConfig;
  readonly #cache: AcmeCache;
  readonly #log: Log;
  readonly #answers: Answers;
  #module: AcmeModule | undefined;
  #client: Client | undefined;
  #registered = false;
  #abort = new AbortController();
  /** How long the last successful issuance took, account to certificate. */
  lastMs = 0;

  constructor(acme: AcmeConfig, cache: AcmeCache, log: Log, answers: Answers) {
    this.#acme = acme;
    this.#cache = cache;
    this.#log = log;
    this.#answers = answers;
  }

  abort(): void {
    this.#abort.abort(new Error("the coordinator is closing"));
  }

  /** One order, from account to certificate, within order_timeout; every failure says what to fix. */
  async issue(): Promise<KeyPair> {
    const t0 = performance.now();
    const deadline = AbortSignal.any([this.#abort.signal, AbortSignal.timeout(this.#acme.order_timeout)]);
    let stage = "setup";
    const problems: ChallengeProblem[] = [];
    try {
      const kp = await Promise.race([
        this.#order(deadline, (s) => (stage = s), problems),
        new Promise<never>((_, reject) => {
          const fail = () => reject(deadline.reason);
          if (deadline.aborted) fail();
          else deadline.addEventListener("abort", fail, { once: true });
        }),
      ]);
      this.lastMs = Math.round(performance.now() - t0);
      return kp;
    } catch (err) {
      throw explainAcmeError(err, { stage, problems, acme: this.#acme, cacheFile: this.#cache.certificateFile, timedOut: deadline.aborted && !this.#abort.signal.aborted });
    } finally {
      this.#answers.alpnAnswers.clear();
      this.#answers.httpAnswers.clear();
    }
  }

  async #order(signal: AbortSignal, at: (stage: string) => void, problems: ChallengeProblem[]): Promise<KeyPair> {
    const acme = this.#acme;
    const lib = await this.#load();
    if (!this.#client) {
      at("account key");
      const key = await accountKey(this.#cache, async () => (await lib.crypto.createPrivateEcdsaKey()).toString(), (w) => this.#log.warn(w));
      this.#client = new lib.Client({
        directoryUrl: acme.directory,
        accountKey: key.pem,
        // acme-client polls a pending challenge or order with these; a
        // constant interval, as many times as order_timeout allows.
        backoffMin: acme.poll_interval,
        backoffMax: acme.poll_interval,
        backoffAttempts: Math.max(1, Math.ceil(acme.order_timeout / acme.poll_interval)),
      });
      if (key.created) this.#log.info(`ACME: made a new account key, ${this.#cache.accountKeyFile}`);
    }
    const client = this.#client;
    if (!this.#registered) {
      at("account");
      // Configuring acme means agreeing to the CA's terms of service. With a
      // key it knows, the CA answers with the existing account.
      await client.createAccount({ termsOfServiceAgreed: true, ...(acme.email ? { contact: [`mailto:${acme.email}`] } : {}) });
      this.#registered = true;
    }
    signal.throwIfAborted();
    at("order");
    const order = await client.createOrder({ identifiers: acme.domains.map((value) => ({ type: "dns", value })) });
    const authorizations = await client.getAuthorizations(order);
    signal.throwIfAborted();
    at("challenge");
    await Promise.all(authorizations.map((authz) => this.#authorize(client, lib, order, authz, signal, problems)));
    signal.throwIfAborted();
    at("finalize");
    const key = (await lib.crypto.createPrivateEcdsaKey()).toString();
    const [, csr] = await lib.crypto.createCsr({ commonName: acme.domains[0].length <= 64 ? acme.domains[0] : undefined, altNames: acme.domains }, key);
    const finalized = await client.finalizeOrder(order, csr);
    const chain = await client.getCertificate(finalized);
    signal.throwIfAborted();
    at("cache");
    writePrivateFile(this.#cache.certificateFile, `${key.trim()}\n${chain.trim()}\n`);
    // Read back as a start would read it: the key must match the chain's leaf.
    return loadKeyPair(this.#cache.certificateFile);
  }

  async #authorize(client: Client, lib: AcmeModule, order: Order, authz: Authorization, signal: AbortSignal, problems: ChallengeProblem[]): Promise<void> {
    if (authz.status === "valid") return;
    const name = authz.identifier.value.toLowerCase();
    const challenge = authz.challenges.find((c) => c.type === this.#acme.challenge);
    if (!challenge) {
      problems.push({ domain: name, detail: `the CA offers no ${this.#acme.challenge} challenge for ${name} (only ${authz.challenges.map((c) => c.type).join(", ")}); set acme.challenge to one it offers`, type: "unsupported" });
      throw new Error(problems.at(-1)!.detail);
    }
    const keyAuthorization = await client.getChallengeKeyAuthorization(challenge);
    // acme-client's types know only http-01 and dns-01.
    if ((challenge.type as string) === "tls-alpn-01") {
      const [key, cert] = await lib.crypto.createAlpnCertificate(authz, keyAuthorization, await lib.crypto.createPrivateEcdsaKey());
      this.#answers.alpnAnswers.set(name, tls.createSecureContext({ key, cert }));
    } else {
      this.#answers.httpAnswers.set(challenge.token, keyAuthorization);
    }
    try {
      signal.throwIfAborted();
      await client.completeChallenge(challenge);
      await client.waitForValidStatus(challenge);
    } catch (err) {
      // The CA's verdict is on the challenge (RFC 8555 §8: its "error"); the
      // rejection above only carries the text.
      const fresh = await client.getAuthorizations(order).catch(() => [] as Authorization[]);
      const seen = fresh.find((a) => a.identifier.value.toLowerCase() === name)?.challenges.find((c) => c.type === challenge.type);
      const error = (seen as { error?: { type?: string; detail?: string } } | undefined)?.error;
      problems.push({ domain: name, type: error?.type?.replace("urn:ietf:params:acme:error:", "") ?? "", detail: error?.detail ?? (err as Error).message });
      throw err;
    } finally {
      this.#answers.alpnAnswers.delete(name);
      if (challenge.type === "http-01") this.#answers.httpAnswers.delete(challenge.token);
    }
  }

  /** acme-client (with axios and its crypto) is loaded only by a coordinator that uses ACME. */
  async #load(): Promise<AcmeModule> {
    if (this.#module) return this.#module;
    const lib = await import("acme-client");
    let extraCa: string | undefined;
    try {
      extraCa = this.#acme.ca ? readBoundedFile(this.#acme.ca) : undefined;
    } catch (err) {
      throw new Error(`coordinator.acme.ca: cannot read "${this.#acme.ca}" (${(err as Error).message})`, { cause: err });
    }
    // acme-client talks through one axios instance of its own, so these are
    // per process: one coordinator runs per process.
    lib.axios.defaults.httpsAgent = new https.Agent(extraCa ? { ca: [...tls.rootCertificates, extraCa] } : {});
    lib.axios.defaults.timeout = this.#acme.request_timeout;
    // Far above any directory, order or certificate chain.
    lib.axios.defaults.maxContentLength = 1024 * 1024;
    // Its own retries wait 5 s and more per request with no jitter; failures
    // go to the renewal schedule instead, which backs off from retry_delay.
    (lib.axios.defaults as { acmeSettings?: { retryMaxAttempts: number } }).acmeSettings!.retryMaxAttempts = 0;
    // acme-client 5.4's response interceptor reads error.response.config of a
    // failure that has no response (refused, unresolved, untrusted, timed
    // out) and throws a TypeError in place of it; an error without `config`
    // passes through it as it is, code and all.
    const { default: axios } = await import("axios");
    const httpAdapter = axios.getAdapter("http");
    lib.axios.defaults.adapter = async function keepNetworkErrors(config) {
      try {
        return await httpAdapter(config);
      } catch (err) {
        const e = err as NodeJS.ErrnoException & { response?: unknown };
        if (e.response !== undefined) throw err;
        throw Object.assign(new Error(e.message, { cause: err }), { code: e.code });
      }
    };
    lib.setLogger((line) => this.#log.trace(`acme-client: ${line}`));
    this.#module = lib;
    return lib;
  }
}
