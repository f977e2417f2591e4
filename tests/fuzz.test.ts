/**
 * Property-based fuzzing of the decoders (issue 8): the QEMU stream decoder, the tunnel message
 * decoder and the control parser get generated and mutated input, split anywhere, and must decode
 * exactly what this file's own encoders produced (or what its own reference decoders make of it),
 * or reject it cleanly with the documented error types. Nothing here reuses relay.ts's encoders.
 * The client address read from proxy headers (issue 19) gets X-Forwarded-For and Forwarded in every
 * spelling, from trusted and untrusted peers.
 *
 * FUZZ_SEED=<integer> replays a run (fast-check prints the seed and the shrunk counterexample of a
 * failure); FUZZ_RUNS=<n> runs every property n times instead of 10,000 (the end-to-end one n/50).
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import fc from "fast-check";
import { isIP } from "node:net";
import {
  MAX_FRAME,
  StreamDecoder,
  TUNNEL_PROTOCOL,
  clientAddress,
  decodeTunnelMessage,
  parseCidr,
  parseConfig,
  parseControl,
  startRelay,
  trustedProxyList,
  type RelayHandle,
} from "../relay.ts";
import { waitUntil } from "./helpers.ts";

// ───────────────────────────── settings ─────────────────────────────

const seedText = process.env.FUZZ_SEED;
const seed = seedText === undefined || seedText === "" ? undefined : Number(seedText);
if (seed !== undefined && !Number.isSafeInteger(seed)) throw new Error(`FUZZ_SEED must be an integer, got ${JSON.stringify(seedText)}`);
const RUNS = Number(process.env.FUZZ_RUNS || 10_000);
if (!Number.isSafeInteger(RUNS) || RUNS < 1) throw new Error(`FUZZ_RUNS must be a positive integer, got ${JSON.stringify(process.env.FUZZ_RUNS)}`);
/** Each message of the end-to-end property goes over a real socket: far fewer runs. */
const E2E_RUNS = Math.max(10, Math.round(RUNS / 50));
const params = (numRuns = RUNS): fc.Parameters<any> => ({ numRuns, includeErrorInReport: true, ...(seed !== undefined && { seed }) });
/** Generous per property (each takes seconds, but CI machines are slow and shared), more for longer runs. */
const PROPERTY_TIMEOUT_MS = 120_000 * Math.max(1, RUNS / 10_000);

/** The README's wire limits, restated rather than imported. */
const MESSAGE_LIMIT = 1024 * 1024;
const NAMES_LIMIT = 64;

// ───────────────────────────── independent encoders ─────────────────────────────

/** QEMU stream framing: each frame behind its 4-byte big-endian length. */
function encodeStream(frames: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(frames.reduce((n, f) => n + 4 + f.length, 0));
  const view = new DataView(out.buffer);
  let at = 0;
  for (const f of frames) {
    view.setUint32(at, f.length);
    out.set(f, at + 4);
    at += 4 + f.length;
  }
  return out;
}

/** A tunnel data message: type 0x01, channel (u16 BE), then stream-framed frames. */
function encodeData(channel: number, frames: Uint8Array[]): Uint8Array {
  const body = encodeStream(frames);
  const out = new Uint8Array(3 + body.length);
  out[0] = 0x01;
  new DataView(out.buffer).setUint16(1, channel);
  out.set(body, 3);
  return out;
}

/** A tunnel control message: type 0x00, then the bytes given (normally UTF-8 JSON). */
function controlBytes(payload: Uint8Array): Uint8Array {
  const out = new Uint8Array(1 + payload.length);
  out.set(payload, 1);
  return out;
}
const utf8 = (text: string) => new TextEncoder().encode(text);

const concat = (parts: Uint8Array[]) => {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
};
const u32 = (n: number) => {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, n);
  return b;
};
const same = (a: Uint8Array, b: Uint8Array) => Buffer.from(a.buffer, a.byteOffset, a.length).equals(b);
/** A check on the hot path of a property (expect() per byte or chunk costs more than the decoding). */
function check(ok: boolean, what: () => string): void {
  if (!ok) throw new Error(what());
}

// ───────────────────────────── reference decoders ─────────────────────────────

interface StreamRecord {
  /** Offset of the record's 4-byte length. */
  start: number;
  /** -1: a length cut short by the end of the stream, or one above MAX_FRAME (the last record, then). */
  length: number;
}

/**
 * The whole stream parsed at once: the records whose length is valid (the last may be incomplete),
 * and the offset of the first length above MAX_FRAME, if any (parsing stops there).
 */
function referenceStream(bytes: Uint8Array): { records: StreamRecord[]; frames: Uint8Array[]; badLengthAt: number | undefined } {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const records: StreamRecord[] = [];
  const frames: Uint8Array[] = [];
  let at = 0;
  while (bytes.length - at >= 4) {
    const length = view.getUint32(at);
    if (length > MAX_FRAME) {
      records.push({ start: at, length: -1 });
      return { records, frames, badLengthAt: at };
    }
    records.push({ start: at, length });
    if (bytes.length - at - 4 >= length) frames.push(bytes.subarray(at + 4, at + 4 + length));
    at += 4 + length;
  }
  if (at < bytes.length) records.push({ start: at, length: -1 });
  return { records, frames, badLengthAt: undefined };
}

/**
 * What a decoder has to hold after the first `end` bytes: the bytes of an incomplete length, or
 * once the length is known, the frame bytes received so far (as StreamDecoder.buffered counts them).
 */
function heldAfter(records: StreamRecord[], end: number): number {
  for (const r of records) {
    if (r.length >= 0 && end >= r.start + 4 + r.length) continue;
    if (end <= r.start) return 0;
    const into = end - r.start;
    return into < 4 ? into : into - 4;
  }
  return 0;
}

