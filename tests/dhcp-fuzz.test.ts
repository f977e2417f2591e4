/**
 * Property-based fuzzing of the --dhcp host's decoders (issue 21), in tests/fuzz.test.ts's manner:
 * DHCP, IPv4, UDP and ARP decoders get generated and mutated input and must decode what this file's
 * own encoder produced, or refuse with RangeError; the host itself, fed random and mutated frames
 * through a switch, must count what it drops and still answer a good DISCOVER afterwards.
 *
 * FUZZ_SEED=<integer> replays a run; FUZZ_RUNS=<n> runs every property n times instead of 10,000.
 */
import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { CapturePort } from "./dhcp-packets.ts";
import { waitUntil } from "./helpers.ts";
import { GatewayHost, Network, decodeArp, decodeDhcp, decodeIpv4, decodeUdp, resolveDhcpNetwork, type DhcpNetworkSpec } from "../relay.ts";

const seedText = process.env.FUZZ_SEED;
const seed = seedText === undefined || seedText === "" ? undefined : Number(seedText);
const RUNS = Number(process.env.FUZZ_RUNS || 10_000);
const params = (numRuns = RUNS): fc.Parameters<any> => ({ numRuns, includeErrorInReport: true, ...(seed !== undefined && { seed }) });
const PROPERTY_TIMEOUT_MS = 120_000 * Math.max(1, RUNS / 10_000);

/** Either a result or a RangeError: anything else thrown is a bug. */
function decodesOrRefuses<T>(decode: () => T): T | undefined {
  try {
    return decode();
  } catch (error) {
    expect(error).toBeInstanceOf(RangeError);
    return undefined;
  }
}

const option = fc.record({ code: fc.integer({ min: 1, max: 254 }), value: fc.uint8Array({ maxLength: 40 }) });

/** A DHCP message with these options after option 53 (the test's own encoder). */
function encode(type: number, options: { code: number; value: Uint8Array }[]): Uint8Array {
  const body = [53, 1, type, ...options.flatMap((o) => [o.code, o.value.length, ...o.value]), 255];
  const m = new Uint8Array(240 + body.length);
  m.set([1, 1, 6], 0);
  new DataView(m.buffer).setUint32(236, 0x63825363);
  m.set([0x52, 0x54, 0, 1, 2, 3], 28);
  m.set(body, 240);
  return m;
}

describe("DHCP and packet decoders under fuzzing", () => {
  test("decodeDhcp: arbitrary bytes decode or throw RangeError", () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 700 }), (bytes) => void decodesOrRefuses(() => decodeDhcp(bytes))), params());
  }, PROPERTY_TIMEOUT_MS);

  test("decodeDhcp: a well-formed message gives each option's values concatenated in order (RFC 3396)", () => {
    const valid = fc.array(option.filter((o) => o.code !== 53 && o.code !== 52), { maxLength: 20 });
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 8 }), valid, (type, options) => {
        const m = decodeDhcp(encode(type, options));
        expect(m.type).toBe(type);
        expect(m.chaddr).toBe("52:54:00:01:02:03");
        for (const code of new Set(options.map((o) => o.code))) {
          const expected = options.filter((o) => o.code === code).flatMap((o) => [...o.value]);
          expect([...m.options.get(code)!]).toEqual(expected);
        }
      }),
      params(),
    );
  }, PROPERTY_TIMEOUT_MS);

  test("decodeDhcp: a message with bytes flipped, cut or overloaded decodes or throws RangeError", () => {
    const mutated = fc
      .tuple(fc.integer({ min: 1, max: 8 }), fc.array(option, { maxLength: 12 }), fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { maxLength: 8 }), fc.nat())
      .map(([type, options, flips, cut]) => {
        const m = encode(type, options);
        for (const [at, value] of flips) m[at % m.length] = value;
        return m.subarray(0, 236 + (cut % (m.length - 235)));
      });
    fc.assert(fc.property(mutated, (bytes) => void decodesOrRefuses(() => decodeDhcp(bytes))), params());
  }, PROPERTY_TIMEOUT_MS);

  test("decodeIpv4, decodeUdp and decodeArp: arbitrary frames decode within their bytes or throw RangeError", () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 14, maxLength: 200 }), (frame) => {
        const ip = decodesOrRefuses(() => decodeIpv4(frame));
        if (ip) {
          expect(ip.payload.byteOffset + ip.payload.length).toBeLessThanOrEqual(frame.byteOffset + frame.length);
          const udp = decodesOrRefuses(() => decodeUdp(ip.payload));
          if (udp) expect(udp.payload.length).toBeLessThanOrEqual(ip.payload.length - 8);
        }
        decodesOrRefuses(() => decodeArp(frame));
      }),
      params(),
    );
  }, PROPERTY_TIMEOUT_MS);
});

