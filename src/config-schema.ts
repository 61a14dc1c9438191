import { z } from "zod";
import { parseHostPort, type HostPort } from "./address.ts";
import { LOG_LEVELS } from "./log.ts";

// The config file's schema: every key, its type, range and default. What a
// key means is in proxy.toml.example; which timers and limits it sets, in
// ARCHITECTURE.md. Validation across keys (files, tokens, rules) is in
// config.ts.

// Durations are integer milliseconds; a day is the longest any timer may be.
const ms = (fallback: number) => z.number().int().min(1).max(86_400_000).default(fallback);
const count = (fallback: number, max: number) => z.number().int().min(0).max(max).default(fallback);

// "*" (or an empty host) means every address, IPv6 and IPv4 alike: Node then
// listens on :: dual-stack, and on 0.0.0.0 where the host has no IPv6.
const listenAddress = (fallback: string) => z.string().default(fallback).transform(toListenAddress);

/** A listener that is off unless given an address: "" (the default) is off. */
const optionalListenAddress = () =>
  z
    .string()
    .default("")
    .transform((text, ctx): HostPort | undefined => (text === "" ? undefined : toListenAddress(text, ctx)));

function toListenAddress(text: string, ctx: z.RefinementCtx): HostPort {
  try {
    const star = text.startsWith("*:");
    const hp = parseHostPort(star ? `0.0.0.0:${text.slice(2)}` : text);
    return star ? { host: "*", port: hp.port } : hp;
  } catch (err) {
    ctx.addIssue({ code: "custom", message: `expected "host:port", "[ipv6]:port" or "*:port" (${(err as Error).message})` });
    return z.NEVER;
  }
}

const localSchema = z.strictObject({
  listen: listenAddress("127.0.0.1:8080"),
  metrics_listen: optionalListenAddress(),
  coordinator: z.string().default(""),
  token: z.string().default(""),
  token_file: z.string().default(""),
  reporter: z.string().default(""),
  tunnel_port: z.number().int().min(0).max(65535).default(0),
  allow_self_signed: z.boolean().default(false),
  ca: z.string().default(""),
  fingerprint: z.string().default(""),
  nat_keep_alive_interval: ms(15_000),
  tunnel_idle_timeout: ms(60_000),
  connect_timeout: ms(10_000),
  handshake_timeout: ms(10_000),
  hello_timeout: ms(10_000),
  tunnel: z.enum(["auto", "connect-back", "outbound"]).default("auto"),
  probe_timeout: ms(3_000),
  probe_interval: ms(60_000),
  connect_back_grace: ms(1_500),
  pool_hedge_delay: ms(1_500),
  reporter_timeout: ms(5_000),
  reporter_retries: count(5, 1000),
  retry_delay: ms(500),
  retry_max_delay: ms(30_000),
  session_idle_timeout: ms(600_000),
  fin_timeout: ms(30_000),
  pool_idle_timeout: ms(30_000),
  pool_size: z.number().int().min(0).max(64).default(4),
  optimistic_connect: z.boolean().default(true),
  max_header_size: z.number().int().min(1024).max(1_048_576).default(65_536),
  max_pending: z.number().int().min(1).max(100_000).default(256),
  max_tunnel_handshakes: z.number().int().min(1).max(100_000).default(256),
  users: z.array(z.string()).default([]),
});

// [coordinator.acme]: present means the coordinator gets its certificate from an ACME CA.
const acmeSchema = z.strictObject({
  domains: z.array(z.string()).default([]),
  email: z.string().default(""),
  directory: z.string().default("https://acme-v02.api.letsencrypt.org/directory"),
  ca: z.string().default(""),
  cache: z.string().default("/var/lib/natproxy/acme"),
  challenge: z.enum(["tls-alpn-01", "http-01"]).default("tls-alpn-01"),
  http_listen: listenAddress("*:80"),
  // Up to a year: certificates live for months. 0 = when a third of the lifetime is left.
  renew_before: z.number().int().min(0).max(31_536_000_000).default(0),
  request_timeout: ms(30_000),
  poll_interval: ms(2_000),
  order_timeout: ms(300_000),
  retry_delay: ms(120_000),
  retry_max_delay: ms(3_600_000),
});

const coordinatorSchema = z.strictObject({
  listen: listenAddress("*:8443"),
  metrics_listen: optionalListenAddress(),
  cert: z.string().default(""),
  key: z.string().default(""),
  tokens: z.array(z.string()).default([]),
  tokens_file: z.string().default(""),
  reporter: z.boolean().default(false),
  connect_back: z.enum(["same-ip", "any"]).default("same-ip"),
  proxy_protocol: z.boolean().default(false),
  max_sessions: z.number().int().min(1).max(1_000_000).default(4096),
  max_sessions_per_token: z.number().int().min(1).max(1_000_000).default(1024),
  max_unauthenticated_per_ip: z.number().int().min(1).max(1_000_000).default(1024),
  allow_targets: z.array(z.string()).default([]),
  deny_targets: z.array(z.string()).default([]),
  allow_connect_back: z.array(z.string()).default([]),
  own_addresses: z.array(z.string()).default([]),
  connect_timeout: ms(10_000),
  handshake_timeout: ms(10_000),
  session_idle_timeout: ms(600_000),
  fin_timeout: ms(30_000),
  request_timeout: ms(30_000),
  keep_alive_timeout: ms(60_000),
  open_timeout: ms(60_000),
  acme: acmeSchema.optional(),
});

const reporterSchema = z.strictObject({
  listen: listenAddress("*:3478"),
  nat_keep_alive_interval: ms(15_000),
  handshake_timeout: ms(10_000),
  max_connections_per_ip: z.number().int().min(1).max(10_000).default(64),
});

export const fileSchema = z.strictObject({
  log_level: z.enum(LOG_LEVELS).default("info"),
  shutdown_timeout: ms(10_000),
  local: localSchema.default(() => localSchema.parse({})),
  coordinator: coordinatorSchema.default(() => coordinatorSchema.parse({})),
  reporter: reporterSchema.default(() => reporterSchema.parse({})),
});

