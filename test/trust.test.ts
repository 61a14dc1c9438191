import assert from "node:assert/strict";
import { once } from "node:events";
import https from "node:https";
import type { AddressInfo } from "node:net";
import tls from "node:tls";
import { test } from "node:test";
import { checkServerIdentity } from "../src/tls/trust.ts";
import { testPki } from "../scripts/lib/pki.ts";

test("certificate identity: IPv6 literals match the certificate's IP addresses (Node 22.23's own check never does)", async () => {
  const pki = await testPki();
  const server = https.createServer({ key: pki.server.key, cert: pki.server.cert });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  try {
    const socket = tls.connect({ host: "127.0.0.1", port: (server.address() as AddressInfo).port, rejectUnauthorized: false, servername: "localhost" });
    await once(socket, "secureConnect");
    const cert = socket.getPeerCertificate(true);
    socket.destroy();
    // The test certificate names localhost, 127.0.0.1 and ::1.
    assert.equal(checkServerIdentity("::1", cert), undefined);
    assert.equal(checkServerIdentity("0:0:0:0:0:0:0:1", cert), undefined, "any spelling of the same address");
    assert.equal(checkServerIdentity("127.0.0.1", cert), undefined);
    assert.equal(checkServerIdentity("localhost", cert), undefined);
    for (const other of ["::2", "2001:db8::1", "127.0.0.2", "example.com"]) {
      const err = checkServerIdentity(other, cert) as NodeJS.ErrnoException | undefined;
      assert.equal(err?.code, "ERR_TLS_CERT_ALTNAME_INVALID", other);
    }
  } finally {
    server.close();
  }
});
