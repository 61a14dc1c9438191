import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { describe, test } from "node:test";

// The macOS release binaries cannot be run here, so they are checked the way
// the kernel would check them before running them: Mach-O header,
// architecture, LC_CODE_SIGNATURE and __LINKEDIT pointing at the signature,
// and every hash in the ad-hoc signature recomputed. The reader below is
// written apart from scripts/lib/macho-sign.ts on purpose: it shares no code
// with the signer, so a misreading of the format in one does not hide in the
// other.

const ROOT = resolve(import.meta.dirname, "..");
const VERSION = (JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as { version: string }).version;
const RELEASE = join(ROOT, "dist", "release");
const MACS = [
  { file: `natproxy-${VERSION}-macos-arm64`, cputype: 0x0100000c, arch: "arm64" },
  { file: `natproxy-${VERSION}-macos-x64`, cputype: 0x01000007, arch: "x86_64" },
];
const missing = MACS.filter((m) => !existsSync(join(RELEASE, m.file))).map((m) => m.file);
if (missing.length > 0 && process.env.CI) throw new Error(`dist/release lacks ${missing.join(", ")}: npm test runs the release build first (node scripts/release.ts)`);
const skip = missing.length > 0 ? `dist/release lacks ${missing.join(", ")}; run npm run release:fetch && npm run release` : false;

const sha256 = (b: Uint8Array) => createHash("sha256").update(b).digest();

interface Seg {
  fileoff: number;
  filesize: number;
  vmsize: number;
  sections: { name: string; offset: number; size: number }[];
}

interface Parsed {
  cputype: number;
  filetype: number;
  segs: Map<string, Seg>;
  segOrder: string[];
  sig?: { dataoff: number; datasize: number };
}

function parseMachO(b: Buffer): Parsed {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  assert.equal(v.getUint32(0, true), 0xfeedfacf, "MH_MAGIC_64");
  const out: Parsed = { cputype: v.getUint32(4, true), filetype: v.getUint32(12, true), segs: new Map(), segOrder: [] };
  const n = v.getUint32(16, true);
  let p = 32;
  for (let i = 0; i < n; i++) {
    const [cmd, size] = [v.getUint32(p, true), v.getUint32(p + 4, true)];
    if (cmd === 0x19) {
      const name = b.subarray(p + 8, p + 24).toString("latin1").split("\0")[0];
      const seg: Seg = { vmsize: Number(v.getBigUint64(p + 32, true)), fileoff: Number(v.getBigUint64(p + 40, true)), filesize: Number(v.getBigUint64(p + 48, true)), sections: [] };
      for (let s = 0, q = p + 72; s < v.getUint32(p + 64, true); s++, q += 80) {
        seg.sections.push({ name: b.subarray(q, q + 16).toString("latin1").split("\0")[0], size: Number(v.getBigUint64(q + 40, true)), offset: v.getUint32(q + 48, true) });
      }
      out.segs.set(name, seg);
      out.segOrder.push(name);
    } else if (cmd === 0x1d) {
      out.sig = { dataoff: v.getUint32(p + 8, true), datasize: v.getUint32(p + 12, true) };
    }
    p += size;
  }
  return out;
}

