import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import {
  FrameBatch,
  MAX_FRAME,
  MSG_CONTROL,
  StreamDecoder,
  StreamWriter,
  dataHeader,
  decodeTunnelMessage,
  encodeControl,
  encodeFrames,
  formatMac,
  macBytes,
  macKey,
  parseControl,
  parseHostPort,
  parseMac,
} from "../relay.ts";
import { makeFrame, mac } from "./helpers.ts";

function decodeAll(chunks: Uint8Array[]): Uint8Array[] {
  const out: Uint8Array[] = [];
  const decoder = new StreamDecoder();
  for (const c of chunks) decoder.push(c, (f) => out.push(f.slice()));
  return out;
}

describe("StreamDecoder", () => {
  const frames = [makeFrame("02:00:00:00:00:02", "02:00:00:00:00:01", 60), makeFrame("ff:ff:ff:ff:ff:ff", "02:00:00:00:00:03", 1486), makeFrame("02:00:00:00:00:01", "02:00:00:00:00:02", 0)];
  const wire = encodeFrames(frames);

  test("push() reassembles a frame split at every offset", () => {
    for (let cut = 0; cut <= wire.length; cut++) {
      const got = decodeAll([wire.subarray(0, cut), wire.subarray(cut)]);
      expect(got).toEqual(frames);
    }
  });

  test("push() reassembles frames split at every pair of offsets", () => {
    for (let a = 0; a <= wire.length; a += 7) {
      for (let b = a; b <= wire.length; b += 5) {
        expect(decodeAll([wire.subarray(0, a), wire.subarray(a, b), wire.subarray(b)])).toEqual(frames);
      }
    }
  });

  test("push() reassembles a stream fed one byte at a time", () => {
    expect(decodeAll(Array.from(wire, (b) => Uint8Array.of(b)))).toEqual(frames);
  });

  test("push() accepts a frame of exactly MAX_FRAME bytes", () => {
    const big = new Uint8Array(MAX_FRAME).fill(0xab);
    const got = decodeAll([encodeFrames([big])]);
    expect(got.length).toBe(1);
    expect(got[0]!.length).toBe(MAX_FRAME);
  });

  test("push() throws RangeError for a length above MAX_FRAME, even split inside the header", () => {
    const header = Uint8Array.of(0, 0x01, 0x10, 0x70); // 69,744
    expect(() => new StreamDecoder().push(header, () => {})).toThrow(RangeError);
    const d = new StreamDecoder();
    d.push(header.subarray(0, 2), () => {});
    expect(() => d.push(header.subarray(2), () => {})).toThrow(
      "Cannot decode frame: length 69744 exceeds the maximum of 69632 bytes",
    );
  });

  test("push() hands a 0-length frame to the switch as empty (the switch drops it)", () => {
    const got = decodeAll([Uint8Array.of(0, 0, 0, 0), encodeFrames([frames[0]!])]);
    expect(got.map((f) => f.length)).toEqual([0, frames[0]!.length]);
  });

  test("a frame it reassembles is owned, with headroom and its length in front; one whole in a chunk is a view; midFrame says a frame is in progress", () => {
    const d = new StreamDecoder(3);
    const got: [Uint8Array, boolean][] = [];
    const two = encodeFrames([frames[0]!, frames[1]!]);
    const cut = 4 + frames[0]!.length + 6; // inside the second frame
    d.push(two.subarray(0, cut), (f, owned) => void got.push([f, owned]));
    expect(d.midFrame).toBe(true);
    d.push(two.subarray(cut), (f, owned) => void got.push([f, owned]));
    expect(d.midFrame).toBe(false);
    expect(got.map(([f, owned]) => [f, owned])).toEqual([[frames[0]!, false], [frames[1]!, true]]);
    const [owned] = got[1]!;
    const whole = new Uint8Array(owned.buffer, owned.byteOffset - 7, owned.length + 7);
    expect(whole.byteOffset).toBe(0);
    expect(whole.subarray(3)).toEqual(encodeFrames([frames[1]!]));
    d.push(two.subarray(0, 2), () => {});
    expect(d.midFrame).toBe(true);
  });

  test("buffered counts bytes held for an incomplete frame", () => {
    const d = new StreamDecoder();
    d.push(wire.subarray(0, 10), () => {});
    expect(d.buffered).toBe(6);
  });
});