/** Ethernet + IPv4 + UDP (no UDP checksum) from 10.9.0.77 to `dst`, header checksum right. */
function udpFrame(dstMac: Uint8Array, dst: number, dport: number, payload: Uint8Array): Uint8Array {
  const f = new Uint8Array(42 + payload.length);
  const v = new DataView(f.buffer);
  f.set(dstMac, 0);
  f.set([0x52, 0x54, 0, 9, 9, 9], 6);
  v.setUint16(12, 0x0800);
  f[14] = 0x45;
  v.setUint16(16, 28 + payload.length);
  f[22] = 64;
  f[23] = 17;
  v.setUint32(26, 0x0a09004d);
  v.setUint32(30, dst);
  let s = 0;
  for (let i = 14; i < 34; i += 2) s += (f[i]! << 8) | f[i + 1]!;
  while (s > 0xffff) s = (s & 0xffff) + (s >>> 16);
  v.setUint16(24, ~s & 0xffff);
  v.setUint16(34, 68);
  v.setUint16(36, dport);
  v.setUint16(38, 8 + payload.length);
  f.set(payload, 42);
  return f;
}

describe("the gateway host under fuzzing", () => {
  test("random and mutated DHCP, DNS, ARP and ICMP frames never throw, are counted, and a good DISCOVER is still answered", async () => {
    const warnings: string[] = [];
    const spec = resolveDhcpNetwork({ network: "lab", cidr: "10.9.0.0/24" }) as DhcpNetworkSpec;
    const network = new Network("lab", { ageingMs: 300_000 });
    const host = new GatewayHost({ spec, reservations: [], relayName: "fuzz", log: { info: () => {}, warn: (l) => warnings.push(l) }, probeMs: 1 });
    const vm = new CapturePort();
    network.attach(host);
    network.attach(vm);
    const broadcast = new Uint8Array(6).fill(255);
    const frames = fc.oneof(
      fc.uint8Array({ minLength: 14, maxLength: 400 }).map((f) => {
        f.set(broadcast, 0);
        return f;
      }),
      fc.tuple(fc.integer({ min: 1, max: 8 }), fc.array(option, { maxLength: 10 }), fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { maxLength: 4 })).map(([type, options, flips]) => {
        const m = encode(type, options);
        for (const [at, value] of flips) m[at % m.length] = value;
        return udpFrame(broadcast, 0xffffffff, 67, m);
      }),
      fc.uint8Array({ maxLength: 300 }).map((q) => udpFrame(host.mac, 0x0a090001, 53, q)),
    );
    const runs = Math.max(50, Math.round(RUNS / 10));
    await fc.assert(
      fc.asyncProperty(fc.array(frames, { minLength: 1, maxLength: 8 }), async (batch) => {
        for (const f of batch) vm.receive(f);
        await new Promise<void>((r) => setImmediate(r));
      }),
      params(runs),
    );
    expect(host.counters.malformed).toBeGreaterThan(0);
    expect(warnings.filter((w) => w.includes("could not be handled"))).toEqual([]);
    // Still serving: a fresh client on a fresh port gets an offer.
    const fresh = new CapturePort();
    network.attach(fresh);
    const discover = encode(1, []);
    discover.set([0x52, 0x54, 0, 0xfe, 0xfe, 0xfe], 28);
    const frame = udpFrame(broadcast, 0xffffffff, 67, discover);
    frame.set([0x52, 0x54, 0, 0xfe, 0xfe, 0xfe], 6);
    fresh.receive(frame);
    const offered = () => fresh.sent.some((f) => f.length > 282 && f[42] === 2 && f[42 + 28 + 3] === 0xfe && f.subarray(42 + 240).includes(53));
    await waitUntil(offered, "an OFFER for the fresh client");
    host.close();
  }, PROPERTY_TIMEOUT_MS);
});