/** Every problem with the file's ad-hoc signature; empty when the kernel would accept its hashes. */
function signatureProblems(b: Buffer): { problems: string[]; cdhash?: string; pages?: number } {
  const m = parseMachO(b);
  const problems: string[] = [];
  if (!m.sig) return { problems: ["no LC_CODE_SIGNATURE"] };
  const { dataoff, datasize } = m.sig;
  if (dataoff % 16 !== 0) problems.push(`signature at ${dataoff} is not 16-byte aligned`);
  if (dataoff + datasize !== b.length) problems.push(`signature ends at ${dataoff + datasize}, the file at ${b.length}`);
  const le = m.segs.get("__LINKEDIT");
  if (!le || le.fileoff + le.filesize !== b.length || le.vmsize < le.filesize) problems.push("__LINKEDIT does not end with the file");
  if (m.segOrder.at(-1) !== "__LINKEDIT") problems.push("__LINKEDIT is not the last segment");
  const be = (o: number) => b.readUInt32BE(o);
  if (be(dataoff) !== 0xfade0cc0) return { problems: [...problems, "no embedded-signature SuperBlob at dataoff"] };
  const superLen = be(dataoff + 4);
  if (superLen > datasize) problems.push("SuperBlob longer than LC_CODE_SIGNATURE's datasize");
  const blobs = new Map<number, Buffer>();
  for (let i = 0; i < be(dataoff + 8); i++) {
    const at = dataoff + be(dataoff + 16 + i * 8);
    blobs.set(be(dataoff + 12 + i * 8), b.subarray(at, at + be(at + 4)));
  }
  const cd = blobs.get(0);
  if (!cd || cd.readUInt32BE(0) !== 0xfade0c02) return { problems: [...problems, "no CodeDirectory in slot 0"] };
  const f = (o: number) => cd.readUInt32BE(o);
  const [version, flags, hashOffset, identOffset, nSpecial, nCode, codeLimit] = [f(8), f(12), f(16), f(20), f(24), f(28), f(32)];
  if (version !== 0x20400) problems.push(`CodeDirectory version ${version.toString(16)}`);
  if ((flags & 0x2) === 0) problems.push("not flagged ad-hoc");
  if (cd[36] !== 32 || cd[37] !== 2) problems.push("hashes are not SHA-256");
  if (cd[39] !== 12) problems.push(`page size 2^${cd[39]}, not 4096`);
  if (codeLimit !== dataoff) problems.push(`codeLimit ${codeLimit} is not the signature offset ${dataoff}`);
  if (nCode !== Math.ceil(codeLimit / 4096)) problems.push(`${nCode} code slots for ${codeLimit} bytes`);
  const ident = cd.subarray(identOffset, cd.indexOf(0, identOffset)).toString("utf8");
  if (ident !== "natproxy") problems.push(`identifier ${JSON.stringify(ident)}`);
  const text = m.segs.get("__TEXT")!;
  if (Number(cd.readBigUInt64BE(64)) !== text.fileoff || Number(cd.readBigUInt64BE(72)) !== text.filesize) problems.push("exec segment is not __TEXT");
  if (m.filetype === 2 && cd.readBigUInt64BE(80) !== 1n) problems.push("exec segment flags lack CS_EXECSEG_MAIN_BINARY");
  for (let i = 0; i < nCode; i++) {
    const want = cd.subarray(hashOffset + i * 32, hashOffset + i * 32 + 32);
    if (!sha256(b.subarray(i * 4096, Math.min(codeLimit, (i + 1) * 4096))).equals(want)) problems.push(`page ${i} (offset ${i * 4096}) hash mismatch`);
  }
  for (let slot = 1; slot <= nSpecial; slot++) {
    const want = cd.subarray(hashOffset - slot * 32, hashOffset - slot * 32 + 32);
    const present = blobs.get(slot);
    const ok = present ? sha256(present).equals(want) : want.every((x) => x === 0);
    if (!ok) problems.push(`special slot ${slot} hash mismatch`);
  }
  const req = blobs.get(2);
  if (!req || req.readUInt32BE(0) !== 0xfade0c01 || req.readUInt32BE(8) !== 0) problems.push("slot 2 is not an empty requirement set");
  const ent = blobs.get(5);
  if (!ent || ent.readUInt32BE(0) !== 0xfade7171 || !/<plist version="1.0">\s*<dict\/>\s*<\/plist>/.test(ent.subarray(8).toString("utf8"))) problems.push("slot 5 is not an empty entitlements plist");
  const der = blobs.get(7);
  if (!der || der.readUInt32BE(0) !== 0xfade7172 || der.subarray(8).toString("hex") !== "70050201" + "01b000") problems.push("slot 7 is not an empty DER entitlements dictionary");
  const cms = blobs.get(0x10000);
  if (!cms || cms.readUInt32BE(0) !== 0xfade0b01 || cms.length !== 8) problems.push("slot 0x10000 is not an empty (ad-hoc) signature wrapper");
  return { problems, cdhash: sha256(cd).subarray(0, 20).toString("hex"), pages: nCode };
}

describe("the macOS release binaries", { skip }, () => {
  for (const mac of MACS) {
    test(`${mac.file}: Mach-O ${mac.arch} executable with a SEA blob and a valid ad-hoc signature`, (t) => {
      const b = readFileSync(join(RELEASE, mac.file));
      const m = parseMachO(b);
      assert.equal(m.cputype, mac.cputype, "cputype");
      assert.equal(m.filetype, 2, "MH_EXECUTE");
      const sea = m.segs.get("NODE_SEA")?.sections.find((s) => s.name === "__NODE_SEA_BLOB");
      assert.ok(sea && sea.size > 1_000_000, "NODE_SEA/__NODE_SEA_BLOB holds the program");
      assert.ok(b.subarray(sea.offset, sea.offset + sea.size).includes("HTTP proxy listening on"), "the blob is natproxy's bundle");
      assert.ok(b.includes("NODE_SEA_FUSE_fce680ab2cc467b6e072b8b5df1996b2:1"), "the SEA fuse is flipped");
      const { problems, cdhash, pages } = signatureProblems(b);
      assert.deepEqual(problems, []);
      t.diagnostic(`${b.length} bytes, ${pages} pages hashed, CDHash ${cdhash}`);
    });
  }

  test("the verifier catches a changed code page and a changed requirements blob", () => {
    const b = Buffer.from(readFileSync(join(RELEASE, MACS[0].file)));
    const { dataoff } = parseMachO(b).sig!;
    const page = 1000;
    b[page * 4096 + 7] ^= 0x01;
    assert.deepEqual(signatureProblems(b).problems, [`page ${page} (offset ${page * 4096}) hash mismatch`]);
    b[page * 4096 + 7] ^= 0x01;
    // The SuperBlob's second index entry: slot 2, the requirements; its count is at +8.
    assert.equal(b.readUInt32BE(dataoff + 20), 2);
    const req = dataoff + b.readUInt32BE(dataoff + 24);
    assert.equal(b.readUInt32BE(req), 0xfade0c01);
    b.writeUInt32BE(1, req + 8);
    assert.deepEqual(signatureProblems(b).problems, ["special slot 2 hash mismatch", "slot 2 is not an empty requirement set"]);
  });
});