/** Strict UTF-8 (Unicode's well-formed byte sequences, table 3-7), written out; null if ill-formed. */
function decodeUtf8(bytes: Uint8Array): string | null {
  const units: number[] = [];
  let text = "";
  for (let i = 0; i < bytes.length; ) {
    const b0 = bytes[i]!;
    let cp: number;
    let need: number;
    let lo = 0x80;
    let hi = 0xbf;
    if (b0 < 0x80) [cp, need] = [b0, 0];
    else if (b0 >= 0xc2 && b0 <= 0xdf) [cp, need] = [b0 & 0x1f, 1];
    else if (b0 >= 0xe0 && b0 <= 0xef) {
      [cp, need] = [b0 & 0x0f, 2];
      if (b0 === 0xe0) lo = 0xa0; // no overlong forms
      if (b0 === 0xed) hi = 0x9f; // no surrogates
    } else if (b0 >= 0xf0 && b0 <= 0xf4) {
      [cp, need] = [b0 & 0x07, 3];
      if (b0 === 0xf0) lo = 0x90;
      if (b0 === 0xf4) hi = 0x8f; // nothing above U+10FFFF
    } else return null;
    for (let k = 1; k <= need; k++) {
      const b = bytes[i + k];
      if (b === undefined) return null;
      if (k === 1 ? b < lo || b > hi : b < 0x80 || b > 0xbf) return null;
      cp = (cp << 6) | (b & 0x3f);
    }
    i += need + 1;
    if (cp > 0xffff) units.push(0xd800 + ((cp - 0x10000) >> 10), 0xdc00 + ((cp - 0x10000) & 0x3ff));
    else units.push(cp);
    if (units.length >= 8192) text += String.fromCharCode(...units.splice(0));
  }
  return text + String.fromCharCode(...units);
}

const isObject = (x: unknown): x is Record<string, unknown> => typeof x === "object" && x !== null;
const isAlnum = (c: number) => (c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122);

/** README: a network name is `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`, checked here character by character. */
function isNetworkName(x: unknown): x is string {
  if (typeof x !== "string" || x.length < 1 || x.length > 64) return false;
  for (let i = 0; i < x.length; i++) {
    const c = x.charCodeAt(i);
    if (!isAlnum(c) && (i === 0 || (c !== 0x5f && c !== 0x2e && c !== 0x2d))) return false;
  }
  return true;
}
function isRelayId(x: unknown): x is string {
  if (typeof x !== "string" || x.length !== 16) return false;
  for (let i = 0; i < 16; i++) {
    const c = x.charCodeAt(i);
    if (!((c >= 48 && c <= 57) || (c >= 97 && c <= 102))) return false;
  }
  return true;
}
/** At most 64 names, each valid, none twice; null otherwise. */
function nameList(x: unknown): string[] | null {
  if (!Array.isArray(x) || x.length > NAMES_LIMIT) return null;
  const seen = new Set<string>();
  for (let i = 0; i < x.length; i++) {
    const name: unknown = x[i];
    if (!isNetworkName(name) || seen.has(name)) return null;
    seen.add(name);
  }
  return [...seen];
}
function refusals(x: unknown): { network: string; reason: string }[] | null {
  if (!Array.isArray(x)) return null;
  const out: { network: string; reason: string }[] = [];
  for (let i = 0; i < x.length; i++) {
    const r: unknown = x[i];
    if (!isObject(r) || !isNetworkName(r.network) || typeof r.reason !== "string" || r.reason.length > 200) return null;
    out.push({ network: r.network, reason: r.reason });
  }
  return out;
}
/** Optional relay identity fields of hello/welcome: absent, or valid. */
function identity(m: Record<string, unknown>): Record<string, string> | null {
  const out: Record<string, string> = {};
  if (m.id !== undefined) {
    if (!isRelayId(m.id)) return null;
    out.id = m.id;
  }
  if (m.name !== undefined) {
    if (!isNetworkName(m.name)) return null;
    out.name = m.name;
  }
  return out;
}

/**
 * The documented control messages, checked independently of relay.ts's schema: the normalised
 * message (known fields only), or null when the value is not one.
 */
function referenceControl(m: unknown): object | null {
  if (!isObject(m) || typeof m.type !== "string") return null;
  switch (m.type) {
    case "hello": {
      const networks = nameList(m.networks);
      const id = identity(m);
      return m.version === 1 && networks && id ? { type: "hello", version: 1, networks, ...id } : null;
    }
    case "welcome": {
      const accepted = nameList(m.accepted);
      const refused = refusals(m.refused);
      const id = identity(m);
      return m.version === 1 && accepted && refused && id ? { type: "welcome", version: 1, accepted, refused, ...id } : null;
    }
    case "attach":
    case "detach": {
      const networks = nameList(m.networks);
      return networks && { type: m.type, networks };
    }
    case "attached": {
      const accepted = nameList(m.accepted);
      const refused = refusals(m.refused);
      return accepted && refused && { type: "attached", accepted, refused };
    }
    case "ping":
    case "pong":
      return { type: m.type };
    default:
      return null;
  }
}

type ErrorKind = "RangeError" | "SyntaxError" | "TypeError";
type Outcome =
  | { ok: true; control?: object; channel?: number; frames: Uint8Array[] }
  | { ok: false; error: ErrorKind; /** Frames a streaming decoder hands out before it finds the fault. */ frames: Uint8Array[] };

/**
 * The README's tunnel message, decoded independently. `emptyData` marks a data message with no
 * frame at all: the README says "one or more frames", so this decoder rejects it.
 */
