// An ad-hoc code signature for a thin 64-bit Mach-O executable, as
// `codesign -s - --entitlements <empty plist>` writes one: Apple Silicon
// refuses to run unsigned code, and postject's injection drops the signature
// the official Node build came with. No Mach-O signer is packaged for Debian
// or npm, hence this one.
//
// The format (Apple's cs_blobs.h; all signature fields big-endian, Mach-O
// load commands little-endian): LC_CODE_SIGNATURE points at an embedded
// signature SuperBlob at the end of __LINKEDIT. Its CodeDirectory holds a
// SHA-256 hash of every 4096-byte page of the file before the signature and
// hashes of the other blobs ("special slots"); ad-hoc means no certificate:
// the CMS slot is an empty wrapper and the CodeDirectory's own hash (the
// cdhash) is the code's identity.
import { createHash } from "node:crypto";

const MH_MAGIC_64 = 0xfeedfacf;
const MH_EXECUTE = 2;
const LC_SEGMENT_64 = 0x19;
const LC_CODE_SIGNATURE = 0x1d;
const MACH_HEADER_64_SIZE = 32;
const LINKEDIT_DATA_COMMAND_SIZE = 16;
const SEGMENT_COMMAND_64_SIZE = 72;
const SECTION_64_SIZE = 80;

export const CPU_TYPE_X86_64 = 0x01000007;
export const CPU_TYPE_ARM64 = 0x0100000c;

const CSMAGIC_EMBEDDED_SIGNATURE = 0xfade0cc0;
const CSMAGIC_CODEDIRECTORY = 0xfade0c02;
const CSMAGIC_REQUIREMENTS = 0xfade0c01;
const CSMAGIC_EMBEDDED_ENTITLEMENTS = 0xfade7171;
const CSMAGIC_EMBEDDED_DER_ENTITLEMENTS = 0xfade7172;
const CSMAGIC_BLOBWRAPPER = 0xfade0b01;
const CSSLOT_CODEDIRECTORY = 0;
const CSSLOT_REQUIREMENTS = 2;
const CSSLOT_ENTITLEMENTS = 5;
const CSSLOT_DER_ENTITLEMENTS = 7;
const CSSLOT_SIGNATURESLOT = 0x10000;
const CS_SUPPORTSEXECSEG = 0x20400;
const CS_ADHOC = 0x2;
const CS_HASHTYPE_SHA256 = 2;
const CS_EXECSEG_MAIN_BINARY = 0x1;
const CODE_DIRECTORY_HEADER_SIZE = 88; // the CS_CodeDirectory struct up to execSegFlags (version 0x20400)
const PAGE_SHIFT = 12; // code signing pages are 4096 bytes on every architecture
const PAGE_SIZE = 1 << PAGE_SHIFT;
const HASH_SIZE = 32;

// No entitlement is requested: an empty dictionary, both as the XML plist and
// in the DER form current macOS versions read ([APPLICATION 16] { INTEGER 1,
// [CONTEXT 16] {} }), as codesign writes the pair.
const EMPTY_ENTITLEMENTS =
  '<?xml version="1.0" encoding="UTF-8"?>\n' +
  '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">\n' +
  '<plist version="1.0">\n<dict/>\n</plist>\n';
const EMPTY_DER_ENTITLEMENTS = Buffer.from([0x70, 0x05, 0x02, 0x01, 0x01, 0xb0, 0x00]);

export class MachOSignError extends Error {}

interface Segment {
  name: string;
  /** Offset of the segment_command_64 in the file. */
  at: number;
  fileoff: number;
  filesize: number;
}

interface Layout {
  cputype: number;
  filetype: number;
  ncmds: number;
  sizeofcmds: number;
  text: Segment;
  linkedit: Segment;
  /** Offset of an existing LC_CODE_SIGNATURE command, if any. */
  codeSignatureAt?: number;
  /** Lowest file offset of any section's contents: load commands may grow up to it. */
  firstSectionOffset: number;
}