describe("StreamWriter", () => {
  /**
   * A socket that takes a random share of each write (sometimes nothing) and drains at random: what
   * reaches it is every frame, in order, length-prefixed, and no frame's buffer was changed.
   */
  test("delivers frames of every size in order through partial writes, leaving their buffers as they were", () => {
    const pushArb = fc.record({
      length: fc.oneof(fc.integer({ min: 1, max: 2000 }), fc.integer({ min: 2000, max: MAX_FRAME })),
      offset: fc.integer({ min: 0, max: 9 }),
      drain: fc.boolean(),
    });
    const sharesArb = fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { minLength: 1, maxLength: 16 });
    fc.assert(
      fc.property(fc.array(pushArb, { minLength: 1, maxLength: 24 }), sharesArb, (pushes, shares) => {
        const out: Uint8Array[] = [];
        let w = 0;
        let draining = false;
        const writer = new StreamWriter((data) => {
          const share = shares[w++ % shares.length]!;
          const n = draining ? Math.ceil(data.length * Math.max(share, 0.5)) : Math.floor(data.length * share);
          out.push(data.slice(0, n));
          return n;
        }, Infinity);
        const sent: Uint8Array[] = [];
        const buffers: [Uint8Array, Uint8Array][] = [];
        let serial = 0;
        for (const { length, offset, drain } of pushes) {
          const buffer = Uint8Array.from({ length: offset + length + 3 }, () => serial++ & 0xff);
          buffers.push([buffer, buffer.slice()]);
          const frame = buffer.subarray(offset, offset + length);
          expect(writer.push(frame)).toBe(true);
          sent.push(frame.slice());
          if (drain) writer.drain();
        }
        writer.flush();
        draining = true;
        for (let i = 0; writer.queued > 0; i++) {
          if (i > 1_000) throw new Error("the writer never emptied");
          writer.drain();
        }
        for (const [buffer, copy] of buffers) expect(buffer).toEqual(copy);
        const wire = new Uint8Array(out.reduce((n, c) => n + c.length, 0));
        let at = 0;
        for (const c of out) {
          wire.set(c, at);
          at += c.length;
        }
        expect(wire).toEqual(encodeFrames(sent));
      }),
      { numRuns: 300 },
    );
  });
});

describe("FrameBatch", () => {
  test("append() length-prefixes frames behind the header and reset() keeps the header", () => {
    const batch = new FrameBatch(dataHeader(0x0102));
    expect(batch.empty).toBe(true);
    batch.append(Uint8Array.of(9, 8, 7));
    expect([...batch.view()]).toEqual([1, 1, 2, 0, 0, 0, 3, 9, 8, 7]);
    batch.reset();
    expect(batch.empty).toBe(true);
    batch.append(Uint8Array.of(5));
    expect([...batch.view()]).toEqual([1, 1, 2, 0, 0, 0, 1, 5]);
  });
});

describe("decodeTunnelMessage", () => {
  const collect = (message: Uint8Array) => {
    const frames: [number, number[]][] = [];
    const controls: unknown[] = [];
    decodeTunnelMessage(message, (c) => controls.push(c), (ch, f) => frames.push([ch, [...f]]));
    return { frames, controls };
  };

  test("decodes a data message with several frames on its channel", () => {
    const batch = new FrameBatch(dataHeader(3));
    batch.append(Uint8Array.of(1, 2));
    batch.append(Uint8Array.of(3));
    expect(collect(batch.view()).frames).toEqual([[3, [1, 2]], [3, [3]]]);
  });

  test("decodes a control message", () => {
    const msg = encodeControl({ type: "ping" });
    expect(msg[0]).toBe(MSG_CONTROL);
    expect(collect(msg).controls).toEqual([{ type: "ping" }]);
  });

  test("rejects empty, unknown, truncated and overrunning messages", () => {
    expect(() => collect(new Uint8Array(0))).toThrow(RangeError);
    expect(() => collect(Uint8Array.of(7, 0, 0))).toThrow("unknown type 7");
    expect(() => collect(Uint8Array.of(1, 0))).toThrow(RangeError);
    expect(() => collect(Uint8Array.of(1, 0, 0, 0, 0))).toThrow("truncated frame length");
    expect(() => collect(Uint8Array.of(1, 0, 0, 0, 0, 0, 9, 1))).toThrow("overruns the message");
    expect(() => collect(Uint8Array.of(1, 0, 0, 0, 1, 0x10, 0x70))).toThrow("exceeds the maximum");
    expect(() => collect(Uint8Array.of(0, 0x7b))).toThrow(SyntaxError);
    expect(() => collect(Uint8Array.of(0, 0x31))).toThrow(TypeError);
  });
});

