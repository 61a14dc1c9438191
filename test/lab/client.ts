// Lab helper, run inside a namespace: connects to one or more servers, in
// order, optionally all from one local port, and prints one JSON line per
// attempt: {"event":"result","to":..,"ok":true,"local":..,"server":<first
// line the server sent>} or {"ok":false,"error":"timeout"|"ECONNREFUSED"|..}.
// Then optionally listens on that same local port (connect first, then
// listen: the only order Node allows without internals) and reports each
// inbound connection; inbound peers get one JSON line {"name":..,"peer":..}.
// Lines on stdin are sent over the first connection, and what comes back is
// reported as {"event":"echo"}.
// Usage: client.ts [--name N] [--from-port P] [--bind ADDR] [--timeout MS] [--listen HOST]
//                  [--hold] [--hello] [--max-seconds N] --to HOST:PORT [--to ...]
import net from "node:net";
import readline from "node:readline";

const args = process.argv.slice(2);
let name = "client";
let fromPort: number | undefined;
let bindAddress: string | undefined;
let timeoutMs = 2000;
let listenHost: string | undefined;
let hold = false;
let hello = false;
let maxSeconds = 120;
const targets: Array<{ host: string; port: number; text: string }> = [];
for (let i = 0; i < args.length; i++) {
  const a = args[i];
  const v = (): string => String(args[++i]);
  if (a === "--name") name = v();
  else if (a === "--from-port") fromPort = Number(v());
  else if (a === "--bind") bindAddress = v();
  else if (a === "--timeout") timeoutMs = Number(v());
  else if (a === "--listen") listenHost = v();
  else if (a === "--hold") hold = true;
  else if (a === "--hello") hello = true;
  else if (a === "--max-seconds") maxSeconds = Number(v());
  else if (a === "--to") {
    const t = v();
    const k = t.lastIndexOf(":");
    targets.push({ host: t.slice(0, k).replace(/^\[|\]$/g, ""), port: Number(t.slice(k + 1)), text: t });
  } else {
    console.error(`unknown argument ${a}`);
    process.exit(2);
  }
}

const emit = (o: object): void => {
  process.stdout.write(JSON.stringify(o) + "\n");
};
const plain = (addr: string | undefined): string => (addr ?? "").replace(/^::ffff:/, "");
setTimeout(() => process.exit(0), maxSeconds * 1000).unref();

interface Attempt {
  ok: boolean;
  socket?: net.Socket;
}

function attempt(t: { host: string; port: number; text: string }): Promise<Attempt> {
  return new Promise((resolve) => {
    const started = Date.now();
    const sock = net.connect({ host: t.host, port: t.port, localPort: fromPort, localAddress: bindAddress });
    // net.connect issues connect(2) on the next tick, so by the time this
    // line is out the SYN has left: a hole-punching peer may go now.
    setImmediate(() => emit({ event: "connecting", to: t.text }));
    let buf = "";
    let done = false;
    const finish = (r: object, ok: boolean): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      emit({ event: "result", to: t.text, ms: Date.now() - started, ...r });
      if (!ok) sock.destroy();
      resolve({ ok, socket: ok ? sock : undefined });
    };
    // A dropped SYN gives no error at all, so silence until the deadline is
    // the "filtered" outcome; a RST shows up as ECONNREFUSED.
    const timer = setTimeout(() => finish({ ok: false, error: "timeout" }, false), timeoutMs);
    // In a simultaneous open there is no server to speak first, so each
    // side introduces itself.
    if (hello) sock.on("connect", () => sock.write(JSON.stringify({ name, peer: { address: plain(sock.remoteAddress), port: sock.remotePort } }) + "\n"));
    sock.on("error", (err: NodeJS.ErrnoException) => finish({ ok: false, error: err.code ?? String(err) }, false));
    sock.on("data", (d) => {
      buf += d.toString();
      const nl = buf.indexOf("\n");
      if (nl < 0 || done) return;
      let server: unknown;
      try {
        server = JSON.parse(buf.slice(0, nl));
      } catch {
        server = buf.slice(0, nl);
      }
      buf = buf.slice(nl + 1);
      finish(
        {
          ok: true,
          local: { address: plain(sock.localAddress), port: sock.localPort },
          server,
        },
        true,
      );
    });
  });
}

const open: net.Socket[] = [];
for (const t of targets) {
  const r = await attempt(t);
  if (r.socket) open.push(r.socket);
}

const first = open[0];
if (first) {
  let buf = "";
  first.on("data", (d) => {
    buf += d.toString();
    let nl: number;
    while ((nl = buf.indexOf("\n")) >= 0) {
      emit({ event: "echo", line: buf.slice(0, nl) });
      buf = buf.slice(nl + 1);
    }
  });
  first.on("close", () => emit({ event: "closed" }));
  first.on("error", (err: NodeJS.ErrnoException) => emit({ event: "conn-error", error: err.code ?? String(err) }));
}
if (!hold && listenHost === undefined) {
  for (const s of open) s.end();
  process.exit(0);
}
for (const s of open) s.on("error", () => {});
readline.createInterface({ input: process.stdin }).on("line", (line) => {
  first?.write(line + "\n");
});

if (listenHost !== undefined) {
  const port = fromPort ?? 0;
  const server = net.createServer((sock) => {
    const peer = { address: plain(sock.remoteAddress), port: sock.remotePort };
    emit({ event: "accepted", peer });
    sock.on("error", () => {});
    sock.end(JSON.stringify({ name, peer }) + "\n");
  });
  server.on("error", (err) => {
    emit({ event: "listen-error", error: String(err) });
    process.exit(1);
  });
  server.listen({ host: listenHost, port }, () => {
    emit({ event: "listening", port });
  });
}
setInterval(() => {}, 1 << 30);
process.on("SIGTERM", () => process.exit(0));
