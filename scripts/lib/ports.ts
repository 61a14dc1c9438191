import net from "node:net";

/**
 * A TCP port on `host` that nothing listens on: bound to port 0, then
 * released. Only for what cannot listen on port 0 itself and report the port
 * back, or be handed a listening socket: a program that must be told its port
 * before it starts (turnserver, haproxy, squid, a local port chosen for a
 * link), or a port that must refuse connections. Servers in the test process
 * listen on port 0 and read the port back instead.
 *
 * It races: between the release and the caller's use, any process on the
 * machine may bind the same port (Linux starts its search for a free port at
 * a random point of the ephemeral range, so this is rare, not impossible).
 * Then the program cannot listen (EADDRINUSE: retry with another port where
 * that matters), or a connection meant to be refused reaches a stranger.
 */
export function freePort(host = "127.0.0.1"): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen({ host, port: 0 }, () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}
