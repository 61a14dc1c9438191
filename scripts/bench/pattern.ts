// The deterministic content of /bytes/N: byte i is PATTERN[i % PATTERN.length].
// 1 MiB of xorshift32 output from a fixed seed: not compressible, the same in
// the target and in the client that checks what arrived.
export const PATTERN_SIZE = 1024 * 1024;

function makePattern(): Buffer {
  const buf = Buffer.allocUnsafe(PATTERN_SIZE);
  let x = 0x9e3779b9;
  for (let i = 0; i < PATTERN_SIZE; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    buf.writeUInt32LE(x, i);
  }
  return buf;
}

export const PATTERN: Buffer = makePattern();
