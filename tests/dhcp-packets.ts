/**
 * Packets for the --dhcp tests, built and read by the tests' own code (not relay.ts's): DHCP
 * messages, ARP, ICMP and DNS queries in Ethernet frames, as a fake VM sends and receives them.
 */
import dnsPacket from "dns-packet";
import { Port } from "../relay.ts";
import { mac, type StreamPeer } from "./helpers.ts";

export const GATEWAY = "10.9.0.1";

export const ip = (text: string) => text.split(".").reduce((n, p) => n * 256 + Number(p), 0);
export const ipText = (n: number) => `${n >>> 24}.${(n >>> 16) & 255}.${(n >>> 8) & 255}.${n & 255}`;

export function sum16(bytes: Uint8Array): number {
  let s = 0;
  for (let i = 0; i < bytes.length; i += 2) s += (bytes[i]! << 8) | (bytes[i + 1] ?? 0);
  while (s > 0xffff) s = (s & 0xffff) + (s >>> 16);
  return ~s & 0xffff;
}

/** Ethernet + IPv4 (checksummed) around `payload`. */
export function ipFrame(dst: string, src: string, from: number, to: number, protocol: number, payload: Uint8Array): Uint8Array {
  const f = new Uint8Array(34 + payload.length);
  const v = new DataView(f.buffer);
  f.set(mac(dst), 0);
  f.set(mac(src), 6);
  v.setUint16(12, 0x0800);
  f[14] = 0x45;
  v.setUint16(16, 20 + payload.length);
  f[22] = 64;
  f[23] = protocol;
  v.setUint32(26, from);
  v.setUint32(30, to);
  v.setUint16(24, sum16(f.subarray(14, 34)));
  f.set(payload, 34);
  return f;
}

/** UDP without a checksum (0: allowed over IPv4). */
export function udpFrame(dst: string, src: string, from: number, to: number, sport: number, dport: number, payload: Uint8Array): Uint8Array {
  const u = new Uint8Array(8 + payload.length);
  const v = new DataView(u.buffer);
  v.setUint16(0, sport);
  v.setUint16(2, dport);
  v.setUint16(4, u.length);
  u.set(payload, 8);
  return ipFrame(dst, src, from, to, 17, u);
}

export interface DhcpOut {
  xid?: number;
  ciaddr?: string;
  requested?: string;
  server?: string;
  hostname?: string;
  /** Raw option bytes after option 53 (and before the end option). */
  extra?: number[];
  op?: number;
  /** Bytes of the file and sname fields (option overload). */
  file?: number[];
  sname?: number[];
  /** Leave out the end option and cut the message here. */
  cut?: number;
}

export const TYPE = { DISCOVER: 1, OFFER: 2, REQUEST: 3, DECLINE: 4, ACK: 5, NAK: 6, RELEASE: 7, INFORM: 8 } as const;

export function dhcpMessage(client: string, type: number, o: DhcpOut = {}): Uint8Array {
  const options: number[] = [53, 1, type];
  if (o.requested) options.push(50, 4, ...o.requested.split(".").map(Number));
  if (o.server) options.push(54, 4, ...o.server.split(".").map(Number));
  if (o.hostname) options.push(12, o.hostname.length, ...new TextEncoder().encode(o.hostname));
  options.push(...(o.extra ?? []), 255);
  const m = new Uint8Array(240 + options.length);
  const v = new DataView(m.buffer);
  m[0] = o.op ?? 1;
  m[1] = 1;
  m[2] = 6;
  v.setUint32(4, o.xid ?? 0x1234);
  v.setUint32(12, o.ciaddr ? ip(o.ciaddr) : 0);
  m.set(mac(client), 28);
  if (o.sname) m.set(o.sname, 44);
  if (o.file) m.set(o.file, 108);
  v.setUint32(236, 0x63825363);
  m.set(options, 240);
  return o.cut === undefined ? m : m.subarray(0, o.cut);
}

export function dhcpFrame(client: string, type: number, o: DhcpOut = {}): Uint8Array {
  const from = o.ciaddr ? ip(o.ciaddr) : 0;
  return udpFrame("ff:ff:ff:ff:ff:ff", client, from, 0xffffffff, 68, 67, dhcpMessage(client, type, o));
}

export interface DhcpIn {
  dstMac: string;
  dstIp: string;
  type: number;
  xid: number;
  yiaddr: string;
  chaddr: string;
  options: Map<number, Uint8Array>;
}

/** Reads a DHCP reply out of a frame; undefined for anything else. */
export function readDhcp(f: Uint8Array): DhcpIn | undefined {
  const v = new DataView(f.buffer, f.byteOffset, f.byteLength);
  if (f.length < 42 + 240 || v.getUint16(12) !== 0x0800 || f[23] !== 17 || v.getUint16(34) !== 67 || v.getUint16(36) !== 68) return undefined;
  const m = f.subarray(42);
  const options = new Map<number, Uint8Array>();
  for (let i = 240; i < m.length && m[i] !== 255; ) {
    if (m[i] === 0) {
      i++;
      continue;
    }
    options.set(m[i]!, m.subarray(i + 2, i + 2 + m[i + 1]!));
    i += 2 + m[i + 1]!;
  }
  const hex = (b: Uint8Array) => [...b].map((x) => x.toString(16).padStart(2, "0")).join(":");
  return {
    dstMac: hex(f.subarray(0, 6)),
    dstIp: ipText(v.getUint32(30)),
    type: options.get(53)?.[0] ?? 0,
    xid: v.getUint32(42 + 4),
    yiaddr: ipText(v.getUint32(42 + 16)),
    chaddr: hex(m.subarray(28, 34)),
    options,
  };
}

