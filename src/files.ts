import { closeSync, constants, fstatSync, openSync, readSync, statSync, type Stats } from "node:fs";

// The small files a role reads at start (its config, certificates, keys, CA
// bundles, token files). A path such as /dev/zero or a FIFO must be refused
// with a sentence, not read until the allocator gives up (std::bad_alloc) or
// block the start for ever.

/** Far above any real certificate chain, key, token list or config; the system's whole CA bundle is about 220 KiB. */
export const MAX_FILE_BYTES = 1024 * 1024;

/** What is wrong with a file the user named; `code` is the errno code, or NOT_REGULAR / TOO_LARGE. */
export class FileError extends Error {
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.name = "FileError";
    this.code = code;
  }
}

function kindOf(st: Stats): string {
  if (st.isDirectory()) return "a directory";
  if (st.isCharacterDevice()) return "a character device";
  if (st.isBlockDevice()) return "a block device";
  if (st.isFIFO()) return "a named pipe";
  if (st.isSocket()) return "a socket";
  return "not a regular file";
}

function judge(st: Stats): FileError | undefined {
  if (!st.isFile()) return new FileError("NOT_REGULAR", `${kindOf(st)}, not a regular file`);
  if (st.size > MAX_FILE_BYTES) return new FileError("TOO_LARGE", `${st.size} bytes; at most ${MAX_FILE_BYTES} (1 MiB) are read`);
  return undefined;
}

/** Why `path` cannot be read as one of these files, or undefined; never opens it. */
export function fileProblem(path: string): FileError | undefined {
  try {
    return judge(statSync(path));
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? "error";
    return new FileError(code, code);
  }
}

/** The whole file as UTF-8; throws FileError when it is not a regular file of at most MAX_FILE_BYTES. */
export function readBoundedFile(path: string): string {
  const before = fileProblem(path);
  if (before) throw before;
  let fd: number;
  try {
    // O_NONBLOCK: a path swapped for a FIFO after the check must not block the open.
    fd = openSync(path, constants.O_RDONLY | (constants.O_NONBLOCK ?? 0));
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? "error";
    throw new FileError(code, code);
  }
  try {
    // Judged again on what was opened, and read no further than the limit
    // even if the file grows meanwhile.
    const now = judge(fstatSync(fd));
    if (now) throw now;
    const buf = Buffer.allocUnsafe(MAX_FILE_BYTES + 1);
    let size = 0;
    while (size < buf.length) {
      const n = readSync(fd, buf, size, buf.length - size, null);
      if (n === 0) break;
      size += n;
    }
    if (size > MAX_FILE_BYTES) throw new FileError("TOO_LARGE", `more than ${MAX_FILE_BYTES} bytes (1 MiB)`);
    return buf.toString("utf8", 0, size);
  } finally {
    closeSync(fd);
  }
}

/**
 * A warning when a file holding secrets can be read by its group or by
 * everyone (POSIX permission bits; Windows has none to check), else undefined.
 */
export function exposureWarning(path: string, holds: string): string | undefined {
  if (process.platform === "win32") return undefined;
  let mode: number;
  try {
    mode = statSync(path).mode & 0o777;
  } catch {
    return undefined;
  }
  if ((mode & 0o044) === 0) return undefined;
  const who = (mode & 0o004) !== 0 ? "every user of this machine" : "its group";
  return `${path} holds ${holds} and is readable by ${who} (mode ${mode.toString(8).padStart(4, "0")}); fix: chmod 600 '${path.replaceAll("'", "'\\''")}'`;
}