function referenceMessage(message: Uint8Array): Outcome & { emptyData?: true } {
  if (message.length === 0) return { ok: false, error: "RangeError", frames: [] };
  if (message[0] === 0x00) {
    // RFC 8259 §8.1: a parser MAY ignore a byte order mark; TextDecoder drops one, so this does too.
    let text = decodeUtf8(message.subarray(1));
    if (text !== null && text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    if (text === null) return { ok: false, error: "SyntaxError", frames: [] };
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch {
      return { ok: false, error: "SyntaxError", frames: [] };
    }
    const control = referenceControl(json);
    return control ? { ok: true, control, frames: [] } : { ok: false, error: "TypeError", frames: [] };
  }
  if (message[0] !== 0x01 || message.length < 3) return { ok: false, error: "RangeError", frames: [] };
  const channel = message[1]! * 256 + message[2]!;
  const body = message.subarray(3);
  const { records, frames, badLengthAt } = referenceStream(body);
  const last = records.at(-1);
  const whole = badLengthAt === undefined && (last === undefined || (last.length >= 0 && last.start + 4 + last.length === body.length));
  if (!whole) return { ok: false, error: "RangeError", frames };
  if (frames.length === 0) return { ok: false, error: "RangeError", frames, emptyData: true };
  return { ok: true, channel, frames };
}

/** What decodeTunnelMessage did with `message`, its frames checked to lie inside the message. */
function runDecoder(message: Uint8Array): Outcome {
  const frames: Uint8Array[] = [];
  let channel: number | undefined;
  let control: object | undefined;
  let calls = 0;
  const start = message.byteOffset;
  const end = message.byteOffset + message.byteLength;
  try {
    decodeTunnelMessage(
      message,
      (c) => {
        calls++;
        control = c;
      },
      (ch, frame) => {
        calls++;
        check(frame.length <= MAX_FRAME, () => `handed out a frame of ${frame.length} bytes`);
        // A frame handed out as a view must lie in the message, past its header and a length.
        if (frame.buffer === message.buffer && frame.length > 0) {
          check(frame.byteOffset >= start + 7 && frame.byteOffset + frame.length <= end, () => `frame at ${frame.byteOffset - start}+${frame.length} overruns a message of ${end - start} bytes`);
        }
        check(channel === undefined || ch === channel, () => `channel changed from ${channel} to ${ch} within a message`);
        channel = ch;
        frames.push(frame.slice());
      },
    );
  } catch (error) {
    const kind = (error as Error)?.constructor;
    if (kind !== RangeError && kind !== SyntaxError && kind !== TypeError) {
      throw new Error(`decodeTunnelMessage threw something other than RangeError/SyntaxError/TypeError: ${error}`, { cause: error });
    }
    expect(control).toBeUndefined();
    return { ok: false, error: kind.name as ErrorKind, frames };
  }
  if (control !== undefined) expect(calls).toBe(1);
  return { ok: true, ...(control && { control }), ...(channel !== undefined && { channel }), frames };
}

function expectSameFrames(got: Uint8Array[], want: Uint8Array[]) {
  check(got.length === want.length, () => `${got.length} frames, expected ${want.length}: lengths ${got.map((f) => f.length)} vs ${want.map((f) => f.length)}`);
  for (let i = 0; i < want.length; i++) check(same(got[i]!, want[i]!), () => `frame ${i} differs: [${got[i]}] vs [${want[i]}]`);
}

/** decodeTunnelMessage agrees with the reference; an empty data message may go either way (see the zero-frame property). */
function expectAgrees(message: Uint8Array): Outcome {
  const want = referenceMessage(message);
  const got = runDecoder(message);
  if (want.emptyData) {
    expect(got.frames.length).toBe(0);
    if (!got.ok) expect(got.error).toBe("RangeError");
    return got;
  }
  expect(got.ok ? "accepted" : got.error).toBe(want.ok ? "accepted" : want.error);
  expectSameFrames(got.frames, want.frames);
  if (want.ok && got.ok) {
    expect(got.control).toEqual(want.control);
    if (want.channel !== undefined) expect(got.channel).toBe(want.channel);
  }
  return got;
}

// ───────────────────────────── generators ─────────────────────────────

/** A frame of `length` bytes repeating `pattern`: big frames without generating every byte. */
const patterned = (length: number, pattern: Uint8Array) => {
  const f = new Uint8Array(length);
  if (pattern.length === 0 || length === 0) return f;
  f.set(pattern.subarray(0, length));
  for (let filled = Math.min(pattern.length, length); filled < length; filled *= 2) f.copyWithin(filled, 0, Math.min(filled, length - filled));
  return f;
};
const bigFrame = fc
  .record({ length: fc.integer({ min: MAX_FRAME - 128, max: MAX_FRAME }), pattern: fc.uint8Array({ minLength: 1, maxLength: 32 }) })
  .map(({ length, pattern }) => patterned(length, pattern));
/**
 * Mostly 0..2,000 bytes (random throughout, or a random pattern repeated: generating every byte of
 * every frame would cost most of the time budget), some tiny, now and then one near or at MAX_FRAME.
 */
const frameArb = fc.oneof(
  { weight: 6, arbitrary: fc.uint8Array({ maxLength: 2000, size: "max" }) },
  { weight: 12, arbitrary: fc.record({ length: fc.integer({ min: 0, max: 2000 }), pattern: fc.uint8Array({ minLength: 1, maxLength: 16 }) }).map(({ length, pattern }) => patterned(length, pattern)) },
  { weight: 10, arbitrary: fc.uint8Array({ maxLength: 16 }) },
  { weight: 1, arbitrary: bigFrame }, // in about one run in seven
);
const framesArb = fc.array(frameArb, { maxLength: 10 });

/** How a byte stream is cut into chunks: cut points anywhere (repeats make empty chunks), or every k bytes. */
const splitArb = fc.oneof(
  { weight: 6, arbitrary: fc.array(fc.nat(), { maxLength: 24 }).map((cuts) => ({ cuts })) },
  { weight: 1, arbitrary: fc.integer({ min: 1, max: 7 }).map((every) => ({ every })) },
);
function split(bytes: Uint8Array, how: { cuts: number[] } | { every: number }): Uint8Array[] {
  if ("every" in how) {
    // Keep byte-by-byte feeding of big streams cheap: at most ~512 chunks.
    const step = Math.max(how.every, Math.ceil(bytes.length / 512));
    const out: Uint8Array[] = [];
    for (let at = 0; at < bytes.length; at += step) out.push(bytes.subarray(at, at + step));
    return out;
  }
  const points = how.cuts.map((c) => c % (bytes.length + 1)).sort((a, b) => a - b);
  const out: Uint8Array[] = [];
  let from = 0;
  for (const p of points) {
    out.push(bytes.subarray(from, p));
    from = p;
  }
  out.push(bytes.subarray(from));
  return out;
}

/**
 * Feeds `chunks` to a fresh StreamDecoder the way sockets do: each chunk a view (Uint8Array or
 * Buffer, at an offset) of one read buffer that is overwritten after push() returns, so a decoder
 * that kept a view instead of copying would hand out garbage. Frames are copied when handed out.
 */
function feed(
  chunks: Uint8Array[],
  opts: { buffers: boolean[]; afterPush?: (decoder: StreamDecoder, end: number) => void },
): { frames: Uint8Array[]; error: unknown; threwAt: number | undefined } {
  const decoder = new StreamDecoder();
  const frames: Uint8Array[] = [];
  const backing = new Uint8Array(chunks.reduce((n, c) => Math.max(n, c.length), 0) + 8).fill(0xa5);
  let end = 0;
  for (let k = 0; k < chunks.length; k++) {
    const chunk = chunks[k]!;
    const offset = k % 5;
    backing.set(chunk, offset);
    const view = opts.buffers[k % Math.max(1, opts.buffers.length)]
      ? Buffer.from(backing.buffer, offset, chunk.length)
      : backing.subarray(offset, offset + chunk.length);
    try {
      decoder.push(view, (frame) => {
        check(frame.length <= MAX_FRAME, () => `handed out a frame of ${frame.length} bytes`);
        frames.push(frame.slice());
      });
    } catch (error) {
      return { frames, error, threwAt: end + chunk.length };
    }
    backing.fill(0xee, offset, offset + chunk.length);
    end += chunk.length;
    opts.afterPush?.(decoder, end);
  }
  return { frames, error: undefined, threwAt: undefined };
}

/** A byte stream that is mostly well framed but not always: lengths near every limit, bodies that fit or not. */
const lengthArb = fc.oneof(
  { weight: 6, arbitrary: fc.integer({ min: 0, max: 300 }) },
  { weight: 2, arbitrary: fc.integer({ min: MAX_FRAME - 4, max: MAX_FRAME + 4 }) },
  { weight: 2, arbitrary: fc.constantFrom(0, 1, MAX_FRAME, MAX_FRAME + 1, 0x0001_0000, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff) },
  { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffff_ffff }) },
);
const streamPieceArb = fc.oneof(
  { weight: 6, arbitrary: fc.record({ length: lengthArb, pattern: fc.uint8Array({ maxLength: 8 }) }).map(({ length, pattern }) => concat([u32(length), length <= MAX_FRAME ? patterned(length, pattern) : pattern])) },
  { weight: 1, arbitrary: fc.record({ length: lengthArb, body: fc.uint8Array({ maxLength: 40 }) }).map(({ length, body }) => concat([u32(length), body])) },
  { weight: 1, arbitrary: fc.uint8Array({ maxLength: 6 }) },
);
const arbitraryStreamArb = fc.oneof(
  { weight: 4, arbitrary: fc.array(streamPieceArb, { maxLength: 8 }).map(concat) },
  { weight: 1, arbitrary: fc.uint8Array({ maxLength: 200 }) },
);