function parse(file: Buffer): Layout {
  if (file.length < MACH_HEADER_64_SIZE || file.readUInt32LE(0) !== MH_MAGIC_64) {
    throw new MachOSignError("not a thin little-endian 64-bit Mach-O file (fat files are not supported)");
  }
  const cputype = file.readUInt32LE(4);
  const filetype = file.readUInt32LE(12);
  const ncmds = file.readUInt32LE(16);
  const sizeofcmds = file.readUInt32LE(20);
  if (MACH_HEADER_64_SIZE + sizeofcmds > file.length) throw new MachOSignError("load commands run past the end of the file");
  const segments: Segment[] = [];
  let codeSignatureAt: number | undefined;
  let firstSectionOffset = file.length;
  let at = MACH_HEADER_64_SIZE;
  for (let i = 0; i < ncmds; i++) {
    const cmd = file.readUInt32LE(at);
    const cmdsize = file.readUInt32LE(at + 4);
    if (cmdsize < 8 || at + cmdsize > MACH_HEADER_64_SIZE + sizeofcmds) throw new MachOSignError(`load command ${i} has a bad size ${cmdsize}`);
    if (cmd === LC_SEGMENT_64) {
      const name = file.toString("latin1", at + 8, at + 24).replace(/\0+$/, "");
      segments.push({ name, at, fileoff: Number(file.readBigUInt64LE(at + 40)), filesize: Number(file.readBigUInt64LE(at + 48)) });
      const nsects = file.readUInt32LE(at + 64);
      for (let s = 0; s < nsects; s++) {
        const sect = at + SEGMENT_COMMAND_64_SIZE + s * SECTION_64_SIZE;
        const offset = file.readUInt32LE(sect + 48);
        const flags = file.readUInt32LE(sect + 64);
        const zerofill = (flags & 0xff) === 0x1 || (flags & 0xff) === 0xc || (flags & 0xff) === 0x12;
        if (offset !== 0 && !zerofill) firstSectionOffset = Math.min(firstSectionOffset, offset);
      }
    } else if (cmd === LC_CODE_SIGNATURE) {
      codeSignatureAt = at;
    }
    at += cmdsize;
  }
  const text = segments.find((s) => s.name === "__TEXT");
  const linkedit = segments.find((s) => s.name === "__LINKEDIT");
  if (!text || !linkedit) throw new MachOSignError("no __TEXT or no __LINKEDIT segment");
  if (segments.some((s) => s !== linkedit && s.filesize > 0 && s.fileoff >= linkedit.fileoff)) {
    throw new MachOSignError("__LINKEDIT is not the last segment in the file: the signature has to go at its end");
  }
  return { cputype, filetype, ncmds, sizeofcmds, text, linkedit, codeSignatureAt, firstSectionOffset };
}

const align = (n: number, to: number) => Math.ceil(n / to) * to;
const sha256 = (b: Buffer) => createHash("sha256").update(b).digest();

function blob(magic: number, payload: Buffer): Buffer {
  const b = Buffer.alloc(8 + payload.length);
  b.writeUInt32BE(magic, 0);
  b.writeUInt32BE(b.length, 4);
  payload.copy(b, 8);
  return b;
}

export interface AdhocSignature {
  signed: Buffer;
  /** SHA-256 of the CodeDirectory, hex; its first 20 bytes are what `codesign -dv` calls CDHash. */
  cdhash: string;
  codeLimit: number;
  pages: number;
}