export const optIp = (m: DhcpIn, code: number) => ipText(new DataView(m.options.get(code)!.buffer, m.options.get(code)!.byteOffset).getUint32(0));
export const optU32 = (m: DhcpIn, code: number) => new DataView(m.options.get(code)!.buffer, m.options.get(code)!.byteOffset).getUint32(0);
export const optText = (m: DhcpIn, code: number) => new TextDecoder().decode(m.options.get(code));

/** The next DHCP reply of `type` for `client` that this VM receives. */
export async function reply(vm: StreamPeer, client: string, type: number, timeoutMs = 5_000): Promise<DhcpIn> {
  const f = await vm.frames.next((f) => {
    const m = readDhcp(f);
    return m !== undefined && m.chaddr === client && m.type === type;
  }, timeoutMs);
  return readDhcp(f)!;
}

/** DISCOVER, OFFER, REQUEST, ACK: the lease's address. */
export async function lease(vm: StreamPeer, client: string, o: DhcpOut = {}): Promise<DhcpIn> {
  vm.send(dhcpFrame(client, TYPE.DISCOVER, o));
  const offer = await reply(vm, client, TYPE.OFFER);
  vm.send(dhcpFrame(client, TYPE.REQUEST, { ...o, requested: offer.yiaddr, server: optIp(offer, 54) }));
  return reply(vm, client, TYPE.ACK);
}

export function arpFrame(op: number, src: string, senderIp: number, targetIp: number, dst = "ff:ff:ff:ff:ff:ff", targetMac = "00:00:00:00:00:00"): Uint8Array {
  const f = new Uint8Array(42);
  const v = new DataView(f.buffer);
  f.set(mac(dst), 0);
  f.set(mac(src), 6);
  f.set([0x08, 0x06, 0, 1, 8, 0, 6, 4], 12);
  v.setUint16(20, op);
  f.set(mac(src), 22);
  v.setUint32(28, senderIp);
  f.set(mac(targetMac), 32);
  v.setUint32(38, targetIp);
  return f;
}

export const isArp = (op: number, targetIp?: string) => (f: Uint8Array) => {
  const v = new DataView(f.buffer, f.byteOffset, f.byteLength);
  return f.length >= 42 && v.getUint16(12) === 0x0806 && v.getUint16(20) === op && (targetIp === undefined || ipText(v.getUint32(38)) === targetIp);
};

/** The gateway's ARP announcement (RFC 5227): a broadcast request for its own address, target MAC zero. */
export const isAnnouncement = (f: Uint8Array) =>
  isArp(1, GATEWAY)(f) && ipText(new DataView(f.buffer, f.byteOffset).getUint32(28)) === GATEWAY && f.subarray(0, 6).every((b) => b === 255) && f.subarray(32, 38).every((b) => b === 0);

/** An ARP packet's sender MAC. */
export const senderMac = (f: Uint8Array) => [...f.subarray(22, 28)].map((x) => x.toString(16).padStart(2, "0")).join(":");

/** A DNS query as bytes, built by hand: one question, RD set. */
export function dnsQuery(id: number, name: string, type: number): Uint8Array {
  const labels = name.split(".").flatMap((l) => [l.length, ...new TextEncoder().encode(l)]);
  const q = new Uint8Array(12 + labels.length + 1 + 4);
  const v = new DataView(q.buffer);
  v.setUint16(0, id);
  v.setUint16(2, 0x0100);
  v.setUint16(4, 1);
  q.set(labels, 12);
  v.setUint16(12 + labels.length + 1, type);
  v.setUint16(12 + labels.length + 3, 1);
  return q;
}

export async function ask(vm: StreamPeer, client: string, from: string, query: Uint8Array, sport = 5353): Promise<dnsPacket.DecodedPacket> {
  const gatewayMac = await gatewayMacOf(vm, client, from);
  vm.send(udpFrame(gatewayMac, client, ip(from), ip(GATEWAY), sport, 53, query));
  const f = await vm.frames.next((f) => f.length > 42 && f[23] === 17 && ((f[34]! << 8) | f[35]!) === 53 && ((f[36]! << 8) | f[37]!) === sport);
  return dnsPacket.decode(Buffer.from(f.subarray(42)));
}

/** ARP for the gateway: the MAC in its reply. */
export async function gatewayMacOf(vm: StreamPeer, client: string, from: string): Promise<string> {
  vm.send(arpFrame(1, client, ip(from), ip(GATEWAY)));
  return senderMac(await vm.frames.next(isArp(2)));
}


/** A VM port in-process (for the host class on a switch without sockets): what the switch sends it is kept. */
export class CapturePort extends Port {
  readonly sent: Uint8Array[] = [];
  constructor() {
    super("test", "in-process");
  }
  protected enqueue(frame: Uint8Array): boolean {
    this.sent.push(frame.slice());
    return true;
  }
}