describe("macKey", () => {
  test("turns every byte into a distinct number and formats back", () => {
    for (const text of ["00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff", "52:54:00:12:34:56", "80:00:00:00:00:01", "00:00:80:00:00:00"]) {
      expect(formatMac(macKey(mac(text), 0))).toBe(text);
    }
    expect(macKey(mac("00:00:00:00:00:01"), 0)).not.toBe(macKey(mac("00:00:00:00:01:00"), 0));
  });

  test("parseMac reads the text macKey's number is written as, either case, ':' or '-'; macBytes gives the bytes back", () => {
    for (const text of ["00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff", "52:54:00:12:34:56", "80:00:00:00:00:01", "00:00:80:00:00:00"]) {
      expect(parseMac(text)).toBe(macKey(mac(text), 0));
      expect(macBytes(parseMac(text)!)).toEqual(mac(text));
    }
    expect(parseMac("52-54-00-AB-cd-EF")).toBe(parseMac("52:54:00:ab:cd:ef")!);
    for (const bad of ["", "52:54:00:12:34", "52:54:00:12:34:56:78", "52:54:00:12:34:5g", "525400123456", " 52:54:00:12:34:56", "52:54-00:12:34:56", "52-54-00-12-34:56"]) expect(parseMac(bad)).toBeUndefined();
  });
});

describe("parseHostPort", () => {
  test("takes IPv4, names and bracketed IPv6; refuses the rest", () => {
    expect(parseHostPort("127.0.0.1:80")).toEqual({ host: "127.0.0.1", port: 80 });
    expect(parseHostPort("localhost:0")).toEqual({ host: "localhost", port: 0 });
    expect(parseHostPort("[::1]:8080")).toEqual({ host: "::1", port: 8080 });
    for (const bad of ["127.0.0.1", ":80", "::1:80", "host:65536", "host:-1", "a b:1", ""]) {
      expect(parseHostPort(bad)).toBeNull();
    }
  });
});

describe("parseControl", () => {
  const hello = (fields: object) => ({ type: "hello", version: 1, networks: ["lab"], ...fields });

  test("accepts every message the protocol defines", () => {
    expect(parseControl(hello({ id: "0123456789abcdef", name: "site-a" }))).toEqual({ type: "hello", version: 1, networks: ["lab"], id: "0123456789abcdef", name: "site-a" });
    expect(parseControl({ type: "welcome", version: 1, accepted: ["lab"], refused: [{ network: "dev", reason: "not allowed for this token" }] }).type).toBe("welcome");
    expect(parseControl({ type: "attach", networks: ["a", "b"] })).toEqual({ type: "attach", networks: ["a", "b"] });
    expect(parseControl({ type: "attached", accepted: [], refused: [] }).type).toBe("attached");
    expect(parseControl({ type: "detach", networks: ["a"] }).type).toBe("detach");
    expect(parseControl({ type: "ping" })).toEqual({ type: "ping" });
  });

  const bad: [string, unknown, RegExp][] = [
    ["nested arrays posing as names", hello({ networks: ["lab", ["lab"], [["lab"]]] }), /networks\.1: expected a network name/],
    ["a version other than 1", hello({ version: 99 }), /version: expected version 1/],
    ["a version as a string", hello({ version: "1" }), /version: expected version 1/],
    ["a name twice", hello({ networks: ["lab", "lab"] }), /networks: a network is named twice/],
    ["65 networks", hello({ networks: Array.from({ length: 65 }, (_, i) => `n${i}`) }), /networks: expected at most 64 networks/],
    ["a bad network name", hello({ networks: ["bad name"] }), /networks\.0: expected a network name/],
    ["no networks", { type: "hello", version: 1 }, /networks: missing/],
    ["a bad relay id", hello({ id: "xyz" }), /id: expected a relay id/],
    ["a relay name with a newline", hello({ name: "a\nb" }), /name: expected a relay name/],
    ["an unknown type", { type: "hola" }, /unknown control message type/],
    ["a type that is not a string", { type: ["hello"] }, /unknown control message type/],
    ["null", null, /unknown control message type/],
    ["a welcome refusing a non-name", { type: "welcome", version: 1, accepted: [], refused: [{ network: "\u001b[31m", reason: "x" }] }, /refused\.0\.network: expected a network name/],
  ];
  test.each(bad)("rejects %s with a TypeError naming the field", (_what, json, message) => {
    expect(() => parseControl(json)).toThrow(TypeError);
    expect(() => parseControl(json)).toThrow(message);
  });
});