/** Returns a copy of `file` with an ad-hoc signature in place of any it had. */
export function adhocSign(file: Buffer, identifier: string): AdhocSignature {
  const m = parse(file);
  const existing = m.codeSignatureAt;
  // Whatever signature there was is dropped; the new one goes where it began.
  const contentEnd = existing !== undefined ? file.readUInt32LE(existing + 8) : file.length;
  if (contentEnd > file.length || contentEnd < m.linkedit.fileoff) throw new MachOSignError("LC_CODE_SIGNATURE points outside __LINKEDIT");
  const linkeditEnd = m.linkedit.fileoff + m.linkedit.filesize;
  if (existing === undefined && linkeditEnd !== file.length) throw new MachOSignError(`__LINKEDIT ends at ${linkeditEnd}, the file at ${file.length}`);
  // Like codesign: the signature starts 16-byte aligned.
  const codeLimit = align(contentEnd, 16);
  const pages = Math.ceil(codeLimit / PAGE_SIZE);

  const requirements = Buffer.alloc(12); // an empty requirement set: magic, length, count 0
  requirements.writeUInt32BE(CSMAGIC_REQUIREMENTS, 0);
  requirements.writeUInt32BE(requirements.length, 4);
  const entitlements = blob(CSMAGIC_EMBEDDED_ENTITLEMENTS, Buffer.from(EMPTY_ENTITLEMENTS, "utf8"));
  const derEntitlements = blob(CSMAGIC_EMBEDDED_DER_ENTITLEMENTS, EMPTY_DER_ENTITLEMENTS);
  const cms = blob(CSMAGIC_BLOBWRAPPER, Buffer.alloc(0));

  const ident = Buffer.from(`${identifier}\0`, "utf8");
  const nSpecialSlots = CSSLOT_DER_ENTITLEMENTS;
  const identOffset = CODE_DIRECTORY_HEADER_SIZE;
  const hashOffset = identOffset + ident.length + nSpecialSlots * HASH_SIZE;
  const cd = Buffer.alloc(hashOffset + pages * HASH_SIZE);

  const slots: [number, Buffer][] = [
    [CSSLOT_CODEDIRECTORY, cd],
    [CSSLOT_REQUIREMENTS, requirements],
    [CSSLOT_ENTITLEMENTS, entitlements],
    [CSSLOT_DER_ENTITLEMENTS, derEntitlements],
    [CSSLOT_SIGNATURESLOT, cms],
  ];
  const indexSize = 12 + slots.length * 8;
  const superLength = indexSize + slots.reduce((n, [, b]) => n + b.length, 0);
  const dataSize = align(superLength, 16);

  // The load commands are part of the first page, so they are final before any hashing.
  const out = Buffer.alloc(codeLimit + dataSize);
  file.copy(out, 0, 0, contentEnd);
  let lc = existing;
  if (lc === undefined) {
    lc = MACH_HEADER_64_SIZE + m.sizeofcmds;
    if (lc + LINKEDIT_DATA_COMMAND_SIZE > m.firstSectionOffset || out.subarray(lc, lc + LINKEDIT_DATA_COMMAND_SIZE).some((b) => b !== 0)) {
      throw new MachOSignError("no free room after the load commands for LC_CODE_SIGNATURE");
    }
    out.writeUInt32LE(m.ncmds + 1, 16);
    out.writeUInt32LE(m.sizeofcmds + LINKEDIT_DATA_COMMAND_SIZE, 20);
    out.writeUInt32LE(LC_CODE_SIGNATURE, lc);
    out.writeUInt32LE(LINKEDIT_DATA_COMMAND_SIZE, lc + 4);
  }
  out.writeUInt32LE(codeLimit, lc + 8);
  out.writeUInt32LE(dataSize, lc + 12);
  const linkeditSize = codeLimit + dataSize - m.linkedit.fileoff;
  const segmentPage = m.cputype === CPU_TYPE_ARM64 ? 0x4000 : 0x1000;
  out.writeBigUInt64LE(BigInt(align(linkeditSize, segmentPage)), m.linkedit.at + 32); // vmsize
  out.writeBigUInt64LE(BigInt(linkeditSize), m.linkedit.at + 48); // filesize

  cd.writeUInt32BE(CSMAGIC_CODEDIRECTORY, 0);
  cd.writeUInt32BE(cd.length, 4);
  cd.writeUInt32BE(CS_SUPPORTSEXECSEG, 8);
  cd.writeUInt32BE(CS_ADHOC, 12);
  cd.writeUInt32BE(hashOffset, 16);
  cd.writeUInt32BE(identOffset, 20);
  cd.writeUInt32BE(nSpecialSlots, 24);
  cd.writeUInt32BE(pages, 28);
  cd.writeUInt32BE(codeLimit, 32);
  cd.writeUInt8(HASH_SIZE, 36);
  cd.writeUInt8(CS_HASHTYPE_SHA256, 37);
  cd.writeUInt8(0, 38); // platform
  cd.writeUInt8(PAGE_SHIFT, 39);
  // spare2, scatterOffset, teamOffset (none), spare3 and codeLimit64 (the
  // file is under 4 GiB) stay zero.
  cd.writeBigUInt64BE(BigInt(m.text.fileoff), 64); // execSegBase
  cd.writeBigUInt64BE(BigInt(m.text.filesize), 72); // execSegLimit
  cd.writeBigUInt64BE(BigInt(m.filetype === MH_EXECUTE ? CS_EXECSEG_MAIN_BINARY : 0), 80);
  ident.copy(cd, identOffset);
  // Special slot n lives n hashes before hashOffset; slots without a blob (Info.plist,
  // resources, application-specific, slot 6) stay zero.
  sha256(requirements).copy(cd, hashOffset - CSSLOT_REQUIREMENTS * HASH_SIZE);
  sha256(entitlements).copy(cd, hashOffset - CSSLOT_ENTITLEMENTS * HASH_SIZE);
  sha256(derEntitlements).copy(cd, hashOffset - CSSLOT_DER_ENTITLEMENTS * HASH_SIZE);
  for (let p = 0; p < pages; p++) {
    sha256(out.subarray(p * PAGE_SIZE, Math.min((p + 1) * PAGE_SIZE, codeLimit))).copy(cd, hashOffset + p * HASH_SIZE);
  }

  const sig = out.subarray(codeLimit);
  sig.writeUInt32BE(CSMAGIC_EMBEDDED_SIGNATURE, 0);
  sig.writeUInt32BE(superLength, 4);
  sig.writeUInt32BE(slots.length, 8);
  let offset = indexSize;
  slots.forEach(([slot, b], i) => {
    sig.writeUInt32BE(slot, 12 + i * 8);
    sig.writeUInt32BE(offset, 16 + i * 8);
    b.copy(sig, offset);
    offset += b.length;
  });
  return { signed: out, cdhash: sha256(cd).toString("hex"), codeLimit, pages };
}