// Control messages: mostly near valid, every field sometimes wrong or missing.
const usually = <T, U>(valid: fc.Arbitrary<T>, invalid: fc.Arbitrary<U>) =>
  fc.oneof({ weight: 5, arbitrary: valid }, { weight: 1, arbitrary: invalid }) as fc.Arbitrary<T | U>;
const poolName = fc.constantFrom("default", "lab", "a", "0", "A.b-c_d", "x".repeat(64), "9_.-", "Lab");
const validName = fc.oneof(poolName, fc.stringMatching(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/));
const badName = fc.oneof(
  fc.constantFrom("", "x".repeat(65), "-lab", "_lab", ".", "lab\n", "lab name", "läb", "lab/1", "\u001b[31m", "lab\u0000", "ｌａｂ"),
  fc.string({ maxLength: 70 }),
  fc.string({ unit: "grapheme", maxLength: 8 }),
  fc.integer(),
  fc.constantFrom(null, true, 1.5, {}, { name: "lab" }),
  fc.array(validName, { maxLength: 2 }),
  fc.constant([["lab"]]),
);
const nameItem = usually(validName, badName);
const networksArb = fc.oneof(
  { weight: 8, arbitrary: fc.array(nameItem, { maxLength: 6 }) },
  { weight: 2, arbitrary: fc.array(poolName, { maxLength: 6 }) }, // duplicates likely
  { weight: 1, arbitrary: fc.uniqueArray(validName, { minLength: 62, maxLength: 67 }) }, // around the 64 limit
  { weight: 1, arbitrary: fc.constantFrom("lab", null, 1, {}, [], undefined, ["lab", "lab"]) },
);
const versionArb = usually(fc.constant(1), fc.constantFrom(0, 2, "1", -1, 1.5, null, true, [1], { v: 1 }, 1e300));
const relayIdArb = usually(
  fc.stringMatching(/^[0-9a-f]{16}$/),
  fc.oneof(fc.constantFrom("0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", "0123456789abcdeg", "", 1234), fc.string({ maxLength: 20 })),
);
const reasonArb = usually(fc.string({ maxLength: 40 }), fc.constantFrom("r".repeat(200), "r".repeat(201), 42, null));
const refusalArb = usually(fc.record({ network: nameItem, reason: reasonArb }), fc.oneof(fc.constantFrom(null, "lab", [], { network: "lab" }), fc.record({ reason: reasonArb })));
const refusedArb = usually(fc.array(refusalArb, { maxLength: 4 }), fc.constantFrom(null, "lab", {}));
const typeArb = usually(
  fc.constantFrom("hello", "welcome", "attach", "attached", "detach", "ping", "pong"),
  fc.oneof(fc.constantFrom("hola", "Hello", "HELLO", "hello ", "", "data", null, 1, ["hello"], { type: "hello" }), fc.string({ maxLength: 8 })),
);
/** Some fields of every message type, some wrong, some missing, plus the odd unknown field. */
const controlValueArb = fc
  .record(
    {
      type: typeArb,
      version: versionArb,
      networks: networksArb,
      accepted: networksArb,
      refused: refusedArb,
      id: relayIdArb,
      name: nameItem,
      extra: fc.jsonValue({ maxDepth: 2 }),
    },
    { requiredKeys: ["type"] },
  )
  .chain((m) => fc.constantFrom(...Object.keys(m), undefined).map((drop) => ({ ...m, ...(drop && { [drop]: undefined }) })))
  .map((m) => JSON.parse(JSON.stringify(m)) as unknown); // undefined fields are absent on the wire
/** Anything fast-check makes that JSON can carry. */
const serialisable = fc
  .anything({ maxDepth: 3, withBoxedValues: true, withMap: true, withSet: true, withDate: true, withTypedArray: true, withSparseArray: true, withNullPrototype: true })
  .map((x) => {
    try {
      return JSON.stringify(x) ?? "null";
    } catch {
      return "null";
    }
  });

