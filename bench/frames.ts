/**
 * Bench frame format, shared by the load generator, the sink and the tunnel client.
 *
 * Ethernet:  dst MAC (6) | src MAC (6) | ethertype 0x88B5 (2)
 * Payload:   kind u16 @14 | seq u64 BE @16 | checksum u32 BE @24 | filler @28..end
 *
 * checksum = mix(hash(filler), seq, frame length), so the generator can stamp a frame in O(1) (the
 * filler hash of each preallocated slot is computed once) while the sink re-hashes every byte it got:
 * a flipped bit anywhere in seq, checksum or filler is counted as corrupt.
 */

export const ETHERTYPE = 0x88b5;
export const HEADER = 28; // Ethernet header + kind + seq + checksum
export const KIND_DATA = 1;
export const KIND_ANNOUNCE = 2;
export const KIND_PING = 3;
export const KIND_PONG = 4;
export const MAX_FRAME = 69_632; // what QEMU 7.2 accepts on a stream socket

export const GEN_MAC = Uint8Array.of(0x02, 0, 0, 0, 0, 0x01);
export const SINK_MAC = Uint8Array.of(0x02, 0, 0, 0, 0, 0x02);
export const BROADCAST = Uint8Array.of(0xff, 0xff, 0xff, 0xff, 0xff, 0xff);

export function mac(text: string): Uint8Array {
  const parts = text.split(":").map((p) => parseInt(p, 16));
  if (parts.length !== 6 || parts.some((p) => !(p >= 0 && p <= 255))) throw new Error(`bad MAC ${text}`);
  return Uint8Array.from(parts);
}

export function macText(b: Uint8Array, off = 0): string {
  return Array.from(b.subarray(off, off + 6), (x) => x.toString(16).padStart(2, "0")).join(":");
}

const P = 0x01000193;
const scratch = new Uint8Array(MAX_FRAME + 8);
const s32 = new Int32Array(scratch.buffer);

/** Hash of bytes [s, e) of `b`: four FNV-style lanes over 32-bit words (copied to an aligned buffer). */
export function hashBytes(b: Uint8Array, s: number, e: number): number {
  const n = e - s;
  scratch.set(b.subarray(s, e));
  const w = n >> 2;
  let h1 = 0x811c9dc5 | 0,
    h2 = 0x2c9277b5 | 0,
    h3 = 0x01234567 | 0,
    h4 = 0x76543210 | 0;
  let i = 0;
  for (; i + 4 <= w; i += 4) {
    h1 = Math.imul(h1 ^ s32[i]!, P);
    h2 = Math.imul(h2 ^ s32[i + 1]!, P);
    h3 = Math.imul(h3 ^ s32[i + 2]!, P);
    h4 = Math.imul(h4 ^ s32[i + 3]!, P);
  }
  for (; i < w; i++) h1 = Math.imul(h1 ^ s32[i]!, P);
  for (let j = w << 2; j < n; j++) h2 = Math.imul(h2 ^ scratch[j]!, P);
  return (h1 ^ Math.imul(h2, 0x9e3779b1) ^ Math.imul(h3, 0x85ebca77) ^ Math.imul(h4, 0xc2b2ae3d)) >>> 0;
}

/** Folds the sequence number and the frame length into a filler hash. */
export function mixSeq(fillerHash: number, seqHi: number, seqLo: number, len: number): number {
  let h = fillerHash | 0;
  h = Math.imul(h ^ seqLo, P);
  h = Math.imul(h ^ seqHi, P);
  h = Math.imul(h ^ len, P);
  h ^= h >>> 15;
  return h >>> 0;
}

let rng = 0x9e3779b9;
/** Fills `b[s, e)` with pseudo-random bytes (xorshift32; fast and deterministic). */
export function fillRandom(b: Uint8Array, s: number, e: number) {
  for (let i = s; i < e; i++) {
    rng ^= rng << 13;
    rng ^= rng >>> 17;
    rng ^= rng << 5;
    b[i] = rng & 255;
  }
}

/**
 * Writes a complete frame header at `f[off..]` (frame start, not the length prefix) and returns
 * nothing; the filler must already be in place. `seq` must be < 2^53.
 */
export function stamp(
  view: DataView,
  f: Uint8Array,
  off: number,
  len: number,
  dst: Uint8Array,
  src: Uint8Array,
  kind: number,
  seq: number,
  fillerHash: number,
) {
  f.set(dst, off);
  f.set(src, off + 6);
  view.setUint16(off + 12, ETHERTYPE);
  view.setUint16(off + 14, kind);
  const hi = Math.floor(seq / 0x1_0000_0000) >>> 0;
  const lo = seq >>> 0;
  view.setUint32(off + 16, hi);
  view.setUint32(off + 20, lo);
  view.setUint32(off + 24, mixSeq(fillerHash, hi, lo, len));
}

/** Builds one standalone frame (no length prefix) with random filler. */
export function buildFrame(len: number, dst: Uint8Array, src: Uint8Array, kind: number, seq: number): Uint8Array {
  const f = new Uint8Array(len);
  fillRandom(f, HEADER, len);
  stamp(new DataView(f.buffer), f, 0, len, dst, src, kind, seq, hashBytes(f, HEADER, len));
  return f;
}

/**
 * Reassembles QEMU stream framing (u32 BE length + frame) from arbitrarily split chunks and calls
 * `onFrame(buf, start, len)` for each frame; `buf` is only valid during the call.
 */
export class StreamDeframer {
  private pend = new Uint8Array(4 + MAX_FRAME);
  private pendLen = 0;
  constructor(
    private onFrame: (buf: Uint8Array, start: number, len: number) => void,
    private onError: (msg: string) => void,
  ) {}

  push(chunk: Uint8Array) {
    const n = chunk.length;
    let off = 0;
    const pend = this.pend;
    if (this.pendLen > 0) {
      if (this.pendLen < 4) {
        const take = Math.min(4 - this.pendLen, n);
        pend.set(chunk.subarray(0, take), this.pendLen);
        this.pendLen += take;
        off = take;
        if (this.pendLen < 4) return;
      }
      const flen = ((pend[0]! << 24) | (pend[1]! << 16) | (pend[2]! << 8) | pend[3]!) >>> 0;
      if (flen > MAX_FRAME) return this.onError(`length prefix ${flen} too large`);
      const take = Math.min(4 + flen - this.pendLen, n - off);
      pend.set(chunk.subarray(off, off + take), this.pendLen);
      this.pendLen += take;
      off += take;
      if (this.pendLen < 4 + flen) return;
      this.pendLen = 0;
      this.onFrame(pend, 4, flen);
    }
    while (n - off >= 4) {
      const flen = ((chunk[off]! << 24) | (chunk[off + 1]! << 16) | (chunk[off + 2]! << 8) | chunk[off + 3]!) >>> 0;
      if (flen > MAX_FRAME) return this.onError(`length prefix ${flen} too large`);
      if (n - off - 4 < flen) break;
      this.onFrame(chunk, off + 4, flen);
      off += 4 + flen;
    }
    if (off < n) {
      pend.set(chunk.subarray(off), 0);
      this.pendLen = n - off;
    }
  }
}
