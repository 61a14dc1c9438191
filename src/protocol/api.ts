// The HTTPS API between a local proxy and its coordinator (PROTOCOL.md §2-§4):
// the paths, the Upgrade token of the outbound path, and the JSON bodies.
// Both roles import this module, so a change to the contract is one change:
// the coordinator parses requests (and the Open's content) with these
// schemas, the local proxy parses the answers with them.
import { isIP } from "node:net";
import { z } from "zod";
import { isSessionId } from "./wire.ts";

export const API = {
  hello: "/v1/hello",
  sessions: "/v1/sessions",
  probe: "/v1/probe",
  ready: "/v1/ready",
  /** Only as an HTTP Upgrade to TUNNEL_PROTOCOL (the outbound path). */
  tunnel: "/v1/tunnel",
} as const;

/** The Upgrade token of the outbound path (PROTOCOL.md §4). */
export const TUNNEL_PROTOCOL = "natproxy-tunnel/1";

/** Largest request body the coordinator reads. */
export const MAX_BODY = 16 * 1024;

// RFC 1123 labels (plus "_", which real host names carry), an optional
// trailing dot; checked by the coordinator before any DNS lookup.
const HOSTNAME = /^(?=.{1,253}$)(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?)(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?)*\.?$/i;

// Request fields carry their own messages: a 400 names every bad field and
// what it should be, in words a person fixing a client can act on.
const expected = (what: string) => ({ error: `expected ${what}` });
const UUID = expected("a UUID v4");
const PORT = expected("1-65535");
const HOST_PORT = expected("an object { host, port }");

/** A session, probe or ready id: what the wire's Session and Open messages carry. */
const idSchema = z.string(UUID).refine(isSessionId, UUID);
const portSchema = z.int(PORT).min(1, PORT).max(65535, PORT);

/** Where the coordinator dials: a host name or an IP literal. */
const TARGET_HOST = expected("a host name or IP address");
export const targetAddressSchema = z.object({ host: z.string(TARGET_HOST).refine((h) => isIP(h) !== 0 || HOSTNAME.test(h), TARGET_HOST), port: portSchema }, HOST_PORT);

/** Where the coordinator connects back: the local proxy's public address as the reporter saw it, so never a name. */
const REPLY_HOST = expected("an IP address");
export const replyAddressSchema = z.object({ host: z.string(REPLY_HOST).refine((h) => isIP(h) !== 0, REPLY_HOST), port: portSchema }, HOST_PORT);

// Unknown fields are ignored, in requests as in answers: a newer peer may add some.
const body = <T extends z.core.$ZodLooseShape>(shape: T) => z.object(shape, expected("a JSON object"));

/** POST /v1/sessions */
export const sessionRequestSchema = body({ session: idSchema, target: targetAddressSchema, reply: replyAddressSchema });
/** POST /v1/probe */
export const probeRequestSchema = body({ probe: idSchema, reply: replyAddressSchema });
/** POST /v1/ready */
export const readyRequestSchema = body({ ready: idSchema, reply: replyAddressSchema });
/** What an Open message names (PROTOCOL.md §4), checked like a session request. */
export const openSchema = body({ session: idSchema, target: targetAddressSchema });

// Answers: a missing or mistyped field makes the answer malformed.
const msSchema = z.number().nonnegative();

/** GET /v1/hello: 200 */
export const helloResponseSchema = z.object({
  software: z.literal("natproxy"),
  version: z.string(),
  /** The caller as the coordinator sees it ("unknown", port 0, behind a balancer that named nobody). */
  client: z.object({ host: z.string(), port: z.int().min(0).max(65535) }),
  connect_back: z.enum(["same-ip", "any"]),
});
/** POST /v1/sessions: 200 */
export const sessionResponseSchema = z.object({ session: idSchema, outcome: z.literal("bridged"), target_address: z.string() });
/** POST /v1/probe: 200 */
export const probeResponseSchema = z.object({ probe: idSchema, outcome: z.literal("connected"), ms: msSchema });
/** POST /v1/ready: 200 */
export const readyResponseSchema = z.object({ ready: idSchema, outcome: z.literal("connected"), ms: msSchema });
/** Every error answer, of the API and of the Upgrade (PROTOCOL.md §2). */
export const errorBodySchema = z.object({ error: z.object({ code: z.string(), message: z.string() }) });

export type SessionRequestBody = z.infer<typeof sessionRequestSchema>;
export type ProbeRequestBody = z.infer<typeof probeRequestSchema>;
export type ReadyRequestBody = z.infer<typeof readyRequestSchema>;
export type HelloInfo = z.infer<typeof helloResponseSchema>;
export type SessionAnswer = z.infer<typeof sessionResponseSchema>;
export type ProbeAnswer = z.infer<typeof probeResponseSchema>;
export type ReadyAnswer = z.infer<typeof readyResponseSchema>;
export type ErrorAnswer = z.infer<typeof errorBodySchema>;

/**
 * Parses `value` with `schema`; on failure, throws what `fail` makes of every
 * problem at once, each named by its field ("target.port: expected 1-65535").
 */
export function parseWith<S extends z.ZodType>(schema: S, value: unknown, fail: (problems: string) => Error): z.infer<S> {
  const r = schema.safeParse(value);
  if (r.success) return r.data;
  const problems = new Set(r.error.issues.map((i) => `${i.path.map(String).join(".") || "body"}: ${i.message}`));
  throw fail([...problems].join("; "));
}