/** Damage that makes UTF-8 ill-formed, a byte order mark, or other bytes JSON does not expect. */
const badBytes = fc.constantFrom(
  [0xff], [0xfe], [0x80], [0xc0, 0x80], [0xc1, 0xbf], [0xe0, 0x80, 0x80], [0xed, 0xa0, 0x80], [0xed, 0xbf, 0xbf],
  [0xf4, 0x90, 0x80, 0x80], [0xf5, 0x80, 0x80, 0x80], [0xe2, 0x82], [0xf0, 0x9f, 0x98], [0xef, 0xbb, 0xbf], [0x00], [0x22], [0x5c],
);
const controlMessageArb = fc.oneof(
  { weight: 10, arbitrary: fc.tuple(controlValueArb, fc.constantFrom(undefined, 0, 2, "\t")).map(([v, indent]) => JSON.stringify(v, null, indent)).map(utf8) },
  { weight: 3, arbitrary: fc.jsonValue().map((v) => utf8(JSON.stringify(v))) },
  { weight: 2, arbitrary: serialisable.map(utf8) },
  {
    // A BOM or ill-formed UTF-8 inserted anywhere in a near-valid message.
    weight: 3,
    arbitrary: fc.tuple(controlValueArb, badBytes, fc.nat()).map(([v, bad, at]) => {
      const json = utf8(JSON.stringify(v));
      const i = at % (json.length + 1);
      return concat([json.subarray(0, i), Uint8Array.from(bad), json.subarray(i)]);
    }),
  },
  { weight: 2, arbitrary: fc.uint8Array({ maxLength: 64 }) },
  { weight: 1, arbitrary: fc.string({ unit: "binary", maxLength: 40 }).map(utf8) },
  { weight: 1, arbitrary: fc.integer({ min: 1, max: 3000 }).map((depth) => utf8("[".repeat(depth) + "]".repeat(depth))) },
).map(controlBytes);

/** Ways to damage a valid message. */
type Mutation =
  | { kind: "truncate"; at: number }
  | { kind: "flip"; at: number; xor: number }
  | { kind: "insert"; at: number; bytes: Uint8Array }
  | { kind: "delete"; at: number; count: number }
  | { kind: "length"; at: number; value: number };
const mutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ kind: fc.constant("truncate" as const), at: fc.nat() }),
  fc.record({ kind: fc.constant("flip" as const), at: fc.nat(), xor: fc.integer({ min: 1, max: 255 }) }),
  fc.record({ kind: fc.constant("insert" as const), at: fc.nat(), bytes: fc.uint8Array({ minLength: 1, maxLength: 8 }) }),
  fc.record({ kind: fc.constant("delete" as const), at: fc.nat(), count: fc.integer({ min: 1, max: 8 }) }),
  fc.record({ kind: fc.constant("length" as const), at: fc.nat(), value: lengthArb }),
);
function mutate(message: Uint8Array, m: Mutation): Uint8Array {
  const at = m.at % (message.length + 1);
  switch (m.kind) {
    case "truncate":
      return message.slice(0, at);
    case "flip": {
      const out = message.slice();
      if (at < out.length) out[at]! ^= m.xor;
      return out;
    }
    case "insert":
      return concat([message.subarray(0, at), m.bytes, message.subarray(at)]);
    case "delete":
      return concat([message.subarray(0, at), message.subarray(at + m.count)]);
    case "length": {
      // Overwrite 4 bytes with a length; aimed at a frame's length field when the message is data.
      const out = message.slice();
      if (out.length >= 4) new DataView(out.buffer).setUint32(Math.min(at, out.length - 4), m.value);
      return out;
    }
  }
}
const smallFrames = fc.array(fc.oneof({ weight: 8, arbitrary: fc.uint8Array({ maxLength: 300 }) }, { weight: 1, arbitrary: bigFrame }), { minLength: 1, maxLength: 6 });
const dataMessageArb = fc.record({ channel: fc.integer({ min: 0, max: 0xffff }), frames: smallFrames }).map(({ channel, frames }) => encodeData(channel, frames));
const tunnelMessageArb = fc.oneof(
  { weight: 3, arbitrary: dataMessageArb },
  { weight: 2, arbitrary: controlMessageArb },
  { weight: 6, arbitrary: fc.tuple(fc.oneof(dataMessageArb, controlMessageArb), fc.array(mutationArb, { minLength: 1, maxLength: 3 })).map(([msg, ms]) => ms.reduce(mutate, msg)) },
  { weight: 2, arbitrary: fc.tuple(fc.constantFrom(0x00, 0x01, 0x02, 0x7f, 0x80, 0xff), fc.uint8Array({ maxLength: 64 })).map(([t, rest]) => concat([Uint8Array.of(t), rest])) },
  { weight: 1, arbitrary: fc.uint8Array({ maxLength: 16 }) },
);

/** Hands the decoder the message as a view (Uint8Array or Buffer) into a larger buffer, to catch overruns. */
const placed = (message: Uint8Array, offset: number, asBuffer: boolean) => {
  const backing = new Uint8Array(offset + message.length + 8).fill(0x5a);
  backing.set(message, offset);
  return asBuffer ? Buffer.from(backing.buffer, offset, message.length) : backing.subarray(offset, offset + message.length);
};

// ───────────────────────────── properties ─────────────────────────────

