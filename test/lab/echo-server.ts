// Lab helper, run inside a namespace: a TCP server that first tells each
// client how it sees it (one JSON line: the server's name and the peer's
// address and port), then echoes every line back. Reports on stdout as JSON
// lines: {"event":"listening"} once every address listens, then one
// {"event":"accepted"} per connection.
// Usage: echo-server.ts NAME HOST:PORT [HOST:PORT...] [--max-seconds N]
import net from "node:net";

const args = process.argv.slice(2);
const name = args.shift() ?? "server";
let maxSeconds = 300;
const endpoints: Array<{ host: string; port: number }> = [];
for (let i = 0; i < args.length; i++) {
  const a = args[i] as string;
  if (a === "--max-seconds") maxSeconds = Number(args[++i]);
  else {
    const k = a.lastIndexOf(":");
    endpoints.push({ host: a.slice(0, k).replace(/^\[|\]$/g, ""), port: Number(a.slice(k + 1)) });
  }
}

const emit = (o: object): void => {
  process.stdout.write(JSON.stringify(o) + "\n");
};
const plain = (addr: string | undefined): string => (addr ?? "").replace(/^::ffff:/, "");

// Outlives no test run even if nobody kills it.
setTimeout(() => process.exit(0), maxSeconds * 1000).unref();
const sockets = new Set<net.Socket>();

let pending = endpoints.length;
for (const ep of endpoints) {
  const server = net.createServer((sock) => {
    sockets.add(sock);
    sock.on("close", () => sockets.delete(sock));
    sock.on("error", () => sock.destroy());
    const peer = { address: plain(sock.remoteAddress), port: sock.remotePort };
    emit({ event: "accepted", name, local: { address: plain(sock.localAddress), port: sock.localPort }, peer });
    sock.write(JSON.stringify({ name, peer }) + "\n");
    sock.pipe(sock);
  });
  server.on("error", (err) => {
    emit({ event: "error", endpoint: ep, error: String(err) });
    process.exit(1);
  });
  server.listen({ host: ep.host, port: ep.port, ipv6Only: ep.host.includes(":") }, () => {
    if (--pending === 0) emit({ event: "listening", name, endpoints });
  });
}
// Keep the event loop alive for the max-seconds window.
setInterval(() => {}, 1 << 30);
process.on("SIGTERM", () => {
  for (const s of sockets) s.destroy();
  process.exit(0);
});