describe("StreamDecoder (fuzz)", () => {
  test(
    "decodes exactly the frames an independent encoder wrote, however the stream is split",
    () => {
      fc.assert(
        fc.property(framesArb, splitArb, fc.array(fc.boolean(), { minLength: 1, maxLength: 3 }), (frames, how, buffers) => {
          const got = feed(split(encodeStream(frames), how), {
            buffers,
            afterPush: (d) => check(d.buffered <= 4 + MAX_FRAME, () => `buffered ${d.buffered} bytes`),
          });
          expect(got.error).toBeUndefined();
          expectSameFrames(got.frames, frames);
        }),
        params(),
      );
    },
    PROPERTY_TIMEOUT_MS,
  );

  test(
    "on arbitrary bytes, hands out what a reference parse finds and throws RangeError exactly at the first length above MAX_FRAME",
    () => {
      fc.assert(
        fc.property(arbitraryStreamArb, splitArb, fc.array(fc.boolean(), { minLength: 1, maxLength: 3 }), (bytes, how, buffers) => {
          const ref = referenceStream(bytes);
          const chunks = split(bytes, how);
          const got = feed(chunks, {
            buffers,
            afterPush: (d) => check(d.buffered <= 4 + MAX_FRAME, () => `buffered ${d.buffered} bytes`),
          });
          if (got.error !== undefined && !(got.error instanceof RangeError)) throw got.error;
          if (ref.badLengthAt === undefined) expect(got.error).toBeUndefined();
          else {
            expect(got.error).toBeInstanceOf(RangeError);
            // Thrown by the push that completed the bad length: the first chunk to reach past it.
            let end = 0;
            const reached = chunks.map((c) => (end += c.length)).find((e) => e >= ref.badLengthAt! + 4);
            expect(got.threwAt).toBe(reached!);
          }
          expectSameFrames(got.frames, ref.frames);
        }),
        params(),
      );
    },
    PROPERTY_TIMEOUT_MS,
  );

  test(
    "buffered counts exactly the bytes held back for an incomplete length or frame",
    () => {
      fc.assert(
        fc.property(arbitraryStreamArb, splitArb, (bytes, how) => {
          const ref = referenceStream(bytes);
          feed(split(bytes, how), {
            buffers: [false],
            afterPush: (d, end) => {
              const held = heldAfter(ref.records, end);
              check(d.buffered === held, () => `after ${end} bytes: buffered is ${d.buffered}, but ${held} bytes are held back`);
            },
          });
        }),
        params(),
      );
    },
    PROPERTY_TIMEOUT_MS,
  );
});

describe("decodeTunnelMessage (fuzz)", () => {
  test(
    "decodes a data message from an independent encoder exactly: channel and frames",
    () => {
      fc.assert(
        fc.property(fc.integer({ min: 0, max: 0xffff }), fc.array(frameArb, { minLength: 1, maxLength: 10 }), fc.nat(7), fc.boolean(), (channel, frames, offset, asBuffer) => {
          const got = runDecoder(placed(encodeData(channel, frames), offset, asBuffer));
          expect(got.ok).toBe(true);
          expect(got.channel).toBe(channel);
          expect(got.control).toBeUndefined();
          expectSameFrames(got.frames, frames);
        }),
        params(),
      );
    },
    PROPERTY_TIMEOUT_MS,
  );

  test(
    "on arbitrary and mutated messages, agrees with a reference decoder or throws RangeError/SyntaxError/TypeError as it does",
    () => {
      fc.assert(
        fc.property(tunnelMessageArb, fc.nat(7), fc.boolean(), (message, offset, asBuffer) => {
          expectAgrees(placed(message, offset, asBuffer));
        }),
        params(),
      );
    },
    PROPERTY_TIMEOUT_MS,
  );

  test(
    "rejects a data message without any frame (README: a channel, then one or more frames)",
    () => {
      fc.assert(
        fc.property(fc.integer({ min: 0, max: 0xffff }), (channel) => {
          const got = runDecoder(encodeData(channel, []));
          expect(got.frames.length).toBe(0);
          check(!got.ok && got.error === "RangeError", () => `a data message on channel ${channel} without any frame was ${got.ok ? "accepted" : `rejected with ${got.error}`}, expected a RangeError`);
        }),
        params(),
      );
    },
    PROPERTY_TIMEOUT_MS,
  );
});

describe("control messages (fuzz)", () => {
  test(
    "a control message yields a documented message (known type, hello version 1, valid names, ≤ 64, none twice) or throws SyntaxError/TypeError",
    () => {
      fc.assert(
        fc.property(controlMessageArb, (message) => {
          const got = expectAgrees(message);
          if (!got.ok) expect(["SyntaxError", "TypeError"]).toContain(got.error);
          else expect(referenceControl(got.control)).toEqual(got.control!);
        }),
        params(),
      );
    },
    PROPERTY_TIMEOUT_MS,
  );

  test(
    "parseControl on any JavaScript value returns what the reference accepts, else throws TypeError",
    () => {
      const values = fc.oneof(
        controlValueArb,
        fc.anything({ maxDepth: 3, withBoxedValues: true, withMap: true, withSet: true, withDate: true, withTypedArray: true, withSparseArray: true, withNullPrototype: true, withBigInt: true }),
      );
      fc.assert(
        fc.property(values, (value) => {
          const want = referenceControl(value);
          let got: unknown;
          try {
            got = parseControl(value);
          } catch (error) {
            if (!(error instanceof TypeError)) throw error;
            expect(error.message).toStartWith("Cannot decode control message: ");
            expect(want).toBeNull();
            return;
          }
          expect(got).toEqual(want!);
        }),
        params(),
      );
    },
    PROPERTY_TIMEOUT_MS,
  );
});

// ───────────────────────────── end to end ─────────────────────────────

const TOKEN = "fuzz-token-0123456789";
const quietLogger = { info: () => {}, warn: () => {} };

/** Resolves with `promise`, or fails naming `what` (a safety net against a hang, not a synchronisation). */
function within<T>(promise: Promise<T>, what: string, ms = 10_000): Promise<T> {
  let timer: ReturnType<typeof setTimeout>;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms))),
  ]);
}

/** A tunnel client whose events are promises: open, each control message, close. */
class Client {
  readonly ws: WebSocket;
  readonly opened: Promise<void>;
  readonly closed: Promise<number>;
  readonly controls: unknown[] = [];
  #waiters: (() => void)[] = [];
  constructor(base: string) {
    this.ws = new WebSocket(`${base.replace(/^http/, "ws")}/tunnel`, { headers: { Authorization: `Bearer ${TOKEN}` }, protocols: [TUNNEL_PROTOCOL] });
    this.ws.binaryType = "arraybuffer";
    this.opened = new Promise((resolve, reject) => {
      this.ws.onopen = () => resolve();
      this.ws.onerror = () => reject(new Error("tunnel WebSocket error"));
    });
    this.closed = new Promise((resolve) => (this.ws.onclose = (e) => resolve(e.code)));
    this.opened.catch(() => {});
    this.ws.onmessage = (e) => {
      if (typeof e.data === "string") throw new Error(`relay sent a text message: ${e.data}`);
      const bytes = new Uint8Array(e.data as ArrayBuffer);
      if (bytes[0] === 0x00) {
        const ref = referenceMessage(bytes);
        if (!ref.ok || !ref.control) throw new Error(`relay sent a malformed control message: ${[...bytes]}`);
        this.controls.push(ref.control);
        for (const w of this.#waiters.splice(0)) w();
      }
    };
  }
  /** Resolves once `count` control messages of `type` have arrived. */
  async waitFor(type: string, count = 1): Promise<void> {
    const n = () => this.controls.filter((c) => (c as { type: string }).type === type).length;
    while (n() < count) await new Promise<void>((resolve) => this.#waiters.push(resolve));
  }
}

/** One message of the end-to-end run: binary, text, or more than the 1 MiB a message may be. */
type WireMessage = { bytes: Uint8Array } | { text: string } | { oversize: number };

describe("relay tunnel endpoint (fuzz, end to end)", () => {
  let relay: RelayHandle;
  beforeAll(async () => {
    relay = await startRelay(parseConfig({ http: "127.0.0.1:0", tokens: [TOKEN] }), quietLogger);
  });
  afterAll(() => relay?.stop());

  async function expectWelcome(networks: string[]): Promise<Client> {
    const client = new Client(relay.http);
    await within(client.opened, "the tunnel to open");
    client.ws.send(controlBytes(utf8(JSON.stringify({ type: "hello", version: 1, networks }))));
    await within(client.waitFor("welcome"), "the welcome");
    expect(client.controls[0]).toEqual({ type: "welcome", version: 1, accepted: networks, refused: [], id: expect.stringMatching(/^[0-9a-f]{16}$/), name: expect.any(String) });
    return client;
  }

  test(
    "stays up under arbitrary messages after a hello: malformed ones close only that tunnel with 1008, the rest are served",
    async () => {
      const helloNames = fc.uniqueArray(poolName, { minLength: 1, maxLength: 4 });
      // Valid traffic for the attached channels, then maybe one arbitrary message.
      const validMessage = (channels: number) =>
        fc.oneof(
          fc.record({ channel: fc.nat(channels - 1), frames: smallFrames }).map(({ channel, frames }) => ({ bytes: encodeData(channel, frames) })),
          fc.constantFrom({ type: "ping" }, { type: "pong" }, { type: "attach", networks: ["lab"] }, { type: "detach", networks: ["lab"] }).map((c) => ({ bytes: controlBytes(utf8(JSON.stringify(c))) })),
        );
      const anyMessage: fc.Arbitrary<WireMessage> = fc.oneof(
        { weight: 20, arbitrary: tunnelMessageArb.map((bytes) => ({ bytes })) },
        { weight: 1, arbitrary: fc.string({ maxLength: 20 }).map((text) => ({ text })) },
        { weight: 1, arbitrary: fc.integer({ min: MESSAGE_LIMIT + 1, max: MESSAGE_LIMIT + 4096 }).map((oversize) => ({ oversize })) },
      );
      const runArb = helloNames.chain((names) =>
        fc.record({ names: fc.constant(names), valid: fc.array(validMessage(names.length), { maxLength: 5 }), last: fc.option(anyMessage, { freq: 4 }) }),
      );
      let malformedRuns = 0;
      let cleanRuns = 0;
      await fc.assert(
        fc.asyncProperty(runArb, async ({ names, valid, last }) => {
          const messages: WireMessage[] = [...valid, ...(last ? [last] : [])];
          // What the relay must make of each message, from the reference decoder: the first bad one closes.
          let expectClose: number | undefined;
          let pings = 0;
          // The server's side of the handshake: channels by number, claimed in the order names are offered.
          const attached = new Map(names.map((name, channel) => [channel, name] as const));
          let nextChannel = names.length;
          for (const m of messages) {
            if ("text" in m) expectClose = 1008;
            else if ("oversize" in m) expectClose = 1009;
            else {
              const ref = referenceMessage(m.bytes);
              // An empty data message is left out here: the zero-frame property covers it.
              if (ref.emptyData) return;
              const control = ref.control as { type?: string; networks?: string[] } | undefined;
              if (!ref.ok || (ref.channel !== undefined && !attached.has(ref.channel))) expectClose = 1008;
              // After the hello a client may only ping, answer pings, attach and detach.
              else if (control && !["ping", "pong", "attach", "detach"].includes(control.type!)) expectClose = 1008;
              else if (control?.type === "ping") pings++;
              else if (control?.type === "attach") {
                for (const name of control.networks!) {
                  const channel = nextChannel++;
                  if (![...attached.values()].includes(name)) attached.set(channel, name);
                }
              } else if (control?.type === "detach") {
                for (const [channel, name] of attached) if (control.networks!.includes(name)) attached.delete(channel);
              }
            }
            if (expectClose !== undefined) break;
          }
          const errorsBefore = relay.snapshot().protocolErrors;
          const client = await expectWelcome(names);
          for (const m of messages) {
            if ("text" in m) client.ws.send(m.text);
            else if ("oversize" in m) client.ws.send(new Uint8Array(m.oversize).fill(1));
            else client.ws.send(m.bytes);
          }
          if (expectClose !== undefined) {
            malformedRuns++;
            expect(await within(client.closed, "the relay to close a tunnel that sent a malformed message")).toBe(expectClose);
            // Bun closes an oversize message itself (1009); the relay counts it like any malformed input.
            await within(waitUntil(() => relay.snapshot().protocolErrors - errorsBefore === 1, "the error counted"), "the error counted");
            expect(relay.snapshot().protocolErrors - errorsBefore).toBe(1);
          } else {
            // Pings are answered in order: the pong to a last ping means every message was taken.
            cleanRuns++;
            client.ws.send(controlBytes(utf8('{"type":"ping"}')));
            await within(client.waitFor("pong", pings + 1), "the pong to the last ping");
            expect(relay.snapshot().protocolErrors).toBe(errorsBefore);
            client.ws.close(1000);
            expect(await within(client.closed, "the tunnel to close")).toBe(1000);
          }
        }),
        params(E2E_RUNS),
      );
      expect(malformedRuns).toBeGreaterThan(0);
      expect(cleanRuns).toBeGreaterThan(0);
      // Still serving: a fresh tunnel gets its welcome, and HTTP answers.
      const fresh = await expectWelcome(["default", "lab"]);
      fresh.ws.close(1000);
      await within(fresh.closed, "the fresh tunnel to close");
      expect(await (await fetch(`${relay.http}/healthz`)).text()).toBe("ok\n");
    },
    PROPERTY_TIMEOUT_MS,
  );
});

// ───────────────────────────── proxy headers ─────────────────────────────

/** The trusted proxies of these properties: 10.0.0.0/8 and fd00::/8. */
const PROXIES = trustedProxyList(["10.0.0.0/8", "fd00::/8"].map((t) => parseCidr(t)!))!;
/** An IPv6 address in the one spelling URLs use (lower case, longest zero run as ::). */
const v6 = (ip: string) => new URL(`http://[${ip}]/`).hostname.slice(1, -1);
const untrustedV4 = fc.ipV4().filter((ip) => !ip.startsWith("10."));
const untrustedV6 = fc.ipV6().filter((ip) => !ip.includes(".") && !/^fd/i.test(v6(ip)));
const trustedV4 = fc.tuple(fc.nat(255), fc.nat(255), fc.nat(255)).map(([a, b, c]) => `10.${a}.${b}.${c}`);
const trustedV6 = fc.tuple(fc.nat(0xff), fc.nat(0xffff)).map(([a, b]) => `fd${a.toString(16).padStart(2, "0")}::${b.toString(16)}`);
/** Header text as a client could send it: any ASCII but NUL, CR and LF. */
const headerText = fc.string({ unit: "binary-ascii", maxLength: 60 }).map((t) => t.replace(/[\0\r\n\x80-\xff]/g, ""));
const port = fc.integer({ min: 1, max: 65_535 });
const space = fc.constantFrom("", " ", "  ", "\t");

/** One hop of X-Forwarded-For in the spellings proxies use: bare, with a port, IPv6 bracketed or not. */
const xffHop = (ip: string) =>
  fc.tuple(fc.option(port), fc.boolean()).map(([p, bracket]) => (ip.includes(":") ? (p !== null || bracket ? `[${ip}]${p !== null ? `:${p}` : ""}` : ip) : p !== null ? `${ip}:${p}` : ip));
/** One element of Forwarded: for= in any case, quoted or not (IPv6 always quoted and bracketed), among other parameters. */
const forwardedElement = (ip: string) =>
  fc.tuple(fc.constantFrom("for", "For", "FOR"), fc.option(port), fc.boolean(), fc.subarray(["proto=https", 'by="[fd00::1]"', "host=relay.example.net", "by=_proxy1"]), fc.nat(3), space).map(([key, p, quote, others, at, sp]) => {
    const node = ip.includes(":") ? `"[${ip}]${p !== null ? `:${p}` : ""}"` : quote || p !== null ? `"${ip}${p !== null ? `:${p}` : ""}"` : ip;
    const params = [...others];
    params.splice(Math.min(at, params.length), 0, `${key}=${node}`);
    return params.join(`${sp};${sp}`);
  });

/** Hops joined with commas and spaces; sometimes over several header lines, which Headers joins with ", ". */
function headersWith(name: string, parts: string[], lines: number, sp: string): Headers {
  const headers = new Headers();
  const per = Math.max(1, Math.ceil(parts.length / lines));
  for (let i = 0; i < parts.length; i += per) headers.append(name, parts.slice(i, i + per).join(`${sp},${sp}`));
  return headers;
}

describe("client address from proxy headers (fuzz)", () => {
  test("from an untrusted peer no header, well-formed or not, ever changes the address", () => {
    const spoof = fc.oneof(
      headerText,
      fc.array(fc.oneof(untrustedV4, trustedV4, untrustedV6, trustedV6), { minLength: 1, maxLength: 4 }).map((ips) => ips.join(", ")),
    );
    fc.assert(
      fc.property(fc.oneof(untrustedV4, untrustedV6), port, fc.option(spoof), fc.option(spoof.map((t) => `for=${t}`)), (peer, peerPort, xff, forwarded) => {
        const headers = new Headers();
        if (xff !== null) headers.set("X-Forwarded-For", xff);
        if (forwarded !== null) headers.set("Forwarded", forwarded);
        const got = clientAddress({ address: peer, port: peerPort }, headers, PROXIES);
        expect(got).toEqual({ address: peer.includes(":") ? v6(peer) : peer, port: peerPort });
      }),
      params(),
    );
  });

  test("through trusted proxies the client is the rightmost untrusted hop, in every X-Forwarded-For and Forwarded spelling, whatever the client wrote to its left", () => {
    const run = fc.record({
      client: fc.oneof(untrustedV4, untrustedV6),
      spoofed: fc.array(fc.oneof(untrustedV4, untrustedV6), { maxLength: 3 }),
      proxies: fc.array(fc.oneof(trustedV4, trustedV6), { maxLength: 3 }),
      peer: fc.oneof(trustedV4, trustedV6),
      forwarded: fc.boolean(),
      lines: fc.integer({ min: 1, max: 3 }),
      sp: space,
    }).chain((r) => {
      const hops = [...r.spoofed, r.client, ...r.proxies].map((ip) => (r.forwarded ? forwardedElement(ip) : xffHop(ip)));
      return fc.tuple(...(hops as [fc.Arbitrary<string>])).map((parts) => ({ ...r, parts: parts as string[] }));
    });
    fc.assert(
      fc.property(run, ({ client, peer, forwarded, lines, sp, parts }) => {
        const headers = headersWith(forwarded ? "Forwarded" : "X-Forwarded-For", parts, lines, sp);
        const got = clientAddress({ address: peer, port: 40122 }, headers, PROXIES);
        expect(got.address).toBe(client.includes(":") ? v6(client) : client);
        expect(got.via).toBe(peer.includes(":") ? `[${v6(peer)}]:40122` : `${peer}:40122`);
      }),
      params(),
    );
  });

  test("from a trusted peer any header text gives a valid IP, never throws; both headers at once give the peer", () => {
    fc.assert(
      fc.property(trustedV4, fc.option(headerText), fc.option(headerText), (peer, xff, forwarded) => {
        const headers = new Headers();
        if (xff !== null) headers.set("X-Forwarded-For", xff);
        if (forwarded !== null) headers.set("Forwarded", forwarded);
        const got = clientAddress({ address: peer, port: 1 }, headers, PROXIES);
        expect(isIP(got.address)).not.toBe(0);
        if (xff !== null && forwarded !== null) expect(got).toEqual({ address: peer, port: 1 });
      }),
      params(),
    );
  });
});
