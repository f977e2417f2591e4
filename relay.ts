#!/usr/bin/env bun
/**
 * edge-relay: share Ethernet segments between QEMU virtual machines on different hosts.
 *
 * A relay hosts named networks; each network is a learning Ethernet switch. QEMU links (TCP and
 * unix stream connections, UDP and unix datagram peers, multicast segments) and WebSocket tunnels to
 * other relays are ports on a network. Sites dial out to a hub over an authenticated WebSocket
 * (`wss://` with the hub's own certificate pinned by a join string, or with --tls-cert/--tls-key;
 * `ws://` on trusted paths), so NAT is no obstacle; hub and site are this same program with
 * different ports configured. A --dhcp network also gets DHCP, names and a pingable gateway.
 *
 * ```sh
 * # one host: a local switch on 127.0.0.1:10000, status on http://127.0.0.1:8080/status
 * npx bun relay.ts
 *
 * # hub (public host): one command makes its certificate and tokens and prints the line for each site
 * npx bun relay.ts --public-url wss://hub.example.net:8443 --state-dir ./hub-state
 * # each site behind NAT: the join string the hub printed (or from RELAY_JOIN, --join-file)
 * npx bun relay.ts --join ER1…::…@hub.example.net:8443 --qemu-listen 127.0.0.1:10000
 *
 * # the same by hand: tokens of one's own, no TLS
 * RELAY_TOKENS=site-secret-change-me RELAY_ADMIN_TOKEN=admin-secret-change-me npx bun relay.ts --http 0.0.0.0:8080
 * RELAY_UPLINK_TOKEN=site-secret-change-me npx bun relay.ts --qemu-listen 127.0.0.1:10000 --uplink ws://hub.example:8080
 *
 * # several hubs that share their networks through NATS, sites spread over them by a load balancer
 * RELAY_TOKENS=site-secret-change-me RELAY_ADMIN_TOKEN=admin-secret-change-me npx bun relay.ts --http 0.0.0.0:8080 --backplane nats://nats.example:4222
 * ```
 *
 * Attach a VM (QEMU ≥ 7.2, or the older `-netdev socket` form):
 *
 * ```sh
 * # to --qemu-listen 127.0.0.1:10000
 * qemu-system-x86_64 … -netdev stream,id=n0,server=off,addr.type=inet,addr.host=127.0.0.1,addr.port=10000 -device virtio-net-pci,netdev=n0
 * qemu-system-x86_64 … -netdev socket,id=n0,connect=127.0.0.1:10000 -device virtio-net-pci,netdev=n0
 * # the VM listens, the relay dials it: --qemu-connect 127.0.0.1:10001
 * qemu-system-x86_64 … -netdev stream,id=n0,server=on,addr.type=inet,addr.host=127.0.0.1,addr.port=10001 …
 * qemu-system-x86_64 … -netdev socket,id=n0,listen=127.0.0.1:10001 …
 * # UDP: --qemu-udp 127.0.0.1:10002,127.0.0.1:10003
 * qemu-system-x86_64 … -netdev dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port=10003,remote.type=inet,remote.host=127.0.0.1,remote.port=10002 …
 * qemu-system-x86_64 … -netdev socket,id=n0,udp=127.0.0.1:10002,localaddr=127.0.0.1:10003 …
 * # unix sockets: --qemu-listen unix:/run/vm.sock, --qemu-udp unix:/run/relay.dgram,unix:/run/vm.dgram
 * qemu-system-x86_64 … -netdev stream,id=n0,server=off,addr.type=unix,addr.path=/run/vm.sock …
 * qemu-system-x86_64 … -netdev dgram,id=n0,local.type=unix,local.path=/run/vm.dgram,remote.type=unix,remote.path=/run/relay.dgram …
 * # a multicast segment as one port: --qemu-mcast 239.255.0.1:5000,127.0.0.1
 * qemu-system-x86_64 … -netdev socket,id=n0,mcast=239.255.0.1:5000,localaddr=127.0.0.1 …
 * ```
 *
 * ## Map
 *
 * The file reads top to bottom: a section uses only what stands above it (types excepted; two
 * exceptions by design: the HTTP app serves the page assets, long strings kept last as bottle.py
 * keeps its templates, and config values' messages name options through the option table's
 * `flagOf`), and each opens with a few lines of design notes. The supported API comes first; everything exported after
 * it is `@internal` (for the tests). Sections:
 *
 * - public API            the wire constants, the config and log types, and the handle startRelay returns
 * - basics                one-line errors, rate-limited logs, the redial skeleton, addresses, MAC text
 * - impairment            link impairment in netem's words: the grammar, the engine in front of a port, the table by target
 * - config values         valibot schemas for one option's value: endpoints, files, secrets, sizes
 * - DHCP options          --dhcp and --dhcp-host: a network's subnet, gateway, pool, domain and reservations
 * - option table          OPTIONS: one entry per option drives the schema, the CLI, --help and config keys
 * - framing               QEMU's stream framing, the tunnel's messages, MAC addresses: pure codecs
 * - system                libc through bun:ffi: unix socket paths and calls, the open-file limit
 * - ports & flow control  Port, the one interface every kind of link is, 802.3x-style pausing, totals per kind
 * - switch                Network: a learning Ethernet switch per named network, with loop probes
 * - capture               pcapng of a network's traffic: live (GET /capture) or to rotating files
 * - auth & admission      tokens, the failed-login throttle, connection limits, the relay's counters
 * - tunnels               one WebSocket between two relays: channels, ports, the hub's side of the handshake
 * - uplink                the site's side: dial the hub (proxy, TLS, pin), keep the tunnel up, sync networks
 * - v86                   browser VMs: a v86 NIC's WebSocket on /v86/NETWORK is a port
 * - NATS client           NATS's core protocol on Bun's sockets: decoder, one session per connection, the link
 * - backplane             hubs sharing networks through NATS: one port per network stands for every other hub
 * - QEMU stream ports     --qemu-listen and --qemu-connect: TCP and unix stream connections are ports
 * - QEMU datagram ports   --qemu-udp and --qemu-mcast: every datagram peer, or a multicast group, is a port
 * - DHCP packets          the wire formats the gateway host reads and writes: IPv4, UDP, ARP, DHCP, DNS names
 * - gateway host          --dhcp: the relay's own host on a network: ARP, ping, DHCP leases and DNS for them
 * - status & metrics      the shape of GET /status (its assembly is lifecycle's buildSnapshot) and GET /metrics
 * - hub state             --public-url and --join: the hub's certificate, tokens and invites; join strings
 * - HTTP app              the routes on the one Bun.serve: admin pages and data, captures, impairments, invites, upgrades
 * - lifecycle             startRelay: the composition root, and the registry of networks
 * - page assets           the status page and the login form, byte for byte
 * - CLI                   the command line: flags against the option table, --help, QEMU hints, --invite and --revoke, --install-service, main
 *
 * ## The life of a frame
 *
 * A VM's frame on a --qemu-listen connection: Bun's `data` handler (streamHandlers, in QEMU stream
 * ports) → `StreamPort.decode` → `StreamDecoder.push` (framing) cuts the byte stream into frames →
 * `Port.receive` (ports & flow control; through the port's inbound Impairment, if any) →
 * `Network.forward` (switch: learn the source MAC, look up the destination, else flood; captures tap
 * here) → `Port.send` on each destination (through its outbound Impairment) → `Port.transmit` → the
 * port kind's `enqueue`: a StreamWriter batches a turn's frames into one socket write, a TunnelPort or
 * BackplanePort into one message, a DatagramPort sends one datagram, a V86Port one WebSocket message.
 * Frames from a tunnel enter at `TunnelLink.receive` → `decodeTunnelMessage`, from NATS at
 * `Backplane`'s `#received`, from datagram sockets at `DatagramBinding`, from a multicast group at
 * `joinMulticast`'s `onGroupDatagram`, from v86 at `V86Port.message`, and the gateway host's own
 * replies from `GatewayHost`; all of them then go `Port.receive` → `Network.forward` as above.
 *
 * Cut-through, the fast path: a stream chunk's or a tunnel or backplane message's whole frames first
 * try `Network.forwardRun`, which sends a run of unicast frames to one known port that takes runs
 * (`Port.enqueueRun`: stream, tunnel and backplane ports) as the bytes they came in, no view or copy
 * per frame; from the first frame it cannot take (a flood, a capture, an impairment) the rest goes
 * frame by frame as above, the frames before it still as a run.
 *
 * Flow control: when a unicast frame's destination port is past half its queue bound,
 * `Network.forward` calls `from.waitFor(to)`: the source stops reading its peer (a StreamPort pauses
 * its socket, so QEMU stops taking its guest's packets; a tunnel pauses its whole WebSocket), and what
 * was already read waits in a HeldInput. The destination polls its queue and lets its waiters read
 * again below a quarter, or after a second without progress (then it pauses no one until it drains).
 *
 * ## Port kinds
 *
 * | kind                      | class         | section              | made by                                      |
 * |---------------------------|---------------|----------------------|----------------------------------------------|
 * | qemu-listen, qemu-connect | StreamPort    | QEMU stream ports    | streamHandlers (listenStream, QemuDialer)    |
 * | qemu-udp                  | DatagramPort  | QEMU datagram ports  | DatagramBinding: per peer heard, or 1 fixed  |
 * | qemu-mcast                | DatagramPort  | QEMU datagram ports  | joinMulticast: one per group                 |
 * | tunnel                    | TunnelPort    | tunnels              | TunnelServer (the hub's side), per network   |
 * | uplink                    | TunnelPort    | tunnels              | Uplink (the site's side), per network        |
 * | backplane                 | BackplanePort | backplane            | Backplane.join: one per network on this hub  |
 * | v86                       | V86Port       | v86                  | V86Server: one per browser VM                |
 * | host                      | GatewayHost   | gateway host         | startGateways: one per --dhcp network        |
 *
 * To add a port kind: a Port subclass (ports & flow control says what to implement: `enqueue`;
 * `queued` with a finite `queueLimit` and `reading` to take part in flow control, or it is never
 * congested; `takesRuns`, `maxRun` and `enqueueRun` for cut-through; the constructor's `trunk` for a
 * link that carries many MACs) in a section of its own above lifecycle, something that attaches each
 * port to its network (`network.attach(port)`) and detaches it when its peer goes, and its start in
 * startRelay (lifecycle), with a row here and in the section index (tests/map.test.ts holds both).
 * A few places treat kinds by name: NetworkRegistry's release (uplink, backplane), ImpairmentTable's
 * targets (uplink), and Network's attach and detach log lines (qemu-mcast).
 *
 * To add an option: an entry in OPTIONS (option table) and a row in README's CLI reference (a test
 * holds the two together); then read `config.yourOption` where the relay starts (lifecycle). An
 * entry without a schema is a command-line action (main handles it, as --invite); a `secret` needs
 * an `env` (--install-service moves secrets to the environment file).
 *
 * @module
 */

import { chmodSync, chownSync, copyFileSync, existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, readlinkSync, realpathSync, renameSync, rmSync, statSync, unlinkSync, watch, writeFileSync } from "node:fs";
import { BlockList, connect as tcpConnect, isIP, isIPv4, isIPv6, type Socket as NetSocket } from "node:net";
import { basename, dirname, join, resolve as resolvePath } from "node:path";
import { hostname, constants as osConstants } from "node:os";
import { dlopen, FFIType, read } from "bun:ffi";
import { X509Certificate, createPrivateKey, generateKeyPairSync, sign, timingSafeEqual } from "node:crypto";
import { checkServerIdentity, connect as tlsConnect, type PeerCertificate } from "node:tls";
import type { Server, ServerWebSocket, Socket, udp } from "bun";
import { credsAuthenticator, nkeyAuthenticator } from "@nats-io/nats-core";
import dnsPacket from "dns-packet";
import { Hono, type Context } from "hono";
import { bodyLimit } from "hono/body-limit";
import { deleteCookie, getCookie, setCookie } from "hono/cookie";
import { getPath } from "hono/utils/url";
import * as v from "valibot";
import UNIT_TEMPLATE from "./deploy/edge-relay.service" with { type: "text" };

// ───────────────────────────── public API ─────────────────────────────
//
// What a program that embeds the relay (or speaks to one) uses; everything else is internal. The
// functions are further down, where what they use stands above them: `startRelay(config, log?, env?)`
// in lifecycle, `parseConfig(input)` in the option table, `loadConfig(argv, env)` and `main()` in CLI.
// The types here may name classes defined later: types cost nothing at run time.

export const VERSION = "0.1.0";
/** QEMU's NET_BUFSIZE: the largest frame a QEMU stream netdev accepts. */
export const MAX_FRAME = 69_632;
/** An Ethernet header: anything shorter is a runt. */
export const MIN_FRAME = 14;
/** The largest UDP payload over IPv4. */
export const MAX_DATAGRAM = 65_507;
export const TUNNEL_PATH = "/tunnel";
export const TUNNEL_PROTOCOL = "edge-relay.v1";
export const TUNNEL_VERSION = 1;
/** Tunnel message types (first byte of every binary message). */
export const MSG_CONTROL = 0x00;
export const MSG_DATA = 0x01;

/** Where v86 NICs (and clients speaking their framing) connect: `GET /v86/NETWORK`, upgraded. */
export const V86_PATH = "/v86";

/** The NATS header that names the hub a backplane message came from. */
export const BACKPLANE_HUB_HEADER = "Edge-Relay-Hub";

/** The status page's login: the cookie holds a random session id, never the admin token. */
export const ADMIN_COOKIE = "edge_relay_session";

export interface Logger {
  info(line: string): void;
  warn(line: string): void;
}

/** A bad option or config file: the CLI prints the message and exits with status 2. */
export class ConfigError extends Error {
  override name = "ConfigError";
}

export type Config = v.InferOutput<typeof ConfigSchema>;

export interface BoundAddress {
  what: string;
  network?: string;
  address: string;
}

export interface RelayHandle extends AsyncDisposable {
  /** The HTTP server's address, e.g. `http://127.0.0.1:8080`. */
  http: string;
  bound: BoundAddress[];
  network(name: string): Network | undefined;
  snapshot(): Snapshot;
  stop(): Promise<void>;
  /** With --public-url: the hub's state, and a reload of its tokens (SIGHUP). */
  hub?: HubState & { reload(): void };
}

// ───────────────────────────── basics ─────────────────────────────
//
// Small helpers every later section uses. Errors are one line naming what failed (describeError);
// logs that a peer can provoke go through rateLimitedLog; every dialer (uplink, --qemu-connect, the
// NATS link) redials through one Redialer and its Backoff. Addresses are HOST:PORT, [IPv6]:PORT or
// unix:PATH (`@name`: a Linux abstract socket). A MAC is a number (macKey's, in framing); parseMac
// and formatMac are its text, `52:54:00:12:34:56`.

/** What an errno means, for one-line errors. */
const ERRNO_TEXT: Record<string, string> = {
  EADDRINUSE: "address already in use",
  EADDRNOTAVAIL: "address not available",
  EACCES: "permission denied",
  ECONNREFUSED: "connection refused",
  ECONNRESET: "connection reset by peer",
  EHOSTUNREACH: "host unreachable",
  ENETUNREACH: "network unreachable",
  ENOENT: "no such file or directory",
  ETIMEDOUT: "timed out",
  EPIPE: "broken pipe",
  EINVAL: "invalid argument",
  EEXIST: "file exists",
  EISDIR: "is a directory",
  ENOTDIR: "not a directory",
};

/**
 * One line for a failed system call: `Cannot listen on 127.0.0.1:10000: address already in use
 * (EADDRINUSE)`, `cannot read /x: no such file or directory (ENOENT)`.
 */
function describeError(action: string, error: unknown): string {
  const code = (error as { code?: unknown })?.code;
  if (typeof code === "string" && ERRNO_TEXT[code]) return `${action}: ${ERRNO_TEXT[code]} (${code})`;
  const message = error instanceof Error ? error.message : String(error);
  return `${action}: ${message}${typeof code === "string" && !message.includes(code) ? ` (${code})` : ""}`;
}

/**
 * Writes a whole file or nothing: a temporary file with its mode from the start, then a rename over
 * the old one. Root (an --invite at the shell) keeps the old file's owner: the service's user must still read it.
 */
function writeAtomically(path: string, text: string, mode: number): void {
  const temporary = `${path}.${process.pid}.tmp`;
  try {
    writeFileSync(temporary, text, { mode });
    chmodSync(temporary, mode);
    const old = statSync(path, { throwIfNoEntry: false });
    if (old && process.getuid?.() === 0) chownSync(temporary, old.uid, old.gid);
    renameSync(temporary, path);
  } catch (error) {
    rmSync(temporary, { force: true });
    throw new Error(describeError(`Cannot write ${path}`, error), { cause: error });
  }
}

/** 32 random bytes, base64url: 43 characters nobody guesses. */
const randomToken = () => Buffer.from(crypto.getRandomValues(new Uint8Array(32))).toString("base64url");

/**
 * At most `burst` lines per `windowMs`, so a flood of bad connections cannot flood the log; what was
 * held back is summed up in one line when the window ends (on a timer, so a burst's tail is told).
 * @internal
 */
export function rateLimitedLog(write: (line: string) => void, burst: number, windowMs: number) {
  let windowStart = 0;
  let written = 0;
  let held = 0;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const summarise = () => {
    timer = undefined;
    if (held > 0) write(`${held} more like it not logged in the last ${windowMs / 1000} s`);
    held = 0;
  };
  return {
    log(line: string) {
      const now = Date.now();
      if (now - windowStart >= windowMs) {
        clearTimeout(timer);
        summarise();
        windowStart = now;
        written = 0;
      }
      if (written++ < burst) return write(line);
      held++;
      if (timer === undefined) {
        timer = setTimeout(summarise, windowStart + windowMs - now);
        timer.unref();
      }
    },
  };
}

/** How a dialer is doing, as status shows it: `since` is when its state last changed. */
interface LinkStatus<S extends string> {
  state: S;
  since: string;
  lastError?: string | undefined;
}

/** Sets a dialer's state, and its last error if one is given; true when the state changed. */
function setLinkState<S extends string>(status: LinkStatus<S>, state: S, error?: string): boolean {
  const changed = status.state !== state;
  if (changed) status.since = new Date().toISOString();
  status.state = state;
  if (error !== undefined) status.lastError = error;
  return changed;
}

/** Logs a line only when it differs from the last one: one line per change of state, not one per try. */
class ChangeLog {
  #last = "";

  /** Writes the line unless it repeats the last; true when written. */
  log(write: (line: string) => void, line: string): boolean {
    if (line === this.#last) return false;
    this.#last = line;
    write(line);
    return true;
  }
}

/**
 * When to try again after a failed dial: doubling from `minMs` to `maxMs`, each wait drawn from its
 * upper half so many dialers that failed together (a hub restart) do not come back together. One
 * helper for every dialer (through Redialer): the uplink, --qemu-connect, the backplane. A failure
 * that retrying soon cannot mend waits `finalMs` instead, until a dial succeeds.
 * @internal
 */
export class Backoff {
  #failures = 0;
  #final = false;
  constructor(
    readonly minMs: number,
    readonly maxMs: number,
    readonly finalMs = maxMs,
  ) {}

  next(): number {
    const ceiling = this.#final ? this.finalMs : Math.min(this.maxMs, this.minMs * 2 ** this.#failures++);
    return ceiling / 2 + (Math.random() * ceiling) / 2;
  }

  reset(): void {
    this.#failures = 0;
    this.#final = false;
  }

  /** A failure that retrying soon cannot mend (a wrong token): the longest wait from now on. */
  exhaust(): void {
    this.#final = true;
  }
}

/**
 * The redial skeleton every dialer shares (the uplink, --qemu-connect, the backplane's NATS link):
 * a dial, then after each failure or loss a wait drawn from its Backoff and the next dial, until
 * stopped. Its change log writes a line once per change, not once per try.
 */
class Redialer {
  readonly #changes = new ChangeLog();
  #timer: ReturnType<typeof setTimeout> | undefined;
  #stopped = false;

  constructor(
    readonly backoff: Backoff,
    private readonly dial: () => void,
  ) {}

  get stopped(): boolean {
    return this.#stopped;
  }

  /** Dials again after the backoff; the wait in ms, or undefined once stopped. */
  retry(): number | undefined {
    if (this.#stopped) return undefined;
    const delay = this.backoff.next();
    this.#timer = setTimeout(this.dial, delay);
    return delay;
  }

  /** Logs `line` unless it repeats the last one; true when logged. */
  log(write: (line: string) => void, line: string): boolean {
    return this.#changes.log(write, line);
  }

  stop(): void {
    this.#stopped = true;
    clearTimeout(this.#timer);
  }
}

const NETWORK_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;

/** Which rule of NETWORK_NAME `name` breaks, in words (the first one, as the rules are read). */
function nameRuleBroken(name: string): string {
  if (name === "") return "is empty";
  if (!/^[A-Za-z0-9]/.test(name)) return `must start with a letter or digit, not ${JSON.stringify(name[0])}`;
  if (!/^[A-Za-z0-9_.-]*$/.test(name)) return "must be letters, digits, '.', '_' or '-'";
  return "is longer than 64 characters";
}

interface HostPort {
  host: string;
  port: number;
}

const HOST_NAME = /^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$/;

/** `HOST:PORT` or `[IPv6]:PORT`, the port any digits: addressProblem tells a port out of range. */
const HOST_PORT = /^(?:\[([^\]]*)\]|([^:\[\]]*)):(\d+)$/;

/**
 * Why text of the shape `HOST:PORT` or `[IPv6]:PORT` is not a usable address, in words; undefined
 * when it is one (or when it is not of that shape at all).
 */
function addressProblem(text: string): string | undefined {
  const m = HOST_PORT.exec(text);
  if (!m) return undefined;
  if (Number(m[3]) > 65_535) return `port ${m[3]} is out of range 0–65535`;
  const host = m[1] ?? m[2]!;
  if (m[1] !== undefined) return isIPv6(host) ? undefined : `${JSON.stringify(host)} is not an IPv6 address`;
  if (/^[\d.]+$/.test(host)) return isIPv4(host) ? undefined : `${host} is not an IPv4 address`;
  return HOST_NAME.test(host) ? undefined : `${JSON.stringify(host)} is not a host name or address`;
}

/** Parses `HOST:PORT` or `[IPv6]:PORT`; `null` when it is neither (addressProblem says why). @internal */
export function parseHostPort(text: string): HostPort | null {
  const m = HOST_PORT.exec(text);
  if (!m || addressProblem(text) !== undefined) return null;
  return { host: m[1] ?? m[2]!, port: Number(m[3]) };
}

/** `127.0.0.1:80`, `[::1]:80`. */
function formatHostPort({ host, port }: HostPort): string {
  return host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
}

/** A URL's host as sockets and certificates name it: an IPv6 address without its brackets. */
function urlHost(url: URL): string {
  return url.hostname.replace(/^\[|\]$/g, "");
}

/** A unix socket path; `@name` is a Linux abstract name. */
interface UnixPath {
  path: string;
}

type SocketAddress = HostPort | UnixPath;

/** `HOST:PORT`, `[IPv6]:PORT` or `unix:PATH`. */
function parseSocketAddress(text: string): SocketAddress | null {
  if (!text.startsWith("unix:")) return parseHostPort(text);
  const path = text.slice(5);
  return path.length > 1 || (path.length === 1 && path !== "@") ? { path } : null;
}

function formatAddress(address: SocketAddress): string {
  return "path" in address ? `unix:${address.path}` : formatHostPort(address);
}

/** Bun spells a Linux abstract socket name with a leading NUL. */
function bunUnixPath(path: string): string {
  return path.startsWith("@") ? `\0${path.slice(1)}` : path;
}

function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || /^127\.\d+\.\d+\.\d+$/.test(host);
}

/** Bun names a sender in canonical form (`::1`); a configured IPv6 remote may be spelled otherwise. */
function canonicalIp(host: string): string {
  return host.includes(":") ? new URL(`http://[${host}]`).hostname.slice(1, -1) : host;
}

/** Six hex pairs split all by `:` or all by `-` (as Windows writes them), either case. */
const MAC_TEXT = /^[0-9a-f]{2}([:-])[0-9a-f]{2}(?:\1[0-9a-f]{2}){4}$/i;

/**
 * A MAC written as text, `52:54:00:12:34:56`, as the number macKey (framing) makes of its bytes;
 * undefined when it is not one. Numbers, not strings, are what the switch compares. @internal
 */
export function parseMac(text: string): number | undefined {
  return MAC_TEXT.test(text) ? parseInt(text.replace(/[:-]/g, ""), 16) : undefined;
}

/** A MAC's number as text: `52:54:00:12:34:56`. @internal */
export function formatMac(key: number): string {
  return key.toString(16).padStart(12, "0").replace(/(..)(?!$)/g, "$1:");
}

/** A group (multicast or broadcast) MAC: the low bit of its first byte. */
function isGroupMac(key: number): boolean {
  return Math.floor(key / 0x100_0000_0000) % 2 === 1;
}

// ───────────────────────────── impairment ─────────────────────────────
//
// `delay 40ms 5ms loss 0.1%` means what it means to Linux netem, and the engine follows netem's own
// order: duplicate, then loss, then corrupt, then reorder or delay (and rate). One timer per
// impairment drains a heap ordered by release time; the clock is injectable (ImpairmentClock), so
// tests drive time instead of sleeping. Random draws are seeded (sfc32) when the spec gives a seed.
// ImpairmentTable gives each port, per direction, the most specific target's impairment.

/** How jitter spreads around the delay: netem's built-in uniform, or one of its tables. */
type DelayDistribution = "uniform" | "normal" | "pareto" | "paretonormal";

/**
 * A parsed impairment. Percentages are 0–100 as written, times whole nanoseconds (netem's unit),
 * rates bits per second; a clause left out is absent.
 */
interface ImpairmentSpec {
  delay?: { timeNs: number; jitterNs: number; correlation: number; distribution: DelayDistribution };
  /** `random`: independent (or correlated) loss; `gemodel`: Gilbert–Elliott bursts, in netem's four parameters. */
  loss?:
    | { model: "random"; percent: number; correlation: number }
    | { model: "gemodel"; p: number; r: number; oneMinusH: number; oneMinusK: number };
  duplicate?: { percent: number; correlation: number };
  /** After a reordered frame the next `gap − 1` are delayed; 1 when not given, as in netem. */
  reorder?: { percent: number; correlation: number; gap: number };
  corrupt?: { percent: number; correlation: number };
  rate?: { bitsPerSecond: number };
  /** Frames the queue may hold; when absent, IMPAIR_RATE_LIMIT with a rate, else IMPAIR_MAX_QUEUE. */
  limit?: number;
  seed?: number;
}

interface ImpairmentCounters {
  /** Frames held for more than 0 ms (by delay or by the rate). */
  delayed: number;
  lost: number;
  /** Frames sent twice. */
  duplicated: number;
  /** Frames sent at once, ahead of the delay. */
  reordered: number;
  /** Frames with one bit flipped. */
  corrupted: number;
  /** Frames dropped because the queue was full: `limit` frames, or IMPAIR_MAX_QUEUE_BYTES. */
  rateDropped: number;
  /** Frames in the queue now. */
  queued: number;
}

/** What Impairment needs of time; tests pass a fake one. Times in ms. @internal */
export interface ImpairmentClock {
  now(): number;
  setTimer(fn: () => void, ms: number): unknown;
  clearTimer(timer: unknown): void;
}

const IMPAIR_KEYWORDS = ["delay", "loss", "duplicate", "reorder", "corrupt", "rate", "limit", "seed"];
/** tc's other names for the same clauses. */
const IMPAIR_ALIASES: Record<string, string> = { latency: "delay", drop: "loss" };
const IMPAIR_DISTRIBUTIONS: readonly DelayDistribution[] = ["uniform", "normal", "pareto", "paretonormal"];
/** netem's default queue: what a rate may hold back before it drops. */
const IMPAIR_RATE_LIMIT = 1_000;
/** Without a rate netem's 1000 would drop at ~10,000 frames/s × 100 ms, so delay alone gets room; memory is still bounded. */
const IMPAIR_MAX_QUEUE = 100_000;
const IMPAIR_MAX_QUEUE_BYTES = 64 * 1024 * 1024;
/** Longer is memory held for nothing: no link worth emulating takes a minute. */
const IMPAIR_MAX_DELAY_NS = 60e9;
const IMPAIR_MAX_GAP = 1_000_000;
/** A decimal as tc's strtod takes it, without a sign, then the unit. */
const IMPAIR_NUMBER = /^((?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)(.*)$/i;
/**
 * tc(8) says a bare number is µs, but tc netem parses delay and jitter with get_time64, where a bare
 * number is nanoseconds: `delay 50` is 50 ns. We do what tc netem does.
 */
const IMPAIR_TIME_UNITS: Record<string, number> = {
  "": 1, ns: 1, nsec: 1, nsecs: 1,
  us: 1e3, usec: 1e3, usecs: 1e3,
  ms: 1e6, msec: 1e6, msecs: 1e6,
  s: 1e9, sec: 1e9, secs: 1e9,
};
/** tc's rate suffixes (case-insensitive): `…bit` bits/s, `…bps` bytes/s, `…i…` powers of 1024; a bare number is bits/s. */
const IMPAIR_RATE_UNITS: Record<string, number> = {
  "": 1, bit: 1, kbit: 1e3, mbit: 1e6, gbit: 1e9, tbit: 1e12,
  kibit: 1024, mibit: 1024 ** 2, gibit: 1024 ** 3, tibit: 1024 ** 4,
  bps: 8, kbps: 8e3, mbps: 8e6, gbps: 8e9, tbps: 8e12,
  kibps: 8 * 1024, mibps: 8 * 1024 ** 2, gibps: 8 * 1024 ** 3, tibps: 8 * 1024 ** 4,
};

function impairmentError(message: string): RangeError {
  return new RangeError(`Cannot parse impairment: ${message}`);
}

/** A word as the user wrote it, quoted and on one line. */
function quoted(word: string): string {
  return JSON.stringify(word);
}

/** `30%`, `0.1%` or `30` (tc lets the % go), as 0–100. */
function parsePercent(word: string, what: string): number {
  const m = IMPAIR_NUMBER.exec(word);
  const percent = m && (m[2] === "" || m[2] === "%") ? Number(m[1]) : NaN;
  if (!(percent >= 0 && percent <= 100)) throw impairmentError(`${what} ${quoted(word)} is not a percentage from 0 to 100`);
  return percent;
}

/** `50ms`, `1s`, `250us`, `0.5ms`, to whole nanoseconds as tc rounds them. */
function parseTime(word: string, what: string): number {
  const m = IMPAIR_NUMBER.exec(word);
  const scale = m ? IMPAIR_TIME_UNITS[m[2]!.toLowerCase()] : undefined;
  if (!m || scale === undefined) throw impairmentError(`${what} ${quoted(word)} is not a time (like 50ms, 1s, 250us; a bare number is ns, as in tc)`);
  const ns = Math.round(Number(m[1]) * scale);
  if (!(ns <= IMPAIR_MAX_DELAY_NS)) throw impairmentError(`${what} ${quoted(word)} is longer than ${IMPAIR_MAX_DELAY_NS / 1e9}s`);
  return ns;
}

function parseRate(word: string): number {
  const m = IMPAIR_NUMBER.exec(word);
  const scale = m ? IMPAIR_RATE_UNITS[m[2]!.toLowerCase()] : undefined;
  if (!m || scale === undefined) throw impairmentError(`rate ${quoted(word)} is not a rate (like 10mbit, 512kbit, 1gbit, 100kbps)`);
  const bits = Math.round(Number(m[1]) * scale);
  if (!(bits >= 1 && bits <= Number.MAX_SAFE_INTEGER)) throw impairmentError(`rate ${quoted(word)} is not a rate above 0`);
  return bits;
}

function parseWhole(word: string, what: string, min: number, max: number): number {
  const n = /^\d+$/.test(word) ? Number(word) : NaN;
  if (!(n >= min && n <= max)) throw impairmentError(`${what} ${quoted(word)} is not a whole number from ${min} to ${max}`);
  return n;
}

/**
 * Parses netem's words, e.g. `delay 50ms 10ms 25% distribution normal loss 1% rate 10mbit limit 500
 * seed 7`. Clauses come in any order, each once; an optional value (jitter, a correlation, gemodel's
 * R, 1-H, 1-K) is taken when the next word starts like a number, as tc does. `""` is no impairment.
 * Throws a one-line RangeError naming the word that is wrong.
 * @internal
 */
export function parseImpairment(text: string): ImpairmentSpec {
  const words = text.split(/\s+/).filter((w) => w !== "");
  const spec: ImpairmentSpec = {};
  let distribution: DelayDistribution | undefined;
  let gap: number | undefined;
  let i = 0;
  const value = (what: string, example: string): string => {
    const word = words[i++];
    if (word === undefined) throw impairmentError(`${what} needs a value, e.g. ${example}`);
    return word;
  };
  const more = (): boolean => i < words.length && /^[-+.\d]/.test(words[i]!);
  const correlation = (what: string): number => (more() ? parsePercent(words[i++]!, `${what} correlation`) : 0);
  const seen = new Set<string>();
  while (i < words.length) {
    const word = words[i++]!;
    const keyword = IMPAIR_ALIASES[word] ?? word;
    if (!IMPAIR_KEYWORDS.includes(keyword) && keyword !== "distribution" && keyword !== "gap") {
      throw impairmentError(`${quoted(word)} is not a netem keyword (${IMPAIR_KEYWORDS.join(", ")})`);
    }
    if (seen.has(keyword)) throw impairmentError(`${quoted(word)} is given twice`);
    seen.add(keyword);
    switch (keyword) {
      case "delay": {
        const timeNs = parseTime(value("delay", "delay 50ms"), "delay");
        const jitterNs = more() ? parseTime(words[i++]!, "delay jitter") : 0;
        spec.delay = { timeNs, jitterNs, correlation: correlation("delay"), distribution: "uniform" };
        break;
      }
      case "distribution": {
        const word = value("distribution", "distribution normal");
        if (!IMPAIR_DISTRIBUTIONS.includes(word as DelayDistribution)) {
          throw impairmentError(`distribution ${quoted(word)} is not one of ${IMPAIR_DISTRIBUTIONS.join(", ")}`);
        }
        distribution = word as DelayDistribution;
        break;
      }
      case "loss": {
        let word = value("loss", "loss 1%");
        if (word === "random") word = value("loss random", "loss random 1%");
        if (word === "gemodel") {
          const p = parsePercent(value("loss gemodel", "loss gemodel 1% 10%"), "loss gemodel P");
          const r = more() ? parsePercent(words[i++]!, "loss gemodel R") : 100 - p;
          const oneMinusH = more() ? parsePercent(words[i++]!, "loss gemodel 1-H") : 100;
          const oneMinusK = more() ? parsePercent(words[i++]!, "loss gemodel 1-K") : 0;
          spec.loss = { model: "gemodel", p, r, oneMinusH, oneMinusK };
        } else {
          spec.loss = { model: "random", percent: parsePercent(word, "loss"), correlation: correlation("loss") };
        }
        break;
      }
      case "duplicate":
      case "corrupt":
        spec[keyword] = { percent: parsePercent(value(keyword, `${keyword} 1%`), keyword), correlation: correlation(keyword) };
        break;
      case "reorder":
        spec.reorder = { percent: parsePercent(value("reorder", "reorder 25%"), "reorder"), correlation: correlation("reorder"), gap: 1 };
        break;
      case "gap":
        gap = parseWhole(value("gap", "gap 5"), "gap", 1, IMPAIR_MAX_GAP);
        break;
      case "rate":
        spec.rate = { bitsPerSecond: parseRate(value("rate", "rate 10mbit")) };
        break;
      case "limit":
        spec.limit = parseWhole(value("limit", "limit 1000"), "limit", 1, IMPAIR_MAX_QUEUE);
        break;
      case "seed":
        spec.seed = parseWhole(value("seed", "seed 7"), "seed", 0, 0xffff_ffff);
        break;
    }
  }
  // What netem's tc refuses too, said in one line each.
  if (distribution !== undefined) {
    if (!spec.delay?.jitterNs) throw impairmentError("distribution needs a delay with jitter, e.g. delay 50ms 10ms distribution normal");
    spec.delay.distribution = distribution;
  }
  if (spec.reorder && !spec.delay?.timeNs) {
    throw impairmentError("reorder needs a delay (a reordered frame is sent at once instead of after it), e.g. delay 10ms reorder 25%");
  }
  if (gap !== undefined) {
    if (!spec.reorder) throw impairmentError("gap needs reorder, e.g. delay 10ms reorder 25% gap 5");
    spec.reorder.gap = gap;
  }
  return spec;
}

function formatTime(ns: number): string {
  if (ns !== 0 && ns % 1e9 === 0) return `${ns / 1e9}s`;
  if (ns % 1e6 === 0) return `${ns / 1e6}ms`;
  if (ns % 1e3 === 0) return `${ns / 1e3}us`;
  return `${ns}ns`;
}

function formatRate(bits: number): string {
  for (const [scale, unit] of [[1e12, "tbit"], [1e9, "gbit"], [1e6, "mbit"], [1e3, "kbit"]] as const) {
    if (bits % scale === 0) return `${bits / scale}${unit}`;
  }
  return `${bits}bit`;
}

/** netem's way of writing a spec, every clause in one order; parseImpairment reads it back to an equal spec. @internal */
export function formatImpairment(spec: ImpairmentSpec): string {
  const words: string[] = [];
  const chance = (keyword: string, c: { percent: number; correlation: number }) => {
    words.push(keyword, `${c.percent}%`);
    if (c.correlation > 0) words.push(`${c.correlation}%`);
  };
  const { delay, loss } = spec;
  if (delay) {
    words.push("delay", formatTime(delay.timeNs));
    if (delay.jitterNs > 0 || delay.correlation > 0) words.push(formatTime(delay.jitterNs));
    if (delay.correlation > 0) words.push(`${delay.correlation}%`);
    if (delay.distribution !== "uniform") words.push("distribution", delay.distribution);
  }
  if (loss?.model === "random") chance("loss", loss);
  if (loss?.model === "gemodel") words.push("loss", "gemodel", `${loss.p}%`, `${loss.r}%`, `${loss.oneMinusH}%`, `${loss.oneMinusK}%`);
  if (spec.duplicate) chance("duplicate", spec.duplicate);
  if (spec.reorder) {
    chance("reorder", spec.reorder);
    if (spec.reorder.gap > 1) words.push("gap", String(spec.reorder.gap));
  }
  if (spec.corrupt) chance("corrupt", spec.corrupt);
  if (spec.rate) words.push("rate", formatRate(spec.rate.bitsPerSecond));
  if (spec.limit !== undefined) words.push("limit", String(spec.limit));
  if (spec.seed !== undefined) words.push("seed", String(spec.seed));
  return words.join(" ");
}

/**
 * Where an impairment applies: `uplink[:NET][:in|:out]` (the uplink, both ways unless told),
 * `NET` (the way out of every port of that network), or a port id `NET/KIND-N[:in|:out]` (both ways
 * unless told). Undefined when the text is none of these.
 */
interface ImpairTarget {
  kind: "uplink" | "network" | "port";
  network?: string;
  port?: string;
  directions: ("in" | "out")[];
}

function parseImpairTarget(text: string): ImpairTarget | undefined {
  const m = /^(.*?)(?::(in|out))?$/.exec(text)!;
  const [base, direction] = [m[1]!, m[2] as "in" | "out" | undefined];
  const both: ("in" | "out")[] = direction ? [direction] : ["in", "out"];
  if (base === "uplink") return { kind: "uplink", directions: both };
  if (base.startsWith("uplink:")) {
    const network = base.slice(7);
    return NETWORK_NAME.test(network) ? { kind: "uplink", network, directions: both } : undefined;
  }
  if (NETWORK_NAME.test(base)) return direction ? undefined : { kind: "network", network: base, directions: ["out"] };
  const slash = base.indexOf("/");
  if (slash > 0 && NETWORK_NAME.test(base.slice(0, slash)) && /^[a-z0-9-]+-\d+$/.test(base.slice(slash + 1))) {
    return { kind: "port", network: base.slice(0, slash), port: base, directions: both };
  }
  return undefined;
}

/**
 * sfc32 (Doty-Humphrey's small fast counting generator) as uniforms in (0, 1), never 0 or 1 so the
 * inverse CDFs below stay finite. 128 bits of state: no pattern repeats over a relay's lifetime.
 */
function seededRandom(seed: number): () => number {
  let a = 0x9e3779b9;
  let b = 0x243f6a88;
  let c = 0xb7e15162;
  let d = seed >>> 0;
  const next = (): number => {
    const t = (((a + b) | 0) + d) | 0;
    d = (d + 1) | 0;
    a = b ^ (b >>> 9);
    b = (c + (c << 3)) | 0;
    c = (c << 21) | (c >>> 11);
    c = (c + t) | 0;
    return t >>> 0;
  };
  // The first outputs still show the constant state.
  for (let i = 0; i < 12; i++) next();
  return function uniform(): number {
    return (next() + 0.5) / 0x1_0000_0000;
  };
}

/**
 * netem's correlation (get_crandom): each draw is `c·last + (1−c)·uniform`. It keeps the mean but
 * narrows the spread, as netem's does; 0 is plain independent draws.
 */
function correlatedRandom(random: () => number, percent: number): () => number {
  const c = percent / 100;
  if (c === 0) return random;
  let last = random();
  return function correlated(): number {
    return (last = c * last + (1 - c) * random());
  };
}

/** The standard normal's inverse CDF (Acklam's rational approximation, relative error < 1.2e-9). */
function normalQuantile(u: number): number {
  const low = 0.02425;
  if (u < low || u > 1 - low) {
    const q = Math.sqrt(-2 * Math.log(u < low ? u : 1 - u));
    const x =
      (((((-7.784894002430293e-3 * q - 3.223964580411365e-1) * q - 2.400758277161838) * q - 2.549732539343734) * q + 4.374664141464968) * q + 2.938163982698783) /
      ((((7.784695709041462e-3 * q + 3.224671290700398e-1) * q + 2.445134137142996) * q + 3.754408661907416) * q + 1);
    return u < low ? x : -x;
  }
  const q = u - 0.5;
  const r = q * q;
  return (
    ((((((-3.969683028665376e1 * r + 2.209460984245205e2) * r - 2.759285104469687e2) * r + 1.383577518672690e2) * r - 3.066479806614716e1) * r + 2.506628277459239) * q) /
    (((((-5.447609879822406e1 * r + 1.615858368580409e2) * r - 1.556989798598866e2) * r + 6.680131188771972e1) * r - 1.328068155288572e1) * r + 1)
  );
}

/** netem's tables hold deviates in 16 bits at 8192 per jitter: nothing lies beyond ±4 jitters. */
const DIST_MAX = 32_767 / 8_192;

/** netem's pareto table: shape 3 (mean 1.5), shifted to mean 0 and scaled by 4/3, so −2/3 … +4 jitters. */
function paretoDeviate(u: number): number {
  return Math.min(((1 - u) ** (-1 / 3) - 1.5) * (4 / 3), DIST_MAX);
}

/**
 * A delay's deviate, in jitters, from one (correlated) uniform: netem maps its correlated draw
 * through a distribution table (an inverse CDF), so correlation means the same for every shape.
 * paretonormal is netem's table: a quarter normal and three quarters pareto, at the same quantile.
 */
function delayDeviate(distribution: DelayDistribution, u: number): number {
  switch (distribution) {
    case "uniform":
      return 2 * u - 1;
    case "normal":
      return Math.max(-DIST_MAX, Math.min(DIST_MAX, normalQuantile(u)));
    case "pareto":
      return paretoDeviate(u);
    case "paretonormal":
      return (Math.max(-DIST_MAX, Math.min(DIST_MAX, normalQuantile(u))) + 3 * paretoDeviate(u)) / 4;
  }
}

const REAL_CLOCK: ImpairmentClock = {
  now: () => performance.now(),
  setTimer(fn, ms) {
    // Rounded up: a timer that fired early would only have to be set again.
    const timer = setTimeout(fn, Math.ceil(ms));
    timer.unref();
    return timer;
  },
  clearTimer: (timer) => clearTimeout(timer as ReturnType<typeof setTimeout>),
};

/** A frame waiting in the queue: released at `at` (ms); `seq` keeps arrival order among equal times. */
interface HeldFrame {
  at: number;
  seq: number;
  frame: Uint8Array;
}

function releasesBefore(a: HeldFrame, b: HeldFrame): boolean {
  return a.at < b.at || (a.at === b.at && a.seq < b.seq);
}

/**
 * One link's impairment. As netem: a frame may be duplicated (the copy goes through everything but
 * duplication again), lost, corrupted, then either reordered (sent at once, ahead of the delay) or
 * given a release time: now + delay (+ jitter), and with a rate, no earlier than the previous frame
 * left plus this frame's time on the wire. Frames wait in one queue ordered by release time, so with
 * jitter they may overtake each other (as in netem) and without they leave in arrival order; one
 * timer, set for the earliest, releases everything due. A frame due at once is delivered inside push,
 * uncopied, so an impairment without delay costs next to nothing.
 * @internal
 */
export class Impairment {
  readonly counters: ImpairmentCounters = { delayed: 0, lost: 0, duplicated: 0, reordered: 0, corrupted: 0, rateDropped: 0, queued: 0 };
  /** The seed in use: the spec's, or one drawn at random, so a run can be repeated. */
  readonly seed: number;
  readonly #deliver: (frame: Uint8Array) => void;
  readonly #clock: ImpairmentClock;
  readonly #random: () => number;
  // Probabilities as 0–1, times in ms, each chance with its own correlated source (as netem).
  readonly #delayMs: number;
  readonly #jitterMs: number;
  readonly #distribution: DelayDistribution;
  readonly #delayDraw: () => number;
  readonly #loss: number;
  readonly #lossDraw: () => number;
  readonly #duplicate: number;
  readonly #duplicateDraw: () => number;
  readonly #corrupt: number;
  readonly #corruptDraw: () => number;
  readonly #reorder: number;
  readonly #reorderDraw: () => number;
  readonly #gap: number;
  /** Frames delayed since the last reordered one. */
  #sinceReorder = 0;
  /** Gilbert–Elliott: transition and loss chances, and the state we are in. */
  readonly #gemodel: { p: number; r: number; badLoss: number; goodLoss: number } | undefined;
  #bad = false;
  /** Bytes the rate lets out per ms (0: no rate), and when the last frame admitted has left. */
  readonly #bytesPerMs: number;
  #wireFree = -Infinity;
  /** Nothing is ever held: push hands frames straight on without asking the clock. */
  readonly #instant: boolean;
  readonly #limit: number;
  #queuedBytes = 0;
  /** A binary min-heap on (at, seq). */
  #queue: HeldFrame[] = [];
  #seq = 0;
  #timer: unknown;
  #timerAt = Infinity;
  #closed = false;

  constructor(
    readonly spec: ImpairmentSpec,
    deliver: (frame: Uint8Array) => void,
    clock: ImpairmentClock = REAL_CLOCK,
  ) {
    this.#deliver = deliver;
    this.#clock = clock;
    this.seed = spec.seed ?? crypto.getRandomValues(new Uint32Array(1))[0]!;
    const random = (this.#random = seededRandom(this.seed));
    const { delay, loss, duplicate, corrupt, reorder, rate } = spec;
    this.#delayMs = (delay?.timeNs ?? 0) / 1e6;
    this.#jitterMs = (delay?.jitterNs ?? 0) / 1e6;
    this.#distribution = delay?.distribution ?? "uniform";
    this.#delayDraw = correlatedRandom(random, delay?.correlation ?? 0);
    this.#loss = loss?.model === "random" ? loss.percent / 100 : 0;
    this.#lossDraw = correlatedRandom(random, loss?.model === "random" ? loss.correlation : 0);
    this.#gemodel = loss?.model === "gemodel" ? { p: loss.p / 100, r: loss.r / 100, badLoss: loss.oneMinusH / 100, goodLoss: loss.oneMinusK / 100 } : undefined;
    this.#duplicate = (duplicate?.percent ?? 0) / 100;
    this.#duplicateDraw = correlatedRandom(random, duplicate?.correlation ?? 0);
    this.#corrupt = (corrupt?.percent ?? 0) / 100;
    this.#corruptDraw = correlatedRandom(random, corrupt?.correlation ?? 0);
    this.#reorder = (reorder?.percent ?? 0) / 100;
    this.#reorderDraw = correlatedRandom(random, reorder?.correlation ?? 0);
    this.#gap = reorder?.gap ?? 1;
    this.#bytesPerMs = rate ? rate.bitsPerSecond / 8 / 1000 : 0;
    this.#instant = this.#delayMs === 0 && this.#jitterMs === 0 && !rate;
    this.#limit = spec.limit ?? (rate ? IMPAIR_RATE_LIMIT : IMPAIR_MAX_QUEUE);
  }

  /** Takes a frame (copies it: the caller's buffer may be reused), applies loss/duplicate/corrupt/rate/delay/reorder, and later calls deliver(frame) in release order. */
  push(frame: Uint8Array): void {
    if (!this.#closed) this.#admit(frame, true);
  }

  /** Drops everything queued (counted nowhere) and cancels the timer. Frames pushed later are dropped. */
  close(): void {
    this.#closed = true;
    if (this.#timer !== undefined) this.#clock.clearTimer(this.#timer);
    this.#timer = undefined;
    this.#queue = [];
    this.#queuedBytes = 0;
    this.counters.queued = 0;
  }

  #admit(frame: Uint8Array, mayDuplicate: boolean): void {
    // netem's order: a duplicate and a loss on the same frame cancel out, and the copy is admitted
    // first, through everything but duplication.
    let copies = 1;
    if (mayDuplicate && this.#duplicate > 0 && this.#duplicateDraw() < this.#duplicate) copies++;
    if (this.#lose()) copies--;
    if (copies === 0) {
      this.counters.lost++;
      return;
    }
    if (copies === 2) {
      this.counters.duplicated++;
      this.#admit(frame, false);
      if (this.#closed) return;
    }
    let copied = false;
    if (this.#corrupt > 0 && this.#corruptDraw() < this.#corrupt && frame.length > MIN_FRAME) {
      // One bit past the Ethernet header, so the frame still reaches the same port to be noticed.
      frame = frame.slice();
      copied = true;
      frame[MIN_FRAME + Math.floor(this.#random() * (frame.length - MIN_FRAME))]! ^= 1 << Math.floor(this.#random() * 8);
      this.counters.corrupted++;
    }
    if (this.#instant) return this.#deliver(frame);
    const now = this.#clock.now();
    // netem: after a reordered frame the next gap − 1 are delayed; from then on each may be reordered.
    if (this.#reorder > 0) {
      if (this.#sinceReorder >= this.#gap - 1 && this.#reorderDraw() < this.#reorder) {
        this.#sinceReorder = 0;
        this.counters.reordered++;
        return this.#deliver(frame);
      }
      this.#sinceReorder = Math.min(this.#sinceReorder + 1, this.#gap);
    }
    let at = now + this.#nextDelay();
    // netem's rate: a frame leaves when its last bit would have, behind the frame before it.
    if (this.#bytesPerMs > 0) at = Math.max(at, this.#wireFree) + frame.length / this.#bytesPerMs;
    if (at <= now) {
      // Due already: whatever is due before it goes first, then it goes uncopied.
      if (this.#queue.length > 0) this.#release(at);
      if (!this.#closed) this.#deliver(frame);
      return;
    }
    if (this.#queue.length >= this.#limit || this.#queuedBytes + frame.length > IMPAIR_MAX_QUEUE_BYTES) {
      this.counters.rateDropped++;
      return;
    }
    if (this.#bytesPerMs > 0) this.#wireFree = at;
    this.counters.delayed++;
    this.#enqueue({ at, seq: this.#seq++, frame: copied ? frame : frame.slice() });
    this.#arm(now);
  }

  /** Is this frame lost? Gilbert–Elliott as netem: this frame's fate is the state it found, then the state may change. */
  #lose(): boolean {
    const ge = this.#gemodel;
    if (ge === undefined) return this.#loss > 0 && this.#lossDraw() < this.#loss;
    if (this.#bad) {
      if (this.#random() < ge.r) this.#bad = false;
      return this.#random() < ge.badLoss;
    }
    if (this.#random() < ge.p) this.#bad = true;
    return this.#random() < ge.goodLoss;
  }

  /** Delay plus jitter in ms, never below 0. */
  #nextDelay(): number {
    if (this.#jitterMs === 0) return this.#delayMs;
    return Math.max(0, this.#delayMs + this.#jitterMs * delayDeviate(this.#distribution, this.#delayDraw()));
  }

  /** Delivers every queued frame released by `until`, earliest first. */
  #release(until: number): void {
    const queue = this.#queue;
    while (queue.length > 0 && queue[0]!.at <= until && !this.#closed) {
      const { frame } = this.#dequeue();
      this.#deliver(frame);
    }
  }

  /** The one timer: set for the earliest release, moved only when an earlier one arrives. */
  #arm(now: number): void {
    const first = this.#queue[0];
    if (first === undefined || this.#closed) {
      if (this.#timer !== undefined) this.#clock.clearTimer(this.#timer);
      this.#timer = undefined;
      this.#timerAt = Infinity;
      return;
    }
    if (this.#timer !== undefined) {
      if (this.#timerAt <= first.at) return;
      this.#clock.clearTimer(this.#timer);
    }
    this.#timerAt = first.at;
    this.#timer = this.#clock.setTimer(this.#fire, Math.max(0, first.at - now));
  }

  readonly #fire = (): void => {
    this.#timer = undefined;
    this.#timerAt = Infinity;
    const now = this.#clock.now();
    try {
      this.#release(now);
    } finally {
      // Also after a throwing deliver: what is left still gets its timer.
      this.#arm(this.#clock.now());
    }
  };

  #enqueue(held: HeldFrame): void {
    const queue = this.#queue;
    let i = queue.length;
    queue.push(held);
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (!releasesBefore(held, queue[parent]!)) break;
      queue[i] = queue[parent]!;
      i = parent;
    }
    queue[i] = held;
    this.#queuedBytes += held.frame.length;
    this.counters.queued = queue.length;
  }

  #dequeue(): HeldFrame {
    const queue = this.#queue;
    const first = queue[0]!;
    const last = queue.pop()!;
    const n = queue.length;
    if (n > 0) {
      let i = 0;
      for (;;) {
        let child = 2 * i + 1;
        if (child >= n) break;
        if (child + 1 < n && releasesBefore(queue[child + 1]!, queue[child]!)) child++;
        if (!releasesBefore(queue[child]!, last)) break;
        queue[i] = queue[child]!;
        i = child;
      }
      queue[i] = last;
    }
    this.#queuedBytes -= first.frame.length;
    this.counters.queued = n;
    return first;
  }
}

/**
 * The relay's link impairments by target: each port gets its own Impairment (its own queue and
 * timer) for each direction a target names; the most specific target wins (a port id, then
 * `uplink:NET`, then `uplink`, then `NET`).
 */
class ImpairmentTable {
  readonly #entries = new Map<string, { target: ImpairTarget; spec: ImpairmentSpec }>();

  constructor(private readonly ports: () => Iterable<Port>) {}

  set(text: string, spec: ImpairmentSpec | undefined): boolean {
    const target = parseImpairTarget(text);
    if (target === undefined) throw new RangeError(`Cannot impair ${JSON.stringify(text)}: expected uplink[:NET][:in|:out], NET, or a port id like lab/qemu-listen-1[:in|:out]`);
    const had = this.#entries.delete(text);
    if (spec !== undefined) this.#entries.set(text, { target, spec });
    for (const port of this.ports()) this.apply(port);
    return had;
  }

  #rank(target: ImpairTarget, port: Port): number {
    const network = port.network?.name;
    if (target.kind === "port") return target.port === port.id ? 4 : 0;
    if (target.kind === "uplink") return port.kind !== "uplink" ? 0 : target.network === undefined ? 2 : target.network === network ? 3 : 0;
    return target.network === network ? 1 : 0;
  }

  apply(port: Port): void {
    for (const direction of ["in", "out"] as const) {
      let best: { rank: number; spec: ImpairmentSpec } | undefined;
      for (const { target, spec } of this.#entries.values()) {
        const rank = target.directions.includes(direction) ? this.#rank(target, port) : 0;
        if (rank > 0 && rank > (best?.rank ?? 0)) best = { rank, spec };
      }
      port.impair(direction, best?.spec);
    }
  }

  /** Status: each profile, the ports it applies to now, and its counters summed over them. */
  snapshot() {
    // Without impairments, no walk over every port (status and metrics ask each time).
    if (this.#entries.size === 0) return [];
    const ports = [...this.ports()];
    return [...this.#entries].map(([text, { spec }]) => {
      const counters: ImpairmentCounters = { delayed: 0, lost: 0, duplicated: 0, reordered: 0, corrupted: 0, rateDropped: 0, queued: 0 };
      const on: string[] = [];
      for (const port of ports) {
        for (const [direction, impairment] of [["in", port.impairIn], ["out", port.impairOut]] as const) {
          if (impairment?.spec !== spec) continue;
          on.push(`${port.id}:${direction}`);
          for (const key of Object.keys(counters) as (keyof ImpairmentCounters)[]) counters[key] += impairment.counters[key];
        }
      }
      return { target: text, spec: formatImpairment(spec), ports: on, ...counters };
    });
  }
}

// ───────────────────────────── config values ─────────────────────────────
//
// Each schema checks and converts one value and says what it expected in words, never quoting the
// value (it may be a secret). Files named by options are read while validating, so a missing or wrong
// certificate is a config error at start, not a failure at the first dial.

/**
 * Splits `[NET=]REST` into the network name (default `default`) and the rest. A prefix with a `:`
 * is part of the address (`unix:/run/a=b.sock`), not a network name.
 */
function splitNetwork(text: string): { network: string; rest: string } {
  const eq = text.indexOf("=");
  if (eq < 0 || text.slice(0, eq).includes(":")) return { network: "default", rest: text };
  return { network: text.slice(0, eq), rest: text.slice(eq + 1) };
}

/** `parse` gives the endpoint, why it is none in words, or null when it is not of the shape at all. */
function endpointSchema<T extends object>(shape: string, parse: (rest: string) => T | string | null) {
  return v.pipe(
    v.string(`expected ${shape}`),
    v.rawTransform(({ dataset, addIssue, NEVER }) => {
      const { network, rest } = splitNetwork(dataset.value);
      const parsed = parse(rest);
      if (!NETWORK_NAME.test(network)) {
        addIssue({ message: `network name ${JSON.stringify(network)} ${nameRuleBroken(network)}` });
        return NEVER;
      }
      if (typeof parsed === "string") {
        addIssue({ message: parsed });
        return NEVER;
      }
      if (!parsed) {
        const problem = rest.split(",").map(addressProblem).find((p) => p !== undefined);
        addIssue({ message: problem ?? `expected ${shape}, got ${JSON.stringify(dataset.value)}` });
        return NEVER;
      }
      return { network, ...parsed };
    }),
  );
}

const StreamEndpoint = endpointSchema("[NET=]HOST:PORT or [NET=]unix:PATH", (rest) => {
  const address = parseSocketAddress(rest);
  return address && { address };
});

/**
 * A fixed datagram peer must be something a socket can send to: a unix path with a unix socket, or
 * an IP literal with a port, of the local address's family (Bun sends to IPs only, no names).
 */
function validRemote(local: SocketAddress, remote: SocketAddress): boolean {
  if ("path" in local || "path" in remote) return "path" in local && "path" in remote;
  const [localFamily, remoteFamily] = [isIP(local.host), isIP(remote.host)];
  return remote.port > 0 && remoteFamily !== 0 && (localFamily === 0 || localFamily === remoteFamily);
}

const UdpEndpoint = endpointSchema(
  "[NET=]HOST:PORT[,REMOTE_IP:REMOTE_PORT] or [NET=]unix:PATH[,unix:REMOTE_PATH], the remote an IP literal of the same family",
  (rest) => {
    const [local, remote, extra] = rest.split(",");
    const address = parseSocketAddress(local!);
    const remoteAddress = remote === undefined ? undefined : parseSocketAddress(remote);
    if (!address || remoteAddress === null || extra !== undefined) return null;
    if (remoteAddress && !validRemote(address, remoteAddress)) return null;
    return { address, remote: remoteAddress };
  },
);

const IPV4_MULTICAST = /^2(2[4-9]|3\d)\.\d{1,3}\.\d{1,3}\.\d{1,3}$/;

const McastEndpoint = endpointSchema("[NET=]GROUP:PORT[,LOCALADDR] with an IPv4 multicast GROUP (224.0.0.0/4)", (rest) => {
  const [groupText, localAddress, extra] = rest.split(",");
  const group = parseHostPort(groupText!);
  if (!group || !IPV4_MULTICAST.test(group.host) || group.port === 0 || extra !== undefined) return null;
  if (localAddress !== undefined && !isIPv4(localAddress)) return `LOCALADDR ${JSON.stringify(localAddress)} is not an IPv4 address`;
  return { group, localAddress };
});

/** A PEM file named by the option: read while validating, so a missing file is a config error. */
const PemFile = v.pipe(
  v.string("expected a file name"),
  v.rawTransform(({ dataset, addIssue, NEVER }) => {
    try {
      return { path: dataset.value, text: readFileSync(dataset.value, "utf8") };
    } catch (error) {
      addIssue({ message: describeError(`cannot read ${dataset.value}`, error) });
      return NEVER;
    }
  }),
);

/** A PEM file that `parse` accepts: a wrong file fails here, not at every dial. The message never quotes the file (a key is a secret). */
function pemHolding(parse: (text: string) => unknown, message: string) {
  return v.pipe(
    PemFile,
    v.check(({ text }) => {
      try {
        return parse(text) !== undefined;
      } catch {
        return false;
      }
    }, message),
  );
}

/** The first certificate is parsed. */
const CertificateFile = pemHolding((text) => new X509Certificate(text), "expected a PEM file with a certificate (-----BEGIN CERTIFICATE-----)");
const PrivateKeyFile = pemHolding(createPrivateKey, "expected a PEM file with a private key (-----BEGIN PRIVATE KEY-----)");

const Fingerprint = v.pipe(
  v.string("expected a SHA-256 fingerprint"),
  v.regex(/^(?:[0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}$/, "expected a SHA-256 fingerprint: 64 hex digits, colons optional"),
  v.transform((f) => f.replace(/:/g, "").toUpperCase().replace(/(..)(?!$)/g, "$1:")),
);

const HttpAddress = v.pipe(
  v.string("expected HOST:PORT"),
  v.rawTransform(({ dataset, addIssue, NEVER }) => {
    const addr = parseHostPort(dataset.value);
    if (addr) return addr;
    addIssue({ message: addressProblem(dataset.value) ?? `expected HOST:PORT, got ${JSON.stringify(dataset.value)}` });
    return NEVER;
  }),
);

/** Secrets: the message never repeats the value. */
const Secret = v.pipe(
  v.string("expected a string"),
  v.check((s) => s.length > 0 && !/\s/.test(s), "must be non-empty and contain no white space"),
);

const Seconds = v.pipe(v.number("expected a number of seconds"), v.minValue(0.01, "must be positive"), v.maxValue(86_400, "must be at most a day"));

/** A whole number in a range, e.g. `wholeNumber("bytes", 1, 10)`. */
function wholeNumber(what: string, min: number, max: number) {
  return v.pipe(
    v.number(`expected a number of ${what}`),
    v.integer("expected a whole number"),
    v.minValue(min, `must be at least ${min}`),
    v.maxValue(max, `must be at most ${max}`),
  );
}

/** A list option: the message names what one entry looks like, never the value given. */
function list<S extends v.GenericSchema>(item: S, shape: string) {
  return v.optional(v.array(item, `expected an array of ${shape}`), []);
}

/**
 * A list option each of whose values may list several items separated by commas (`--trusted-proxy
 * 10.0.0.0/8,::1`): the items of every value in order, each checked by `item`, whose message is the
 * option's. An empty item (a stray comma) is refused, saying what one looks like (`one`).
 */
function commaList<T>(item: v.GenericSchema<string, T>, one: string, many: string) {
  return v.optional(
    v.pipe(
      v.array(v.string(`expected ${one}`), `expected an array of ${many}`),
      v.rawTransform(({ dataset, addIssue, NEVER }) => {
        const items: T[] = [];
        for (const text of dataset.value.flatMap((value) => value.split(",")).map((text) => text.trim())) {
          const result = text === "" ? undefined : v.safeParse(item, text);
          if (result?.success) {
            items.push(result.output);
            continue;
          }
          addIssue({ message: result?.issues[0].message ?? `expected ${one}, got an empty value` });
          return NEVER;
        }
        return items;
      }),
    ),
    [],
  );
}

/** Tokens shorter than this are refused at start. */
const MIN_TOKEN_LENGTH = 16;

/** A credential this relay accepts: long enough that guessing is no option. */
const AcceptedSecret = v.pipe(Secret, v.minLength(MIN_TOKEN_LENGTH, `must be at least ${MIN_TOKEN_LENGTH} characters long`));

/** A token, alone or limited to some networks: `"…"` is `{ token: "…" }`. */
const TokenGrant = v.pipe(
  v.unknown(),
  v.transform((grant) => (typeof grant === "string" ? { token: grant } : grant)),
  v.strictObject(
    {
      token: AcceptedSecret,
      networks: v.optional(v.array(v.pipe(v.string(), v.regex(NETWORK_NAME, "expected a network name")), "expected an array of network names")),
    },
    "expected a token string or { token, networks }",
  ),
);

/** `NET=PATH`: a network's traffic into a pcapng file. */
const CaptureFileSpec = v.pipe(
  v.string("expected NET=PATH"),
  v.rawTransform(({ dataset, addIssue, NEVER }) => {
    const eq = dataset.value.indexOf("=");
    const [network, path] = [dataset.value.slice(0, eq), dataset.value.slice(eq + 1)];
    if (eq < 1 || !NETWORK_NAME.test(network) || path === "") {
      addIssue({ message: `expected NET=PATH, got ${JSON.stringify(dataset.value)}` });
      return NEVER;
    }
    return { network, path };
  }),
);

const BYTE_UNITS: Record<string, number> = { "": 1, B: 1, KB: 1e3, MB: 1e6, GB: 1e9, KIB: 1024, MIB: 1024 ** 2, GIB: 1024 ** 3 };

/** `100MB`, `1GiB`, `65536`: a size in bytes. */
const ByteSize = v.pipe(
  v.union([v.string(), v.number()], "expected a size like 100MB"),
  v.rawTransform(({ dataset, addIssue, NEVER }) => {
    const m = /^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$/i.exec(String(dataset.value));
    const bytes = m ? Math.round(Number(m[1]) * BYTE_UNITS[(m[2] ?? "").toUpperCase()]!) : NaN;
    if (!(bytes >= 4096)) {
      addIssue({ message: "expected a size of at least 4KB, like 100MB" });
      return NEVER;
    }
    return bytes;
  }),
);

/** `TARGET=SPEC`: a link impairment at start, in netem's words. */
const ImpairOption = v.pipe(
  v.string("expected TARGET=SPEC"),
  v.rawTransform(({ dataset, addIssue, NEVER }) => {
    const eq = dataset.value.indexOf("=");
    const target = dataset.value.slice(0, eq);
    if (eq < 1 || parseImpairTarget(target) === undefined) {
      addIssue({ message: `expected TARGET=SPEC with TARGET uplink[:NET][:in|:out], NET or a port id, got ${JSON.stringify(dataset.value)}` });
      return NEVER;
    }
    try {
      return { target, spec: parseImpairment(dataset.value.slice(eq + 1)) };
    } catch (error) {
      addIssue({ message: (error as Error).message });
      return NEVER;
    }
  }),
);

/** `--v86-rate`: frames and bytes per second, each way, per v86 port; 0 is no limit. */
interface V86Rate {
  frames: number;
  bytes: number;
}

/** The origin of a URL (`https://host[:port]`), or undefined when it has none. */
function originOf(text: string): string | undefined {
  try {
    const origin = new URL(text).origin;
    return origin === "null" ? undefined : origin;
  } catch {
    return undefined;
  }
}

/** An http:// proxy URL (a bare HOST:PORT is taken as http://), or undefined if it is none. */
function parseProxyUrl(text: string): URL | undefined {
  let url: URL;
  try {
    url = new URL(/^[a-z][a-z0-9+.-]*:\/\//i.test(text) ? text : `http://${text}`);
  } catch {
    return undefined;
  }
  if (url.protocol !== "http:" || url.hostname === "" || !/^\/?$/.test(url.pathname) || url.search || url.hash) return undefined;
  return url;
}

/** What --uplink-proxy, HTTPS_PROXY and HTTP_PROXY must look like (the value itself may hold a password: never quoted). */
const PROXY_URL_EXPECTED = "expected http://[USER:PASSWORD@]HOST:PORT";

/** A browser origin for --v86-origin: `https://host[:port]`, kept in the form browsers send. */
const BrowserOrigin = v.pipe(
  v.string("expected an origin"),
  v.rawTransform(({ dataset, addIssue, NEVER }) => {
    const origin = /^https?:\/\/[^/?#]+\/?$/i.test(dataset.value) ? originOf(dataset.value) : undefined;
    if (origin !== undefined) return origin;
    addIssue({ message: `expected an origin such as https://example.org or http://localhost:8000, got ${JSON.stringify(dataset.value)}` });
    return NEVER;
  }),
);

/** --v86-rate FRAMES,BYTES: per second; 0 is no limit on that count. */
const V86RateSchema = v.pipe(
  v.string("expected FRAMES,BYTES"),
  v.regex(/^\d{1,9}(,\d{1,12})?$/, "expected FRAMES,BYTES per second, e.g. 200,40000 (0: no limit on that count)"),
  v.transform((text): V86Rate => {
    const [frames, bytes] = text.split(",").map(Number);
    return { frames: frames!, bytes: bytes ?? 0 };
  }),
);

/** A range of addresses: `10.0.0.0/8`, `fd00::/8`, or one address (`127.0.0.1`, `::1`). */
interface Cidr {
  address: string;
  prefix: number;
  family: "ipv4" | "ipv6";
}

/** Parses a CIDR range or a bare address; undefined when it is neither. @internal */
export function parseCidr(text: string): Cidr | undefined {
  const m = /^([^/]+)(?:\/(\d{1,3}))?$/.exec(text);
  const version = m ? isIP(m[1]!) : 0;
  if (!m || version === 0) return undefined;
  const bits = version === 4 ? 32 : 128;
  const prefix = m[2] === undefined ? bits : Number(m[2]);
  return prefix <= bits ? { address: m[1]!, prefix, family: version === 4 ? "ipv4" : "ipv6" } : undefined;
}

const CIDR_EXPECTED = "an address or a CIDR range like 10.0.0.0/8 or fd00::/8";

const CidrRange = v.pipe(
  v.string(),
  v.rawTransform(({ dataset, addIssue, NEVER }) => {
    const range = parseCidr(dataset.value);
    if (range !== undefined) return range;
    addIssue({ message: `expected ${CIDR_EXPECTED}, got ${JSON.stringify(dataset.value)}` });
    return NEVER;
  }),
);

/** --trusted-proxy: repeatable, and each may list several ranges separated by commas. */
const TrustedProxies = commaList(CidrRange, CIDR_EXPECTED, "CIDR ranges");

/**
 * Why a --backplane server is not one. A refused value is never quoted: credentials may hide in any
 * part of it (`user:pass@`, `?token=`, a scheme-less `user:pass@host`), and status and logs would show them.
 */
function backplaneUrlProblem(text: string): string | undefined {
  const url = URL.parse(text);
  if (url && /^(nats|tls):$/.test(url.protocol) && url.hostname && !url.username && !url.password && /^\/?$/.test(url.pathname) && !url.search && !url.hash) return undefined;
  return `expected nats://HOST:PORT or tls://HOST:PORT; credentials go in ${flagOf("backplaneToken")} or ${flagOf("backplaneCreds")}, not the URL`;
}

const BackplaneServer = v.pipe(
  v.string(),
  v.rawCheck(({ dataset, addIssue }) => {
    const problem = dataset.typed ? backplaneUrlProblem(dataset.value) : undefined;
    if (problem !== undefined) addIssue({ message: problem });
  }),
);

/** --backplane: repeatable, and each may list several servers separated by commas. */
const BackplaneServers = commaList(BackplaneServer, "nats://HOST:PORT", "nats://HOST:PORT URLs");

/** What signs the NATS server's nonce for a credentials file or an NKey seed. */
function natsAuthenticator(creds: { kind: "creds" | "seed"; text: string }): (nonce?: string) => unknown {
  return (creds.kind === "creds" ? credsAuthenticator : nkeyAuthenticator)(new TextEncoder().encode(creds.text));
}

/** --backplane-creds: a NATS credentials file (user JWT and NKey seed), or an NKey seed alone. */
const NatsCredentials = v.pipe(
  PemFile,
  v.rawTransform(({ dataset, addIssue, NEVER }) => {
    const { path, text } = dataset.value;
    const seed = /^\s*(SU[A-Z2-7]{50,})\s*$/m.exec(text)?.[1];
    const found = text.includes("-----BEGIN NATS USER JWT-----") ? { path, kind: "creds" as const, text } : seed !== undefined ? { path, kind: "seed" as const, text: seed } : undefined;
    if (found === undefined) {
      addIssue({ message: `${path} is neither a NATS credentials file nor an NKey seed (SU…)` });
      return NEVER;
    }
    // Signed once here, so a damaged seed is a config error rather than a failure at every dial.
    try {
      natsAuthenticator(found)("edge-relay");
    } catch {
      addIssue({ message: `${path} holds a NATS key that cannot sign (a damaged seed?)` });
      return NEVER;
    }
    return found;
  }),
);

/** A relay's name or a backplane cluster's: what a network name may be. */
const Name = v.pipe(v.string("expected a name"), v.regex(NETWORK_NAME, "expected letters, digits, '.', '_' or '-' (at most 64)"));

const OnOff = v.pipe(
  v.union([v.boolean(), v.picklist(["on", "off"])], "expected on or off"),
  v.transform((value) => value === true || value === "on"),
);

// ───────────────────────────── DHCP options ─────────────────────────────
//
// What a --dhcp network is, checked and resolved at start: the gateway and the pool must lie in the
// subnet and leave room, the domain must be DNS labels, a reservation's MAC and address must fit its
// network. The host that serves these networks (DHCP, DNS, ARP, ping) is the gateway host section.

/** `10.9.0.1` as a 32-bit unsigned number; undefined when it is not a dotted quad. */
function ipv4Number(text: string): number | undefined {
  if (!isIPv4(text)) return undefined;
  return text.split(".").reduce((n, part) => n * 256 + Number(part), 0);
}

function ipv4Text(n: number): string {
  return `${n >>> 24}.${(n >>> 16) & 255}.${(n >>> 8) & 255}.${n & 255}`;
}

/**
 * Where `address` stands in the subnet `base/prefix` (`base` its network address): a "host" address,
 * an "edge" (the network or the broadcast address, which no host may have), or "outside" it.
 */
function placeInSubnet(base: number, prefix: number, address: number): "host" | "edge" | "outside" {
  const size = 2 ** (32 - prefix);
  if (address < base || address >= base + size) return "outside";
  return address === base || address === base + size - 1 ? "edge" : "host";
}

/** The most addresses one pool may hold: allocation walks the pool, and a lease table is kept per address. */
const DHCP_MAX_POOL = 65_536;
const DURATION_UNITS: Record<string, number> = { s: 1, m: 60, h: 3600, d: 86_400 };
/** A DNS label: what a lease's host name must be (a guest's is cut to its first label and lowercased). */
const DNS_LABEL = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;

/** One --dhcp network, resolved: addresses as numbers, the pool without the gateway. @internal */
export interface DhcpNetworkSpec {
  network: string;
  /** `10.9.0.0/24` */
  cidr: string;
  base: number;
  prefix: number;
  gateway: number;
  first: number;
  last: number;
  leaseSeconds: number;
  domain: string;
}

/** The fields of `NET=CIDR[,gateway=IP][,range=FIRST-LAST][,lease=DURATION][,domain=NAME]` or of its config object. */
interface DhcpFields {
  network: string;
  cidr: string;
  gateway?: string;
  range?: string;
  lease?: string | number;
  domain?: string;
}

/**
 * Checks and resolves one DHCP network, or says in words what is wrong with it. The default gateway
 * is the first host; the default pool is every other host from the 10th address on (the first nine
 * are left for static use) or, in a network of fewer than 32 addresses, every host but the gateway.
 * @internal
 */
export function resolveDhcpNetwork(fields: DhcpFields): DhcpNetworkSpec | string {
  const { network } = fields;
  if (!NETWORK_NAME.test(network)) return `network name ${JSON.stringify(network)} ${nameRuleBroken(network)}`;
  const m = /^([\d.]+)\/(\d{1,2})$/.exec(fields.cidr);
  const base = m ? ipv4Number(m[1]!) : undefined;
  const prefix = m ? Number(m[2]) : NaN;
  if (base === undefined || !(prefix >= 8 && prefix <= 30)) return `expected an IPv4 CIDR from /8 to /30 like 10.9.0.0/24, got ${JSON.stringify(fields.cidr)}`;
  const size = 2 ** (32 - prefix);
  if (base % size !== 0) return `${fields.cidr} is not a network address (${ipv4Text(base - (base % size))}/${prefix})`;
  const address = (what: string, text: string) => {
    const n = ipv4Number(text);
    return n !== undefined && placeInSubnet(base, prefix, n) === "host" ? n : `${what} ${JSON.stringify(text)} is not a host address of ${fields.cidr}`;
  };
  const gateway = fields.gateway === undefined ? base + 1 : address("gateway", fields.gateway);
  if (typeof gateway === "string") return gateway;
  let first = base + (size >= 32 ? 10 : 1);
  let last = base + size - 2;
  if (fields.range !== undefined) {
    const [from, to, extra] = fields.range.split("-");
    if (to === undefined || extra !== undefined) return `expected range=FIRST-LAST, got ${JSON.stringify(fields.range)}`;
    const [a, b] = [address("range start", from!), address("range end", to)];
    if (typeof a === "string") return a;
    if (typeof b === "string") return b;
    if (a > b) return `range ${fields.range} ends before it starts`;
    [first, last] = [a, b];
  }
  const pool = last - first + 1 - (gateway >= first && gateway <= last ? 1 : 0);
  if (pool < 1) return `range ${ipv4Text(first)}-${ipv4Text(last)} holds no address but the gateway`;
  if (pool > DHCP_MAX_POOL) return `a pool of ${pool} addresses is more than ${DHCP_MAX_POOL}: give range=FIRST-LAST`;
  const leaseText = String(fields.lease ?? "12h");
  const lm = /^(\d{1,8})([smhd]?)$/.exec(leaseText);
  const leaseSeconds = lm ? Number(lm[1]) * DURATION_UNITS[lm[2] || "s"]! : NaN;
  if (!(leaseSeconds >= 60 && leaseSeconds <= 365 * 86_400)) return `lease ${JSON.stringify(leaseText)} is not a duration from 60s to 365d (like 30m, 12h, 7d)`;
  const domain = (fields.domain ?? network).toLowerCase().replace(/\.$/, "");
  if (!domain.split(".").every((label) => /^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$/.test(label)) || domain.length > 200) return `domain ${JSON.stringify(domain)} is not a DNS name`;
  return { network, cidr: `${ipv4Text(base)}/${prefix}`, base, prefix, gateway, first, last, leaseSeconds, domain };
}

const DHCP_SHAPE = "NET=CIDR[,gateway=IP][,range=FIRST-LAST][,lease=DURATION][,domain=NAME]";

/** --dhcp: the command line's text, or the same as an object in the config file. */
const DhcpNetwork = v.pipe(
  v.union(
    [
      v.string(),
      v.strictObject({
        network: v.string(),
        cidr: v.string(),
        gateway: v.optional(v.string()),
        range: v.optional(v.string()),
        lease: v.optional(v.union([v.string(), v.number()])),
        domain: v.optional(v.string()),
      }),
    ],
    `expected ${DHCP_SHAPE} or { network, cidr, gateway?, range?, lease?, domain? }`,
  ),
  v.rawTransform(({ dataset, addIssue, NEVER }) => {
    let fields: DhcpFields | string;
    if (typeof dataset.value === "string") {
      const [head, ...rest] = dataset.value.split(",");
      const eq = head!.indexOf("=");
      const parsed: Record<string, string> = { network: head!.slice(0, eq), cidr: head!.slice(eq + 1) };
      let wellFormed = eq >= 1;
      for (const pair of rest) {
        const [key, value] = [pair.slice(0, pair.indexOf("=")), pair.slice(pair.indexOf("=") + 1)];
        if (!["gateway", "range", "lease", "domain"].includes(key) || key in parsed) wellFormed = false;
        parsed[key] = value;
      }
      fields = wellFormed ? (parsed as unknown as DhcpFields) : `expected ${DHCP_SHAPE}, got ${JSON.stringify(dataset.value)}`;
    } else fields = dataset.value;
    const resolved = typeof fields === "string" ? fields : resolveDhcpNetwork(fields);
    if (typeof resolved !== "string") return resolved;
    addIssue({ message: resolved });
    return NEVER;
  }),
);

/** A reservation: this MAC always gets this address, and the name if given. */
interface DhcpHostSpec {
  mac: string;
  address: number;
  name?: string;
}

/** --dhcp-host MAC,IP[,NAME], or `{ mac, address, name? }` in the config file. */
const DhcpHost = v.pipe(
  v.union([v.string(), v.strictObject({ mac: v.string(), address: v.string(), name: v.optional(v.string()) })], "expected MAC,IP[,NAME] or { mac, address, name? }"),
  v.rawTransform(({ dataset, addIssue, NEVER }) => {
    const value = dataset.value;
    const [mac, address, name, extra] = typeof value === "string" ? value.split(",") : [value.mac, value.address, value.name];
    const key = parseMac(mac ?? "");
    const spec = { mac: key === undefined ? "" : formatMac(key), address: ipv4Number(address ?? ""), name: name?.toLowerCase() };
    let problem: string | undefined;
    if (extra !== undefined || key === undefined || isGroupMac(key)) problem = `expected MAC,IP[,NAME] with a unicast MAC like 52:54:00:12:34:56, got ${JSON.stringify(typeof value === "string" ? value : mac)}`;
    else if (spec.address === undefined) problem = `${JSON.stringify(address)} is not an IPv4 address`;
    else if (spec.name !== undefined && !DNS_LABEL.test(spec.name)) problem = `name ${JSON.stringify(name)} is not a DNS label (letters, digits and '-', at most 63)`;
    if (problem === undefined) return spec as DhcpHostSpec;
    addIssue({ message: problem });
    return NEVER;
  }),
);

// ───────────────────────────── option table ─────────────────────────────
//
// To add an option: one entry in OPTIONS (its flag is the key in kebab case, its config key the key
// itself), a row in README's CLI reference (tests/cli.test.ts holds the two together), and its use
// where the relay starts (lifecycle). Checks across options go in ConfigSchema's pipe; parseConfig
// turns the first issue into one line naming the option.

const OPTION_GROUPS = {
  qemu: "QEMU ports (repeatable). ADDR is HOST:PORT, [IPv6]:PORT, unix:PATH or unix:@ABSTRACT_NAME:",
  tunnel: "Tunnel:",
  backplane: "Backplane (hubs that share networks through NATS; see the README):",
  http: "HTTP (status, metrics, tunnel endpoint):",
  hub: "A hub that keeps its own certificate and tokens, and join strings for sites (see the README):",
  v86: "v86 browser VMs (GET /v86/NETWORK?token=… upgraded to a WebSocket; tokens as for tunnels):",
  switch: "Switch:",
  limits: "Limits (each refusal or drop is counted and shown in /status):",
  capture: "Capture (pcapng, for Wireshark and tshark) and link impairment:",
  dhcp: "DHCP, DNS and a pingable gateway (one relay per network serves them; see the README):",
  other: "Other:",
};

type OptionGroup = keyof typeof OPTION_GROUPS;

/** One row of the option table: the flag, its config key, how it is validated and what --help says. */
interface OptionSpec {
  /** The command-line flag without dashes; by default the config key in kebab-case. */
  flag?: string;
  short?: string;
  /** The value's placeholder in --help; an option without one is a switch. */
  arg?: string;
  multiple?: boolean;
  /** The command line's text is converted to a number. */
  numeric?: boolean;
  /** An environment variable that supplies the value when neither flag nor file does. */
  env?: string;
  /** The value is a credential (or may hold one, as a proxy URL's password): no message quotes it. */
  secret?: boolean;
  /**
   * A list whose entries from the config file, the command line and the environment (comma-separated)
   * add up, where for other options the command line replaces the rest.
   */
  cumulative?: boolean;
  /** Gives the relay ports (QEMU's, tunnels'): with none of these set, the default --qemu-listen applies. */
  givesPorts?: boolean;
  group: OptionGroup;
  /** Lines of help; the default, if any, is added from the schema. */
  help: string;
  /** Validates the config value; options without one exist on the command line only. */
  schema?: v.GenericSchema;
}

const DEFAULT_HTTP = "127.0.0.1:8080";

/** The largest --queue-bytes: a tunnel's WebSocket backpressure limit is derived from it. */
const MAX_QUEUE_BYTES = 64 * 1024 * 1024;

const DEFAULT_STORM_LIMIT = 5_000;

const MAX_MACS_PER_NETWORK = 16_384;
const DEFAULT_PORT_MACS = 256;

const MAX_TUNNEL_NETWORKS = 64;

/**
 * Every option, once: the config schema, the command-line parser, --help and the names in error
 * messages all come from this table. Keys are the config file's (camelCase).
 * @internal
 */
export const OPTIONS = {
  qemuListen: {
    arg: "[NET=]ADDR", multiple: true, givesPorts: true, group: "qemu", schema: list(StreamEndpoint, "[NET=]HOST:PORT or [NET=]unix:PATH"),
    help: "accept QEMU stream clients: -netdev stream,server=off,… or\n-netdev socket,connect=HOST:PORT; each connection is a port",
  },
  qemuConnect: {
    arg: "[NET=]ADDR", multiple: true, givesPorts: true, group: "qemu", schema: list(StreamEndpoint, "[NET=]HOST:PORT or [NET=]unix:PATH"),
    help: "dial QEMU -netdev stream,server=on,… or -netdev socket,listen=…;\nretried with backoff until it answers and after it restarts",
  },
  qemuUdp: {
    arg: "[NET=]ADDR[,REMOTE]", multiple: true, givesPorts: true, group: "qemu", schema: list(UdpEndpoint, "[NET=]HOST:PORT[,REMOTE]"),
    help: "datagram socket for -netdev dgram,… (inet or unix) or\n-netdev socket,udp=…,localaddr=…; each source address is a port;\nREMOTE (same family) fixes the peer: only it is then accepted",
  },
  qemuMcast: {
    arg: "[NET=]GROUP:PORT[,LOCALADDR]", multiple: true, givesPorts: true, group: "qemu", schema: list(McastEndpoint, "[NET=]GROUP:PORT[,LOCALADDR]"),
    help: "bridge a -netdev socket,mcast=GROUP:PORT / -netdev dgram multicast\nsegment into NET as one port",
  },
  allowRemoteQemu: {
    group: "qemu", schema: v.optional(v.boolean("expected true or false"), false),
    help: "let QEMU ports use a non-loopback address: anyone who can reach\nit gets a port on the segment",
  },
  tokens: {
    flag: "token", arg: "SECRET", multiple: true, env: "RELAY_TOKENS", secret: true, cumulative: true, givesPorts: true, group: "tunnel", schema: list(TokenGrant, "tokens"),
    help: `accept tunnels that present this token (repeatable, at least\n${MIN_TOKEN_LENGTH} characters); also RELAY_TOKENS (comma-separated) and\n--token-file; none: tunnels off`,
  },
  tokenFile: { arg: "FILE", group: "tunnel", help: "one token per line (# comments allowed)" },
  uplink: {
    arg: "URL", givesPorts: true, group: "tunnel",
    schema: v.optional(
      v.pipe(
        v.string("expected a ws:// or wss:// URL"),
        // One check: a pipe runs every step, so a later one must not meet a string URL cannot parse.
        v.check((u) => URL.canParse(u) && /^wss?:$/.test(new URL(u).protocol) && new URL(u).hostname !== "", "expected a ws:// or wss:// URL"),
      ),
    ),
    help: "dial another relay (ws://HOST:PORT or wss://…) and carry every\nlocal network over it, and networks that appear later",
  },
  uplinkToken: { arg: "SECRET", env: "RELAY_UPLINK_TOKEN", secret: true, group: "tunnel", schema: v.optional(Secret), help: "the token for --uplink; also RELAY_UPLINK_TOKEN" },
  join: {
    arg: "STRING", env: "RELAY_JOIN", secret: true, givesPorts: true, group: "tunnel", schema: v.optional(Secret),
    help: "dial the hub this join string names (ER1…, as the hub prints it):\nits URL, certificate pin and token in one; also RELAY_JOIN",
  },
  joinFile: { arg: "FILE", group: "tunnel", help: "read the join string from this file" },
  name: {
    arg: "NAME", group: "tunnel",
    schema: v.optional(Name),
    help: "this relay's name in the hub's logs and status (the host name)",
  },
  keepalive: { arg: "SECONDS", numeric: true, group: "tunnel", schema: v.optional(Seconds, 10), help: "uplink ping interval; no answer for 3 intervals redials" },
  handshakeTimeout: {
    arg: "SECONDS", numeric: true, group: "tunnel", schema: v.optional(Seconds, 10),
    help: "deadline for each phase of an uplink dial (connect, TLS and\nupgrade; then the hub's welcome); then it redials",
  },
  uplinkCa: { arg: "FILE", group: "tunnel", schema: v.optional(CertificateFile), help: "trust this CA (PEM) for a wss:// uplink instead of the system's" },
  uplinkFingerprint: { arg: "SHA256", group: "tunnel", schema: v.optional(Fingerprint), help: "also require the hub certificate's SHA-256 fingerprint (pinning)" },
  insecure: { group: "tunnel", schema: v.optional(v.boolean("expected true or false"), false), help: "do not verify the hub's certificate (logged on every connect)" },
  uplinkProxy: {
    arg: "URL", secret: true, group: "tunnel",
    schema: v.optional(v.pipe(v.string("expected an http:// proxy URL"), v.check((u) => parseProxyUrl(u) !== undefined, PROXY_URL_EXPECTED))),
    help: "dial the uplink through this HTTP proxy (CONNECT); without it\nHTTPS_PROXY (wss://) or HTTP_PROXY (ws://) apply; none is used\nwhen NO_PROXY names the hub",
  },
  backplane: {
    arg: "URL[,URL…]", multiple: true, group: "backplane", schema: BackplaneServers,
    help: "share networks with the other hubs on these NATS servers\n(nats://HOST:PORT or tls://HOST:PORT): each network with a port\nhere gets one backplane port; /healthz is 503 while NATS is down",
  },
  backplaneCluster: {
    arg: "NAME", group: "backplane", schema: v.optional(Name, "default"),
    help: "hubs with the same NAME share networks, on subjects\nedge-relay.NAME.NETWORK",
  },
  backplaneToken: { arg: "SECRET", env: "RELAY_BACKPLANE_TOKEN", secret: true, group: "backplane", schema: v.optional(Secret), help: "the NATS server's token; also RELAY_BACKPLANE_TOKEN" },
  backplaneCreds: {
    arg: "FILE", group: "backplane", schema: v.optional(NatsCredentials),
    help: "a NATS credentials file (user JWT and NKey seed), or an NKey\nuser's seed alone (SU…)",
  },
  backplaneCa: { arg: "FILE", group: "backplane", schema: v.optional(CertificateFile), help: "trust this CA (PEM) for the NATS servers instead of the system's" },
  http: { arg: "HOST:PORT", group: "http", schema: v.optional(HttpAddress, DEFAULT_HTTP), help: "listen address" },
  adminToken: {
    arg: "SECRET", env: "RELAY_ADMIN_TOKEN", secret: true, group: "http", schema: v.optional(AcceptedSecret),
    help: "Bearer token for /, /status, /metrics, /capture, /impair, /invites\n(or the session the login form at / starts; /healthz needs none);\nrequired when --http is not a loopback address; also RELAY_ADMIN_TOKEN",
  },
  trustedProxies: {
    flag: "trusted-proxy", arg: "CIDR[,CIDR…]", multiple: true, group: "http", schema: TrustedProxies,
    help: "requests from these addresses come through a proxy of yours: take\nthe client's address from X-Forwarded-For or Forwarded (for the\nthrottle, --max-tunnels-per-address, logs and status); never\nfrom anyone else (repeatable)",
  },
  tlsCert: { arg: "FILE", group: "http", schema: v.optional(CertificateFile), help: "serve HTTPS and wss:// with this certificate (PEM)" },
  tlsKey: { arg: "FILE", group: "http", schema: v.optional(PrivateKeyFile), help: "the certificate's private key (PEM)" },
  publicUrl: {
    arg: "wss://NAME:PORT", givesPorts: true, group: "hub",
    schema: v.optional(
      v.pipe(
        v.string("expected wss://NAME:PORT"),
        v.check((u) => URL.canParse(u) && /^wss:\/\/[^/@?#]+:\d+\/?$/.test(u) && new URL(u).port !== "", "expected wss://NAME:PORT"),
      ),
    ),
    help: "be a hub at this address: with --state-dir, make (first start) or\nreuse a certificate for NAME and tokens, serve TLS, and keep the\nsites' join string in DIR/site-join (the site line is printed only\nto a terminal); --http is then [::]:PORT (all addresses, IPv6 and\nIPv4) unless given",
  },
  invite: { arg: "NET[,NET…]", group: "hub", help: "print a join line for a new token limited to these networks\n(the hub in --state-dir) and exit" },
  invites: { group: "hub", help: "list the hub's tokens (id, networks; never the token) and exit" },
  revoke: { arg: "ID", group: "hub", help: "revoke the token ID; a running hub closes its tunnels and v86\nports" },
  installService: {
    group: "hub",
    help: "install this command (less this option) as the systemd service\nedge-relay: unit, binary, secrets in a 0600 environment file,\n--state-dir's files copied to /var/lib/edge-relay",
  },
  installRoot: { arg: "DIR", group: "hub", help: "with --install-service: write below DIR instead of / (tests,\nimages); systemctl is then left to you" },
  v86Origins: {
    flag: "v86-origin", arg: "ORIGIN", multiple: true, group: "v86", schema: list(BrowserOrigin, "origins"),
    help: "accept v86 browsers only from pages of this origin (repeatable),\ne.g. https://lab.example.org; others get 403 (none: any origin)",
  },
  v86Rate: {
    arg: "FRAMES,BYTES", group: "v86", schema: v.optional(V86RateSchema),
    help: "at most this many frames and bytes per second each way on one\nv86 port (0: no limit on that count); the excess is dropped",
  },
  macAgeing: { arg: "SECONDS", numeric: true, group: "switch", schema: v.optional(Seconds, 300), help: "forget a MAC not seen for this long" },
  queueBytes: {
    arg: "BYTES", numeric: true, group: "switch", schema: v.optional(wholeNumber("bytes", MAX_FRAME + 4, MAX_QUEUE_BYTES), 4 * 1024 * 1024),
    help: "send queue bound per port; beyond it frames are dropped",
  },
  flowControl: {
    arg: "on|off", group: "switch", schema: v.optional(OnOff, "on"),
    help: "when a VM's or tunnel's unicast frames go to a port whose queue is\nhalf full, stop reading it until that queue drains, like 802.3x\nPAUSE (floods never pause; off: the excess is dropped)",
  },
  portMacs: {
    arg: "N", numeric: true, group: "switch", schema: v.optional(wholeNumber("MACs", 1, MAX_MACS_PER_NETWORK), DEFAULT_PORT_MACS),
    help: "MACs learned behind one VM port; frames from further source MACs\nare dropped (a tunnel may fill the network's table)",
  },
  stormLimit: {
    arg: "FRAMES", numeric: true, group: "switch", schema: v.optional(wholeNumber("frames per second", 0, 10_000_000), DEFAULT_STORM_LIMIT),
    help: "broadcast and multicast frames per second one port may send into\nthe switch; the excess is dropped (0: no limit)",
  },
  loopProbe: {
    arg: "SECONDS", numeric: true, group: "switch", schema: v.optional(v.pipe(v.number("expected a number of seconds"), v.minValue(0, "must not be negative"), v.maxValue(3600, "must be at most an hour")), 2),
    help: "send a loop probe (EtherType 0x9000) out of each port this often;\na port it comes back on is blocked for a minute (0: off)",
  },
  maxNetworks: { arg: "N", numeric: true, group: "limits", schema: v.optional(wholeNumber("networks", 1, 1_000_000), 1024), help: "networks on this relay" },
  maxTunnels: { arg: "N", numeric: true, group: "limits", schema: v.optional(wholeNumber("tunnels", 1, 1_000_000), 4096), help: "tunnels connected to this relay" },
  maxTunnelsPerAddress: {
    arg: "N", numeric: true, group: "limits", schema: v.optional(wholeNumber("tunnels", 1, 1_000_000), 64),
    help: "tunnels from one source address",
  },
  maxConnections: {
    arg: "N", numeric: true, group: "limits", schema: v.optional(wholeNumber("connections", 1, 1_000_000), 4096),
    help: "QEMU stream connections; further ones are closed at once",
  },
  udpPeers: {
    arg: "N", numeric: true, group: "limits", schema: v.optional(wholeNumber("peers", 1, 65_536), 64),
    help: "peers one --qemu-udp socket learns (the least recent goes)",
  },
  memoryBudget: {
    arg: "BYTES", numeric: true, group: "limits", schema: v.optional(wholeNumber("bytes", 1024 * 1024, 2 ** 40), 256 * 1024 * 1024),
    help: "bytes queued across all ports; beyond it, or beyond what is\nstill free for one port, frames drop",
  },
  maxCaptures: {
    arg: "N", numeric: true, group: "capture", schema: v.optional(wholeNumber("captures", 1, 1_000), 4),
    help: "live captures (GET /capture) at once; more get 429",
  },
  captureFile: {
    arg: "NET=PATH", multiple: true, group: "capture", schema: list(CaptureFileSpec, "NET=PATH"),
    help: "write NET's traffic to PATH as pcapng (repeatable)",
  },
  captureRotate: {
    arg: "SIZE", group: "capture", schema: v.optional(ByteSize, "100MB"),
    help: "start a new capture file past this size (B, KB, MB, GB)",
  },
  captureKeep: { arg: "N", numeric: true, group: "capture", schema: v.optional(wholeNumber("files", 1, 1_000), 5), help: "capture files kept: PATH, PATH.1, …" },
  impair: {
    arg: "TARGET=SPEC", multiple: true, group: "capture", schema: list(ImpairOption, "TARGET=SPEC"),
    help: "impair a link in netem's words (repeatable): TARGET is uplink[:NET][:in|:out],\nNET (every port's way out) or a port id; e.g. uplink=\"delay 40ms 5ms loss 0.1%\"",
  },
  dhcp: {
    arg: "NET=CIDR[,…]", multiple: true, group: "dhcp", schema: list(DhcpNetwork, DHCP_SHAPE),
    help: "join NET as a host of the relay's own that answers DHCP, DNS for\nthe leases' names, ARP and ping (repeatable): NET=CIDR[,gateway=IP]\n[,range=FIRST-LAST][,lease=DURATION][,domain=NAME]",
  },
  dhcpHosts: {
    flag: "dhcp-host", arg: "MAC,IP[,NAME]", multiple: true, group: "dhcp", schema: list(DhcpHost, "MAC,IP[,NAME]"),
    help: "always give MAC this address (and name) on the --dhcp network\nholding it (repeatable)",
  },
  stateDir: {
    arg: "DIR", env: "STATE_DIRECTORY", group: "other", schema: v.optional(v.pipe(v.string("expected a directory"), v.minLength(1, "expected a directory"))),
    help: "directory for state the relay keeps (DHCP leases, the hub's\ncertificate and tokens); default: $STATE_DIRECTORY (systemd's\nStateDirectory), else beside the config file",
  },
  config: {
    arg: "FILE", group: "other",
    help: 'JSON file with the same options in camelCase (qemuListen: [...],\ntokens: ["…" or {"token": "…", "networks": ["lab"]}], …);\noptions given on the command line replace the file\'s, but\ntokens from the file, --token, RELAY_TOKENS and --token-file add up',
  },
  help: { short: "h", group: "other", help: "show this help" },
  version: { short: "V", group: "other", help: "print the version" },
} satisfies Record<string, OptionSpec>;

type OptionTable = typeof OPTIONS;
type ConfigEntries = {
  [K in keyof OptionTable as OptionTable[K] extends { schema: v.GenericSchema } ? K : never]: OptionTable[K] extends { schema: infer S } ? S : never;
};

/** `--qemu-listen` for `qemuListen`. @internal */
export function flagOf(key: string): string {
  const spec = (OPTIONS as Record<string, OptionSpec>)[key];
  return `--${spec?.flag ?? key.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`;
}

const configEntries = Object.fromEntries(
  Object.entries(OPTIONS as Record<string, OptionSpec>).flatMap(([key, spec]) => (spec.schema ? [[key, spec.schema]] : [])),
) as ConfigEntries;

/**
 * The first listener given an address another one has (the same, or one a wildcard includes), said
 * before binding: the kernel's "address already in use" would blame some other process. Port 0 is
 * never shared; multicast members share their group by design.
 */
function sharedAddress(c: {
  http: HostPort;
  qemuListen: { address: SocketAddress }[];
  qemuUdp: { address: SocketAddress }[];
}): { key: "qemuListen" | "qemuUdp"; index: number; message: string } | undefined {
  const taken: { kind: string; address: SocketAddress; by: string }[] = [{ kind: "tcp", address: c.http, by: flagOf("http") }];
  for (const key of ["qemuListen", "qemuUdp"] as const) {
    for (const [index, { address }] of c[key].entries()) {
      const kind = "path" in address ? "unix" : key === "qemuListen" ? "tcp" : "udp";
      const clash = taken.find((t) => t.kind === kind && sameListener(t.address, address));
      if (clash) {
        const mine = formatAddress(address);
        const theirs = formatAddress(clash.address);
        const message = mine === theirs ? `${mine} is given twice, here and to ${clash.by}` : `${mine} overlaps ${theirs}, given to ${clash.by}`;
        return { key, index, message };
      }
      taken.push({ kind, address, by: `${flagOf(key)} (${key}[${index}])` });
    }
  }
  return undefined;
}

/** Whether two listeners of one kind would want the same socket address. */
function sameListener(a: SocketAddress, b: SocketAddress): boolean {
  if ("path" in a || "path" in b) return "path" in a && "path" in b && a.path === b.path;
  const wildcard = (host: string) => host === "0.0.0.0" || host === "::";
  return a.port !== 0 && a.port === b.port && (a.host === b.host || wildcard(a.host) || wildcard(b.host));
}

/**
 * Why a QEMU port would be open to other hosts, or undefined when it is local: a VM port is a port
 * on the segment for whoever reaches it. Unix sockets are local; --qemu-connect dials out.
 */
function remoteQemuPort(entry: { address: SocketAddress } | { localAddress: string | undefined }): string | undefined {
  if ("localAddress" in entry) {
    if (entry.localAddress === undefined) return "without a loopback LOCALADDR the group is joined on every interface: anyone on the network is on the segment";
    return isLoopback(entry.localAddress) ? undefined : `${entry.localAddress} is not a loopback address: anyone on that network is on the segment`;
  }
  const { address } = entry;
  if ("path" in address || isLoopback(address.host)) return undefined;
  return `${address.host} is not a loopback address: anyone who can reach it gets a port on the segment`;
}

const ConfigSchema = v.pipe(
  v.strictObject(configEntries),
  v.forward(
    v.check((c) => c.uplink === undefined || c.uplinkToken !== undefined, `required with ${flagOf("uplink")} (or set ${OPTIONS.uplinkToken.env})`),
    ["uplinkToken"],
  ),
  v.forward(v.check((c) => !(c.backplaneToken && c.backplaneCreds), `${flagOf("backplaneToken")} and ${flagOf("backplaneCreds")} exclude each other`), ["backplaneCreds"]),
  v.rawCheck(({ dataset, addIssue }) => {
    if (!dataset.typed || dataset.value.backplane.length > 0) return;
    for (const key of ["backplaneToken", "backplaneCreds", "backplaneCa"] as const) {
      if (dataset.value[key] === undefined) continue;
      addIssue({ message: `only means something with ${flagOf("backplane")}`, path: [{ type: "object", origin: "value", input: dataset.value, key, value: dataset.value[key] }] });
    }
  }),
  v.forward(
    v.check((c) => isLoopback(c.http.host) || c.adminToken !== undefined || c.publicUrl !== undefined, `required when ${flagOf("http")} is not a loopback address`),
    ["adminToken"],
  ),
  v.forward(
    v.check((c) => (c.tlsCert === undefined) === (c.tlsKey === undefined), `${flagOf("tlsCert")} and ${flagOf("tlsKey")} go together`),
    ["tlsKey"],
  ),
  v.forward(v.check((c) => c.publicUrl === undefined || c.stateDir !== undefined, `required with ${flagOf("publicUrl")} (or set STATE_DIRECTORY)`), ["stateDir"]),
  v.forward(
    v.check(
      (c) => !(c.insecure && c.uplinkFingerprint),
      `cannot be combined with ${flagOf("insecure")}: a pin is checked only on a verified chain; give the hub's certificate as ${flagOf("uplinkCa")} instead`,
    ),
    ["uplinkFingerprint"],
  ),
  v.forward(
    v.check(
      (c) => c.uplink === undefined || new Set([...c.qemuListen, ...c.qemuConnect, ...c.qemuUdp, ...c.qemuMcast].map((p) => p.network)).size <= MAX_TUNNEL_NETWORKS,
      `a tunnel carries at most ${MAX_TUNNEL_NETWORKS} networks; the QEMU ports name more`,
    ),
    ["uplink"],
  ),
  v.forward(
    v.check(
      (c) => new Set(c.qemuMcast.map((m) => formatHostPort(m.group))).size === c.qemuMcast.length,
      "a multicast group may be bridged once: twice would forward each copy to the other forever",
    ),
    ["qemuMcast"],
  ),
  v.rawCheck(({ dataset, addIssue }) => {
    if (!dataset.typed) return;
    const issue = sharedAddress(dataset.value);
    if (issue === undefined) return;
    const list = dataset.value[issue.key];
    const path: [v.ObjectPathItem, v.ArrayPathItem] = [
      { type: "object", origin: "value", input: dataset.value, key: issue.key, value: list },
      { type: "array", origin: "value", input: list, key: issue.index, value: list[issue.index]! },
    ];
    addIssue({ message: issue.message, path });
  }),
  v.rawCheck(({ dataset, addIssue }) => {
    if (!dataset.typed) return;
    const { dhcp, dhcpHosts } = dataset.value;
    const at = (key: "dhcp" | "dhcpHosts", index: number): [v.ObjectPathItem, v.ArrayPathItem] => {
      const list: unknown[] = dataset.value[key];
      return [{ type: "object", origin: "value", input: dataset.value, key, value: list }, { type: "array", origin: "value", input: list, key: index, value: list[index] }];
    };
    dhcp.forEach((d, i) => {
      if (dhcp.findIndex((o) => o.network === d.network) !== i) addIssue({ message: `network ${d.network} is given twice`, path: at("dhcp", i) });
    });
    dhcpHosts.forEach((h, i) => {
      const home = dhcp.find((d) => placeInSubnet(d.base, d.prefix, h.address) !== "outside");
      let problem: string | undefined;
      if (home === undefined) problem = `${ipv4Text(h.address)} is in no ${flagOf("dhcp")} network`;
      else if (h.address === home.gateway || placeInSubnet(home.base, home.prefix, h.address) !== "host") problem = `${ipv4Text(h.address)} is not an address ${home.network} can lease`;
      else if (dhcpHosts.findIndex((o) => o.mac === h.mac) !== i) problem = `MAC ${h.mac} is reserved twice`;
      else if (dhcpHosts.findIndex((o) => o.address === h.address) !== i) problem = `${ipv4Text(h.address)} is reserved twice`;
      if (problem !== undefined) addIssue({ message: problem, path: at("dhcpHosts", i) });
    });
  }),
  v.rawCheck(({ dataset, addIssue }) => {
    if (!dataset.typed || dataset.value.allowRemoteQemu) return;
    for (const key of ["qemuListen", "qemuUdp", "qemuMcast"] as const) {
      const list = dataset.value[key];
      list.forEach((entry, index) => {
        const message = remoteQemuPort(entry);
        if (message === undefined) return;
        const path: [v.ObjectPathItem, v.ArrayPathItem] = [
          { type: "object", origin: "value", input: dataset.value, key, value: list },
          { type: "array", origin: "value", input: list, key: index, value: entry },
        ];
        addIssue({ message: `${message}; add ${flagOf("allowRemoteQemu")}`, path });
      });
    }
  }),
);

/** Keys whose values are credentials: no message may quote them. */
const SECRET_KEYS = new Set(Object.entries(OPTIONS as Record<string, OptionSpec>).flatMap(([key, spec]) => (spec.secret ? [key] : [])));

/** Validates raw options (the config file's shape); throws a one-line ConfigError naming the option. */
export function parseConfig(input: unknown): Config {
  // valibot's stock messages quote the value received, which may be a secret: say what was expected.
  const result = v.safeParse(ConfigSchema, input, { message: (issue) => `expected ${issue.expected ?? "something else"}` });
  if (result.success) return result.output;
  const issue = result.issues[0];
  const keys = (issue.path ?? []).map((p) => p.key);
  const [first, ...rest] = keys;
  const option = typeof first === "string" ? flagOf(first) : "config";
  const where = issue.type === "strict_object" ? "config" : rest.length ? `${option} (${first}${rest.map((k) => (typeof k === "number" ? `[${k}]` : `.${String(k)}`)).join("")})` : option;
  const unknown = issue.type === "strict_object";
  const message = unknown ? `unknown option ${JSON.stringify(String(keys.at(-1)))}` : issue.message;
  if (!unknown && typeof first === "string" && SECRET_KEYS.has(first) && typeof issue.input === "string" && issue.input.length > 0 && message.includes(issue.input)) {
    throw new ConfigError(`${where}: invalid value`);
  }
  throw new ConfigError(`${where}: ${message}`);
}

// ───────────────────────────── framing ─────────────────────────────
//
// QEMU's stream netdevs send a 4-byte big-endian length, then the frame; the decoder takes chunks
// split anywhere and hands out frames that arrived whole as views, without a copy. A tunnel message
// is a type byte: control (JSON, checked field by field) or data (a channel, then length-prefixed
// frames). Decoders throw RangeError/SyntaxError/TypeError; the caller closes only the sender.

/** Views of a Buffer go through its species constructor; a plain Uint8Array view is cheaper per frame. */
function plainBytes(data: Uint8Array): Uint8Array {
  return data.constructor === Uint8Array ? data : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

function readLength(bytes: Uint8Array, at: number): number {
  const length = ((bytes[at]! << 24) | (bytes[at + 1]! << 16) | (bytes[at + 2]! << 8) | bytes[at + 3]!) >>> 0;
  if (length > MAX_FRAME) {
    throw new RangeError(`Cannot decode frame: length ${length} exceeds the maximum of ${MAX_FRAME} bytes`);
  }
  return length;
}

const EMPTY = new Uint8Array(0);

/**
 * Reassembles QEMU stream framing (4-byte big-endian length, then the frame) from chunks split
 * anywhere. Frames that arrive whole are handed out as views of the chunk, without a copy.
 * @internal
 */
export class StreamDecoder {
  #head = new Uint8Array(4);
  #headUsed = 0;
  #frame: Uint8Array | null = null;
  #frameUsed = 0;

  /**
   * A frame it has to reassemble gets a buffer of its own with `headroom` bytes and the frame's
   * length in front (`owned` is then true): a message header fits there, so the frame can go on
   * without another copy.
   */
  constructor(readonly headroom = 0) {}

  /**
   * Calls `onFrame` for every complete frame; throws RangeError on a length above MAX_FRAME. One that
   * returns false stops the decoding after its frame: the rest of the chunk is returned, to push later.
   */
  push(data: Uint8Array, onFrame: (frame: Uint8Array, owned: boolean) => boolean | void): Uint8Array {
    const chunk = plainBytes(data);
    const n = chunk.length;
    let i = 0;
    while (i < n) {
      const frame = this.#frame;
      if (frame !== null) {
        const take = Math.min(n - i, frame.length - this.#frameUsed);
        frame.set(chunk.subarray(i, i + take), this.#frameUsed);
        this.#frameUsed += take;
        i += take;
        if (this.#frameUsed === frame.length) {
          this.#frame = null;
          this.#frameUsed = 0;
          if (onFrame(frame, true) === false) return chunk.subarray(i);
        }
        continue;
      }
      let length: number;
      if (this.#headUsed > 0 || n - i < 4) {
        const take = Math.min(n - i, 4 - this.#headUsed);
        this.#head.set(chunk.subarray(i, i + take), this.#headUsed);
        this.#headUsed += take;
        i += take;
        if (this.#headUsed < 4) return EMPTY;
        this.#headUsed = 0;
        length = readLength(this.#head, 0);
      } else {
        length = readLength(chunk, i);
        i += 4;
        if (n - i >= length) {
          const frame = chunk.subarray(i, i + length);
          i += length;
          if (onFrame(frame, false) === false) return chunk.subarray(i);
          continue;
        }
      }
      if (length === 0) {
        if (onFrame(EMPTY, false) === false) return chunk.subarray(i);
        continue;
      }
      const room = this.headroom;
      if (room === 0) this.#frame = new Uint8Array(length);
      else {
        const owned = new Uint8Array(room + 4 + length);
        owned[room] = length >>> 24;
        owned[room + 1] = (length >>> 16) & 0xff;
        owned[room + 2] = (length >>> 8) & 0xff;
        owned[room + 3] = length & 0xff;
        this.#frame = owned.subarray(room + 4);
      }
      this.#frameUsed = 0;
    }
    return EMPTY;
  }

  /** Bytes held back waiting for the rest of a frame. */
  get buffered(): number {
    return this.#headUsed + this.#frameUsed;
  }

  /** Part of a frame (or of its length) is held: the next chunk starts with the rest of it. */
  get midFrame(): boolean {
    return this.#frame !== null || this.#headUsed > 0;
  }
}

/** A batch is sent once it passes this size, so one message or write never gets huge. */
const BATCH_BYTES = 256 * 1024;

/**
 * A growable buffer of length-prefixed frames behind a fixed header: a stream write (no header) or
 * a tunnel data message (type and channel). Reused between batches, so steady traffic allocates nothing.
 * @internal
 */
export class FrameBatch {
  bytes: Uint8Array;
  used: number;
  /** The size of the last batch taken: the next one is likely as big, so it starts that big. */
  #taken = 0;
  constructor(readonly header: Uint8Array = EMPTY) {
    this.bytes = header.length ? header.slice() : EMPTY;
    this.used = header.length;
  }

  get empty(): boolean {
    return this.used === this.header.length;
  }

  append(frame: Uint8Array): void {
    const need = this.used + 4 + frame.length;
    if (need > this.bytes.length) this.#grow(need);
    const b = this.bytes;
    let at = this.used;
    const length = frame.length;
    b[at++] = length >>> 24;
    b[at++] = (length >>> 16) & 0xff;
    b[at++] = (length >>> 8) & 0xff;
    b[at++] = length & 0xff;
    b.set(frame, at);
    this.used = at + length;
  }

  /** Frames already in stream framing (length-prefixed), copied in one go. */
  appendRun(run: Uint8Array): void {
    const need = this.used + run.length;
    if (need > this.bytes.length) this.#grow(need);
    this.bytes.set(run, this.used);
    this.used = need;
  }

  /**
   * Grows the buffer to hold `need` bytes: doubling, capped at a batch's size; a longer buffer
   * (encodeFrames) keeps doubling, never growing by one frame at a time, which would copy quadratically.
   */
  #grow(need: number): void {
    const doubled = Math.max(this.bytes.length * 2, this.#taken);
    const grown = new Uint8Array(Math.max(need, need <= BATCH_BYTES ? Math.min(doubled, BATCH_BYTES) : doubled, 4096));
    grown.set(this.bytes.subarray(0, this.used));
    this.bytes = grown;
  }

  /** Bytes after the last frame: a protocol's trailer. */
  end(trailer: Uint8Array): void {
    const need = this.used + trailer.length;
    if (need > this.bytes.length) this.#grow(need);
    this.bytes.set(trailer, this.used);
    this.used += trailer.length;
  }

  /** The batch so far; valid until the next append or reset. */
  view(): Uint8Array {
    return this.bytes.subarray(0, this.used);
  }

  /** The batch so far, for keeping: the next append starts a new buffer. */
  take(): Uint8Array {
    const taken = this.view();
    this.#taken = taken.length;
    this.bytes = this.header.length ? this.header.slice() : EMPTY;
    this.used = this.header.length;
    return taken;
  }

  reset(): void {
    this.used = this.header.length;
  }
}

/** Stream framing for a list of frames (tests, tools). @internal */
export function encodeFrames(frames: Uint8Array[]): Uint8Array {
  const batch = new FrameBatch();
  for (const f of frames) batch.append(f);
  return batch.view().slice();
}

/** A MAC address (6 bytes at `at`) as a number: no string on the hot path. @internal */
export function macKey(frame: Uint8Array, at: number): number {
  return (
    frame[at]! * 0x100_0000_0000 +
    frame[at + 1]! * 0x1_0000_0000 +
    (((frame[at + 2]! << 24) | (frame[at + 3]! << 16) | (frame[at + 4]! << 8) | frame[at + 5]!) >>> 0)
  );
}

/** The inverse of macKey: a MAC's number as its 6 bytes. @internal */
export function macBytes(key: number): Uint8Array {
  const high = Math.floor(key / 0x1_0000_0000);
  return Uint8Array.of(high >>> 8, high & 255, key >>> 24, (key >>> 16) & 255, (key >>> 8) & 255, key & 255);
}

/** A data message names its channel in 16 bits; channels are numbered once per tunnel, never reused. */
const TUNNEL_CHANNELS = 0x10000;

const NetworkName = v.pipe(v.string("expected a network name"), v.regex(NETWORK_NAME, "expected a network name"));
const NetworkList = v.pipe(
  v.array(NetworkName, "expected an array of network names"),
  v.maxLength(MAX_TUNNEL_NETWORKS, `expected at most ${MAX_TUNNEL_NETWORKS} networks`),
  v.check((names) => new Set(names).size === names.length, "a network is named twice"),
);
/** A relay's random id: 16 hex digits, made at start. */
const RelayId = v.pipe(v.string(), v.regex(/^[0-9a-f]{16}$/, "expected a relay id"));
const RelayName = v.pipe(v.string(), v.regex(NETWORK_NAME, "expected a relay name"));
const Refusal = v.object({ network: NetworkName, reason: v.pipe(v.string(), v.maxLength(200)) });

type Refusal = v.InferOutput<typeof Refusal>;

/** Every control message, checked field by field: a peer's JSON is never trusted to coerce. */
const ControlSchema = v.variant(
  "type",
  [
    v.object({ type: v.literal("hello"), version: v.literal(TUNNEL_VERSION, "expected version 1"), networks: NetworkList, id: v.optional(RelayId), name: v.optional(RelayName) }),
    v.object({
      type: v.literal("welcome"),
      version: v.literal(TUNNEL_VERSION, "expected version 1"),
      accepted: NetworkList,
      refused: v.array(Refusal),
      id: v.optional(RelayId),
      name: v.optional(RelayName),
    }),
    v.object({ type: v.literal("attach"), networks: NetworkList }),
    v.object({ type: v.literal("attached"), accepted: NetworkList, refused: v.array(Refusal) }),
    v.object({ type: v.literal("detach"), networks: NetworkList }),
    v.object({ type: v.literal("ping") }),
    v.object({ type: v.literal("pong") }),
  ],
  "unknown control message type",
);

type ControlMessage = v.InferOutput<typeof ControlSchema>;

/** Validates a decoded control message; throws TypeError naming the first bad field. @internal */
export function parseControl(json: unknown): ControlMessage {
  const result = v.safeParse(ControlSchema, json, {
    abortEarly: true,
    message: (issue) => (issue.received === "undefined" ? "missing" : `expected ${issue.expected ?? "something else"}`),
  });
  if (result.success) return result.output;
  const issue = result.issues[0];
  const path = (issue.path ?? []).map((p) => String(p.key)).join(".") || "message";
  throw new TypeError(`Cannot decode control message: ${path}: ${issue.message}`);
}

/** @internal */
export function encodeControl(message: ControlMessage): Uint8Array {
  const json = new TextEncoder().encode(JSON.stringify(message));
  const out = new Uint8Array(1 + json.length);
  out[0] = MSG_CONTROL;
  out.set(json, 1);
  return out;
}

/** A data message's type and channel, before its frames. */
const DATA_HEADER_BYTES = 3;

/** @internal */
export function dataHeader(channel: number): Uint8Array {
  return Uint8Array.of(MSG_DATA, channel >>> 8, channel & 0xff);
}

/**
 * Decodes one tunnel message (a data message from byte `from`, where an earlier call stopped).
 * Throws RangeError/SyntaxError on anything malformed; the caller closes the tunnel that sent it.
 * An `onFrame` that returns false stops the decoding after its frame: the offset reached is returned.
 * @internal
 */
export function decodeTunnelMessage(
  data: Uint8Array,
  onControl: (control: ControlMessage) => void,
  onFrame: (channel: number, frame: Uint8Array) => boolean | void,
  from = DATA_HEADER_BYTES,
): number {
  const message = plainBytes(data);
  if (message.length === 0) throw new RangeError("Cannot decode tunnel message: empty message");
  const type = message[0];
  if (type === MSG_CONTROL) {
    let json: unknown;
    try {
      json = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(message.subarray(1)));
    } catch {
      throw new SyntaxError("Cannot decode tunnel message: control message is not UTF-8 JSON");
    }
    onControl(parseControl(json));
    return message.length;
  }
  if (type !== MSG_DATA) throw new RangeError(`Cannot decode tunnel message: unknown type ${type}`);
  if (message.length < 3) throw new RangeError("Cannot decode tunnel message: data message shorter than its header");
  if (message.length === 3) throw new RangeError("Cannot decode tunnel message: data message without a frame");
  const channel = (message[1]! << 8) | message[2]!;
  let i = from;
  while (i < message.length) {
    if (message.length - i < 4) throw new RangeError("Cannot decode tunnel message: truncated frame length");
    const length = readLength(message, i);
    i += 4;
    if (message.length - i < length) {
      throw new RangeError(`Cannot decode tunnel message: frame of ${length} bytes overruns the message`);
    }
    const frame = message.subarray(i, i + length);
    i += length;
    if (onFrame(channel, frame) === false) return i;
  }
  return i;
}

// ───────────────────────────── system ─────────────────────────────
//
// What Bun has no API for goes to libc through bun:ffi, loaded on first use: unix-socket calls
// (telling a stale socket file from a live one; the datagram sockets of QEMU datagram ports) and the
// open-file limit. A failed call is an Error with the errno's code, as Node's own calls give.

const AF_UNIX = 1;
const SOCK_STREAM = 1;
const SOCK_DGRAM = 2;
const SOCK_CLOEXEC = 0x80000;

const SOL_SOCKET = 1;

const RLIMIT_NOFILE = 7;

function loadLibc() {
  return dlopen("libc.so.6", {
    socket: { args: [FFIType.i32, FFIType.i32, FFIType.i32], returns: FFIType.i32 },
    bind: { args: [FFIType.i32, FFIType.ptr, FFIType.u32], returns: FFIType.i32 },
    connect: { args: [FFIType.i32, FFIType.ptr, FFIType.u32], returns: FFIType.i32 },
    setsockopt: { args: [FFIType.i32, FFIType.i32, FFIType.i32, FFIType.ptr, FFIType.u32], returns: FFIType.i32 },
    getsockopt: { args: [FFIType.i32, FFIType.i32, FFIType.i32, FFIType.ptr, FFIType.ptr], returns: FFIType.i32 },
    sendto: { args: [FFIType.i32, FFIType.ptr, FFIType.u64, FFIType.i32, FFIType.ptr, FFIType.u32], returns: FFIType.i32 },
    close: { args: [FFIType.i32], returns: FFIType.i32 },
    getrlimit: { args: [FFIType.i32, FFIType.ptr], returns: FFIType.i32 },
    setrlimit: { args: [FFIType.i32, FFIType.ptr], returns: FFIType.i32 },
    __errno_location: { args: [], returns: FFIType.ptr },
  }).symbols;
}

let libcSymbols: ReturnType<typeof loadLibc> | undefined;
/** libc's calls, loaded on first use. */
function libc() {
  return (libcSymbols ??= loadLibc());
}

function sockaddrUnix(path: string): Uint8Array {
  const abstract = path.startsWith("@");
  const name = new TextEncoder().encode(abstract ? path.slice(1) : path);
  if (name.length > 107) throw Object.assign(new Error("unix socket path longer than 107 bytes"), { code: "ENAMETOOLONG" });
  const out = new Uint8Array(2 + name.length + 1);
  out[0] = AF_UNIX;
  out.set(name, abstract ? 3 : 2);
  return abstract ? out.subarray(0, 3 + name.length) : out;
}

function errnoError(call: string, errno = read.i32(libc().__errno_location()!, 0)): Error {
  const code = Object.entries(osConstants.errno).find(([, n]) => n === errno)?.[0] ?? `errno ${errno}`;
  return Object.assign(new Error(`${call} failed`), { code });
}

/**
 * Clears the way for a unix socket: a file left by a killed process is removed; one that a live
 * process still uses (a stream or datagram socket that accepts a connect), or a file that is not a
 * socket, is an error. libc's connect tells "refused" from "wrong socket type", which Bun's does not.
 */
function claimUnixPath(path: string): void {
  if (path.startsWith("@")) return;
  let stats;
  try {
    stats = lstatSync(path);
  } catch {
    return;
  }
  if (!stats.isSocket()) throw new Error("the path exists and is not a socket");
  const address = sockaddrUnix(path);
  const c = libc();
  const inUse = [SOCK_STREAM, SOCK_DGRAM].some((type) => {
    const probe = c.socket(AF_UNIX, type | SOCK_CLOEXEC, 0);
    const connected = c.connect(probe, address, address.length) === 0;
    c.close(probe);
    return connected;
  });
  if (inUse) throw Object.assign(new Error("a running process uses it"), { code: "EADDRINUSE" });
  unlinkSync(path);
}

/**
 * Raises the soft open-file limit to the hard one (Bun 1.4 already does at start; a runtime that
 * does not would leave many hosts at 1024) and returns the soft limit in force.
 */
function raiseFdLimit(): number {
  const c = libc();
  const limit = new BigUint64Array(2);
  if (c.getrlimit(RLIMIT_NOFILE, limit) !== 0) throw errnoError("getrlimit");
  if (limit[0]! < limit[1]! && c.setrlimit(RLIMIT_NOFILE, BigUint64Array.of(limit[1]!, limit[1]!)) === 0) limit[0] = limit[1]!;
  return Number(limit[0]);
}

// ───────────────────────────── ports & flow control ─────────────────────────────
//
// A port kind implements `enqueue` (queue a frame toward its peer), and may implement `queued` and
// `reading` (stop reading its peer) and `enqueueRun` (take a run of frames whole, for cut-through).
// Flow control: a source whose unicast frame goes to a port past half its queue stops being read
// until that queue drains below a quarter; one that drains nothing for a second is given up on, so a
// hung VM cannot stall a network. PortTotals keeps per-kind counters that outlive closed ports.

interface PortStats {
  rxFrames: number;
  rxBytes: number;
  /** Runt and 0-length frames received and dropped. */
  rxRunts: number;
  /** Broadcast and multicast frames over the port's per-second storm limit. */
  rxStorm: number;
  /** Frames from a source MAC beyond the port's MAC limit. */
  rxMacLimit: number;
  /** Frames that arrived while the port was blocked for a loop. */
  rxLoop: number;
  txFrames: number;
  txBytes: number;
  /** Frames not sent because the port's queue (or the relay's memory budget) was full, or the socket refused them. */
  txDrops: number;
  /** Protocol errors: an oversize length, a malformed message. */
  errors: number;
}

type PortState = "up" | "blocked-loop" | "closed";

interface PortSnapshot {
  id: string;
  kind: string;
  peer: string;
  state: PortState;
  since: string;
  rx: { frames: number; bytes: number; drops: number; runts: number; storm: number; macLimit: number; loop: number };
  tx: { frames: number; bytes: number; drops: number };
  errors: number;
  macs: number;
  /**
   * Flow control: times this port's reading was paused, the port it waits for now (null: reading),
   * and times it was itself given up on for sending nothing while others waited.
   */
  flow: { pauses: number; waitingFor: string | null; stalls: number };
  /** Why it closed: peer closed, oversize frame, write error, read error: …, aged out, relay stopping, … */
  reason?: string;
}

/**
 * Flow control: a port whose queue passes this share of its bound is congested, and it has drained
 * below the second share; the sources it paused are checked this often; one that sends nothing for
 * the last while pauses no one until it drains (a hung VM or a dead link must not stall a network).
 */
const FLOW_HIGH_WATER = 0.5;
const FLOW_LOW_WATER = 0.25;
const FLOW_POLL_MS = 1;
const FLOW_STALL_MS = 1_000;

let portSerial = 0;

/** Anything that carries frames into and out of one network. @internal */
export abstract class Port {
  /** `NET/KIND-N`, numbered per network and kind in the order ports attach. */
  id: string;
  /** Set by whoever closes the port, for the log and closedPorts. */
  closeReason: string | undefined;
  /** Names this port in loop probes. */
  readonly serial = ++portSerial;
  readonly stats: PortStats = { rxFrames: 0, rxBytes: 0, rxRunts: 0, rxStorm: 0, rxMacLimit: 0, rxLoop: 0, txFrames: 0, txBytes: 0, txDrops: 0, errors: 0 };
  state: PortState = "up";
  since = Date.now();
  network: Network | undefined;
  /** MACs the switch has learned behind this port, and how many it may. */
  macCount = 0;
  macLimit = Infinity;
  /** Storm control: broadcast/multicast frames counted in the current second. */
  floodSecond = 0;
  floodCount = 0;
  /** When a loop block ends (ms). */
  blockedUntil = 0;
  /** Link impairment on the way into the switch and out of it (netem's vocabulary). */
  impairIn: Impairment | undefined;
  impairOut: Impairment | undefined;
  /** The relay at the far end of a tunnel, its name, and the link's rank for loop breaking (tunnel ports only). */
  remoteId: string | undefined;
  remoteName: string | undefined;
  linkRank: string | undefined;
  /** Flow control: the congested port this one's reading waits for, and how often it waited. */
  waitingFor: Port | undefined;
  pauses = 0;
  /** Sent nothing for FLOW_STALL_MS while others waited: it pauses no one until it drains. */
  stalled = false;
  stalls = 0;
  /** Ports whose reading waits for this one to drain, and the timer that watches it meanwhile. */
  #waiters: Port[] = [];
  #watch: ReturnType<typeof setInterval> | undefined;
  /** The smallest queue seen while watched, and when: progress for the stall check. */
  #lowest = Infinity;
  #lowestAt = 0;

  constructor(
    readonly kind: string,
    readonly peer: string,
    /** Carries a whole segment (a tunnel, a multicast group): learns up to the network's MAC cap. */
    readonly trunk = false,
  ) {
    this.id = `${kind}-${this.serial}`;
  }

  /** Queues a frame for sending; false when it had to be dropped. */
  protected abstract enqueue(frame: Uint8Array): boolean;

  /** Takes a run of length-prefixed frames whole (the switch's cut-through): see enqueueRun. */
  readonly takesRuns: boolean = false;
  /** The longest run it takes, in bytes. */
  get maxRun(): number {
    return Infinity;
  }

  /**
   * Queues `frames` frames, length-prefixed in `block[start, end)`, as they are, and counts them as
   * transmit does; false when there is no room for all of them (then nothing was queued or counted).
   * `message`: the run is all of `block` from `start`, and the bytes before it are a message header
   * free to overwrite.
   */
  enqueueRun(_block: Uint8Array, _start: number, _end: number, _frames: number, _message: boolean): boolean {
    return false;
  }

  /** Counts a run handed to the socket (or refused by it) as transmit counts frames. */
  protected countRun(frames: number, bytes: number, sent: boolean): void {
    if (sent) {
      this.stats.txFrames += frames;
      this.stats.txBytes += bytes;
    } else this.stats.txDrops += frames;
  }

  /** Told of each port that joins this one's network, itself included (the relay's host announces itself). */
  joined?(port: Port): void;

  /** Bytes queued toward the peer, and their bound: a port without a queue is never congested. */
  queued(): number {
    return 0;
  }
  queueLimit = Infinity;

  /** Stops (false) or restarts reading the peer; false when this port cannot (datagrams, v86). */
  protected reading(_on: boolean): boolean {
    return false;
  }

  /** Past the high-water mark, unless given up on; one given up on counts again once drained. */
  congested(): boolean {
    const queued = this.queued();
    if (queued > this.queueLimit * FLOW_HIGH_WATER) return !this.stalled;
    if (this.stalled && queued <= this.queueLimit * FLOW_LOW_WATER) this.stalled = false;
    return false;
  }

  /** 802.3x-style PAUSE: stops reading this port until `to` drains, is given up on, or closes. */
  waitFor(to: Port): void {
    if (!this.reading(false)) return;
    this.waitingFor = to;
    this.pauses++;
    to.#waiters.push(this);
    to.#watch ??= setInterval(to.#checkDrained, FLOW_POLL_MS);
  }

  /** Polled while sources wait: a queue that never shrinks for FLOW_STALL_MS has a peer that reads nothing. */
  readonly #checkDrained = (): void => {
    const queued = this.queued();
    const now = performance.now();
    if (queued < this.#lowest) {
      this.#lowest = queued;
      this.#lowestAt = now;
    } else if (now - this.#lowestAt >= FLOW_STALL_MS) {
      this.stalled = true;
      this.stalls++;
      return this.releaseWaiters();
    }
    if (queued <= this.queueLimit * FLOW_LOW_WATER) this.releaseWaiters();
  };

  /** Lets every port waiting for this one read again (it drained, was given up on, or closed). */
  releaseWaiters(): void {
    clearInterval(this.#watch);
    this.#watch = undefined;
    this.#lowest = Infinity;
    for (const port of this.#waiters.splice(0)) {
      port.waitingFor = undefined;
      port.reading(true);
    }
  }

  /** Queues a frame; a port that cannot take it counts a drop (false), and never throws back into the switch. */
  send(frame: Uint8Array): boolean {
    if (this.impairOut !== undefined) {
      this.impairOut.push(frame);
      return true;
    }
    return this.transmit(frame);
  }

  /** Frames out of an impairment (or straight from send): counted as they reach the queue. */
  readonly transmit = (frame: Uint8Array): boolean => {
    let queued = false;
    try {
      queued = this.enqueue(frame);
    } catch {
      this.stats.errors++;
    }
    if (queued) {
      this.stats.txFrames++;
      this.stats.txBytes += frame.length;
    } else {
      this.stats.txDrops++;
    }
    return queued;
  };

  /** Sends a frame of the relay's own (a loop probe): not counted as traffic. */
  sendOwn(frame: Uint8Array): void {
    try {
      this.enqueue(frame);
    } catch {
      this.stats.errors++;
    }
  }

  /** Hands a received frame to the switch. */
  readonly receive = (frame: Uint8Array): void => {
    if (this.impairIn !== undefined) this.impairIn.push(frame);
    else this.network?.forward(frame, this);
  };

  readonly #arrive = (frame: Uint8Array): void => {
    this.network?.forward(frame, this);
  };

  /** Impairs this port's way in, out, or both (the impairment's profile and counters are its own). */
  impair(direction: "in" | "out", spec: ImpairmentSpec | undefined): void {
    const current = direction === "in" ? this.impairIn : this.impairOut;
    if (current?.spec === spec) return;
    current?.close();
    const next = spec && new Impairment(spec, direction === "in" ? this.#arrive : this.transmit);
    if (direction === "in") this.impairIn = next;
    else this.impairOut = next;
  }

  /** Frames received and dropped, for every reason the port counts. */
  rxDrops(): number {
    const s = this.stats;
    return s.rxRunts + s.rxStorm + s.rxMacLimit + s.rxLoop;
  }

  snapshot(): PortSnapshot {
    const s = this.stats;
    return {
      id: this.id,
      kind: this.kind,
      peer: this.peer,
      state: this.state,
      since: new Date(this.since).toISOString(),
      rx: {
        frames: s.rxFrames,
        bytes: s.rxBytes,
        drops: this.rxDrops(),
        runts: s.rxRunts,
        storm: s.rxStorm,
        macLimit: s.rxMacLimit,
        loop: s.rxLoop,
      },
      tx: { frames: s.txFrames, bytes: s.txBytes, drops: s.txDrops },
      errors: s.errors,
      macs: this.macCount,
      flow: { pauses: this.pauses, waitingFor: this.waitingFor?.id ?? null, stalls: this.stalls },
      ...(this.state === "closed" && { reason: this.closeReason ?? "peer closed" }),
    };
  }
}

/**
 * --memory-budget's dynamic threshold (Choudhury & Hahne, as switch ASICs share their buffer): one
 * port may hold at most this many times the budget still free. With 1 a lone port may fill half of
 * it, and N ports that stop reading leave 1/(1 + N) of it free for the rest.
 * @internal
 */
export const BUDGET_ALPHA = 1;

/**
 * Bytes queued across every port of the relay (--memory-budget), so many slow peers together cannot
 * grow memory without bound. It is shared by a dynamic threshold (BUDGET_ALPHA): a port's share
 * shrinks as the budget fills, so ports that stop reading can never take all of it, and a healthy
 * port always finds room for its next frames.
 * @internal
 */
export class MemoryBudget {
  used = 0;
  /** Frames refused because the budget, or the port's share of what is free, was spent. */
  drops = 0;
  constructor(readonly limit: number) {}

  /** Room for `bytes` more on a port that holds `held`: within the budget and within the port's share. */
  take(bytes: number, held: number): boolean {
    const free = this.limit - this.used;
    if (bytes > free || held + bytes > BUDGET_ALPHA * free) {
      this.drops++;
      return false;
    }
    this.used += bytes;
    return true;
  }

  /**
   * Room for `bytes` more on a port that holds `held` of its own bound `limit`, then in the budget
   * (`take`). A port's own bound refuses first and is not a budget drop: the port counts its own.
   */
  admit(bytes: number, held: number, limit: number): boolean {
    return held + bytes <= limit && this.take(bytes, held);
  }

  release(bytes: number): void {
    this.used -= bytes;
  }

  /**
   * A buffer that drains on its own (a socket's) was charged `charged` and holds `held` now: the
   * difference is charged (or released). Returns `held`, the new charge.
   */
  recharge(charged: number, held: number): number {
    this.used += held - charged;
    return held;
  }
}

/** For ports made where no relay-wide budget applies (tests, tools). */
const UNLIMITED = new MemoryBudget(Infinity);

/**
 * The send side of a byte stream: frames are batched per event-loop turn into one write; a partial
 * write keeps its remainder for `drain`; past `limit` queued bytes (or the relay's budget) new
 * frames are refused.
 * @internal
 */
export class StreamWriter {
  readonly #batch = new FrameBatch();
  readonly #pending: Uint8Array[] = [];
  #pendingBytes = 0;
  #blocked = false;
  #scheduled = false;
  #closed = false;

  constructor(
    private readonly write: (data: Uint8Array) => number,
    private readonly limit: number,
    private readonly budget: MemoryBudget = UNLIMITED,
  ) {}

  get queued(): number {
    return this.#pendingBytes + this.#batch.used;
  }

  push(frame: Uint8Array): boolean {
    const need = 4 + frame.length;
    if (this.#closed || !this.budget.admit(need, this.queued, this.limit)) return false;
    if (this.#batch.used + need > BATCH_BYTES) {
      if (this.#blocked) this.#seal();
      else this.#writeOut();
    }
    this.#batch.append(frame);
    if (!this.#scheduled) {
      this.#scheduled = true;
      setImmediate(this.flush);
    }
    return true;
  }

  /**
   * Queues frames already in stream framing: written as they are when nothing waits before them (a
   * partial write keeps a view of the rest, not a copy), else copied behind the batch.
   */
  pushRun(run: Uint8Array): boolean {
    if (this.#closed || !this.budget.admit(run.length, this.queued, this.limit)) return false;
    if (!this.#blocked && this.#pending.length === 0 && !this.#batch.empty) this.#writeOut();
    if (!this.#blocked && this.#pending.length === 0) {
      const n = Math.max(0, this.write(run));
      this.budget.release(n);
      if (n < run.length) {
        this.#pending.push(run.subarray(n));
        this.#pendingBytes += run.length - n;
        this.#blocked = true;
      }
      return true;
    }
    if (!this.#batch.empty && this.#batch.used + run.length > BATCH_BYTES) this.#seal();
    this.#batch.appendRun(run);
    return true;
  }

  /** Queues the full batch behind the blocked write, handing over its buffer rather than copying it. */
  #seal(): void {
    this.#pendingBytes += this.#batch.used;
    this.#pending.push(this.#batch.take());
  }

  /** Runs once per event-loop turn with frames queued: everything that turn brought goes in one write. */
  readonly flush = (): void => {
    this.#scheduled = false;
    this.#writeOut();
  };

  #writeOut(): void {
    if (this.#blocked || this.#closed) return;
    while (this.#pending.length > 0) {
      const chunk = this.#pending[0]!;
      const n = Math.max(0, this.write(chunk));
      this.#pendingBytes -= n;
      this.budget.release(n);
      if (n < chunk.length) {
        this.#pending[0] = chunk.subarray(n);
        this.#blocked = true;
        return;
      }
      this.#pending.shift();
    }
    if (this.#batch.empty) return;
    const data = this.#batch.view();
    const n = Math.max(0, this.write(data));
    this.budget.release(n);
    if (n < data.length) {
      this.#pending.push(this.#batch.take().subarray(n));
      this.#pendingBytes += data.length - n;
      this.#blocked = true;
    } else this.#batch.reset();
  }

  /** The socket can take more. */
  drain(): void {
    this.#blocked = false;
    this.#writeOut();
  }

  /** The connection is gone: what is still queued leaves the budget. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.budget.release(this.queued);
    this.#pending.length = 0;
    this.#pendingBytes = 0;
    this.#batch.reset();
  }
}

/** A run this big goes out as a message of its own even behind a batch: one more message costs less than copying it. */
const OWN_MESSAGE_BYTES = 16 * 1024;

/**
 * Input that flow control left undecoded: the rest of the chunk or message that was being decoded
 * when the port paused, then whatever was already in flight and read while paused. Decoded first,
 * in order, when the port reads again; each chunk from where its decoding stopped.
 */
class HeldInput {
  readonly #chunks: Uint8Array[] = [];
  /** Where decoding resumes in the first chunk. */
  #at: number;

  constructor(
    /** Where decoding starts in a chunk held whole: past a message's header. */
    private readonly start = 0,
  ) {
    this.#at = start;
  }

  get empty(): boolean {
    return this.#chunks.length === 0;
  }

  /** Keeps a chunk read while paused, behind what is held. */
  push(chunk: Uint8Array): void {
    this.#chunks.push(chunk);
  }

  /** Keeps a chunk whose decoding stopped at `at`, ahead of what is held. */
  unshift(chunk: Uint8Array, at: number): void {
    this.#chunks.unshift(chunk);
    this.#at = at;
  }

  /** Decodes held chunks in order while `reading()` holds. */
  drain(decode: (chunk: Uint8Array, from: number) => void, reading: () => boolean): void {
    while (this.#chunks.length > 0 && reading()) {
      const from = this.#at;
      this.#at = this.start;
      decode(this.#chunks.shift()!, from);
    }
  }

  clear(): void {
    this.#chunks.length = 0;
    this.#at = this.start;
  }
}

/**
 * A port whose frames leave as messages: those of one event-loop turn are batched behind a header
 * (a tunnel's data message, a backplane message, at most `maxBytes`) and sent as one.
 * @internal
 */
export abstract class BatchedPort extends Port {
  readonly #batch: FrameBatch;
  #frames = 0;
  #scheduled = false;

  constructor(
    kind: string,
    peer: string,
    header: Uint8Array,
    /** The largest batch, its header included. */
    protected maxBytes: number,
  ) {
    super(kind, peer, true);
    this.#batch = new FrameBatch(header);
  }

  override get maxRun(): number {
    return this.maxBytes - this.#batch.header.length;
  }

  /** Room for `bytes` more in whatever bounds this port's queue. */
  protected abstract reserve(bytes: number): boolean;

  /** Sends the batch, `reserved` bytes of frames; false when all of it was dropped. */
  protected abstract sendBatch(batch: FrameBatch, reserved: number, frames: number): boolean;

  /** Sends a message of this port's framing, header written, as it is; where the port can (tunnels). */
  protected sendMessage?(message: Uint8Array, reserved: number): boolean;

  override readonly takesRuns = true;

  /**
   * A received message of the tunnel framing goes out as it is with this port's header written
   * over its own (after whatever this turn batched before it, when it is big); any other run is
   * copied into the batch in one go.
   */
  override enqueueRun(block: Uint8Array, start: number, end: number, frames: number, message: boolean): boolean {
    const bytes = end - start;
    const batch = this.#batch;
    const header = batch.header;
    if (batch.used + bytes > this.maxBytes) this.flush();
    if (!this.reserve(bytes)) return false;
    if (this.sendMessage !== undefined && message && start === header.length && (batch.empty || bytes >= OWN_MESSAGE_BYTES)) {
      if (!batch.empty) this.flush();
      block.set(header, 0);
      this.countRun(frames, bytes - 4 * frames, this.sendMessage(block, bytes));
      return true;
    }
    batch.appendRun(block.subarray(start, end));
    this.#frames += frames;
    this.countRun(frames, bytes - 4 * frames, true);
    if (!this.#scheduled) {
      this.#scheduled = true;
      setImmediate(this.flush);
    }
    return true;
  }

  protected enqueue(frame: Uint8Array): boolean {
    const need = 4 + frame.length;
    if (this.#batch.used + need > this.maxBytes) this.flush();
    if (!this.reserve(need)) return false;
    this.#batch.append(frame);
    this.#frames++;
    if (!this.#scheduled) {
      this.#scheduled = true;
      setImmediate(this.flush);
    }
    return true;
  }

  readonly flush = (): void => {
    this.#scheduled = false;
    if (this.#batch.empty) return;
    const frames = this.#frames;
    const bytes = this.#batch.used - this.#batch.header.length;
    this.#frames = 0;
    if (!this.sendBatch(this.#batch, bytes, frames)) {
      // Counted as handed over when queued; the whole message was refused.
      this.stats.txFrames -= frames;
      this.stats.txBytes -= bytes - 4 * frames;
      this.stats.txDrops += frames;
    }
  };
}

/** Counters summed per port kind, for /metrics. */
interface KindTotals {
  ports: number;
  rxFrames: number;
  rxBytes: number;
  rxDrops: number;
  txFrames: number;
  txBytes: number;
  txDrops: number;
}

function emptyTotals(): KindTotals {
  return { ports: 0, rxFrames: 0, rxBytes: 0, rxDrops: 0, txFrames: 0, txBytes: 0, txDrops: 0 };
}

function addPort(t: KindTotals, port: Port): KindTotals {
  const s = port.stats;
  t.ports++;
  t.rxFrames += s.rxFrames;
  t.rxBytes += s.rxBytes;
  t.rxDrops += port.rxDrops();
  t.txFrames += s.txFrames;
  t.txBytes += s.txBytes;
  t.txDrops += s.txDrops;
  return t;
}

/**
 * Counters per port kind over every port the relay has had: the live ones are summed when asked,
 * a closed one is added here as it goes, so the totals never go backwards (Prometheus counters).
 * @internal
 */
export class PortTotals {
  readonly #retired = new Map<string, KindTotals>();

  retire(port: Port): void {
    let t = this.#retired.get(port.kind);
    if (t === undefined) this.#retired.set(port.kind, (t = emptyTotals()));
    addPort(t, port);
  }

  /** Totals per kind; `ports` counts the live ports only. */
  collect(networks: Iterable<Network>): Map<string, KindTotals> {
    const out = new Map<string, KindTotals>();
    for (const [kind, t] of this.#retired) out.set(kind, { ...t, ports: 0 });
    for (const n of networks) {
      for (const port of n.ports) {
        let t = out.get(port.kind);
        if (t === undefined) out.set(port.kind, (t = emptyTotals()));
        addPort(t, port);
      }
    }
    return out;
  }
}

// ───────────────────────────── switch ─────────────────────────────
//
// Network.forward takes one frame with no allocation: MACs are numbers, the table a Map kept in
// last-seen order (ageing stops early, a full table evicts the oldest); Network.forwardRun is its
// cut-through twin for runs of frames to one port. Storm and MAC limits drop at the source port;
// loop probes (EtherType 0x9000) block one port of a loop, the same one at both ends. What the relay
// decides (limits, clock, impairments) is SwitchPolicy.

interface MacEntry {
  port: Port;
  seen: number;
  /** When it last went to the end of the table: the table is in this order. */
  inserted: number;
  /** When it last moved to another port: a second move soon after is a flap. */
  moved: number;
}

/** EtherType 0x9000 (Ethernet configuration testing, "loopback"), as switches use for loop detection. */
const PROBE_ETHERTYPE = 0x9000;
const PROBE_MAGIC = new TextEncoder().encode("edge-relay probe");
/** ECTP's multicast destination: flooded by every switch, consumed by none. */
const PROBE_DESTINATION = Uint8Array.of(0xcf, 0, 0, 0, 0, 0);
const PROBE_SERIAL_AT = 14 + PROBE_MAGIC.length + 8;

/** Is this one of the loop probes that some edge-relay sent? */
function isProbe(frame: Uint8Array): boolean {
  if (frame[12] !== PROBE_ETHERTYPE >> 8 || frame[13] !== (PROBE_ETHERTYPE & 0xff) || frame.length < PROBE_SERIAL_AT + 4) return false;
  for (let i = 0; i < PROBE_MAGIC.length; i++) if (frame[14 + i] !== PROBE_MAGIC[i]) return false;
  return true;
}

const CLOSED_PORTS_KEPT = 16;

/** A MAC that moves again within this long after its last move is flapping. */
const MAC_FLAP_MS = 10_000;

const LOOP_BLOCK_MS = 60_000;

/** Learned MACs listed per network in /status (the count is always given). */
const MAC_LIST_LIMIT = 1024;

/** What a network needs from its relay: limits, a clock, and where to report. @internal */
export interface SwitchPolicy {
  ageingMs: number;
  now?: () => number;
  /** MACs a non-trunk port may have learned (--port-macs). */
  portMacs?: number;
  /** Broadcast/multicast frames per second one port may send in; 0 is no limit. */
  stormLimit?: number;
  /** This relay's id (16 hex digits), for loop probes. */
  relayId?: string;
  /** How long a port stays blocked after a loop was seen through it. */
  loopBlockMs?: number;
  log?: Logger;
  /** Where VM ports coming and going are logged (rate-limited by the relay). */
  portLog?: Logger;
  /** Link impairments by target, applied to each port as it attaches. */
  impairments?: ImpairmentTable;
  /** A source whose unicast frames go to a congested port stops being read until it drains. */
  flowControl?: boolean;
  /** Set when the relay stops: ports closing now close for that reason. */
  stopping?: boolean;
  /** Called once per port blocked for a loop. */
  onLoop?: () => void;
  /** A port left the network: the relay may drop a network nothing uses any more. */
  onDetach?: (network: Network) => void;
  /** Where a closed port's counters go, so per-kind totals keep counting them. */
  totals?: PortTotals;
}

/** A learning Ethernet switch. @internal */
export class Network {
  readonly ports = new Set<Port>();
  /** Insertion order is kept close to last-seen order, so the first entry is the one to evict. */
  readonly macs = new Map<number, MacEntry>();
  readonly closed: PortSnapshot[] = [];
  readonly ageingMs: number;
  readonly now: () => number;
  readonly #policy: SwitchPolicy;
  /** This relay's probe, less the port's serial. */
  readonly #probeFrame: Uint8Array | undefined;
  readonly #probeKey: number;
  /** MAC moves between ports in quick succession. */
  macFlaps = 0;
  /** Live captures of this network; null (not empty) when there are none, so forwarding tests one value. */
  captures: Capture[] | null = null;
  /** Ports attached so far, per kind: the N of `NET/KIND-N`. */
  readonly #serials = new Map<string, number>();
  /** Ports that want to hear of each port that joins. */
  readonly #greeters = new Set<Port>();
  readonly #flapLog: { log(line: string): void };

  constructor(
    readonly name: string,
    policy: SwitchPolicy | number,
  ) {
    this.#policy = typeof policy === "number" ? { ageingMs: policy } : policy;
    this.ageingMs = this.#policy.ageingMs;
    this.now = this.#policy.now ?? Date.now;
    const id = this.#policy.relayId;
    if (id !== undefined) {
      const frame = new Uint8Array(60);
      frame.set(PROBE_DESTINATION, 0);
      // A locally administered unicast MAC derived from the relay id: 02 + the id's first 5 bytes.
      frame.set([0x02, ...Buffer.from(id.slice(0, 10), "hex")], 6);
      frame[12] = PROBE_ETHERTYPE >> 8;
      frame[13] = PROBE_ETHERTYPE & 0xff;
      frame.set(PROBE_MAGIC, 14);
      frame.set(Buffer.from(id, "hex"), 14 + PROBE_MAGIC.length);
      this.#probeFrame = frame;
    }
    this.#probeKey = this.#probeFrame ? macKey(this.#probeFrame, 6) : -1;
    this.#flapLog = rateLimitedLog((line) => this.#policy.log?.warn(line), 1, 10_000);
  }

  attach(port: Port): void {
    const n = (this.#serials.get(port.kind) ?? 0) + 1;
    this.#serials.set(port.kind, n);
    port.id = `${this.name}/${port.kind}-${n}`;
    port.network = this;
    port.macLimit = port.trunk ? MAX_MACS_PER_NETWORK : (this.#policy.portMacs ?? DEFAULT_PORT_MACS);
    this.ports.add(port);
    this.#policy.impairments?.apply(port);
    if (!port.trunk || port.kind === "qemu-mcast") this.#policy.portLog?.info(`${port.id} up: ${port.kind} ${port.peer}`);
    if (port.joined !== undefined) this.#greeters.add(port);
    for (const greeter of this.#greeters) greeter.joined!(port);
  }

  detach(port: Port, reason?: string): void {
    if (!this.ports.delete(port)) return;
    this.#greeters.delete(port);
    // A stop closes every socket at once; what a port saw on the way (a failed write) is not why it closed.
    port.closeReason = this.#policy.stopping ? "relay stopping" : (port.closeReason ?? reason);
    port.impair("in", undefined);
    port.impair("out", undefined);
    port.state = "closed";
    port.since = this.now();
    port.releaseWaiters();
    this.#forgetPort(port);
    this.#policy.totals?.retire(port);
    const snapshot = port.snapshot();
    this.closed.push(snapshot);
    if (this.closed.length > CLOSED_PORTS_KEPT) this.closed.shift();
    if (!port.trunk || port.kind === "qemu-mcast") this.#policy.portLog?.info(`${port.id} down: ${port.kind} ${port.peer}: ${snapshot.reason}`);
    this.#policy.onDetach?.(this);
  }

  #forgetPort(port: Port): void {
    if (port.macCount > 0) for (const [key, entry] of this.macs) if (entry.port === port) this.macs.delete(key);
    port.macCount = 0;
  }

  /** Learns the source, then forwards to the known port or floods; never back out of `from`. */
  forward(frame: Uint8Array, from: Port): void {
    const stats = from.stats;
    if (frame.length < MIN_FRAME) {
      stats.rxRunts++;
      return;
    }
    if (from.state !== "up") {
      stats.rxLoop++;
      return;
    }
    const now = this.now();
    if ((frame[0]! & 1) !== 0) {
      if (isProbe(frame)) return this.#probeArrived(frame, from);
      const limit = this.#policy.stormLimit ?? 0;
      if (limit > 0) {
        const second = Math.floor(now / 1000);
        if (from.floodSecond !== second) {
          from.floodSecond = second;
          from.floodCount = 0;
        }
        if (++from.floodCount > limit) {
          stats.rxStorm++;
          return;
        }
      }
    }
    if ((frame[6]! & 1) === 0 && !this.#learn(macKey(frame, 6), from, now)) {
      stats.rxMacLimit++;
      return;
    }
    stats.rxFrames++;
    stats.rxBytes += frame.length;
    const captures = this.captures;
    if (captures !== null) for (const c of captures) c.tap(frame, from, true);
    if ((frame[0]! & 1) === 0) {
      const entry = this.macs.get(macKey(frame, 0));
      if (entry !== undefined && now - entry.seen < this.ageingMs) {
        const to = entry.port;
        if (to === from || to.state !== "up") return;
        if (to.send(frame) && captures !== null) for (const c of captures) c.tap(frame, to, false);
        // Floods never pause anyone: one slow port must not stall the network.
        if (this.#policy.flowControl && from.waitingFor === undefined && to.congested()) from.waitFor(to);
        return;
      }
    }
    for (const port of this.ports) {
      if (port !== from && port.state === "up" && port.send(frame) && captures !== null) for (const c of captures) c.tap(frame, port, false);
    }
  }

  /**
   * Cut-through: forwards the whole frames of a run in stream framing (`block[start, end)`, each a
   * 4-byte length and the frame) as they are, without a view or a copy per frame, when every one is
   * unicast from a source already learned on `from` to one destination port that takes runs, and
   * no capture, impairment or loop block is in the way. Learning, counters and flow control end as
   * forward() frame by frame would leave them. Returns the offset after the frames forwarded: the
   * frames before the first that cannot go this way (or that would make the run too long) go as a
   * run, and that frame and the rest are the caller's (`start` when nothing was forwarded).
   * `message`: `block` is a message of the tunnel framing and `start` is just past its header (free
   * to overwrite): a run to `end` may go on as that message.
   */
  forwardRun(block: Uint8Array, start: number, end: number, from: Port, message: boolean): number {
    if (this.captures !== null || from.impairIn !== undefined || from.state !== "up") return start;
    const now = this.now();
    const macs = this.macs;
    let to: Port | undefined;
    let lastSrc = -1;
    let lastDst = -1;
    let frames = 0;
    let i = start;
    while (end - i >= 4) {
      const length = ((block[i]! << 24) | (block[i + 1]! << 16) | (block[i + 2]! << 8) | block[i + 3]!) >>> 0;
      if (length > end - i - 4) break;
      // Runts, broadcast and multicast take forward()'s checks (storm control, probes, flooding);
      // a length over the maximum is the decoder's to refuse. The frames before it still go as a run.
      if (length < MIN_FRAME || length > MAX_FRAME || (block[i + 4]! & 1) !== 0) break;
      const src = macKey(block, i + 10);
      if (src !== lastSrc) {
        // A source new here or moving here goes through #learn (port security, flaps); a known one is refreshed.
        if ((block[i + 10]! & 1) === 0) {
          const entry = macs.get(src);
          if (entry === undefined || entry.port !== from) break;
          this.#refresh(src, entry, now);
        }
        lastSrc = src;
      }
      // A run ends where the destination could not take it in one piece.
      if (to !== undefined && i + 4 + length - start > to.maxRun) break;
      const dst = macKey(block, i + 4);
      if (dst !== lastDst) {
        const entry = macs.get(dst);
        if (entry === undefined || now - entry.seen >= this.ageingMs) break;
        if (to === undefined) {
          const port = entry.port;
          if (port === from || port.state !== "up" || !port.takesRuns || port.impairOut !== undefined || 4 + length > port.maxRun) break;
          to = port;
        } else if (entry.port !== to) break;
        lastDst = dst;
      }
      frames++;
      i += 4 + length;
    }
    if (to === undefined || !to.enqueueRun(block, start, i, frames, message && i === end)) return start;
    const stats = from.stats;
    stats.rxFrames += frames;
    stats.rxBytes += i - start - 4 * frames;
    if (this.#policy.flowControl && from.waitingFor === undefined && to.congested()) from.waitFor(to);
    return i;
  }

  /** Sends a frame of the relay's own to one port, as forwarding would (captures see it). */
  deliver(frame: Uint8Array, to: Port): void {
    const captures = this.captures;
    if (to.state === "up" && to.send(frame) && captures !== null) for (const c of captures) c.tap(frame, to, false);
  }

  /** Adds a live capture; the switch pays for captures only while there are some. */
  addCapture(capture: Capture): void {
    (this.captures ??= []).push(capture);
  }

  removeCapture(capture: Capture): void {
    const rest = (this.captures ?? []).filter((c) => c !== capture);
    this.captures = rest.length ? rest : null;
  }

  /** False when the port may learn no more MACs: the frame is then dropped. */
  #learn(key: number, port: Port, now: number): boolean {
    const entry = this.macs.get(key);
    if (entry !== undefined) {
      if (entry.port !== port) {
        if (port.macCount >= port.macLimit) return false;
        if (now - entry.moved < MAC_FLAP_MS) this.#flapped(key, entry.port, port);
        entry.port.macCount--;
        port.macCount++;
        entry.port = port;
        entry.moved = now;
      }
      this.#refresh(key, entry, now);
      return true;
    }
    if (port.macCount >= port.macLimit) return false;
    if (this.macs.size >= MAX_MACS_PER_NETWORK) this.#evictOldest();
    this.macs.set(key, { port, seen: now, inserted: now, moved: -Infinity });
    port.macCount++;
    return true;
  }

  /** Seen again on its port. Re-inserted at most once a second, so the map's order is last-seen order to within a second. */
  #refresh(key: number, entry: MacEntry, now: number): void {
    if (now - entry.inserted >= 1000) {
      this.macs.delete(key);
      this.macs.set(key, entry);
      entry.inserted = now;
    }
    entry.seen = now;
  }

  /** One MAC seen on two ports in turn: two VMs share a MAC, or frames loop. Warned, rate-limited. */
  #flapped(key: number, from: Port, to: Port): void {
    this.macFlaps++;
    this.#flapLog.log(
      `network ${this.name}: MAC ${formatMac(key)} moves between ${from.id} ${from.peer} and ${to.id} ${to.peer}: two VMs with the same MAC, or a loop`,
    );
  }

  /** A full table forgets its least recently seen entry rather than refusing new ones. */
  #evictOldest(): void {
    for (const [key, entry] of this.macs) {
      this.macs.delete(key);
      entry.port.macCount--;
      return;
    }
  }

  /**
   * Forgets MAC entries older than the ageing time. The table is in last-seen order to within a
   * second, so the walk stops a second's worth of entries past the last expired one. Returns the
   * entries looked at.
   */
  sweep(): number {
    const now = this.now();
    let visited = 0;
    for (const [key, entry] of this.macs) {
      if (now - entry.inserted < this.ageingMs) break;
      visited++;
      if (now - entry.seen >= this.ageingMs) {
        this.macs.delete(key);
        entry.port.macCount--;
      }
    }
    return visited;
  }

  /**
   * Sends a loop probe out of every port that could close a loop: every port that is not a tunnel,
   * and tunnels too where this relay joins two or more (a relay with one tunnel is a leaf of it);
   * none in a network of one port, where a probe can only come back on the port it left by.
   * Ports whose block has run out are unblocked first, so a loop that is still there is seen again.
   * Returns the probes sent.
   */
  probe(): number {
    const template = this.#probeFrame;
    if (template === undefined) return 0;
    const now = this.now();
    let trunks = 0;
    for (const port of this.ports) {
      if (port.state === "blocked-loop" && now >= port.blockedUntil) {
        port.state = "up";
        port.since = now;
      }
      if (port.linkRank !== undefined) trunks++;
    }
    if (this.ports.size < 2) return 0;
    let sent = 0;
    for (const port of this.ports) {
      if (port.state !== "up" || (port.linkRank !== undefined && trunks < 2)) continue;
      const frame = template.slice();
      const serial = port.serial;
      frame[PROBE_SERIAL_AT] = serial >>> 24;
      frame[PROBE_SERIAL_AT + 1] = (serial >>> 16) & 0xff;
      frame[PROBE_SERIAL_AT + 2] = (serial >>> 8) & 0xff;
      frame[PROBE_SERIAL_AT + 3] = serial & 0xff;
      port.sendOwn(frame);
      sent++;
    }
    return sent;
  }

  /** Another relay's probe is flooded like any multicast (never learned); our own means a loop. */
  #probeArrived(frame: Uint8Array, from: Port): void {
    if (macKey(frame, 6) !== this.#probeKey) {
      for (const port of this.ports) if (port !== from && port.state === "up") port.sendOwn(frame);
      return;
    }
    const serial = new DataView(frame.buffer, frame.byteOffset, frame.byteLength).getUint32(PROBE_SERIAL_AT);
    let out: Port | undefined;
    for (const port of this.ports) if (port.serial === serial) out = port;
    // Back on the port it left by: the loop is behind that port, for the relays there to break.
    if (out === undefined || out === from || out.state !== "up") return;
    // Block one port of the pair, the same one whichever probe comes back first: a port that is not
    // a tunnel (an external bridge is the likelier cause); between two tunnels, the link both ends
    // rank highest, so two relays in the loop block the same link rather than one each.
    const victim =
      from.linkRank === undefined ? from : out.linkRank === undefined ? out : from.linkRank > out.linkRank ? from : out;
    const now = this.now();
    const blockMs = this.#policy.loopBlockMs ?? LOOP_BLOCK_MS;
    victim.state = "blocked-loop";
    victim.since = now;
    victim.blockedUntil = now + blockMs;
    this.#forgetPort(victim);
    this.#policy.onLoop?.();
    this.#policy.log?.warn(
      `network ${this.name}: loop detected (a probe sent out of ${out.id} came back on ${from.id}); blocking ${victim.id} ${victim.peer} for ${blockMs / 1000} s`,
    );
  }

  /** Status: up to `portLimit` ports and `macLimit` learned MACs (the counts are always exact). */
  snapshot(macLimit = MAC_LIST_LIMIT, portLimit = Infinity) {
    const now = this.now();
    const macs: { mac: string; port: string; age: number }[] = [];
    if (macLimit > 0) for (const [key, e] of this.macs) {
      if (macs.length >= macLimit) break;
      macs.push({ mac: formatMac(key), port: e.port.id, age: (now - e.seen) / 1000 });
    }
    const ports: PortSnapshot[] = [];
    for (const p of this.ports) {
      if (ports.length >= portLimit) break;
      ports.push(p.snapshot());
    }
    return {
      name: this.name,
      ports,
      portCount: this.ports.size,
      closedPorts: [...this.closed],
      macCount: this.macs.size,
      macFlaps: this.macFlaps,
      macs,
    };
  }
}

// ───────────────────────────── capture ─────────────────────────────
//
// The switch taps frames only while a capture exists (one null check per frame otherwise). Filters
// run in the relay, since a pipe has no capture filter; a reader slower than the traffic loses
// frames (counted), never slows the switch. Blocks are written as Wireshark reads them from a pipe.

/**
 * pcapng blocks (little-endian), as Wireshark and tshark read them from a pipe: a section header,
 * one interface description per port, one enhanced packet block per frame with a nanosecond
 * timestamp and the direction flag.
 */
const PCAPNG_SHB = 0x0a0d0d0a;
const PCAPNG_IDB = 1;
const PCAPNG_EPB = 6;
const LINKTYPE_ETHERNET = 1;

/** Options: code, length, value padded to 4 bytes; then opt_endofopt. */
function pcapngOptions(options: [code: number, value: Uint8Array][]): Uint8Array {
  const size = options.reduce((n, [, value]) => n + 4 + ((value.length + 3) & ~3), 0) + (options.length ? 4 : 0);
  const out = new Uint8Array(size);
  const view = new DataView(out.buffer);
  let at = 0;
  for (const [code, value] of options) {
    view.setUint16(at, code, true);
    view.setUint16(at + 2, value.length, true);
    out.set(value, at + 4);
    at += 4 + ((value.length + 3) & ~3);
  }
  return out;
}

/** A block: type, total length, body, total length again. */
function pcapngBlock(type: number, body: Uint8Array): Uint8Array {
  const length = 12 + body.length;
  const out = new Uint8Array(length);
  const view = new DataView(out.buffer);
  view.setUint32(0, type, true);
  view.setUint32(4, length, true);
  out.set(body, 8);
  view.setUint32(length - 4, length, true);
  return out;
}

function pcapngSectionHeader(): Uint8Array {
  const body = new Uint8Array(16);
  const view = new DataView(body.buffer);
  view.setUint32(0, 0x1a2b3c4d, true);
  view.setUint16(4, 1, true);
  view.setUint16(6, 0, true);
  view.setBigInt64(8, -1n, true); // section length unknown: a stream
  return pcapngBlock(PCAPNG_SHB, body);
}

function pcapngInterface(name: string, description: string, snaplen: number): Uint8Array {
  const text = new TextEncoder();
  const options = pcapngOptions([
    [2, text.encode(name)],
    [3, text.encode(description)],
    [9, Uint8Array.of(9)], // if_tsresol: nanoseconds
  ]);
  const body = new Uint8Array(8 + options.length);
  const view = new DataView(body.buffer);
  view.setUint16(0, LINKTYPE_ETHERNET, true);
  view.setUint32(4, snaplen, true);
  body.set(options, 8);
  return pcapngBlock(PCAPNG_IDB, body);
}

/** Little-endian u32 at `at`: plain byte writes, cheaper per frame than a DataView on a fresh buffer. */
function putUint32(out: Uint8Array, at: number, value: number): void {
  out[at] = value & 0xff;
  out[at + 1] = (value >>> 8) & 0xff;
  out[at + 2] = (value >>> 16) & 0xff;
  out[at + 3] = (value >>> 24) & 0xff;
}

/**
 * One frame on interface `id` at `timeMs` (wall clock, ms; written in nanosecond units), cut to
 * `snaplen` (the original length is kept), inbound or outbound: one allocation per frame, as this
 * runs for every frame a capture sees.
 */
function pcapngPacket(id: number, timeMs: number, frame: Uint8Array, snaplen: number, inbound: boolean): Uint8Array {
  const captured = Math.min(frame.length, snaplen);
  const padded = (captured + 3) & ~3;
  const length = 8 + 20 + padded + 12 + 4;
  const out = new Uint8Array(length);
  const ns = timeMs * 1e6;
  const high = Math.floor(ns / 0x1_0000_0000);
  putUint32(out, 0, PCAPNG_EPB);
  putUint32(out, 4, length);
  putUint32(out, 8, id);
  putUint32(out, 12, high);
  putUint32(out, 16, ns - high * 0x1_0000_0000);
  putUint32(out, 20, captured);
  putUint32(out, 24, frame.length);
  out.set(captured === frame.length ? frame : frame.subarray(0, captured), 28);
  // epb_flags (code 2, length 4): direction in the low two bits, 1 inbound, 2 outbound.
  const options = 28 + padded;
  out[options] = 2;
  out[options + 2] = 4;
  out[options + 4] = inbound ? 1 : 2;
  putUint32(out, length - 4, length);
  return out;
}

/** The EtherType a filter matches: a VLAN-tagged frame's inner one. */
function etherTypeOf(frame: Uint8Array): number {
  const outer = (frame[12]! << 8) | frame[13]!;
  return (outer === 0x8100 || outer === 0x88a8) && frame.length >= 18 ? (frame[16]! << 8) | frame[17]! : outer;
}

/** Bytes captured of a frame at most (tcpdump's default), and what one slow capture reader may have queued. */
const CAPTURE_SNAPLEN = 262_144;
const CAPTURE_QUEUE_BYTES = 4 * 1024 * 1024;

/** What a capture keeps: frames of one port, to or from one MAC, of one EtherType (each optional). */
interface CaptureFilter {
  port?: string;
  mac?: number;
  etherType?: number;
  snaplen: number;
}

/** Where a capture's blocks go: false when the reader is behind and the block was dropped. */
type CaptureSink = (block: Uint8Array, force: boolean) => boolean;

/**
 * A live capture of one network: filters in the relay (a pipe has no capture filter), an interface
 * block per port as it first appears, and drops counted when the reader is slower than the traffic.
 * @internal
 */
export class Capture {
  frames = 0;
  drops = 0;
  readonly started = Date.now();
  readonly #interfaces = new Map<Port, number>();

  constructor(
    readonly network: Network,
    readonly filter: CaptureFilter,
    readonly sink: CaptureSink,
    /** Called once when `frames` frames were captured (0: no limit); `beforeTap` before each frame is looked at. */
    readonly limit: { frames: number; done(): void; beforeTap?(): void },
  ) {}

  /** Starts a new section (a new file): the interfaces are described again as they appear. */
  restart(): void {
    this.#interfaces.clear();
    this.sink(pcapngSectionHeader(), true);
  }

  /** Called by the switch for each frame a port took in (inbound) or was handed (outbound). */
  tap(frame: Uint8Array, port: Port, inbound: boolean): void {
    // Frames of the same turn may come after the count was reached, before the capture ends.
    if (this.limit.frames > 0 && this.frames >= this.limit.frames) return;
    this.limit.beforeTap?.();
    const f = this.filter;
    if (f.port !== undefined && port.id !== f.port) return;
    if (f.mac !== undefined && macKey(frame, 0) !== f.mac && macKey(frame, 6) !== f.mac) return;
    if (f.etherType !== undefined && etherTypeOf(frame) !== f.etherType) return;
    let id = this.#interfaces.get(port);
    if (id === undefined) {
      id = this.#interfaces.size;
      this.#interfaces.set(port, id);
      this.sink(pcapngInterface(port.id, `${port.kind} ${port.peer}`, f.snaplen), true);
    }
    if (!this.sink(pcapngPacket(id, performance.timeOrigin + performance.now(), frame, f.snaplen, inbound), false)) {
      this.drops++;
      return;
    }
    if (++this.frames === this.limit.frames) this.limit.done();
  }
}

/**
 * `--capture-file NET=PATH`: the network's traffic as pcapng in PATH, a new file past `rotate`
 * bytes (PATH becomes PATH.1, and so on; `keep` files in all). Writes are buffered and flushed
 * every second, never waited for on the data path.
 */
class CaptureFile {
  readonly #capture: Capture;
  #writer: ReturnType<ReturnType<typeof Bun.file>["writer"]>;
  #bytes = 0;
  readonly #flush: ReturnType<typeof setInterval>;

  constructor(
    readonly network: Network,
    readonly path: string,
    readonly rotate: number,
    readonly keep: number,
    readonly log: Logger,
  ) {
    this.#writer = Bun.file(path).writer();
    this.#capture = new Capture(network, { snaplen: CAPTURE_SNAPLEN }, this.#write, {
      frames: 0,
      done() {},
      // A file past `rotate` is closed before the next frame, which starts the next file with its own header.
      beforeTap: () => {
        if (this.#bytes >= this.rotate) this.#rotate();
      },
    });
    this.#capture.restart();
    network.addCapture(this.#capture);
    this.#flush = setInterval(() => void this.#writer.flush(), 1000);
    this.#flush.unref();
    log.info(`capture ${network.name}: writing pcapng to ${path}`);
  }

  readonly #write = (block: Uint8Array): boolean => {
    this.#writer.write(block);
    this.#bytes += block.length;
    return true;
  };

  #rotate(): void {
    void this.#writer.end();
    for (let i = this.keep - 1; i >= 1; i--) {
      const from = i === 1 ? this.path : `${this.path}.${i - 1}`;
      try {
        renameSync(from, `${this.path}.${i}`);
      } catch {
        // not there yet
      }
    }
    if (this.keep === 1) rmSync(this.path, { force: true });
    this.#writer = Bun.file(this.path).writer();
    this.#bytes = 0;
    this.#capture.restart();
  }

  snapshot() {
    return { network: this.network.name, port: undefined, client: `file ${this.path}`, since: new Date(this.#capture.started).toISOString(), frames: this.#capture.frames, drops: this.#capture.drops };
  }

  async close(): Promise<void> {
    clearInterval(this.#flush);
    this.network.removeCapture(this.#capture);
    await this.#writer.end();
  }
}

interface CaptureRequest {
  network: string;
  filter: CaptureFilter;
  /** Stop after this many frames (the query's `count`), or this many seconds (0: no limit). */
  frames: number;
  seconds: number;
}

/** `/capture`'s query: `network` (required), `port`, `snaplen`, `count`, `seconds`, `mac`, `ethertype`; or why not. */
function parseCaptureRequest(query: URLSearchParams): CaptureRequest | string {
  const network = query.get("network");
  if (network === null) return "capture: network=NAME is required";
  if (!NETWORK_NAME.test(network)) return `capture: network name ${JSON.stringify(network)} ${nameRuleBroken(network)}`;
  const whole = (name: string, min: number, max: number, fallback: number): number | string => {
    const text = query.get(name);
    if (text === null) return fallback;
    const n = Number(text);
    return /^\d+$/.test(text) && n >= min && n <= max ? n : `capture: ${name} must be a whole number from ${min} to ${max}`;
  };
  const snaplen = whole("snaplen", 14, CAPTURE_SNAPLEN, CAPTURE_SNAPLEN);
  const frames = whole("count", 1, Number.MAX_SAFE_INTEGER, 0);
  const seconds = whole("seconds", 1, 86_400, 0);
  for (const value of [snaplen, frames, seconds]) if (typeof value === "string") return value;
  const macText = query.get("mac");
  const mac = macText === null ? undefined : (parseMac(macText) ?? NaN);
  if (Number.isNaN(mac)) return "capture: mac must look like 52:54:00:12:34:56";
  const typeText = query.get("ethertype");
  const etherType = typeText === null ? undefined : /^(?:0x[0-9a-fA-F]{1,4}|\d{1,5})$/.test(typeText) ? Number(typeText) : NaN;
  if (Number.isNaN(etherType) || (etherType ?? 0) > 0xffff) return "capture: ethertype must be a number like 0x0806";
  const port = query.get("port") ?? undefined;
  return { network, filter: { port, mac, etherType, snaplen: snaplen as number }, frames: frames as number, seconds: seconds as number };
}

/**
 * The relay's live captures (at most `max` at once): each streams pcapng through a bounded queue,
 * so a viewer that reads too slowly loses frames (counted) and never slows the switch.
 */
class CaptureRegistry {
  readonly #live = new Set<{ capture: Capture; client: string; stop(): void }>();

  constructor(
    private readonly network: (name: string) => Network | undefined,
    private readonly max: number,
  ) {}

  open(request: CaptureRequest, client: string): ReadableStream<Uint8Array> | string {
    const network = this.network(request.network);
    if (network === undefined) return `no network ${request.network} on this relay`;
    if (this.#live.size >= this.max) return `at most ${this.max} captures at once (--max-captures)`;
    let controller!: ReadableStreamDefaultController<Uint8Array>;
    let timer: ReturnType<typeof setTimeout> | undefined;
    let ended = false;
    const entry = {
      capture: undefined as unknown as Capture,
      client,
      stop: () => {
        if (ended) return;
        ended = true;
        clearTimeout(timer);
        network.removeCapture(entry.capture);
        this.#live.delete(entry);
        try {
          controller.close();
        } catch {
          // the reader went first
        }
      },
    };
    const stream = new ReadableStream<Uint8Array>(
      {
        start: (c) => void (controller = c),
        cancel: () => entry.stop(),
      },
      new ByteLengthQueuingStrategy({ highWaterMark: CAPTURE_QUEUE_BYTES }),
    );
    const sink: CaptureSink = (block, force) => {
      if (ended || (!force && (controller.desiredSize ?? 0) <= 0)) return false;
      controller.enqueue(block);
      return true;
    };
    entry.capture = new Capture(network, request.filter, sink, { frames: request.frames, done: () => queueMicrotask(entry.stop) });
    entry.capture.restart();
    network.addCapture(entry.capture);
    this.#live.add(entry);
    if (request.seconds > 0) timer = setTimeout(entry.stop, request.seconds * 1000);
    return stream;
  }

  snapshot() {
    return [...this.#live].map(({ capture, client }) => ({
      network: capture.network.name,
      port: capture.filter.port,
      client,
      since: new Date(capture.started).toISOString(),
      frames: capture.frames,
      drops: capture.drops,
    }));
  }

  stop(): void {
    for (const entry of this.#live) entry.stop();
  }
}

// ───────────────────────────── auth & admission ─────────────────────────────
//
// Tokens are compared as SHA-256 digests in constant time; a grant may be limited to some networks.
// Only failures are throttled: an address whose wrong credentials pass the allowance gets 429 for a
// while. Behind a --trusted-proxy the client is the one its header names. Tunnels and v86 clients are
// admitted within --max-tunnels and --max-tunnels-per-address before the upgrade: a refusal costs no socket.

interface Grant {
  digest: Uint8Array;
  /** Networks this token may attach to; undefined means all. */
  networks: Set<string> | undefined;
}

function sha256(text: string): Uint8Array {
  return new Bun.CryptoHasher("sha256").update(text).digest() as Uint8Array;
}

function makeGrants(tokens: Config["tokens"]): Grant[] {
  return tokens.map((t) => ({ digest: sha256(t.token), networks: t.networks && new Set(t.networks) }));
}

/**
 * Closes the open sockets (tunnels, v86 ports) whose grant `accepted` no longer accepts, a revoked
 * token's, with `code` and `reason` and a log line each; the others stay.
 */
function closeSocketsUnaccepted<D extends { grant: Grant; peer: string }>(
  sockets: Iterable<ServerWebSocket<D>>,
  accepted: (grant: Grant) => boolean,
  code: number,
  reason: string,
  log: (line: string) => void,
  name: (data: D) => string,
): void {
  for (const ws of sockets) {
    if (accepted(ws.data.grant)) continue;
    log(`${name(ws.data)} closed: ${reason}`);
    ws.close(code, reason);
  }
}

/** `authenticate` for a bare token (a v86 client's `?token=`); an empty or missing one matches nothing. */
function authenticateToken(token: string | null | undefined, grants: Grant[]): Grant | undefined {
  const given = sha256(token ?? "");
  let found: Grant | undefined;
  for (const grant of grants) if (timingSafeEqual(given, grant.digest) && token) found ??= grant;
  return found;
}

/** Compares against every grant in constant time (digests hide the length); the grant or undefined. */
function authenticate(authorization: string | null | undefined, grants: Grant[]): Grant | undefined {
  return authenticateToken(/^Bearer\s+(\S+)\s*$/i.exec(authorization ?? "")?.[1], grants);
}

/** Failed authentications from one address before it gets 429, within this window, for this long. */
const AUTH_FAILURES = 10;
const AUTH_WINDOW_MS = 60_000;
const AUTH_BLOCK_MS = 60_000;
const AUTH_TABLE_SIZE = 4_096;

/**
 * Failed authentications per client address: after AUTH_FAILURES of them within AUTH_WINDOW_MS,
 * the address's further failed attempts get 429 until AUTH_BLOCK_MS have passed. A right credential
 * is never asked about here: one address is often many clients (a NAT, a proxy), and one of them
 * failing must not lock the others out. The table is bounded; the entry not touched for longest goes first.
 * @internal
 */
export class AuthThrottle {
  readonly #entries = new Map<string, { failures: number; since: number; until: number }>();
  /** Failed attempts answered 429. */
  throttled = 0;

  /** Seconds a failed attempt from the address must wait, or 0 when it is an ordinary failure. */
  retryAfter(address: string, now = Date.now()): number {
    const entry = this.#entries.get(address);
    if (entry === undefined || entry.until <= now) return 0;
    this.throttled++;
    return Math.ceil((entry.until - now) / 1000);
  }

  failed(address: string, now = Date.now()): void {
    let entry = this.#entries.get(address);
    if (entry === undefined || now - entry.since > AUTH_WINDOW_MS) {
      this.#entries.delete(address);
      if (this.#entries.size >= AUTH_TABLE_SIZE) this.#entries.delete(this.#entries.keys().next().value!);
      entry = { failures: 0, since: now, until: 0 };
      this.#entries.set(address, entry);
    }
    if (++entry.failures >= AUTH_FAILURES) entry.until = now + AUTH_BLOCK_MS;
  }

  /** Addresses with an entry (bounded by AUTH_TABLE_SIZE). */
  get size(): number {
    return this.#entries.size;
  }
}

/** Who sent a request: the client's address (and port, when known), and the proxy it came through. */
interface ClientAddress {
  address: string;
  port?: number;
  /** The trusted proxy's `HOST:PORT`, when the address came from its header. */
  via?: string;
}

/** A client's address in one spelling (`::FFFF:1.2.3.4` is 1.2.3.4, `2001:DB8:0::1` is 2001:db8::1): the throttle and the limits key on it. */
function clientIp(ip: string): string {
  return canonicalIp(/^::ffff:(\d{1,3}(?:\.\d{1,3}){3})$/i.exec(ip)?.[1] ?? ip);
}

/** `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:80` as an IP in one spelling per address; undefined for anything else. */
function forwardedNode(text: string): { address: string; port?: number } | undefined {
  const m = /^\[([^\]]+)\](?::(\d{1,5}))?$|^(\d{1,3}(?:\.\d{1,3}){3})(?::(\d{1,5}))?$|^([0-9A-Fa-f:.]+)$/.exec(text.trim());
  const host = m?.[1] ?? m?.[3] ?? m?.[5];
  const port = m?.[2] ?? m?.[4];
  if (host === undefined || isIP(host) === 0 || (port !== undefined && Number(port) > 65_535)) return undefined;
  return { address: clientIp(host), port: port === undefined ? undefined : Number(port) };
}

/**
 * The `for=` nodes of RFC 7239 `Forwarded` values, in order; a node that names no address
 * (`unknown`, an obfuscated `_hidden`, garbage) is undefined.
 */
function forwardedFor(header: string): ({ address: string; port?: number } | undefined)[] {
  const nodes: ({ address: string; port?: number } | undefined)[] = [];
  for (const element of header.split(",")) {
    const pair = element.split(";").map((p) => /^\s*for\s*=\s*("?)(.*?)\1\s*$/i.exec(p)).find((m) => m !== null);
    if (pair) nodes.push(forwardedNode(pair[2]!));
  }
  return nodes;
}

function isTrusted(trusted: BlockList, address: string): boolean {
  return trusted.check(address, isIPv4(address) ? "ipv4" : "ipv6");
}

/**
 * The client behind a request. Only a TCP peer in `trusted` (--trusted-proxy) is asked: its
 * `X-Forwarded-For` or `Forwarded` is read right to left, skipping the trusted hops, and the first
 * other hop is the client. A hop that names no address stops the walk at the last trusted one, and
 * a request with both headers is taken as the proxy's own: a proxy appends to one of them, so the
 * other is whatever its client wrote.
 * @internal
 */
export function clientAddress(peer: { address: string; port: number } | null, headers: Headers, trusted: BlockList | undefined): ClientAddress {
  if (peer === null) return { address: "unknown" };
  const direct = { address: clientIp(peer.address), port: peer.port };
  if (trusted === undefined || !isTrusted(trusted, direct.address)) return direct;
  const xff = headers.get("x-forwarded-for");
  const forwarded = headers.get("forwarded");
  if ((xff === null) === (forwarded === null)) return direct;
  const hops = xff !== null ? xff.split(",").map(forwardedNode) : forwardedFor(forwarded!);
  const via = formatHostPort({ host: direct.address, port: direct.port });
  let last: ClientAddress = direct;
  for (let i = hops.length - 1; i >= 0; i--) {
    const hop = hops[i];
    if (hop === undefined) break;
    last = { ...hop, via };
    if (!isTrusted(trusted, hop.address)) return last;
  }
  return last;
}

/** --trusted-proxy's ranges as one BlockList; undefined when none is given. @internal */
export function trustedProxyList(ranges: Cidr[]): BlockList | undefined {
  if (ranges.length === 0) return undefined;
  const list = new BlockList();
  for (const r of ranges) list.addSubnet(r.address, r.prefix, r.family);
  return list;
}

/** How a log line or /status names a client: `1.2.3.4:5678`, or `1.2.3.4 via 10.0.0.2:40122` behind a proxy. @internal */
export function formatClient(client: ClientAddress): string {
  const shown = client.port === undefined ? client.address : formatHostPort({ host: client.address, port: client.port });
  return client.via === undefined ? shown : `${shown} via ${client.via}`;
}

interface RelayCounters {
  authFailures: number;
  /** Wrong credentials answered 429 after repeated failures from their client's address. */
  authThrottled: number;
  protocolErrors: number;
  /** Tunnels refused before the upgrade (--max-tunnels, --max-tunnels-per-address). */
  tunnelsRefused: number;
  /** Networks refused to tunnels because a relay would loop (itself, or already attached). */
  loopRefusals: number;
  /** Ports blocked after a loop probe came back. */
  loopsDetected: number;
  /** QEMU stream connections closed at once for --max-connections. */
  connectionsRefused: number;
}

/** Who this relay is, to the relays it meets. */
interface RelayIdentity {
  id: string;
  name: string;
}

/**
 * Connections of one kind open on this relay and from each source address, with their bounds
 * (--max-tunnels, --max-tunnels-per-address): checked before the upgrade, counted from open to close.
 */
class AdmissionLimit {
  /** Connections open now. */
  open = 0;
  readonly #perAddress = new Map<string, number>();

  constructor(
    /** Starts a refusal's log line: `tunnel`, `v86`. */
    readonly kind: string,
    /** What is counted, as a refusal names it: `tunnels`. */
    readonly noun: string,
    readonly max: number,
    readonly maxPerAddress: number,
    readonly counters: RelayCounters,
    readonly warn: (line: string) => void,
  ) {}

  /** Before the upgrade: undefined to go ahead, or why not (answered 503). */
  admit(address: string): string | undefined {
    const why =
      this.open >= this.max
        ? `this relay has the maximum of ${this.max} ${this.noun}`
        : (this.#perAddress.get(address) ?? 0) >= this.maxPerAddress
          ? `${address} has the maximum of ${this.maxPerAddress} ${this.noun}`
          : undefined;
    if (why !== undefined) {
      this.counters.tunnelsRefused++;
      this.warn(`${this.kind}: refused ${address}: ${why}`);
    }
    return why;
  }

  opened(address: string): void {
    this.open++;
    this.#perAddress.set(address, (this.#perAddress.get(address) ?? 0) + 1);
  }

  closed(address: string): void {
    this.open--;
    const left = (this.#perAddress.get(address) ?? 1) - 1;
    if (left > 0) this.#perAddress.set(address, left);
    else this.#perAddress.delete(address);
  }
}

// ───────────────────────────── tunnels ─────────────────────────────
//
// Both ends are a TunnelLink: a channel per network, a TunnelPort per channel, one queue bound for
// all of them. The site says hello with its networks; the hub attaches what the token allows and
// no loop forbids (a relay id seen twice on a network), and answers every name. A malformed
// message closes that tunnel only, counted and logged rate-limited.

/** Close codes Bun uses for malformed WebSocket input: protocol error, bad data, message too big. */
const WS_PROTOCOL_CLOSES: Record<number, string> = { 1002: "malformed WebSocket frame", 1007: "invalid message data", 1009: "message too big" };

/**
 * Bun reports the input it refused (too big, bad UTF-8) as a close with its code, or an abnormal
 * close (1006) with its reason: what was malformed, or undefined for any other close.
 */
function malformedClose(code: number, reason: string): string | undefined {
  return WS_PROTOCOL_CLOSES[code] ?? (code === 1006 && reason ? JSON.stringify(reason.slice(0, 80)) : undefined);
}

/** The two ends of a tunnel differ only in how they send and report buffered bytes. */
interface TunnelSocket {
  /** False when the message was dropped (the socket's own backpressure limit). */
  send(data: Uint8Array): boolean;
  buffered(): number;
  /** Stops or restarts reading (flow control): the far end then sees TCP backpressure. */
  pause(paused: boolean): void;
  close(code: number, reason: string): void;
}

/** One network carried over a tunnel: a port whose frames are batched into data messages. */
class TunnelPort extends BatchedPort {
  constructor(
    kind: string,
    peer: string,
    readonly link: TunnelLink,
    readonly channel: number,
  ) {
    super(kind, peer, dataHeader(channel), BATCH_BYTES);
    this.queueLimit = link.limit;
  }

  override queued(): number {
    return this.link.queued();
  }

  /** Pausing one network's port pauses the whole tunnel: every network on it waits. */
  protected override reading(on: boolean): boolean {
    return this.link.reading(on);
  }

  protected reserve(bytes: number): boolean {
    return this.state !== "closed" && !this.link.closed && this.link.reserve(bytes);
  }

  /** One data message (both Bun WebSocket ends copy it, so the buffer is reused). */
  protected sendBatch(batch: FrameBatch, reserved: number): boolean {
    const sent = this.link.sendData(batch.view(), reserved);
    batch.reset();
    return sent;
  }

  /** A received data message, its channel rewritten: the hub's cut-through from one tunnel to another. */
  protected override sendMessage(message: Uint8Array, reserved: number): boolean {
    return this.link.sendData(message, reserved);
  }
}

interface TunnelEvents {
  /** Server side: a hello or an attach offered networks starting at channel `first`. */
  onOffer?(link: TunnelLink, networks: string[], first: number, hello: boolean): void;
  /** Client side: a welcome or an attached answered an offer. */
  onAnswer?(link: TunnelLink, accepted: string[], refused: Refusal[], welcome: boolean): void;
}

/**
 * The state of one tunnel WebSocket, either end: its channels and the ports behind them, and the
 * bytes it has queued (one bound for all its channels, and a share of the relay's budget).
 * @internal
 */
export class TunnelLink {
  readonly ports: (TunnelPort | undefined)[] = [];
  /** Channels are numbered in the order networks are offered: the hello's first, then each attach's. */
  #nextChannel = 0;
  helloDone = false;
  lastHeard = Date.now();
  closed = false;
  /** The far relay's id and name, from its hello or welcome. */
  remoteId: string | undefined;
  remoteName: string | undefined;
  /** When this tunnel, and those it replaced in turn, replaced an older one from the same relay (ms): the last window's. */
  takeovers: number[] = [];
  /** The token the hub's side of this tunnel authenticated with: only the same token may take it over. */
  grant: Grant | undefined;
  #batched = 0;
  #buffered = 0;
  /** Its ports that flow control paused: the socket reads while there are none. */
  #paused = 0;
  /** Messages not yet decoded while paused: decoded first when it reads again. */
  readonly #held = new HeldInput(DATA_HEADER_BYTES);

  constructor(
    readonly socket: TunnelSocket,
    readonly kind: "tunnel" | "uplink",
    public peer: string,
    readonly limit: number,
    readonly budget: MemoryBudget,
    readonly log: Logger,
    readonly events: TunnelEvents,
    readonly countError: () => void,
  ) {}

  /** Channels not yet numbered: every offer, accepted or refused, uses up one per network. */
  get channelsLeft(): number {
    return TUNNEL_CHANNELS - this.#nextChannel;
  }

  claimChannels(count: number): number {
    const first = this.#nextChannel;
    if (count > this.channelsLeft) throw new RangeError(`Cannot attach: the tunnel has used all ${TUNNEL_CHANNELS.toLocaleString("en")} channels; reconnect`);
    this.#nextChannel += count;
    return first;
  }

  get attached(): number {
    let n = 0;
    for (const port of this.ports) if (port) n++;
    return n;
  }

  /**
   * Attaches `channel` to `network`. Both ends rank the link by its client's and server's ids, so
   * loop breaking picks the same link at both.
   */
  attach(channel: number, network: Network, localId: string): TunnelPort {
    const port = new TunnelPort(this.kind, this.peer, this, channel);
    port.remoteId = this.remoteId;
    port.remoteName = this.remoteName;
    if (this.remoteId !== undefined) port.linkRank = this.kind === "uplink" ? `${localId}>${this.remoteId}` : `${this.remoteId}>${localId}`;
    this.ports[channel] = port;
    network.attach(port);
    return port;
  }

  detachChannel(channel: number): void {
    const port = this.ports[channel];
    this.ports[channel] = undefined;
    port?.network?.detach(port);
  }

  /** Bytes queued: the socket's backlog is sampled once per event-loop turn (when no batch is open), not per frame. */
  queued(): number {
    if (this.#batched === 0) this.#buffered = this.budget.recharge(this.#buffered, this.socket.buffered());
    return this.#buffered + this.#batched;
  }

  /** Room for `bytes` more. */
  reserve(bytes: number): boolean {
    this.queued();
    if (!this.budget.admit(bytes, this.#buffered + this.#batched, this.limit)) return false;
    this.#batched += bytes;
    return true;
  }

  /** Sends a data message holding `reserved` bytes of frames; false when the socket dropped it. */
  sendData(message: Uint8Array, reserved: number): boolean {
    this.#batched -= reserved;
    const sent = !this.closed && this.socket.send(message);
    if (sent) this.#buffered += reserved;
    else this.budget.release(reserved);
    return sent;
  }

  /** Counts the ports that want the socket paused; it reads again when none does, after what it held. */
  reading(on: boolean): boolean {
    if (this.closed) return false;
    this.#paused += on ? -1 : 1;
    if (!on) {
      if (this.#paused === 1) this.socket.pause(true);
      return true;
    }
    this.#held.drain(this.#decode, this.#reads);
    if (this.#paused === 0) this.socket.pause(false);
    return true;
  }

  sendControl(message: ControlMessage): void {
    if (!this.closed) this.socket.send(encodeControl(message));
  }

  /** False (stop decoding) once flow control has paused this tunnel. */
  readonly #onFrame = (channel: number, frame: Uint8Array): boolean => {
    const port = this.ports[channel];
    if (port === undefined) throw new RangeError(`Cannot decode tunnel message: channel ${channel} is not attached`);
    port.receive(frame);
    return this.#paused === 0;
  };

  readonly #onControl = (control: ControlMessage): void => {
    const server = this.events.onOffer !== undefined;
    switch (control.type) {
      case "ping":
        return this.sendControl({ type: "pong" });
      case "pong":
        return;
      case "hello":
        if (!server || this.helloDone) break;
        this.helloDone = true;
        this.remoteId = control.id;
        this.remoteName = control.name;
        return this.events.onOffer!(this, control.networks, this.claimChannels(control.networks.length), true);
      case "attach":
        if (!server || !this.helloDone) break;
        return this.events.onOffer!(this, control.networks, this.claimChannels(control.networks.length), false);
      case "detach":
        if (!server || !this.helloDone) break;
        for (const port of this.ports) if (port && control.networks.includes(port.network?.name ?? "")) this.detachChannel(port.channel);
        return;
      case "welcome":
        if (server || this.helloDone) break;
        this.helloDone = true;
        this.remoteId = control.id;
        this.remoteName = control.name;
        return this.events.onAnswer!(this, control.accepted, control.refused, true);
      case "attached":
        if (server || !this.helloDone) break;
        return this.events.onAnswer!(this, control.accepted, control.refused, false);
    }
    throw new TypeError(`Cannot decode tunnel message: unexpected ${control.type} ${server ? "from a client" : "from the server"}${this.helloDone ? "" : " before the handshake"}`);
  };

  /** Decodes a message; a malformed one (a text message too) closes this tunnel only, counted and logged (rate-limited). */
  receive(message: Uint8Array | string): void {
    if (typeof message === "string") return this.fail(new TypeError("Cannot decode tunnel message: text messages are not part of the protocol"));
    this.lastHeard = Date.now();
    if (this.closed) return;
    // Read while paused (already in flight): kept behind what is held, in order.
    if (!this.#held.empty) this.#held.push(message);
    else this.#decode(message, DATA_HEADER_BYTES);
  }

  readonly #reads = (): boolean => this.#paused === 0 && !this.closed;

  readonly #decode = (message: Uint8Array, from: number): void => {
    try {
      if (!this.helloDone && message[0] !== MSG_CONTROL) {
        throw new RangeError("Cannot decode tunnel message: data before the handshake");
      }
      const at = message[0] === MSG_DATA ? this.#cutThrough(message, from) : from;
      // Paused after a run: the rest waits. Otherwise what the runs left goes frame by frame.
      const stopped = at > from && this.#paused !== 0 ? at : decodeTunnelMessage(message, this.#onControl, this.#onFrame, at);
      if (stopped < message.length) this.#held.unshift(message, stopped);
    } catch (error) {
      this.fail(error);
    }
  };

  /** Forwards a data message from `from` in runs (Network.forwardRun) while they go: the offset reached, the rest to decode. */
  #cutThrough(message: Uint8Array, from: number): number {
    if (message.length <= DATA_HEADER_BYTES) return from;
    const port = this.ports[(message[1]! << 8) | message[2]!];
    const network = port?.network;
    let at = from;
    while (network !== undefined && at < message.length && this.#paused === 0) {
      const next = network.forwardRun(message, at, message.length, port!, at === DATA_HEADER_BYTES);
      if (next === at) break;
      at = next;
    }
    return at;
  }

  fail(error: unknown): void {
    if (this.closed) return;
    for (const port of this.ports) if (port) port.stats.errors++;
    this.countError();
    this.log.warn(`${this.kind} ${this.peer}: ${error instanceof Error ? error.message : String(error)}; closing`);
    this.socket.close(1008, "protocol error");
    this.detachAll();
  }

  detachAll(): void {
    if (!this.closed) this.budget.release(this.#buffered + this.#batched);
    this.closed = true;
    this.#held.clear();
    for (const port of this.ports) if (port) port.network?.detach(port);
  }
}

/** A peer-supplied name, safe for one log line: validated names are shown as they are, others quoted and cut. */
function shownName(name: string | undefined): string {
  if (name === undefined) return "";
  return NETWORK_NAME.test(name) ? name : JSON.stringify(name.length > 64 ? `${name.slice(0, 64)}…` : name);
}

const HELLO_TIMEOUT_MS = 10_000;

/** Tunnel connect and disconnect lines logged per 10 s; the rest are counted in one line. */
const TUNNEL_LOG_BURST = 100;

/**
 * A relay's tunnel may replace its older one (a redial over a path that flaps) this many times
 * within the window; one more is refused as a loop, and the site offers again later. Ids are random
 * per process, so only a forged id or a bug takes turns faster than that.
 */
const TAKEOVER_BURST = 5;
const TAKEOVER_WINDOW_MS = 30_000;
/** The close code (application range) and reason sent on a tunnel that a newer one replaced. */
const TAKEOVER_CLOSE_CODE = 4000;
const TAKEOVER_REASON = "replaced by a newer tunnel from the same relay";

interface TunnelData {
  grant: Grant;
  /** Source address and port, `1.2.3.4:5678`. */
  peer: string;
  /** Source address alone, for per-address limits. */
  address: string;
  link?: TunnelLink;
  helloTimer?: ReturnType<typeof setTimeout>;
}

/** The network a peer (a tunnel's offer, a v86 client) asked for, made if need be; or why there is none. */
type PeerNetwork = Network | { refused: string };

interface TunnelServerOptions {
  identity: RelayIdentity;
  /** Send-queue bound of each tunnel. */
  limit: number;
  budget: MemoryBudget;
  maxTunnels: number;
  maxTunnelsPerAddress: number;
  counters: RelayCounters;
  log: Logger;
  networkForPeer(name: string): PeerNetwork;
}

/** The hub side of tunnels: admission before the upgrade, the hello, and the WebSocket handlers. */
class TunnelServer {
  readonly admission: AdmissionLimit;
  readonly #log: Logger;
  readonly #sockets = new Set<ServerWebSocket<TunnelData>>();

  constructor(readonly options: TunnelServerOptions) {
    const warn = rateLimitedLog(options.log.warn, 10, 10_000);
    // Sites come and go in crowds when a hub restarts: a line each for the first, then a count.
    const info = rateLimitedLog(options.log.info, TUNNEL_LOG_BURST, 10_000);
    this.#log = { info: info.log, warn: warn.log };
    this.admission = new AdmissionLimit("tunnel", "tunnels", options.maxTunnels, options.maxTunnelsPerAddress, options.counters, warn.log);
  }

  readonly handlers = {
    open: (ws: ServerWebSocket<TunnelData>) => {
      const o = this.options;
      this.admission.opened(ws.data.address);
      this.#sockets.add(ws);
      const socket: TunnelSocket = {
        send: (data) => ws.send(data) !== 0,
        buffered: () => ws.getBufferedAmount(),
        pause: (paused) => (paused ? ws.pause() : ws.resume()),
        close: (code, reason) => ws.close(code, reason),
      };
      ws.data.link = new TunnelLink(socket, "tunnel", ws.data.peer, o.limit, o.budget, this.#log, {
        onOffer: (link, names, first, hello) => {
          clearTimeout(ws.data.helloTimer);
          if (hello && link.remoteName) link.peer = `${link.remoteName} (${ws.data.peer})`;
          this.#offer(link, ws.data.grant, names, first, hello);
        },
      }, () => void o.counters.protocolErrors++);
      ws.data.link.grant = ws.data.grant;
      ws.data.helloTimer = setTimeout(() => ws.data.link?.fail(new Error(`no hello within ${HELLO_TIMEOUT_MS / 1000} s`)), HELLO_TIMEOUT_MS);
    },
    message: (ws: ServerWebSocket<TunnelData>, message: string | Buffer) => {
      ws.data.link!.receive(message);
    },
    close: (ws: ServerWebSocket<TunnelData>, code: number, reason: string) => {
      const link = ws.data.link;
      this.admission.closed(ws.data.address);
      this.#sockets.delete(ws);
      clearTimeout(ws.data.helloTimer);
      if (link && !link.closed) {
        const malformed = malformedClose(code, reason);
        if (malformed !== undefined) {
          this.options.counters.protocolErrors++;
          for (const port of link.ports) if (port) port.stats.errors++;
          this.#log.warn(`tunnel ${link.peer}: closed for malformed WebSocket input: ${malformed} (close code ${code})`);
        } else this.#log.info(`tunnel: ${link.peer} disconnected`);
      }
      link?.detachAll();
    },
  };

  /** Closes the tunnels whose token `accepted` no longer accepts (revoked), saying why; the others stay. */
  closeUnaccepted(accepted: (grant: Grant) => boolean, code: number, reason: string): void {
    closeSocketsUnaccepted(this.#sockets, accepted, code, reason, this.#log.info, (data) => `tunnel: ${data.link?.peer ?? data.peer}`);
  }

  /** Attaches what the token allows, the limits permit and no loop forbids; answers every name. */
  #offer(link: TunnelLink, grant: Grant, names: string[], first: number, hello: boolean): void {
    const o = this.options;
    const accepted: string[] = [];
    const refused: Refusal[] = [];
    names.forEach((name, i) => {
      const why = this.#refusal(link, grant, name);
      if (typeof why === "string") refused.push({ network: name, reason: why });
      else {
        link.attach(first + i, why, o.identity.id);
        accepted.push(name);
      }
    });
    if (hello) link.sendControl({ type: "welcome", version: TUNNEL_VERSION, accepted, refused, id: o.identity.id, name: o.identity.name });
    else link.sendControl({ type: "attached", accepted, refused });
    const extra = refused.length ? `; refused: ${refused.map((r) => `${r.network} (${r.reason})`).join(", ")}` : "";
    this.#log.info(`tunnel: ${link.peer} ${hello ? "attached" : "added"} (networks: ${accepted.join(", ") || "none"}${extra})`);
  }

  #refusal(link: TunnelLink, grant: Grant, name: string): Network | string {
    const o = this.options;
    if (grant.networks && !grant.networks.has(name)) return "not allowed for this token";
    if (link.remoteId === o.identity.id) {
      o.counters.loopRefusals++;
      return "that is this relay itself: a tunnel to itself would loop";
    }
    for (const port of link.ports) if (port?.network?.name === name) return "attached on this tunnel already";
    if (link.attached >= MAX_TUNNEL_NETWORKS) return `a tunnel carries at most ${MAX_TUNNEL_NETWORKS} networks`;
    const network = o.networkForPeer(name);
    if (!(network instanceof Network)) return network.refused;
    for (const port of network.ports) {
      if (link.remoteId === undefined || port.remoteId !== link.remoteId) continue;
      const relay = shownName(link.remoteName) || link.remoteId;
      // The relay's own older tunnel to this hub: it redialled before the hub saw that one die.
      if (port instanceof TunnelPort && port.link !== link && port.link.grant === grant) {
        const now = Date.now();
        const recent = port.link.takeovers.filter((t) => now - t < TAKEOVER_WINDOW_MS);
        if (recent.length < TAKEOVER_BURST) {
          link.takeovers = [...recent, now];
          this.#replace(port.link, link);
          continue;
        }
        o.counters.loopRefusals++;
        return `loop: relay ${relay} replaced its tunnel ${recent.length} times in ${TAKEOVER_WINDOW_MS / 1000} s; is its id used twice?`;
      }
      o.counters.loopRefusals++;
      return `loop: relay ${relay} is attached to ${name} already`;
    }
    return network;
  }

  /** Closes `old` for `newer`, from the same relay: the newest tunnel wins, as in an MQTT session takeover. */
  #replace(old: TunnelLink, newer: TunnelLink): void {
    this.#log.info(`tunnel: ${old.peer} ${TAKEOVER_REASON} (${newer.peer})`);
    old.detachAll();
    old.socket.close(TAKEOVER_CLOSE_CODE, TAKEOVER_REASON);
  }
}

// ───────────────────────────── uplink ─────────────────────────────
//
// Each phase of a dial has a deadline; a failure is explained in words a user can act on, and one
// that retrying cannot mend (a wrong token) waits the longest. The networks that come and go here
// are attached and detached on the live tunnel; local switching never waits for the uplink.

/** The uplink's view for status: where it dials and how it is doing. */
interface UplinkStatus {
  url: string;
  state: "connecting" | "up" | "down";
  since: string;
  connects: number;
  /** Dials so far, successful or not. */
  attempts: number;
  lastError: string | undefined;
  /** When the next dial is due, while down. */
  nextDial: string | undefined;
  /** The hub's name and id, from its welcome. */
  hub: string | undefined;
  networks: string[];
  refused: Refusal[];
  /** The proxy dialled through, without credentials. */
  proxy?: string;
}

/** The proxy an uplink dials through: its URL (credentials included), that URL for display, and who named it. */
interface UplinkProxy {
  url: string;
  shown: string;
  source: string;
}

interface UplinkOptions {
  /** The hub's base URL (ws:// or wss://); the tunnel path is added. */
  url: string;
  token: string;
  identity: RelayIdentity;
  keepaliveMs: number;
  /** Deadline for each phase of a dial: the WebSocket handshake (TCP, TLS, upgrade), then the welcome. */
  handshakeMs: number;
  /** Send-queue bound of the tunnel. */
  limit: number;
  budget: MemoryBudget;
  /** Extra CA (PEM) for a wss:// hub: the --uplink-ca file, its name for messages. */
  ca?: { path: string; text: string };
  /** Required SHA-256 fingerprint of the hub's certificate, `AB:CD:…`. */
  fingerprint?: string;
  /** Skip certificate verification (logged on every connect). */
  insecure?: boolean;
  /** An HTTP proxy to dial through (CONNECT), from --uplink-proxy or the environment. */
  proxy?: UplinkProxy;
  /** Runs before each dial: a joined site learns there the certificate its pin names. */
  beforeDial?: () => Promise<void>;
}

/**
 * Whether NO_PROXY (curl's and Go's syntax: comma- or space-separated; `*`; a domain, which
 * covers its subdomains, with or without a leading `.` or `*.`; an IP address or CIDR block;
 * any of these with `:PORT`) exempts the URL's host from the proxy.
 * @internal
 */
export function noProxyMatches(target: URL, noProxy: string): boolean {
  const host = urlHost(target).replace(/\.$/, "").toLowerCase();
  const port = target.port || (target.protocol === "wss:" || target.protocol === "https:" ? "443" : "80");
  const family = isIP(host);
  for (const item of noProxy.toLowerCase().split(/[\s,]+/)) {
    if (item === "") continue;
    if (item === "*") return true;
    // `[v6]:port`, `[v6]`, `host:port`, or a bare name, IPv4 or IPv6 address (or CIDR block).
    const m = /^\[([^\]]+)\](?::(\d+))?$/.exec(item) ?? /^([^:]+):(\d+)$/.exec(item);
    const name = (m ? m[1]! : item).replace(/^\*?\./, "").replace(/\.$/, "");
    if (m?.[2] !== undefined && m[2] !== port) continue;
    if (name.includes("/")) {
      const [base, bits] = name.split("/");
      const kind = isIP(base!);
      if (kind === 0 || kind !== family || !/^\d+$/.test(bits!)) continue;
      try {
        const block = new BlockList();
        block.addSubnet(base!, Number(bits), kind === 4 ? "ipv4" : "ipv6");
        if (block.check(host, kind === 4 ? "ipv4" : "ipv6")) return true;
      } catch {
        // not a usable block: it matches nothing
      }
    } else if (host === name || (family === 0 && host.endsWith(`.${name}`))) {
      return true;
    }
  }
  return false;
}

/**
 * The proxy for an uplink to `target`: `--uplink-proxy`, else https_proxy / HTTPS_PROXY for wss://
 * and http_proxy / HTTP_PROXY for ws://; none when no_proxy / NO_PROXY names the hub. Bun's
 * WebSocket applies NO_PROXY to any proxy it is given, so this does too, reading it the way Bun
 * does (no_proxy first). Errors name the setting, never its value (it may hold a password).
 * @internal
 */
export function uplinkProxy(target: string, explicit: string | undefined, env: Record<string, string | undefined>): UplinkProxy | undefined {
  const url = new URL(target);
  let source = flagOf("uplinkProxy");
  let text = explicit;
  if (text === undefined) {
    const names = url.protocol === "wss:" ? ["https_proxy", "HTTPS_PROXY"] : ["http_proxy", "HTTP_PROXY"];
    const name = names.find((n) => env[n]?.trim());
    if (name === undefined) return undefined;
    source = name;
    text = env[name]!.trim();
  }
  if (noProxyMatches(url, env.no_proxy || env.NO_PROXY || "")) return undefined;
  const proxy = parseProxyUrl(text);
  if (!proxy) throw new ConfigError(`${source}: ${PROXY_URL_EXPECTED}`);
  return { url: proxy.href, shown: `http://${proxy.host}`, source };
}

/**
 * The text with the user and password taken out of every URL in it (`http://u:pw@proxy:3128/` →
 * `http://proxy:3128/`), however it is spelled: for messages that may quote a proxy's URL.
 * @internal
 */
export function withoutUserinfo(text: string): string {
  return text.replace(/\/\/[^\s/?#]*@/g, "//");
}

/**
 * TLS options for the uplink: system CAs by default, plus a CA, a pinned fingerprint, or none.
 * Bun reports a refused pin as a host-name mismatch, so `pinRefused` hears of it.
 */
function uplinkTls(options: UplinkOptions, pinRefused: (seen: string) => void) {
  if (options.insecure) return { rejectUnauthorized: false };
  const pin = options.fingerprint;
  return {
    ...(options.ca !== undefined && { ca: options.ca.text }),
    ...(pin !== undefined && {
      checkServerIdentity(host: string, cert: PeerCertificate) {
        const mismatch = checkServerIdentity(host, cert);
        if (mismatch || cert.fingerprint256 === pin) return mismatch;
        pinRefused(cert.fingerprint256);
        return new Error(`certificate fingerprint ${cert.fingerprint256} does not match ${flagOf("uplinkFingerprint")}`);
      },
    }),
  };
}

/** A URL without credentials, for logs and status. */
function displayUrl(url: URL): string {
  return `${url.protocol}//${url.host}${url.pathname}`;
}

function tunnelUrl(base: string): URL {
  const url = new URL(base);
  url.pathname = url.pathname.replace(/\/+$/, "") + TUNNEL_PATH;
  url.search = "";
  url.hash = "";
  return url;
}

/**
 * The URL one dial uses: the networks it offers in the query (`?networks=lab,dev`), so a load
 * balancer in front of several hubs can keep a network's sites on one hub (HAProxy's
 * `balance url_param networks`). Only an optimisation: the hello is what attaches networks.
 */
function dialUrl(url: URL, networks: Iterable<string>): string {
  const names = [...networks].join(",");
  return names ? `${url.href}?networks=${names}` : url.href;
}

/** What a hub's HTTP answer instead of an upgrade means, and whether retrying soon can help. */
const DIAL_REFUSALS: Record<string, [why: string, final: boolean]> = {
  "400": ["the hub does not speak edge-relay.v1 (400): is it an edge-relay?", true],
  "401": ["the hub refused the token (401)", true],
  "403": ["the hub refused this client (403)", true],
  "404": ["no tunnel endpoint there (404): is the target started with --token?", true],
  "429": ["the hub is refusing this address after failed logins (429)", true],
  "503": ["the hub is at its tunnel limit (503)", false],
};

/** Why a TLS handshake failed (Bun's reason, e.g. "self signed certificate"), in words a user can act on. */
function explainTls(reason: string, ca: string | undefined): string {
  if (/WRONG_VERSION_NUMBER/i.test(reason)) return "TLS: the hub does not speak TLS on that port (is it ws://?)";
  if (/Hostname\/IP does not match/i.test(reason)) return `TLS: the hub's certificate is not for the host name in ${flagOf("uplink")}`;
  if (/expired|not yet valid/i.test(reason)) return `TLS: ${reason} (check the hub certificate's dates and this host's clock)`;
  if (/self.signed|issuer|verify|untrusted|chain/i.test(reason)) {
    return ca === undefined ? `TLS: certificate not trusted (use ${flagOf("uplinkCa")} for a private CA or a self-signed hub): ${reason}` : `TLS: certificate not trusted by the CA in ${flagOf("uplinkCa")} ${ca}: ${reason}`;
  }
  return `TLS handshake failed: ${reason}`;
}

/**
 * A failed dial in words a user can act on; `final` when retrying soon cannot help (a wrong token).
 * `tls`: the --uplink-ca file, and the fingerprint of a certificate the pin refused.
 */
function explainDialFailure(message: string, tls: { ca?: string; pinRefused?: string; plain?: boolean } = {}): { why: string; final: boolean } {
  const status = /Expected 101 status code: (\d+)/.exec(message)?.[1];
  if (status !== undefined) {
    const [why, final] = DIAL_REFUSALS[status] ?? [`the hub answered HTTP ${status} instead of a WebSocket upgrade`, false];
    return { why, final };
  }
  if (tls.pinRefused !== undefined) return { why: `TLS: the hub's certificate does not match ${flagOf("uplinkFingerprint")} (it is ${tls.pinRefused})`, final: false };
  const reason = /TLS handshake failed: (.*)$/.exec(message)?.[1];
  if (reason !== undefined) return { why: explainTls(reason, tls.ca), final: false };
  if (/ECONNREFUSED|connection refused/i.test(message)) return { why: "connection refused: is the hub running, on that port?", final: false };
  // A TLS server hangs up on the plain HTTP upgrade: the reverse of WRONG_VERSION_NUMBER above.
  if (/Connection ended$/.test(message) && tls.plain) return { why: "the hub closed the connection without answering the upgrade: it may speak TLS (is it wss://?)", final: false };
  return { why: message, final: false };
}

/**
 * A refused or failed uplink dial is retried within a few seconds (a hub that returns has its sites
 * back soon); one the hub refused for good (a wrong token) waits the long final backoff.
 */
const UPLINK_BACKOFF_MIN_MS = 250;
const UPLINK_BACKOFF_MAX_MS = 3_000;
const UPLINK_BACKOFF_FINAL_MS = 30_000;

/** While the uplink stays down, a line with the next dial's time at most this often. */
const UPLINK_DOWN_LOG_MS = 10_000;

/**
 * Networks the hub refused on a live tunnel are offered again after a backoff between these: what it
 * refused may pass (a stale tunnel of this relay it still held, its network limit).
 */
const UPLINK_REOFFER_MIN_MS = 1_000;
const UPLINK_REOFFER_MAX_MS = 60_000;

/**
 * Dials a hub and keeps the tunnel up: a deadline on each phase of the dial, exponential backoff
 * with jitter (capped at 3 s; 30 s after a wrong token), keepalive pings, a redial when the hub
 * stops answering, the networks that come and go here attached and detached on the live tunnel,
 * and those the hub refused offered again after a backoff. Local switching never waits for it.
 */
class Uplink {
  readonly url: URL;
  status: UplinkStatus;
  #ws: WebSocket | undefined;
  #link: TunnelLink | undefined;
  /** Networks offered on the current tunnel (by hello or attach), by name: their channel. */
  #offered = new Map<string, number>();
  /** Networks the hub refused on the current tunnel: not offered again until the re-offer timer or the next dial. */
  #declined = new Set<string>();
  readonly #reofferBackoff = new Backoff(UPLINK_REOFFER_MIN_MS, UPLINK_REOFFER_MAX_MS);
  #reoffer: ReturnType<typeof setTimeout> | undefined;
  readonly #redial = new Redialer(new Backoff(UPLINK_BACKOFF_MIN_MS, UPLINK_BACKOFF_MAX_MS, UPLINK_BACKOFF_FINAL_MS), () => void this.#dial());
  /** When the uplink last logged that it is down (ms), and since when it has been (ISO; none while up). */
  #downLoggedAt = -Infinity;
  #downSince: string | undefined;
  #deadline: ReturnType<typeof setTimeout> | undefined;
  #keepalive: ReturnType<typeof setInterval> | undefined;
  #tooMany = false;
  #syncing = false;

  constructor(
    private readonly options: UplinkOptions,
    /** Every network this relay has: the uplink carries them all (the first 64). */
    private readonly networks: () => Iterable<Network>,
    private readonly log: Logger,
    private readonly countError: () => void,
  ) {
    this.url = tunnelUrl(options.url);
    this.status = {
      url: displayUrl(this.url),
      state: "connecting",
      since: new Date().toISOString(),
      connects: 0,
      attempts: 0,
      lastError: undefined,
      nextDial: undefined,
      hub: undefined,
      networks: [],
      refused: [],
      proxy: options.proxy?.shown,
    };
  }

  start(): void {
    const proxy = this.options.proxy;
    if (proxy) this.log.info(`uplink: dialing ${this.status.url} through the proxy ${proxy.shown} (${proxy.source})`);
    void this.#dial();
  }

  /** The networks to carry, by name; beyond the tunnel's limit, the rest is left out (logged once). */
  #wanted(): Map<string, Network> {
    const wanted = new Map<string, Network>();
    for (const n of this.networks()) {
      if (wanted.size === MAX_TUNNEL_NETWORKS) {
        if (!this.#tooMany) this.log.warn(`uplink: a tunnel carries at most ${MAX_TUNNEL_NETWORKS} networks; ${n.name} and any further ones are not carried`);
        this.#tooMany = true;
        break;
      }
      wanted.set(n.name, n);
    }
    return wanted;
  }

  async #dial(): Promise<void> {
    await this.options.beforeDial?.();
    if (this.#redial.stopped) return;
    this.status.attempts++;
    this.status.nextDial = undefined;
    setLinkState(this.status, "connecting");
    const proxy = this.options.proxy;
    const wanted = this.#wanted();
    const ws = new WebSocket(dialUrl(this.url, wanted.keys()), {
      headers: { Authorization: `Bearer ${this.options.token}` },
      protocols: [TUNNEL_PROTOCOL],
      perMessageDeflate: false,
      tls: uplinkTls(this.options, (seen) => (pinRefused = seen)),
      ...(proxy && { proxy: proxy.url }),
    });
    // Buffers (Bun's default) cost less than ArrayBuffers: in the 64 KiB bench the message handler
    // fell from 15 % to 1 % of the receiving site's samples.
    ws.binaryType = "nodebuffer";
    this.#ws = ws;
    let failure: string | undefined;
    let pinRefused: string | undefined;
    const socket: TunnelSocket = {
      send: (data) => (ws.send(data), true),
      buffered: () => ws.bufferedAmount,
      pause: (paused) => void (paused ? ws.pause() : ws.resume()),
      close: (code, reason) => ws.close(code, reason),
    };
    const link = new TunnelLink(socket, "uplink", this.status.url, this.options.limit, this.options.budget, this.log, {
      onAnswer: (l, accepted, refused, welcome) => this.#answered(l, accepted, refused, welcome),
    }, this.countError);
    link.claimChannels(wanted.size);
    this.#offered = new Map([...wanted.keys()].map((name, channel) => [name, channel]));
    this.#declined.clear();
    clearTimeout(this.#reoffer);
    this.#reoffer = undefined;
    this.#reofferBackoff.reset();
    this.#link = link;
    const seconds = this.options.handshakeMs / 1000;
    this.#setDeadline(ws, link, `no answer to the WebSocket handshake within ${seconds} s`);
    ws.onopen = () => {
      this.#setDeadline(ws, link, `no welcome within ${seconds} s`);
      const { id, name } = this.options.identity;
      link.sendControl({ type: "hello", version: TUNNEL_VERSION, networks: [...this.#offered.keys()], id, name });
    };
    ws.onmessage = function onTunnelMessage(event) {
      link.receive(event.data as Uint8Array | string);
    };
    ws.onerror = (event) => {
      // Bun's messages name the target only; should one quote a URL with a password, it is taken out.
      failure = withoutUserinfo((event as ErrorEvent).message || "connection failed");
    };
    // One that cannot succeed by retrying soon (a wrong token) backs off to the longest wait at once.
    ws.onclose = (event) => {
      const explained = failure === undefined ? undefined : explainDialFailure(failure, { ca: this.options.ca?.path, pinRefused, plain: this.url.protocol === "ws:" });
      if (explained?.final) this.#redial.backoff.exhaust();
      const why = explained ? `${explained.why}${proxy ? ` (through the proxy ${proxy.shown})` : ""}` : `closed (${event.code}${event.reason ? ` ${event.reason}` : ""})`;
      this.#lost(ws, link, why);
    };
    this.#keepalive ??= setInterval(() => this.#tick(), this.options.keepaliveMs);
  }

  /** A phase of the dial that does not finish in time ends the attempt: no closing handshake. */
  #setDeadline(ws: WebSocket, link: TunnelLink, why: string): void {
    clearTimeout(this.#deadline);
    this.#deadline = setTimeout(() => {
      this.#lost(ws, link, why);
      ws.terminate();
    }, this.options.handshakeMs);
  }

  #answered(link: TunnelLink, accepted: string[], refused: Refusal[], welcome: boolean): void {
    const nets = new Map([...this.networks()].map((n) => [n.name, n]));
    for (const name of accepted) {
      const channel = this.#offered.get(name);
      const network = nets.get(name);
      // A network that went while the answer was on its way is detached again at once.
      if (channel !== undefined && network !== undefined) link.attach(channel, network, this.options.identity.id);
    }
    for (const r of refused) {
      this.#offered.delete(r.network);
      this.#declined.add(r.network);
    }
    this.status.networks = [...this.#offered.keys()].filter((name) => link.ports[this.#offered.get(name)!] !== undefined);
    this.status.refused = [...this.status.refused.filter((r) => !accepted.includes(r.network) && !refused.some((x) => x.network === r.network)), ...refused];
    const shown = refused.map((r) => `${r.network} (${r.reason})`).join(", ");
    if (welcome) {
      clearTimeout(this.#deadline);
      this.#redial.backoff.reset();
      this.#downSince = undefined;
      this.status.connects++;
      this.status.hub = link.remoteName ?? link.remoteId;
      setLinkState(this.status, "up");
      const hub = link.remoteName ? ` (hub ${link.remoteName})` : "";
      this.#redial.log(this.log.info, `uplink: connected to ${this.status.url}${hub} (networks: ${accepted.join(", ") || "none"}${shown ? `; refused by the hub: ${shown}` : ""})`);
      if (this.options.insecure && this.url.protocol === "wss:") {
        this.log.warn(`uplink: --insecure: the certificate of ${this.status.url} was NOT verified`);
      }
    } else if (accepted.length || refused.length) {
      // A network refused for good is offered again now and then: its refusal is logged once.
      this.#redial.log(this.log.info, `uplink: hub added networks: ${accepted.join(", ") || "none"}${shown ? `; refused: ${shown}` : ""}`);
    }
    this.#reofferLater();
    this.sync();
  }

  /** Offers the declined networks again after a backoff, so a refusal that passes cuts nothing off for good. */
  #reofferLater(): void {
    if (this.#declined.size === 0) return this.#reofferBackoff.reset();
    this.#reoffer ??= setTimeout(() => {
      this.#reoffer = undefined;
      this.#declined.clear();
      this.sync();
    }, this.#reofferBackoff.next());
  }

  /** The relay's networks changed: synced once per event-loop turn, however many changed. */
  networksChanged(): void {
    if (this.#syncing) return;
    this.#syncing = true;
    setImmediate(() => {
      this.#syncing = false;
      this.sync();
    });
  }

  /** Offers networks that appeared since the hello, and detaches those that went. */
  sync(): void {
    const link = this.#link;
    if (!link || !link.helloDone || link.closed) return;
    const wanted = this.#wanted();
    const gone = [...this.#offered.keys()].filter((name) => !wanted.has(name));
    if (gone.length) {
      for (const name of gone) {
        link.detachChannel(this.#offered.get(name)!);
        this.#offered.delete(name);
      }
      link.sendControl({ type: "detach", networks: gone });
    }
    const added = [...wanted.keys()].filter((name) => !this.#offered.has(name) && !this.#declined.has(name));
    if (added.length > link.channelsLeft) {
      // Offers over days (networks that come and go, refusals offered again) used up the channels: a new tunnel numbers from 0.
      const ws = this.#ws!;
      this.#lost(ws, link, `the tunnel has used all ${TUNNEL_CHANNELS.toLocaleString("en")} channels; dialling a new one`);
      ws.close(1000, "renewing the tunnel");
      return;
    }
    if (added.length) {
      const first = link.claimChannels(added.length);
      added.forEach((name, i) => this.#offered.set(name, first + i));
      link.sendControl({ type: "attach", networks: added });
    }
    this.status.networks = [...this.#offered.keys()].filter((name) => link.ports[this.#offered.get(name)!] !== undefined);
  }

  /** The tunnel is gone (closed, failed, silent or late): detach its ports and redial after a backoff. */
  #lost(ws: WebSocket, link: TunnelLink, why: string): void {
    link.detachAll();
    if (this.#ws !== ws) return;
    clearTimeout(this.#deadline);
    this.#ws = undefined;
    this.#link = undefined;
    this.#offered.clear();
    this.status.networks = [];
    if (this.#redial.stopped) return;
    setLinkState(this.status, "down", why);
    const delay = this.#redial.retry()!;
    const now = Date.now();
    this.#downSince ??= new Date(now).toISOString();
    this.status.nextDial = new Date(now + delay).toISOString();
    if (this.#redial.log(this.log.warn, `uplink: ${this.status.url}: ${why}; retrying with backoff`)) this.#downLoggedAt = now;
    else if (now - this.#downLoggedAt >= UPLINK_DOWN_LOG_MS) {
      this.#downLoggedAt = now;
      this.log.warn(`uplink: ${this.status.url} still down since ${this.#downSince} (${this.status.attempts} dials so far; last: ${why}); next dial at ${this.status.nextDial}`);
    }
  }

  /** Pings the hub; one that has not been heard from for three intervals is closed and redialled. */
  #tick(): void {
    const ws = this.#ws;
    const link = this.#link;
    if (!ws || !link || !link.helloDone || ws.readyState !== WebSocket.OPEN) return;
    if (Date.now() - link.lastHeard > 3 * this.options.keepaliveMs) {
      this.#lost(ws, link, "stopped answering keepalive pings");
      ws.terminate();
      return;
    }
    link.sendControl({ type: "ping" });
  }

  stop(): void {
    this.#redial.stop();
    clearTimeout(this.#deadline);
    clearTimeout(this.#reoffer);
    clearInterval(this.#keepalive);
    this.#link?.detachAll();
    this.#ws?.close(1001, "relay stopping");
  }
}

// ───────────────────────────── v86 ─────────────────────────────
//
// One bare Ethernet frame per binary message each way, no batching: v86 hands each message to its
// NIC. Its queue is the WebSocket's own buffer, charged to the relay's memory budget; --v86-rate
// bounds each direction, and --v86-origin the pages a browser may connect from.

/**
 * At most `frames` frames and `bytes` bytes a second on average (0: no limit), in bursts of up to a
 * second's worth. A frame passes while there is any allowance left and may overdraw it, so one
 * bigger than a second's bytes is delayed, never refused forever.
 * @internal
 */
export class RateLimit {
  #frames: number;
  #bytes: number;
  #last: number;

  constructor(
    readonly rate: V86Rate,
    now = performance.now(),
  ) {
    this.#frames = rate.frames;
    this.#bytes = rate.bytes;
    this.#last = now;
  }

  /** Takes one frame of `bytes` from the allowance; false (and nothing taken) when it is spent. */
  allow(bytes: number, now = performance.now()): boolean {
    const { frames, bytes: byteRate } = this.rate;
    const seconds = Math.max(0, now - this.#last) / 1000;
    this.#last = now;
    this.#frames = Math.min(frames, this.#frames + seconds * frames);
    this.#bytes = Math.min(byteRate, this.#bytes + seconds * byteRate);
    if ((frames > 0 && this.#frames < 1) || (byteRate > 0 && this.#bytes <= 0)) return false;
    if (frames > 0) this.#frames -= 1;
    if (byteRate > 0) this.#bytes -= bytes;
    return true;
  }
}

/** What a v86 port needs of its WebSocket: Bun's `ServerWebSocket`, narrowed. */
interface V86Socket {
  /** Bun's answer: bytes sent, -1 queued (backpressure), 0 dropped. */
  send(frame: Uint8Array): number;
  buffered(): number;
  close(code: number, reason: string): void;
}

/**
 * A v86 NIC on `/v86/NETWORK`: one bare Ethernet frame per binary WebSocket message each way, no
 * length prefix, no batching (v86 hands each message to its NIC as one frame). Its queue is the
 * WebSocket's own buffer, bounded by `limit` and the relay's budget; `rate` (--v86-rate) bounds
 * each direction separately.
 */
class V86Port extends Port {
  /** Bytes of the socket's buffer charged to the budget, as last sampled. */
  #accounted = 0;
  readonly #in: RateLimit | undefined;
  readonly #out: RateLimit | undefined;
  /** Frames from the client over the rate limit, and messages too long to be a frame. */
  rxRate = 0;
  rxOversize = 0;

  constructor(
    peer: string,
    private readonly socket: V86Socket,
    private readonly limit: number,
    private readonly budget: MemoryBudget = UNLIMITED,
    rate?: V86Rate,
  ) {
    super("v86", peer);
    if (rate && (rate.frames > 0 || rate.bytes > 0)) {
      this.#in = new RateLimit(rate);
      this.#out = new RateLimit(rate);
    }
  }

  protected enqueue(frame: Uint8Array): boolean {
    if (this.state === "closed" || frame.length === 0) return false;
    if (this.#out && !this.#out.allow(frame.length)) return false;
    // Charge the budget what the socket's buffer holds now, then this frame.
    this.#accounted = this.budget.recharge(this.#accounted, this.socket.buffered());
    if (!this.budget.admit(frame.length, this.#accounted, this.limit)) return false;
    const sent = this.socket.send(frame);
    if (sent === -1) this.#accounted += frame.length;
    else this.budget.release(frame.length);
    return sent !== 0;
  }

  /** One message from the client: one frame, unless it is too long or over the rate. */
  message(data: Uint8Array): void {
    if (this.state === "closed") return;
    if (data.length > MAX_FRAME) {
      this.rxOversize++;
      return;
    }
    if (this.#in && !this.#in.allow(data.length)) {
      this.rxRate++;
      return;
    }
    this.receive(plainBytes(data));
  }

  /** The socket is gone: what its buffer held leaves the budget. */
  closed(): void {
    this.budget.release(this.#accounted);
    this.#accounted = 0;
  }

  override rxDrops(): number {
    return super.rxDrops() + this.rxRate + this.rxOversize;
  }

  override snapshot(): PortSnapshot & { rx: { rate: number; oversize: number } } {
    const s = super.snapshot();
    return { ...s, rx: { ...s.rx, rate: this.rxRate, oversize: this.rxOversize } };
  }
}

interface V86Data {
  v86: true;
  network: string;
  grant: Grant;
  /** The client's address and port, and its Origin if it sent one: never the URL. */
  peer: string;
  address: string;
  port?: V86Port;
}

interface V86ServerOptions {
  limit: number;
  budget: MemoryBudget;
  rate: V86Rate | undefined;
  /** --v86-origin, normalised; undefined allows any. */
  origins: Set<string> | undefined;
  /** v86 connections on this relay, and from one address (the tunnel limits). */
  maxPorts: number;
  maxPerAddress: number;
  counters: RelayCounters;
  log: Logger;
  networkForPeer(name: string): PeerNetwork;
}

/** v86 ports: admission before the upgrade (origin, limits) and the WebSocket handlers. */
class V86Server {
  readonly admission: AdmissionLimit;
  readonly #warn: (line: string) => void;
  readonly #sockets = new Set<ServerWebSocket<V86Data>>();

  constructor(readonly options: V86ServerOptions) {
    this.#warn = rateLimitedLog(options.log.warn, 10, 10_000).log;
    this.admission = new AdmissionLimit("v86", "v86 connections", options.maxPorts, options.maxPerAddress, options.counters, this.#warn);
  }

  /** A browser's Origin header against --v86-origin; a client that sends none is no browser. */
  originAllowed(origin: string | undefined): boolean {
    const allowed = this.options.origins;
    if (allowed === undefined || origin === undefined) return true;
    const normal = originOf(origin);
    return normal !== undefined && allowed.has(normal);
  }

  readonly handlers = {
    open: (ws: ServerWebSocket<V86Data>) => {
      const o = this.options;
      this.admission.opened(ws.data.address);
      this.#sockets.add(ws);
      const network = o.networkForPeer(ws.data.network);
      if (!(network instanceof Network)) {
        this.#warn(`v86 ${ws.data.peer}: ${network.refused}; closing`);
        return ws.close(1013, "network limit");
      }
      const socket: V86Socket = { send: (f) => ws.send(f), buffered: () => ws.getBufferedAmount(), close: (c, r) => ws.close(c, r) };
      ws.data.port = new V86Port(ws.data.peer, socket, o.limit, o.budget, o.rate);
      network.attach(ws.data.port);
    },
    message: (ws: ServerWebSocket<V86Data>, message: string | Buffer) => {
      const port = ws.data.port;
      if (port === undefined || port.state === "closed") return;
      if (typeof message !== "string") return port.message(message);
      port.stats.errors++;
      this.options.counters.protocolErrors++;
      port.closeReason = "text message (frames are binary messages)";
      this.#warn(`${port.id} ${port.peer}: a text message; closing (1003)`);
      ws.close(1003, "binary frames only");
    },
    close: (ws: ServerWebSocket<V86Data>, code: number, reason: string) => {
      this.admission.closed(ws.data.address);
      this.#sockets.delete(ws);
      const port = ws.data.port;
      if (port === undefined) return;
      port.closed();
      const malformed = malformedClose(code, reason);
      if (malformed !== undefined && port.closeReason === undefined) {
        port.stats.errors++;
        this.options.counters.protocolErrors++;
      }
      const shown = reason ? ` ${JSON.stringify(reason.slice(0, 80))}` : "";
      port.network?.detach(port, malformed ?? (code === 1000 || code === 1001 || code === 1005 ? "peer closed" : `closed (${code}${shown})`));
    },
  };

  /** Closes the v86 ports whose token `accepted` no longer accepts (revoked), saying why; the others stay. */
  closeUnaccepted(accepted: (grant: Grant) => boolean, code: number, reason: string): void {
    closeSocketsUnaccepted(this.#sockets, accepted, code, reason, this.options.log.info, (data) => `v86 ${V86_PATH}/${data.network} ${data.peer}`);
  }
}

// ───────────────────────────── NATS client ─────────────────────────────
//
// Written here rather than taken from NATS's JavaScript client, which cost about twice as much per
// frame (bench/RESULTS.md). A message whole in one chunk is handed over in place; a session is one
// method per handshake phase; a lost connection is redialled server after server through Redialer.

/** The longest protocol line taken from a NATS server: an INFO that lists a cluster's URLs fits. */
const NATS_MAX_LINE = 64 * 1024;
/** The largest message taken from NATS: the server's default max_payload. */
const NATS_MAX_MESSAGE = 1024 * 1024;
/** A keepalive PING this often; this many unanswered and the connection is given up as stale. */
const NATS_PING_MS = 5_000;
const NATS_PINGS_OUT = 2;

const LATIN1 = new TextDecoder("latin1");
const CRLF = Uint8Array.of(13, 10);

/** What a NATS server sends that a client acts on. */
interface NatsReceiver {
  /** A message for subscription `sid`: its header block (empty for MSG) and payload, valid during the call. */
  message(sid: number, headers: Uint8Array, payload: Uint8Array): void;
  /** A message over the maximum, skipped unread: anyone who may publish on a subject can send one. */
  oversize(sid: number, bytes: number): void;
  /** INFO, PING, PONG, +OK or -ERR, and the rest of its line. */
  op(op: "INFO" | "PING" | "PONG" | "+OK" | "-ERR", rest: string): void;
}

const NATS_OPS = new Set(["INFO", "PING", "PONG", "+OK", "-ERR"]);

function natsSize(text: string | undefined): number {
  if (text === undefined || !/^\d{1,10}$/.test(text)) throw new TypeError("Cannot decode NATS protocol: a size is not a number");
  return Number(text);
}

/**
 * NATS's protocol as a server sends it: lines, and after MSG/HMSG a message of the size the line
 * gives. A message whole in one chunk is handed over in place; one split across chunks is gathered
 * once into a buffer of its size. A line is bounded, and a message over the maximum is skipped
 * unread; anything malformed throws (a TypeError or RangeError), and the connection is then dropped.
 * @internal
 */
export class NatsDecoder {
  #line = "";
  #body: Uint8Array | undefined;
  #got = 0;
  #sid = 0;
  #headers = 0;
  /** Bytes of an oversize message still to skip. */
  #skip = 0;

  constructor(
    private readonly receiver: NatsReceiver,
    private readonly maxMessage = NATS_MAX_MESSAGE,
  ) {}

  push(chunk: Uint8Array): void {
    let at = 0;
    while (at < chunk.length) {
      if (this.#skip > 0) {
        const n = Math.min(this.#skip, chunk.length - at);
        this.#skip -= n;
        at += n;
        continue;
      }
      const body = this.#body;
      if (body !== undefined) {
        const n = Math.min(body.length - this.#got, chunk.length - at);
        body.set(chunk.subarray(at, at + n), this.#got);
        this.#got += n;
        at += n;
        if (this.#got < body.length) return;
        this.#body = undefined;
        this.#deliver(body, 0, body.length - 2);
        continue;
      }
      const eol = chunk.indexOf(10, at);
      if (eol - at + this.#line.length > NATS_MAX_LINE || (eol < 0 && chunk.length - at + this.#line.length > NATS_MAX_LINE)) {
        throw new RangeError(`Cannot decode NATS protocol: a line longer than ${NATS_MAX_LINE} bytes`);
      }
      if (eol < 0) {
        this.#line += LATIN1.decode(chunk.subarray(at));
        return;
      }
      let line = this.#line + LATIN1.decode(chunk.subarray(at, eol));
      this.#line = "";
      at = eol + 1;
      if (line.endsWith("\r")) line = line.slice(0, -1);
      at = this.#line_(line, chunk, at);
    }
  }

  /** One protocol line; returns where the chunk goes on. */
  #line_(line: string, chunk: Uint8Array, at: number): number {
    const space = line.indexOf(" ");
    const op = (space < 0 ? line : line.slice(0, space)).toUpperCase();
    const rest = space < 0 ? "" : line.slice(space + 1);
    if (op !== "MSG" && op !== "HMSG") {
      if (!NATS_OPS.has(op)) throw new TypeError("Cannot decode NATS protocol: unknown operation");
      this.receiver.op(op as "INFO", rest);
      return at;
    }
    // MSG SUBJECT SID [REPLY] SIZE; HMSG SUBJECT SID [REPLY] HEADER_SIZE TOTAL_SIZE
    const args = rest.split(/[ \t]+/);
    const sizes = op === "HMSG" ? 2 : 1;
    if (args.length !== 2 + sizes && args.length !== 3 + sizes) throw new TypeError(`Cannot decode NATS protocol: ${op} with ${args.length} arguments`);
    const total = natsSize(args[args.length - 1]);
    const headers = op === "HMSG" ? natsSize(args[args.length - 2]) : 0;
    if (headers > total) throw new RangeError(`Cannot decode NATS message: a header of ${headers} bytes in a message of ${total}`);
    this.#sid = natsSize(args[1]);
    if (total > this.maxMessage) {
      this.#skip = total + 2;
      this.receiver.oversize(this.#sid, total);
      return at;
    }
    this.#headers = headers;
    if (chunk.length - at >= total + 2) {
      this.#deliver(chunk, at, at + total);
      return at + total + 2;
    }
    this.#body = new Uint8Array(total + 2);
    this.#got = 0;
    return at;
  }

  #deliver(bytes: Uint8Array, start: number, end: number): void {
    if (bytes[end] !== 13 || bytes[end + 1] !== 10) throw new TypeError("Cannot decode NATS message: no CRLF after the message");
    const split = start + this.#headers;
    this.receiver.message(this.#sid, bytes.subarray(start, split), bytes.subarray(split, end));
  }
}

/** The INFO fields a client acts on; a server sends more. */
const NatsInfo = v.object({
  headers: v.optional(v.boolean()),
  max_payload: v.optional(v.number()),
  tls_required: v.optional(v.boolean()),
  tls_available: v.optional(v.boolean()),
  nonce: v.optional(v.string()),
});

/** A server's -ERR text, unquoted and bounded: it is logged and shown in status. */
function natsErrorText(rest: string): string {
  return rest.replace(/^'|'$/g, "").replace(/[^\x20-\x7e]/g, "?").slice(0, 200);
}

interface NatsLinkOptions {
  servers: string[];
  name: string;
  token?: string;
  /** Answers the server's nonce for CONNECT: an NKey seed's or a credentials file's signature. */
  authenticator?: (nonce?: string) => unknown;
  ca?: string;
  /** Deadline for connecting to a server, through its first PONG. */
  handshakeMs: number;
  /** Bytes the socket may leave unwritten before the connection is given up as stuck. */
  maxBacklog: number;
}

interface NatsLinkEvents {
  up(server: string): void;
  /** A dial failed or the connection was lost; the link dials again after the backoff. */
  down(reason: string): void;
  message(sid: number, headers: Uint8Array, payload: Uint8Array): void;
  /** A message over the maximum was skipped. */
  oversize(sid: number, bytes: number): void;
  /** The server's -ERR while connected (a permissions violation); the connection stays. */
  refused(text: string): void;
  /** What the server sent did not decode; the connection is dropped. */
  malformed(message: string): void;
}

/** What a NATS session needs of its link: the events, the subscriptions, and word of how it went. */
interface NatsSessionOwner {
  readonly options: NatsLinkOptions;
  readonly events: NatsLinkEvents;
  /** Subscriptions, made again on every connection. */
  readonly subjects: ReadonlyMap<number, string>;
  readonly stopped: boolean;
  /** The server's INFO told its max_payload. */
  info(maxPayload: number): void;
  /** A keepalive PING was answered: the connection has lasted. */
  alive(): void;
  /** The connection was lost after it was up. */
  lost(session: NatsSession, reason: string): void;
}

/**
 * One connection to a NATS server, a method per phase: the TCP connect, the server's INFO, a TLS
 * upgrade if wanted, CONNECT with credentials and its PING, whose PONG makes it up (in the same
 * turn: what follows in the chunk already belongs to the connection); then keepalive PINGs until
 * it is lost. What the socket has not taken is kept in order and counted; a stuck one is dropped.
 */
class NatsSession {
  phase: "info" | "tls" | "connect" | "up" | "closed" = "info";
  /** Bytes written but not yet taken by the socket. */
  backlog = 0;
  readonly #url: URL;
  readonly #wantTls: boolean;
  readonly #decoder: NatsDecoder;
  readonly #opened = Promise.withResolvers<void>();
  readonly #deadline: ReturnType<typeof setTimeout>;
  #upgraded = false;
  #socket: Socket<undefined> | undefined;
  #pending: Uint8Array[] = [];
  /** Waiters for the PONGs of PINGs sent since up, oldest first. */
  #pongs: (() => void)[] = [];
  #pingsOut = 0;
  /** A PONG waits in `#pending`: one answers any number of the server's PINGs. */
  #pongQueued = false;
  #keepalive: ReturnType<typeof setInterval> | undefined;

  constructor(
    readonly server: string,
    private readonly owner: NatsSessionOwner,
  ) {
    this.#url = new URL(server);
    this.#wantTls = this.#url.protocol === "tls:" || owner.options.ca !== undefined;
    const ms = owner.options.handshakeMs;
    this.#deadline = setTimeout(() => this.#fail(new Error(`no answer within ${ms} ms`)), ms);
    this.#decoder = new NatsDecoder({
      message: (sid, headers, payload) => {
        if (this.phase === "up") owner.events.message(sid, headers, payload);
      },
      oversize: (sid, bytes) => {
        if (this.phase === "up") owner.events.oversize(sid, bytes);
      },
      op: (op, rest) => this.#op(op, rest),
    });
  }

  /** Connects; resolves once up, rejects when the connection fails before. */
  open(): Promise<void> {
    Bun.connect<undefined>({ hostname: this.#url.hostname, port: Number(this.#url.port || 4222), socket: this.#plain }).catch((error) => this.#fail(error as Error));
    return this.#opened.promise;
  }

  /** The socket's events; once upgraded, the plain socket carries TLS records and only the TLS socket's count. */
  readonly #handlers = {
    data: (_socket: Socket<undefined>, chunk: Uint8Array) => {
      try {
        this.#decoder.push(chunk);
      } catch (error) {
        this.owner.events.malformed((error as Error).message);
        this.#fail(error as Error);
      }
    },
    drain: () => this.#flushPending(),
    close: () => this.#fail(new Error("the server closed the connection")),
    error: (_socket: Socket<undefined>, error: Error) => this.#fail(error),
  };

  readonly #plain = {
    open: (socket: Socket<undefined>) => {
      if (this.phase === "closed" || this.owner.stopped) socket.terminate();
      else this.#socket = socket;
    },
    data: (socket: Socket<undefined>, chunk: Uint8Array) => this.#upgraded || this.#handlers.data(socket, chunk),
    drain: () => this.#upgraded || this.#handlers.drain(),
    close: () => this.#upgraded || this.#handlers.close(),
    error: (socket: Socket<undefined>, error: Error) => this.#upgraded || this.#handlers.error(socket, error),
  };

  #op(op: "INFO" | "PING" | "PONG" | "+OK" | "-ERR", rest: string): void {
    if (op === "PING") {
      if (!this.#pongQueued) this.#pongQueued = !this.send("PONG\r\n");
    } else if (op === "PONG") {
      this.#pong();
    } else if (op === "-ERR") {
      if (this.phase === "up") this.owner.events.refused(natsErrorText(rest));
      else this.#fail(new Error(`the server says ${natsErrorText(rest)}`));
    } else if (op === "INFO" && this.phase === "info") {
      this.#info(rest);
    }
  }

  /** The server's INFO: it must take headers; then TLS if wanted or required, else CONNECT. */
  #info(rest: string): void {
    let info: v.InferOutput<typeof NatsInfo>;
    try {
      info = v.parse(NatsInfo, JSON.parse(rest));
    } catch {
      throw new TypeError("Cannot decode NATS protocol: INFO is not the expected JSON");
    }
    if (info.headers !== true) return this.#fail(new Error("the server does not take message headers (NATS 2.2 or later is needed)"));
    this.owner.info(info.max_payload ?? NATS_MAX_MESSAGE);
    if (!this.#wantTls && !info.tls_required) return this.#connect(info);
    if (!info.tls_required && !info.tls_available) return this.#fail(new Error("the server offers no TLS"));
    this.#startTls(info);
  }

  #startTls(info: v.InferOutput<typeof NatsInfo>): void {
    this.phase = "tls";
    this.#upgraded = true;
    const [, tls] = this.#socket!.upgradeTLS<undefined>({
      tls: { ca: this.owner.options.ca, serverName: this.#url.hostname },
      socket: {
        ...this.#handlers,
        handshake: (_socket, success, error) => {
          if (!success || error) return this.#fail(new Error(`TLS: ${error?.message ?? "handshake failed"}`));
          this.#connect(info);
        },
      },
    } as Parameters<Socket<undefined>["upgradeTLS"]>[0]);
    this.#socket = tls;
  }

  /** CONNECT with the credentials (a token, or the nonce signed), then a PING whose PONG says it is up. */
  #connect(info: v.InferOutput<typeof NatsInfo>): void {
    const o = this.owner.options;
    let auth: unknown;
    try {
      auth = o.token !== undefined ? { auth_token: o.token } : (o.authenticator?.(info.nonce) ?? {});
    } catch {
      return this.#fail(new Error("the credentials cannot sign the server's nonce"));
    }
    const hello = { verbose: false, pedantic: false, tls_required: this.#upgraded, name: o.name, lang: "edge-relay", version: VERSION, protocol: 1, echo: false, headers: true, no_responders: false };
    this.phase = "connect";
    this.send(`CONNECT ${JSON.stringify({ ...hello, ...(auth as object) })}\r\nPING\r\n`);
  }

  /** The PONG to CONNECT's PING makes the connection up; later ones answer the oldest waiter. */
  #pong(): void {
    if (this.phase !== "connect") {
      // An unasked one proves nothing and settles nothing.
      const waiter = this.#pongs.shift();
      if (waiter === undefined) return;
      this.#pingsOut = 0;
      return waiter();
    }
    this.phase = "up";
    clearTimeout(this.#deadline);
    this.#keepalive = setInterval(this.#ping, NATS_PING_MS);
    for (const [sid, subject] of this.owner.subjects) this.send(`SUB ${subject} ${sid}\r\n`);
    this.owner.events.up(this.server);
    this.#opened.resolve();
  }

  readonly #ping = (): void => {
    if (this.#pingsOut >= NATS_PINGS_OUT) return this.#fail(new Error(`no PONG to ${NATS_PINGS_OUT} PINGs`));
    this.#pingsOut++;
    this.flush(this.owner.alive);
  };

  /** Ends the connection: before up, the open fails; once up, the link hears it was lost. */
  #fail(error: Error): void {
    if (this.phase === "closed") return;
    const wasUp = this.phase === "up";
    this.phase = "closed";
    if (wasUp) return this.owner.lost(this, error.message);
    clearTimeout(this.#deadline);
    this.close();
    this.#opened.reject(error);
  }

  /** Writes in order after what the socket has not taken yet; returns the bytes it took now. */
  write(bytes: Uint8Array): number {
    const socket = this.#socket;
    if (socket === undefined) return 0;
    const took = this.#pending.length ? 0 : Math.max(0, socket.write(bytes));
    if (took < bytes.length) {
      this.#pending.push(bytes.subarray(took));
      this.backlog += bytes.length - took;
      if (this.backlog > this.owner.options.maxBacklog && this.phase === "up") this.#fail(new Error(`the server took nothing of ${this.backlog} bytes`));
    }
    return took;
  }

  /** A protocol line; true when the socket took all of it. */
  send(line: string): boolean {
    const bytes = new TextEncoder().encode(line);
    return this.write(bytes) === bytes.length;
  }

  #flushPending(): void {
    const socket = this.#socket;
    while (socket !== undefined && this.#pending.length) {
      const bytes = this.#pending[0]!;
      const took = Math.max(0, socket.write(bytes));
      this.backlog -= took;
      if (took < bytes.length) return void (this.#pending[0] = bytes.subarray(took));
      this.#pending.shift();
    }
    this.#pongQueued = false;
  }

  /** Calls `done` once the server has handled everything written before (a PING's PONG). */
  flush(done: () => void): void {
    this.send("PING\r\n");
    this.#pongs.push(done);
  }

  close(): void {
    clearTimeout(this.#deadline);
    clearInterval(this.#keepalive);
    this.phase = "closed";
    this.#socket?.terminate();
    this.#socket = undefined;
    this.#pending = [];
    this.backlog = 0;
    this.#pongs = [];
  }
}

const BACKPLANE_BACKOFF_MIN_MS = 250;
/** Also the NATS client's longest wait between reconnects: NATS back, hubs share frames within about that. */
const BACKPLANE_BACKOFF_MAX_MS = 5_000;

/**
 * A connection to one of the NATS servers, speaking NATS's core protocol on Bun's own sockets:
 * INFO, CONNECT (token, NKey or credentials), SUB/UNSUB, HPUB, MSG/HMSG, PING/PONG. A lost or failed
 * connection is redialled, server after server, with the shared backoff; subscriptions are made
 * again on every connection. Each connection is a NatsSession; a new one starts empty.
 *
 * Why not the NATS client for JavaScript: the bench measured it at 5.5–6.4 µs per 1,500-byte frame
 * on the publishing hub and 3.7–4.2 µs on the receiving one, against about 3–3.6 µs each for this
 * (it copies every message twice more and writes through `node:net`); with it two hubs carry 0.40
 * of what one does at best, with this about half (bench/RESULTS.md). NATS's library still signs
 * the server's nonce.
 */
class NatsLink implements NatsSessionOwner {
  /** The largest message the server takes. */
  maxPayload = NATS_MAX_MESSAGE;
  readonly subjects = new Map<number, string>();
  #nextSid = 0;
  #nextServer = 0;
  readonly #redial = new Redialer(new Backoff(BACKPLANE_BACKOFF_MIN_MS, BACKPLANE_BACKOFF_MAX_MS), () => void this.#dial());
  /** The connection being made or up. */
  #session: NatsSession | undefined;

  constructor(
    readonly options: NatsLinkOptions,
    readonly events: NatsLinkEvents,
  ) {}

  /** The server connected to, or undefined. */
  get server(): string | undefined {
    return this.up ? this.#session!.server : undefined;
  }

  get up(): boolean {
    return this.#session?.phase === "up";
  }

  /** Bytes written but not yet taken by the socket. */
  get backlog(): number {
    return this.#session?.backlog ?? 0;
  }

  get stopped(): boolean {
    return this.#redial.stopped;
  }

  start(): void {
    void this.#dial();
  }

  async #dial(): Promise<void> {
    const servers = this.options.servers;
    const server = servers[this.#nextServer++ % servers.length]!;
    const session = (this.#session = new NatsSession(server, this));
    try {
      await session.open();
    } catch (error) {
      if (this.#redial.stopped) return;
      this.events.down(describeError(`cannot connect to ${server}`, error));
      this.#redial.retry();
    }
  }

  info(maxPayload: number): void {
    this.maxPayload = maxPayload;
  }

  /**
   * A keepalive answered: the connection has lasted, so the next loss starts the backoff afresh. (Not
   * at the handshake: a server that drops every connection right after it would be redialled flat out.)
   */
  readonly alive = (): void => this.#redial.backoff.reset();

  /** The connection is gone: what it had not written is dropped, and the link dials again. */
  lost(session: NatsSession, reason: string): void {
    if (session !== this.#session) return;
    session.close();
    this.#session = undefined;
    if (this.#redial.stopped) return;
    this.events.down(`lost ${session.server}: ${reason}`);
    this.#redial.retry();
  }

  /** Subscribes now or on the next connection; the id its messages come with. */
  subscribe(subject: string): number {
    const sid = ++this.#nextSid;
    this.subjects.set(sid, subject);
    if (this.up) this.#session!.send(`SUB ${subject} ${sid}\r\n`);
    return sid;
  }

  unsubscribe(sid: number): void {
    if (this.subjects.delete(sid) && this.up) this.#session!.send(`UNSUB ${sid}\r\n`);
  }

  /** Calls `done` once the server has handled everything written before (a PING's PONG). */
  flush(done: () => void): void {
    if (this.up) this.#session!.flush(done);
  }

  /**
   * Publishes the message that `batch` holds from `start` (written by `writeHpub`). When the socket
   * takes all of it the batch is reset for the next; otherwise the link keeps the batch's buffer.
   */
  publish(batch: FrameBatch, start: number): void {
    const message = batch.bytes.subarray(start, batch.used);
    if ((this.#session?.write(message) ?? 0) === message.length) batch.reset();
    else batch.take();
  }

  stop(): void {
    this.#redial.stop();
    this.#session?.close();
    this.#session = undefined;
  }
}

// ───────────────────────────── backplane ─────────────────────────────
//
// A network's frames travel on `edge-relay.CLUSTER.NETWORK`, batched per event-loop turn in the
// tunnel's data framing behind a header naming the hub. The HPUB line is written in front of the
// batch, so publishing copies nothing. While NATS is down frames for other hubs drop, counted.

/**
 * One backplane message at most. Measured (bench case `backplane`, nats-server 2.10): 16 and 32 KiB
 * do about as well, 32 a little better; at 64 KiB nats-server spends more per frame, and at 8 KiB
 * and below the hubs do.
 */
const BACKPLANE_MESSAGE_BYTES = 32 * 1024;

/**
 * The subject a network's frames travel on: `edge-relay.CLUSTER.NETWORK`. A '.' in a name would split
 * it into two subject tokens; names never hold '~', so writing '.' as '~' keeps subjects one-to-one.
 * @internal
 */
export function backplaneSubject(cluster: string, network: string): string {
  return `edge-relay.${cluster.replaceAll(".", "~")}.${network.replaceAll(".", "~")}`;
}

/** The header block every message of this hub carries: its id, so other hubs can name it. @internal */
export function natsHeaderBlock(hubId: string): Uint8Array {
  return new TextEncoder().encode(`NATS/1.0\r\n${BACKPLANE_HUB_HEADER}: ${hubId}\r\n\r\n`);
}

const HUB_HEADER_LINE = new RegExp(`\\r\\n${BACKPLANE_HUB_HEADER}: ([0-9a-f]{16})\\r\\n`, "i");

/** The hub id in a message's header block, when it is one. */
function hubOf(headers: Uint8Array): string | undefined {
  return HUB_HEADER_LINE.exec(LATIN1.decode(headers))?.[1];
}

/**
 * Writes `HPUB SUBJECT HLEN TOTAL\r\n` and the header block so that they end at `end` in `bytes`,
 * right before a payload of `payload` bytes that is already there; returns where they start.
 * Publishing then writes one buffer, and the payload is never copied to make the message.
 * @internal
 */
export function writeHpub(bytes: Uint8Array, end: number, subject: string, headers: Uint8Array, payload: number): number {
  const line = `HPUB ${subject} ${headers.length} ${headers.length + payload}\r\n`;
  const start = end - headers.length - line.length;
  if (start < 0) throw new RangeError(`Cannot encode NATS message: ${line.length + headers.length} bytes of protocol do not fit in ${end}`);
  for (let i = 0; i < line.length; i++) bytes[start + i] = line.charCodeAt(i);
  bytes.set(headers, end - headers.length);
  return start;
}

/** Room for `writeHpub`'s line and header block in front of a message of at most `max` bytes. @internal */
export function hpubRoom(subject: string, headers: Uint8Array, max: number): number {
  return `HPUB ${subject} ${headers.length} ${headers.length + max}\r\n`.length + headers.length;
}

interface BackplaneOptions {
  servers: string[];
  cluster: string;
  token?: string;
  /** A NATS credentials file, or an NKey user's seed. */
  creds?: { kind: "creds" | "seed"; text: string };
  ca?: string;
  identity: RelayIdentity;
  /** Bytes this hub may have on their way to NATS; beyond it frames drop (counted). */
  limit: number;
  /** Deadline for connecting to a server. */
  handshakeMs: number;
  log: Logger;
  countError(): void;
}

interface BackplaneStatus {
  servers: string[];
  cluster: string;
  state: "connecting" | "up" | "down" | "closed";
  since: string;
  /** The server it is connected to. */
  server: string | undefined;
  lastError: string | undefined;
  connects: number;
  messagesIn: number;
  messagesOut: number;
  bytesIn: number;
  bytesOut: number;
  /** Frames not published: NATS was down, or too much was still on its way. */
  drops: number;
  /** Messages from other hubs that did not decode (dropped). */
  errors: number;
}

interface BackplaneSnapshot extends BackplaneStatus {
  /** Networks subscribed to: those with a port on this hub. */
  networks: string[];
}

/**
 * One network's share of the backplane: what the switch forwards to it is published to the network's
 * subject, batched per event-loop turn in the tunnel's data framing; what other hubs publish there
 * comes in through it. One port stands for every other hub, so their MACs are learned behind it, and
 * a frame that came from the backplane never goes back into it.
 */
class BackplanePort extends BatchedPort {
  /** The subscription's id while the network has a port here. */
  sid: number | undefined;
  /** The server has the subscription: other hubs' messages for the network reach this hub. */
  subscribed = false;

  constructor(
    private readonly backplane: Backplane,
    readonly subject: string,
    /** Bytes in front of the batch's data header for the HPUB line and header block. */
    readonly room: number,
  ) {
    const header = new Uint8Array(room + DATA_HEADER_BYTES);
    header.set(dataHeader(0), room);
    super("backplane", backplane.shown, header, room + BACKPLANE_MESSAGE_BYTES);
    // Ranked below every tunnel: in a loop through a tunnel and the backplane, the tunnel is blocked.
    this.linkRank = "";
    this.queueLimit = backplane.options.limit;
  }

  /** What NATS has not taken yet, for every network together: senders into it pause on that. */
  override queued(): number {
    return this.backplane.queued();
  }

  protected reserve(bytes: number): boolean {
    return this.backplane.reserve(bytes);
  }

  protected sendBatch(batch: FrameBatch, reserved: number, frames: number): boolean {
    return this.backplane.publish(this, batch, reserved, frames);
  }

  /** Keeps messages within what the server takes: its max_payload, less the header block. */
  fit(maxPayload: number): void {
    this.maxBytes = this.room + Math.min(BACKPLANE_MESSAGE_BYTES, maxPayload - this.backplane.headerBytes);
  }

  readonly frame = (_channel: number, frame: Uint8Array): void => this.receive(frame);
}

/** Control messages have no place on the backplane. */
function noControl(control: ControlMessage): never {
  throw new TypeError(`Cannot decode backplane message: unexpected ${control.type}`);
}

/**
 * This hub's connection to NATS, and a port on every network that has a port here. While it is
 * not connected frames for other hubs are dropped and counted (never buffered without bound), and
 * local switching goes on.
 */
class Backplane {
  readonly status: BackplaneStatus;
  /** The servers as status and logs show them. */
  readonly shown: string;
  readonly #ports = new Map<string, BackplanePort>();
  readonly #bySid = new Map<number, BackplanePort>();
  readonly #headers: Uint8Array;
  /** The header block's size: a message's payload is smaller than the server's max_payload by it. */
  readonly headerBytes: number;
  readonly #link: NatsLink;
  readonly #log: { log(line: string): void };
  /** Bytes batched this turn, not yet handed to the link. */
  #batched = 0;

  constructor(readonly options: BackplaneOptions) {
    this.shown = options.servers.join(",");
    this.status = {
      servers: options.servers,
      cluster: options.cluster,
      state: "connecting",
      since: new Date().toISOString(),
      server: undefined,
      lastError: undefined,
      connects: 0,
      messagesIn: 0,
      messagesOut: 0,
      bytesIn: 0,
      bytesOut: 0,
      drops: 0,
      errors: 0,
    };
    this.#headers = natsHeaderBlock(options.identity.id);
    this.headerBytes = this.#headers.length;
    this.#log = rateLimitedLog(options.log.warn, 5, 10_000);
    const o = options;
    this.#link = new NatsLink(
      {
        servers: o.servers,
        name: o.identity.name,
        handshakeMs: o.handshakeMs,
        // Frames stay under the limit (reserve); beyond it are protocol lines and message overhead.
        maxBacklog: 2 * o.limit + 64 * 1024,
        ...(o.token !== undefined && { token: o.token }),
        ...(o.creds !== undefined && { authenticator: natsAuthenticator(o.creds) }),
        ...(o.ca !== undefined && { ca: o.ca }),
      },
      {
        up: (server) => this.#up(server),
        down: (reason) => this.#down(reason),
        message: (sid, headers, payload) => this.#received(sid, headers, payload),
        oversize: (sid, bytes) => this.#oversize(sid, bytes),
        refused: (text) => this.#refused(text),
        malformed: (message) => this.#malformed(message),
      },
    );
  }

  /** Connected: messages fit the server's max_payload; subscriptions count once the server has them. */
  #up(server: string): void {
    this.status.connects++;
    this.status.server = server;
    this.#setState("up");
    for (const port of this.#ports.values()) port.fit(this.#link.maxPayload);
    this.#link.flush(() => {
      for (const port of this.#ports.values()) port.subscribed = port.sid !== undefined;
    });
  }

  #down(reason: string): void {
    for (const port of this.#ports.values()) port.subscribed = false;
    this.#setState("down", reason);
  }

  #oversize(sid: number, bytes: number): void {
    const port = this.#bySid.get(sid);
    this.status.errors++;
    if (port !== undefined) port.stats.errors++;
    this.options.countError();
    this.#log.log(`backplane ${port?.network?.name ?? this.shown}: a message of ${bytes} bytes is more than a hub takes (${NATS_MAX_MESSAGE}); dropped`);
  }

  /** The server's -ERR while connected (a permissions violation): shown, and the connection stays. */
  #refused(text: string): void {
    this.status.lastError = `NATS: ${text}`;
    this.#log.log(`backplane: the NATS server refused: ${text}`);
  }

  #malformed(message: string): void {
    this.status.errors++;
    this.options.countError();
    this.#log.log(`backplane ${this.status.server ?? this.shown}: ${message}; connection dropped`);
  }

  get up(): boolean {
    return this.status.state === "up";
  }

  start(): void {
    this.#link.start();
  }

  /** Sets the state; a change is logged. */
  #setState(state: BackplaneStatus["state"], error?: string): void {
    if (!setLinkState(this.status, state, error)) return;
    const why = error === undefined ? "" : `: ${error}`;
    if (state === "up") this.options.log.info(`backplane: connected to ${this.status.server} (cluster ${this.options.cluster})`);
    else if (state === "down") this.options.log.warn(`backplane: ${this.shown}${why}; frames for other hubs are dropped until it is back`);
  }

  /** Gives `network` its backplane port (once). */
  join(network: Network): void {
    if (this.status.state === "closed" || this.#ports.has(network.name)) return;
    const subject = backplaneSubject(this.options.cluster, network.name);
    const port = new BackplanePort(this, subject, hpubRoom(subject, this.#headers, BACKPLANE_MESSAGE_BYTES));
    port.fit(this.#link.maxPayload);
    this.#ports.set(network.name, port);
    network.attach(port);
    const sid = this.#link.subscribe(subject);
    port.sid = sid;
    this.#bySid.set(sid, port);
    this.#link.flush(() => void (port.subscribed = port.sid === sid));
  }

  /** The network has no port here any more: stop hearing it. */
  leave(network: Network): void {
    const port = this.#ports.get(network.name);
    if (port === undefined) return;
    this.#ports.delete(network.name);
    if (port.sid !== undefined) {
      this.#link.unsubscribe(port.sid);
      this.#bySid.delete(port.sid);
    }
    port.sid = undefined;
    port.subscribed = false;
    network.detach(port, "no port on this hub uses the network");
  }

  snapshot(): BackplaneSnapshot {
    const networks: string[] = [];
    // While NATS is down no server has them; they are made again on the next connection.
    if (this.up) for (const [name, port] of this.#ports) if (port.subscribed) networks.push(name);
    return { ...this.status, networks };
  }

  /** What NATS has not taken yet, and this turn's batches. */
  queued(): number {
    return this.#link.backlog + this.#batched;
  }

  /** Room for `bytes` more: NATS is up and what it has not taken stays under the limit. */
  reserve(bytes: number): boolean {
    if (!this.up || this.queued() + bytes > this.options.limit) {
      this.status.drops++;
      return false;
    }
    this.#batched += bytes;
    return true;
  }

  /** Publishes a port's batch; false when NATS cannot take it (its frames are then dropped). */
  publish(port: BackplanePort, batch: FrameBatch, reserved: number, frames: number): boolean {
    this.#batched = Math.max(0, this.#batched - reserved);
    const payload = batch.used - port.room;
    if (!this.up || this.#headers.length + payload > this.#link.maxPayload) {
      // Batches fit the server's max_payload; only a frame bigger than that gets here.
      if (this.up) this.#log.log(`backplane: a frame of ${payload - DATA_HEADER_BYTES - 4} bytes is more than the NATS server takes (max_payload ${this.#link.maxPayload}); dropped`);
      batch.reset();
      this.status.drops += frames;
      return false;
    }
    const start = writeHpub(batch.bytes, port.room, port.subject, this.#headers, payload);
    batch.end(CRLF);
    this.#link.publish(batch, start);
    this.status.messagesOut++;
    this.status.bytesOut += payload;
    return true;
  }

  /** A message from another hub; one that does not decode is dropped, counted and logged. */
  #received(sid: number, headers: Uint8Array, payload: Uint8Array): void {
    const port = this.#bySid.get(sid);
    if (port === undefined) return;
    this.status.messagesIn++;
    this.status.bytesIn += payload.length;
    try {
      // Cut-through as from a tunnel: runs of frames to one port go on whole, the rest frame by frame.
      // A run joins the port's batch rather than going on as this message: NATS messages are small
      // (BACKPLANE_MESSAGE_BYTES) and come several to a read, and a site pays per message it takes
      // (bench `backplane`: site B's CPU per frame 1.09 µs against 1.44, the hub's the same).
      const network = port.network;
      let at = DATA_HEADER_BYTES;
      while (payload[0] === MSG_DATA && network !== undefined && at < payload.length) {
        const next = network.forwardRun(payload, at, payload.length, port, false);
        if (next === at) break;
        at = next;
      }
      decodeTunnelMessage(payload, noControl, port.frame, at);
    } catch (error) {
      this.status.errors++;
      port.stats.errors++;
      this.options.countError();
      const hub = hubOf(headers);
      this.#log.log(`backplane ${port.network?.name ?? port.subject}: ${(error as Error).message}${hub ? ` from hub ${hub}` : ""}; dropped`);
    }
  }

  async stop(): Promise<void> {
    this.status.state = "closed";
    this.#link.stop();
  }
}

// ───────────────────────────── QEMU stream ports ─────────────────────────────
//
// A connection (TCP or unix) is a StreamPort: the decoder on the way in, a StreamWriter batching a
// turn's frames into one write on the way out; pausing it stops reading the socket, which makes QEMU
// stop taking packets from its guest. --max-connections is kept under the open-file limit.

/** QEMU stream connections open across every --qemu-listen, and what happens beyond the cap. */
interface ConnectionCap {
  open: number;
  readonly max: number;
  refuse(peer: string): void;
}

/**
 * The cap on accepted QEMU connections, kept under the open-file limit: at that limit accept fails
 * with EMFILE, which the event loop retries at full speed, and nothing else gets a descriptor.
 */
function connectionCap(max: number, fdLimit: number, log: Logger, countRefused: () => void): ConnectionCap {
  // A quarter of the descriptors stays for HTTP clients, tunnels and the relay's own files.
  const allowed = Math.max(1, Math.floor((fdLimit * 3) / 4));
  if (max > allowed) log.warn(`--max-connections ${max} lowered to ${allowed}: the open-file limit is ${fdLimit}`);
  const refusals = rateLimitedLog(log.warn, 1, 60_000);
  return {
    open: 0,
    max: Math.min(max, allowed),
    refuse(peer) {
      countRefused();
      refusals.log(`qemu-listen: closed a connection from ${peer}: --max-connections ${this.max} reached; further ones are counted in /status`);
    },
  };
}

/** A QEMU stream connection (TCP or unix): length-prefixed frames both ways. */
class StreamPort extends Port {
  /** Room for a tunnel message's header in front of a reassembled frame and its length. */
  readonly decoder = new StreamDecoder(DATA_HEADER_BYTES);
  readonly writer: StreamWriter;
  /** What flow control left undecoded when it paused this port: decoded first when it reads again. */
  readonly #held = new HeldInput();

  constructor(
    kind: string,
    peer: string,
    readonly socket: Socket<StreamPort>,
    limit: number,
    budget: MemoryBudget,
    private readonly log: Logger,
    private readonly countError: () => void,
  ) {
    super(kind, peer);
    this.writer = new StreamWriter(this.#write, limit, budget);
    this.queueLimit = limit;
  }

  readonly #write = (data: Uint8Array): number => {
    const written = this.socket.write(data);
    // Bun reports a failed send (the peer reset) as -1 here, and the close that follows without an error.
    if (written < 0) this.closeReason ??= "write error";
    return written;
  };

  protected enqueue(frame: Uint8Array): boolean {
    // QEMU 7.2 stops receiving for good after a 0-length frame; runts never enter the switch anyway.
    return frame.length > 0 && this.writer.push(frame);
  }

  override readonly takesRuns = true;

  /** The run is already QEMU's stream framing: written as it is. */
  override enqueueRun(block: Uint8Array, start: number, end: number, frames: number): boolean {
    if (!this.writer.pushRun(block.subarray(start, end))) return false;
    this.countRun(frames, end - start - 4 * frames, true);
    return true;
  }

  override queued(): number {
    return this.writer.queued;
  }

  /** Not reading makes QEMU stop taking packets from its guest: backpressure reaches the guest's TCP. */
  protected override reading(on: boolean): boolean {
    if (this.state === "closed") return false;
    if (!on) {
      this.socket.pause();
      return true;
    }
    this.#held.drain(this.#decodeNow, this.#reads);
    if (this.waitingFor === undefined) this.socket.resume();
    return true;
  }

  /** Hands a frame to the switch; false (stop decoding) once flow control has paused this port. */
  readonly #frame = (frame: Uint8Array, owned: boolean): boolean => {
    if (!owned || !this.#forwardOwned(frame)) this.receive(frame);
    return this.waitingFor === undefined;
  };

  /** The frame a chunk finishes: the decoder stops after it, so the whole frames behind it can go as a run. */
  readonly #lastPiece = (frame: Uint8Array, owned: boolean): boolean => {
    if (!owned || !this.#forwardOwned(frame)) this.receive(frame);
    return false;
  };

  /**
   * A big frame the decoder reassembled, with its length and room for a message header in front,
   * goes on as a one-frame run: its bytes are copied once on this hop (into the decoder's buffer).
   */
  #forwardOwned(frame: Uint8Array): boolean {
    if (frame.length < OWN_MESSAGE_BYTES || this.network === undefined) return false;
    const message = new Uint8Array(frame.buffer, frame.byteOffset - 4 - DATA_HEADER_BYTES, DATA_HEADER_BYTES + 4 + frame.length);
    return this.network.forwardRun(message, DATA_HEADER_BYTES, message.length, this, true) === message.length;
  }

  /**
   * The frame in progress (from earlier chunks) is finished through the decoder, the whole frames
   * after it go to the switch as one run where it can take them, the rest through the decoder.
   * Returns what flow control left undecoded.
   */
  #forwardChunk(chunk: Uint8Array): Uint8Array {
    let rest = plainBytes(chunk);
    if (this.decoder.midFrame) {
      rest = this.decoder.push(rest, this.#lastPiece);
      if (rest.length === 0 || this.waitingFor !== undefined) return rest;
    }
    const network = this.network;
    while (network !== undefined && rest.length > 0) {
      const at = network.forwardRun(rest, 0, rest.length, this, false);
      if (at === 0) break;
      rest = rest.subarray(at);
      if (this.waitingFor !== undefined) return rest;
    }
    return rest.length === 0 ? EMPTY : this.decoder.push(rest, this.#frame);
  }

  /** Decodes a chunk; an oversize length closes this connection only, counted and logged once. */
  decode(chunk: Uint8Array): void {
    if (this.state === "closed") return;
    // Read while paused (already in flight): kept behind what is held, in order.
    if (!this.#held.empty) this.#held.push(chunk);
    else this.#decodeNow(chunk);
  }

  readonly #reads = (): boolean => this.waitingFor === undefined && this.state !== "closed";

  readonly #decodeNow = (chunk: Uint8Array): void => {
    try {
      const rest = this.#forwardChunk(chunk);
      if (rest.length > 0) this.#held.unshift(rest, 0);
    } catch (error) {
      this.stats.errors++;
      this.countError();
      this.state = "closed";
      this.closeReason = "oversize frame";
      this.log.warn(`${this.id} ${this.peer}: ${(error as Error).message}; closing the connection`);
      this.socket.end();
    }
  };
}

interface StreamContext {
  network: Network;
  budget: MemoryBudget;
  log: Logger;
  /** Counts a port closed for malformed input, relay-wide. */
  countError: () => void;
  limit: number;
  kind: string;
  /** Names the peer of a unix connection, which has no remote address. */
  unixPeer?: string;
  onClose?: () => void;
  /** Accepted connections are counted against it; beyond it they are closed at once. */
  cap?: ConnectionCap;
}

/** Socket handlers shared by --qemu-listen and --qemu-connect: one port per connection. */
function streamHandlers(ctx: StreamContext) {
  return {
    open(socket: Socket<StreamPort>) {
      const peer = socket.remoteAddress ? formatHostPort({ host: socket.remoteAddress, port: socket.remotePort }) : ctx.unixPeer ?? "unix";
      if (ctx.cap !== undefined) {
        if (ctx.cap.open >= ctx.cap.max) {
          ctx.cap.refuse(peer);
          // No port, no goodbye: the descriptor is what is scarce.
          socket.terminate();
          return;
        }
        ctx.cap.open++;
      }
      const port = new StreamPort(ctx.kind, peer, socket, ctx.limit, ctx.budget, ctx.log, ctx.countError);
      socket.data = port;
      ctx.network.attach(port);
    },
    data(socket: Socket<StreamPort>, chunk: Uint8Array) {
      socket.data.decode(chunk);
    },
    drain(socket: Socket<StreamPort>) {
      socket.data.writer.drain();
    },
    /** `error`: a reset seen on reading, as `read error: connection reset by peer (ECONNRESET)`. */
    close(socket: Socket<StreamPort>, error?: Error) {
      if (socket.data) {
        if (error) socket.data.closeReason ??= describeError(`${(error as { syscall?: string }).syscall ?? "socket"} error`, error);
        socket.data.writer.close();
        ctx.network.detach(socket.data);
        if (ctx.cap !== undefined) ctx.cap.open--;
      }
      ctx.onClose?.();
    },
    // Bun calls it when a handler throws; the connection stays up, so it gives no close reason.
    error(socket: Socket<StreamPort>, error: Error) {
      if (socket.data) socket.data.stats.errors++;
      ctx.log.warn(describeError(`${socket.data?.id ?? ctx.kind} ${socket.data?.peer ?? ""}`.trim(), error));
    },
  };
}

/** A TCP or unix listener for QEMU stream clients; each connection becomes a port. */
async function listenStream(address: SocketAddress, ctx: StreamContext): Promise<{ address: string; stop(): void }> {
  try {
    if ("path" in address) {
      claimUnixPath(address.path);
      const listener = Bun.listen<StreamPort>({ unix: bunUnixPath(address.path), socket: streamHandlers({ ...ctx, unixPeer: formatAddress(address) }) });
      return { address: formatAddress(address), stop: () => listener.stop(true) };
    }
    const listener = Bun.listen<StreamPort>({ hostname: address.host, port: address.port, socket: streamHandlers(ctx) });
    return { address: formatHostPort({ host: address.host, port: listener.port }), stop: () => listener.stop(true) };
  } catch (error) {
    throw new Error(describeError(`Cannot listen on ${formatAddress(address)}`, error));
  }
}

const DIAL_BACKOFF_MIN_MS = 100;
const DIAL_BACKOFF_MAX_MS = 5_000;

/** How a --qemu-connect dialer is doing, for status. */
interface DialStatus {
  network: string;
  target: string;
  state: "connecting" | "up";
  since: string;
  attempts: number;
  lastError: string | undefined;
}

/** Dials a listening QEMU until it answers, and again (with backoff) whenever it goes away. */
class QemuDialer {
  readonly status: DialStatus;
  readonly target: string;
  readonly #redial = new Redialer(new Backoff(DIAL_BACKOFF_MIN_MS, DIAL_BACKOFF_MAX_MS), () => void this.#dial());
  readonly #handlers: ReturnType<typeof streamHandlers>;
  #socket: Socket<StreamPort> | undefined;

  constructor(
    readonly address: SocketAddress,
    private readonly ctx: StreamContext,
  ) {
    this.target = formatAddress(address);
    this.status = { network: ctx.network.name, target: this.target, state: "connecting", since: new Date().toISOString(), attempts: 0, lastError: undefined };
    const handlers = streamHandlers({ ...ctx, unixPeer: this.target, onClose: () => this.#retry() });
    const open = handlers.open;
    handlers.open = (socket) => {
      open(socket);
      this.#redial.backoff.reset();
      setLinkState(this.status, "up");
      this.#redial.log(ctx.log.info, `qemu-connect ${ctx.network.name}: connected to ${this.target}`);
    };
    this.#handlers = handlers;
    void this.#dial();
  }

  async #dial(): Promise<void> {
    const { address, ctx } = this;
    this.status.attempts++;
    try {
      this.#socket =
        "path" in address
          ? await Bun.connect<StreamPort>({ unix: bunUnixPath(address.path), socket: this.#handlers })
          : await Bun.connect<StreamPort>({ hostname: address.host, port: address.port, socket: this.#handlers });
      if (this.#redial.stopped) this.#socket.end();
    } catch (error) {
      this.status.lastError = describeError("cannot connect", error);
      this.#redial.log(ctx.log.info, `qemu-connect ${ctx.network.name}: ${this.status.lastError.replace("cannot connect", `cannot connect to ${this.target}`)}; retrying with backoff`);
      this.#retry();
    }
  }

  #retry(): void {
    this.#socket = undefined;
    if (this.#redial.stopped) return;
    if (this.status.state === "up") this.#redial.log(this.ctx.log.info, `qemu-connect ${this.ctx.network.name}: disconnected from ${this.target}; redialling`);
    setLinkState(this.status, "connecting");
    this.#redial.retry();
  }

  stop(): void {
    this.#redial.stop();
    this.#socket?.end();
  }
}

// ───────────────────────────── QEMU datagram ports ─────────────────────────────
//
// One frame per datagram. UDP goes through Bun (a turn's sends in one sendMany); unix datagrams are
// received by a worker thread blocking in recvfrom, with a bounded backlog. A socket without a fixed
// remote learns peers, within a rate and a table size, so a spoofed flood cannot lock a VM out.

const MSG_DONTWAIT_NOSIGNAL = 0x40 | 0x4000;

const SO_RCVTIMEO = 20;
const SO_RCVBUF = 8;
const MSG_TRUNC = 0x20;
const EINTR = 4;
const EAGAIN = 11;

/** What a datagram port needs from its socket: one frame to one address, and nothing kept. */
interface DatagramSocket {
  /** The bound address, as logged. */
  readonly address: string;
  /** The largest frame one datagram carries. */
  readonly maxFrame: number;
  /** The receive buffer the kernel granted, bytes (it counts overhead per datagram against it). */
  readonly receiveBuffer: number;
  /** The key `OnDatagram` gets for datagrams from `address`. */
  keyOf(address: SocketAddress): string;
  /**
   * Sends or queues a frame; false when it is dropped at once. A queued frame the kernel then
   * refuses (a peer gone: ICMP port unreachable) moves from `stats`' tx frames to its tx drops.
   */
  send(frame: Uint8Array, to: SocketAddress, stats?: PortStats): boolean;
  /** Datagrams dropped because the relay fell behind (unix sockets: the receiver thread's count). */
  overruns(): number;
  /**
   * Datagrams the kernel dropped at this socket, its receive buffer full (UDP). A unix datagram
   * sender is held back instead (EAGAIN), so a unix socket counts none here.
   */
  kernelDrops(): number;
  close(): void | Promise<void>;
}

/**
 * Asked for on every datagram socket. The default (rmem_default, 208 KiB here) holds about 90
 * frames of 1,500 B: one slow event-loop turn at 100k frames/s. The kernel caps it at
 * net.core.rmem_max (raising that is the host's call) and doubles it for its overhead.
 */
const DATAGRAM_RECEIVE_BUFFER = 4 * 1024 * 1024;

/** The receive buffer the kernel grants `fd`, after asking for `bytes` if given. */
function receiveBuffer(fd: number, bytes?: number): number {
  const c = libc();
  const value = new Int32Array([bytes ?? 0]);
  if (bytes !== undefined) c.setsockopt(fd, SOL_SOCKET, SO_RCVBUF, value, 4);
  const length = new Uint32Array([4]);
  return c.getsockopt(fd, SOL_SOCKET, SO_RCVBUF, value, length) === 0 ? value[0]! : 0;
}

/** The inode of the socket behind `fd`: how /proc/net/udp names it. */
function socketInode(fd: number): string | undefined {
  return /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/self/fd/${fd}`))?.[1];
}

/**
 * Datagrams the kernel dropped at a UDP socket, mostly for a full receive buffer: the `drops`
 * column of /proc/net/udp (or udp6), found by the socket's inode.
 */
function udpKernelDrops(inode: string): number {
  for (const table of ["/proc/net/udp", "/proc/net/udp6"]) {
    let text: string;
    try {
      text = readFileSync(table, "latin1");
    } catch {
      continue;
    }
    for (const line of text.split("\n")) {
      // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
      const fields = line.trim().split(/\s+/);
      if (fields[9] === inode) return Number(fields[12]) || 0;
    }
  }
  return 0;
}

/** A UDP send batch holds this much before it goes out early: a turn's frames, in one copy. */
const UDP_SEND_BATCH_BYTES = 256 * 1024;

/** Called per datagram with a key naming the sender; `from` builds its address only when needed. */
type OnDatagram = (data: Uint8Array, key: string, from: () => SocketAddress) => void;

/** A datagram peer (UDP or unix) or a multicast group: one frame per datagram. */
class DatagramPort extends Port {
  lastHeard = Date.now();
  constructor(
    kind: string,
    private readonly socket: DatagramSocket,
    readonly to: SocketAddress,
  ) {
    super(kind, formatAddress(to));
  }

  protected enqueue(frame: Uint8Array): boolean {
    return frame.length > 0 && frame.length <= this.socket.maxFrame && this.socket.send(frame, this.to, this.stats);
  }
}

async function openUdp(address: HostPort, onDatagram: OnDatagram, onError: (error: Error) => void, flags = 0): Promise<DatagramSocket & { socket: udp.Socket<"buffer"> }> {
  // The sender of the datagram at hand; `from` reads them, so no closure is made per datagram, and
  // a key is made only when the sender changes.
  let fromHost = "";
  let fromPort = 0;
  let fromKey = "";
  const from = (): HostPort => ({ host: fromHost, port: fromPort });
  const options: udp.SocketOptions<"buffer"> & { flags: number } = {
    hostname: address.host,
    port: address.port,
    flags,
    socket: {
      data(_socket, data, port, host) {
        if (port !== fromPort || host !== fromHost) {
          fromHost = host;
          fromPort = port;
          fromKey = `${host}:${port}`;
        }
        onDatagram(data, fromKey, from);
      },
      // Bun calls it as error(err), whatever its type says.
      error: onError as unknown as udp.SocketHandler<"buffer">["error"],
    },
  };
  const socket = await Bun.udpSocket(options);
  const granted = receiveBuffer(socket.fd, DATAGRAM_RECEIVE_BUFFER);
  const inode = socketInode(socket.fd);
  // Frames sent in one event-loop turn go out in one sendMany, copied into one reused buffer (the
  // caller's frame need not outlive the call); Bun's send is one system call per datagram.
  const batch = new Uint8Array(UDP_SEND_BATCH_BYTES);
  let batchUsed = 0;
  const batchArgs: (Uint8Array | number | string)[] = [];
  const batchStats: (PortStats | undefined)[] = [];
  let flushing = false;
  /** How many of the queued datagrams from index `from` on the kernel took; a throw counts as a refusal, since no port's send is left to catch it. */
  function sendSome(from: number): number {
    try {
      return socket.sendMany(from === 0 ? batchArgs : batchArgs.slice(from * 3));
    } catch {
      return 0;
    }
  }
  function flushSends(): void {
    flushing = false;
    const frames = batchStats.length;
    let at = 0;
    while (at < frames) {
      at += socket.closed ? 0 : sendSome(at);
      // Short: the datagram at `at` was refused (a peer gone, or the socket closed); the rest may still go.
      if (at < frames) {
        const stats = batchStats[at];
        if (stats) {
          stats.txFrames--;
          stats.txBytes -= (batchArgs[at * 3] as Uint8Array).length;
          stats.txDrops++;
        }
        at++;
      }
    }
    batchArgs.length = 0;
    batchStats.length = 0;
    batchUsed = 0;
  }
  return {
    socket,
    address: formatHostPort({ host: address.host, port: socket.port }),
    maxFrame: MAX_DATAGRAM,
    receiveBuffer: granted,
    keyOf: (to) => `${canonicalIp((to as HostPort).host)}:${(to as HostPort).port}`,
    send(frame, to, stats) {
      if (socket.closed) return false;
      if (batchUsed + frame.length > batch.length) flushSends();
      batch.set(frame, batchUsed);
      batchArgs.push(batch.subarray(batchUsed, batchUsed + frame.length), (to as HostPort).port, (to as HostPort).host);
      batchStats.push(stats);
      batchUsed += frame.length;
      if (!flushing) {
        flushing = true;
        setImmediate(flushSends);
      }
      return true;
    },
    overruns: () => 0,
    kernelDrops: () => (inode === undefined ? 0 : udpKernelDrops(inode)),
    close: () => socket.close(),
  };
}

/** Bytes of datagrams a unix receiver may have posted to the main thread that it has not yet taken. @internal */
export const UNIX_DGRAM_BACKLOG = 4 * 1024 * 1024;
/** What one posted message counts against the backlog besides its bytes: an empty one is not free. @internal */
export const UNIX_DGRAM_MESSAGE_COST = 256;
/** Slots of the receiver's shared state. */
const RX_STOP = 0;
const RX_BACKLOG = 1;
const RX_OVERRUNS = 2;
/** How long close() waits for the receiver to notice a stop (it wakes every 100 ms). */
const RX_STOP_WAIT_MS = 1_000;

/**
 * Receives on a blocking unix datagram socket in a worker thread and posts each datagram back,
 * handing over its buffer rather than copying it again. While the main thread is behind by
 * UNIX_DGRAM_BACKLOG, datagrams are dropped here and counted, so a busy relay cannot queue without
 * end. MSG_TRUNC makes recvfrom report a datagram's real length, so one too big for a frame is
 * dropped whole rather than cut short.
 */
const UNIX_DGRAM_RECEIVER = `
import { dlopen, FFIType, read } from "bun:ffi";
const c = dlopen("libc.so.6", {
  recvfrom: { args: [FFIType.i32, FFIType.ptr, FFIType.u64, FFIType.i32, FFIType.ptr, FFIType.ptr], returns: FFIType.i32 },
  __errno_location: { args: [], returns: FFIType.ptr },
}).symbols;
self.onmessage = ({ data: { fd, shared } }) => {
  const state = new Int32Array(shared);
  const buf = new Uint8Array(${MAX_FRAME});
  const addr = new Uint8Array(112);
  const addrLen = new Uint32Array(1);
  // Counts a message against the backlog, or an overrun when the main thread is that far behind.
  const admit = (cost) => {
    if (Atomics.load(state, ${RX_BACKLOG}) + cost > ${UNIX_DGRAM_BACKLOG}) return void Atomics.add(state, ${RX_OVERRUNS}, 1);
    Atomics.add(state, ${RX_BACKLOG}, cost);
    return true;
  };
  while (Atomics.load(state, ${RX_STOP}) === 0) {
    addrLen[0] = 110;
    const n = c.recvfrom(fd, buf, buf.length, ${MSG_TRUNC}, addr, addrLen);
    if (n > buf.length) {
      if (admit(${UNIX_DGRAM_MESSAGE_COST})) postMessage({ oversize: n, cost: ${UNIX_DGRAM_MESSAGE_COST} });
    } else if (n >= 0) {
      const cost = n + ${UNIX_DGRAM_MESSAGE_COST};
      if (admit(cost)) {
        const data = buf.slice(0, n).buffer;
        const from = addr.slice(0, addrLen[0]).buffer;
        postMessage({ data, from, cost }, [data, from]);
      }
    } else {
      const errno = read.i32(c.__errno_location(), 0);
      if (errno !== ${EAGAIN} && errno !== ${EINTR}) { postMessage({ errno }); break; }
    }
  }
  postMessage({ done: true });
};
`;

/**
 * A peer's identity: its address bytes, unchanged (a name need not be UTF-8), as a binary string.
 * A filesystem path ends at its first NUL however long the kernel says the address is.
 */
function sockaddrKey(addr: Uint8Array): string {
  const end = addr[2] === 0 ? addr.length : addr.indexOf(0, 2);
  return Buffer.from(addr.buffer, addr.byteOffset, end < 0 ? addr.length : end).toString("latin1");
}

/** For logs and status only: never sent back to, since a lossy decode may change the bytes. */
function displaySockaddr(addr: Uint8Array): string {
  const decode = (b: Uint8Array) => new TextDecoder().decode(b);
  return addr[2] === 0 ? `@${decode(addr.subarray(3))}` : decode(addr.subarray(2, sockaddrKey(addr).length));
}

/** A unix peer with the address bytes it sent from: what a reply goes to. */
interface UnixPeer extends UnixPath {
  sockaddr?: Uint8Array;
}

/**
 * A unix datagram socket bound to `path` (a stale file of a killed process is replaced). Peers are
 * told apart by their raw address bytes.
 * @internal
 */
export async function openUnixDgram(
  path: string,
  onDatagram: OnDatagram,
  events: { oversize?(bytes: number): void; overrun?(total: number): void; failed?(message: string): void } = {},
): Promise<DatagramSocket> {
  const c = libc();
  const local = sockaddrUnix(path);
  claimUnixPath(path);
  const fd = c.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw errnoError("socket");
  if (c.bind(fd, local, local.length) !== 0) {
    const error = errnoError("bind");
    c.close(fd);
    throw error;
  }
  // The receiver wakes every 100 ms to notice a stop without closing the fd under it.
  const timeout = new BigInt64Array([0n, 100_000n]);
  c.setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, timeout, 16);
  const shared = new SharedArrayBuffer(12);
  const state = new Int32Array(shared);
  const worker = new Worker(URL.createObjectURL(new Blob([UNIX_DGRAM_RECEIVER], { type: "application/javascript" })));
  // Settles once the receiver is gone, however it went: a stop, a failed recvfrom, or an exception.
  const { promise: done, resolve: finished } = Promise.withResolvers<void>();
  let gone = false;
  /** Says once why receiving stopped, unless close() asked for it. */
  const receiverGone = (why: string | undefined) => {
    if (!gone && why !== undefined && Atomics.load(state, RX_STOP) === 0) events.failed?.(why);
    gone = true;
    finished();
  };
  worker.addEventListener("close", () => receiverGone("receiving stopped: the receiver thread exited"));
  worker.onerror = (event) => {
    // Bun's message is the formatted report; its "error: …" line is the exception's own message.
    receiverGone(`receiving stopped: the receiver thread failed: ${/^error: (.*)$/m.exec(event.message)?.[1] ?? "unknown error"}`);
  };
  let overruns = 0;
  // The sender of the datagram at hand; `sender` reads it, so no closure is made per datagram.
  let from = EMPTY;
  function sender(): UnixPeer {
    return { path: displaySockaddr(from), sockaddr: from };
  }
  worker.onmessage = function onReceived({ data }) {
    if (data.cost) Atomics.sub(state, RX_BACKLOG, data.cost);
    if (Atomics.load(state, RX_OVERRUNS) !== overruns) events.overrun?.((overruns = Atomics.load(state, RX_OVERRUNS)));
    if (data.data) {
      from = new Uint8Array(data.from);
      // An unbound sender has no address to answer to.
      if (from.length <= 2) return;
      onDatagram(new Uint8Array(data.data), sockaddrKey(from), sender);
    } else if (data.oversize) events.oversize?.(data.oversize);
    else if (data.errno) receiverGone(describeError("receiving stopped", errnoError("recvfrom", data.errno)));
    else if (data.done) receiverGone(undefined);
  };
  worker.postMessage({ fd, shared });
  return {
    address: formatAddress({ path }),
    maxFrame: MAX_FRAME,
    // A unix datagram socket's queue is bounded by count (net.unix.max_dgram_qlen) and the sender's
    // buffer, and a full one holds the sender back: this buffer is shown, not raised.
    receiveBuffer: receiveBuffer(fd),
    keyOf: (to) => sockaddrKey(sockaddrUnix((to as UnixPath).path)),
    send(frame, to) {
      const peer = to as UnixPeer;
      const addr = (peer.sockaddr ??= sockaddrUnix(peer.path));
      return c.sendto(fd, frame, frame.length, MSG_DONTWAIT_NOSIGNAL, addr, addr.length) === frame.length;
    },
    overruns: () => Atomics.load(state, RX_OVERRUNS),
    kernelDrops: () => 0,
    async close() {
      Atomics.store(state, RX_STOP, 1);
      // A receiver that neither stops nor fails (wedged) is not waited for: stopping must finish.
      const waited = setTimeout(finished, RX_STOP_WAIT_MS);
      await done;
      clearTimeout(waited);
      worker.terminate();
      c.close(fd);
      if (!path.startsWith("@")) rmSync(path, { force: true });
    },
  };
}

/** A --qemu-udp socket in /status: its peers and what it dropped rather than make a port of. */
interface DatagramStatus {
  network: string;
  address: string;
  /** The fixed REMOTE: then nothing else is accepted. */
  remote: string | undefined;
  peers: number;
  /** Learned peers forgotten to make room for a new one. */
  evicted: number;
  /** The socket's receive buffer as the kernel granted it, bytes. */
  receiveBuffer: number;
  /** Datagrams dropped rather than made a port of, or lost at the socket. */
  drops: {
    /** From a source other than the fixed REMOTE. */
    foreign: number;
    /** Shorter than an Ethernet header, from a source not yet a peer. */
    runts: number;
    /** From new sources beyond the new-peer rate. */
    throttled: number;
    /** While the relay was behind (unix sockets); see DatagramSocket.overruns. */
    overruns: number;
    /** By the kernel, the socket's receive buffer full while the relay was behind (UDP; /proc/net/udp `drops`). */
    kernel: number;
  };
}

/** What a --qemu-udp socket needs of the relay. */
interface DatagramContext {
  network: Network;
  log: Logger;
  ageingMs: number;
  maxPeers: number;
  countError: () => void;
}

/** Learned datagram peers are forgotten after this much silence, or the MAC ageing time if shorter. */
const UDP_PEER_AGEING_MS = 60_000;
/** New peers one --qemu-udp socket learns per second: a spoofed flood cannot churn the table faster. */
const NEW_UDP_PEERS_PER_SECOND = 16;

/**
 * A datagram socket for QEMU dgram/udp netdevs: every distinct source address is its own port, or,
 * with a fixed remote, that remote is the only port and other sources are dropped and counted.
 */
class DatagramBinding {
  /** Peers by key, from least to most recently heard. */
  readonly #peers = new Map<string, DatagramPort>();
  readonly #status: DatagramStatus;
  readonly #peerAgeingMs: number;
  readonly #logs: Record<"foreign" | "runts" | "throttled" | "evicted" | "overruns", { log(line: string): void }>;
  #where: string;
  #oversized = 0;
  #socket!: DatagramSocket;
  #fixed: DatagramPort | undefined;
  #fixedKey: string | undefined;
  /** New peers learned in the current second. */
  #windowStart = 0;
  #learnedInWindow = 0;

  /** Binds `address`; throws a one-line error naming it when it cannot. */
  static async bind(address: SocketAddress, remote: SocketAddress | undefined, ctx: DatagramContext): Promise<DatagramBinding> {
    const binding = new DatagramBinding(address, remote, ctx);
    await binding.#open(address, remote);
    return binding;
  }

  private constructor(
    address: SocketAddress,
    remote: SocketAddress | undefined,
    private readonly ctx: DatagramContext,
  ) {
    this.#where = `qemu-udp ${ctx.network.name} ${formatAddress(address)}`;
    this.#peerAgeingMs = Math.min(ctx.ageingMs, UDP_PEER_AGEING_MS);
    this.#status = {
      network: ctx.network.name,
      address: formatAddress(address),
      remote: remote && formatAddress(remote),
      peers: 0,
      evicted: 0,
      receiveBuffer: 0,
      drops: { foreign: 0, runts: 0, throttled: 0, overruns: 0, kernel: 0 },
    };
    const limited = () => rateLimitedLog(ctx.log.warn, 1, 60_000);
    this.#logs = { foreign: limited(), runts: limited(), throttled: limited(), evicted: limited(), overruns: limited() };
  }

  get socket(): DatagramSocket {
    return this.#socket;
  }

  async #open(address: SocketAddress, remote: SocketAddress | undefined): Promise<void> {
    const { ctx } = this;
    const receive = remote ? this.#onFixedDatagram : this.#onDatagram;
    try {
      this.#socket =
        "path" in address
          ? await openUnixDgram(address.path, receive, {
              oversize: (bytes) => {
                ctx.countError();
                if (this.#oversized++ === 0) ctx.log.warn(`${this.#where}: dropped a ${bytes}-byte datagram (frames are at most ${MAX_FRAME} bytes); further ones are only counted`);
              },
              overrun: (total) => this.#logs.overruns.log(`${this.#where}: the relay fell behind and dropped datagrams (${total} so far); further ones are counted in /status`),
              failed: (message) => ctx.log.warn(`${this.#where}: ${message}`),
            })
          : await openUdp(address, receive, this.#onError);
    } catch (error) {
      throw new Error(describeError(`Cannot listen on ${"path" in address ? "" : "udp "}${formatAddress(address)}`, error));
    }
    // Logs name the bound port, not the :0 asked for.
    this.#where = `qemu-udp ${ctx.network.name} ${this.#socket.address}`;
    this.#status.address = this.#socket.address;
    if (remote) {
      this.#fixed = new DatagramPort("qemu-udp", this.#socket, remote);
      this.#fixedKey = this.#socket.keyOf(remote);
      this.#peers.set(this.#fixedKey, this.#fixed);
      ctx.network.attach(this.#fixed);
    }
  }

  /** With a fixed remote anyone else could inject frames into the segment, so only it is heard. */
  readonly #onFixedDatagram: OnDatagram = (data, key, from) => {
    if (key === this.#fixedKey) this.#fixed!.receive(data);
    else {
      this.#status.drops.foreign++;
      this.#logs.foreign.log(`${this.#where}: dropped a datagram from ${formatAddress(from())}, not the fixed remote ${this.#status.remote}; further ones are counted in /status`);
    }
  };

  readonly #onDatagram: OnDatagram = (data, key, from) => {
    const peer = this.#peers.get(key);
    if (peer === undefined) {
      this.#learn(data, key, from);
      return;
    }
    const now = this.ctx.network.now();
    if (peer.lastHeard !== now) {
      // Moved to the end at most once per clock tick: the map runs from least to most recently heard.
      peer.lastHeard = now;
      this.#peers.delete(key);
      this.#peers.set(key, peer);
    }
    peer.receive(data);
  };

  /**
   * A source that is not a peer yet becomes one only with a whole frame and within the new-peer
   * rate; a full table forgets its least recently heard peer, so a flood cannot lock a VM out.
   */
  #learn(data: Uint8Array, key: string, from: () => SocketAddress): void {
    const { ctx } = this;
    const drops = this.#status.drops;
    if (data.length < MIN_FRAME) {
      drops.runts++;
      this.#logs.runts.log(`${this.#where}: dropped a ${data.length}-byte datagram from ${formatAddress(from())}, not a frame, from a source that is not a peer; further ones are counted in /status`);
      return;
    }
    const now = ctx.network.now();
    if (now - this.#windowStart >= 1000) {
      this.#windowStart = now;
      this.#learnedInWindow = 0;
    }
    if (this.#learnedInWindow >= NEW_UDP_PEERS_PER_SECOND) {
      drops.throttled++;
      this.#logs.throttled.log(`${this.#where}: more than ${NEW_UDP_PEERS_PER_SECOND} new peers in a second; dropping datagrams from new sources (first ${formatAddress(from())}); further ones are counted in /status`);
      return;
    }
    this.#learnedInWindow++;
    if (this.#peers.size >= ctx.maxPeers) {
      const [oldKey, oldest] = this.#peers.entries().next().value!;
      this.#peers.delete(oldKey);
      ctx.network.detach(oldest, "evicted: --udp-peers full");
      this.#status.evicted++;
      this.#logs.evicted.log(`${this.#where}: ${ctx.maxPeers} peers (--udp-peers); forgot ${oldest.peer}, the least recently heard; further ones are counted in /status`);
    }
    const peer = new DatagramPort("qemu-udp", this.#socket, from());
    peer.lastHeard = now;
    this.#peers.set(key, peer);
    ctx.network.attach(peer);
    peer.receive(data);
  }

  readonly #onError = (error: Error): void => {
    // ICMP port unreachable: the peer is not there (yet); QEMU dgram peers come and go.
    if ((error as { code?: string }).code !== "ECONNREFUSED") {
      this.ctx.log.warn(describeError(this.#where, error));
    }
  };

  /** Learned peers silent for their ageing time are forgotten; a fixed remote stays. */
  sweep(): void {
    const now = this.ctx.network.now();
    for (const [key, peer] of this.#peers) {
      if (peer !== this.#fixed && now - peer.lastHeard >= this.#peerAgeingMs) {
        this.#peers.delete(key);
        this.ctx.network.detach(peer, "aged out");
      }
    }
  }

  /** Every peer goes down (the relay is stopping), then the socket closes. */
  close(): void | Promise<void> {
    for (const peer of this.#peers.values()) this.ctx.network.detach(peer);
    this.#peers.clear();
    return this.#socket.close();
  }

  status(): DatagramStatus {
    const socket = this.#socket;
    return {
      ...this.#status,
      peers: this.#peers.size,
      receiveBuffer: socket.receiveBuffer,
      drops: { ...this.#status.drops, overruns: socket.overruns(), kernel: socket.kernelDrops() },
    };
  }
}

/** Bun.udpSocket's undocumented flag for SO_REUSEADDR (what node:dgram passes for reuseAddr). */
const UDP_REUSEADDR = 16;

/**
 * Bridges a QEMU multicast segment into a network as one port. QEMU members share the group port
 * (SO_REUSEADDR) and loop multicast back, so the relay joins with the same flag and sends from a
 * socket of its own, whose looped-back copies it recognises by source and drops.
 */
async function joinMulticast(
  group: HostPort,
  localAddress: string | undefined,
  ctx: { network: Network; log: Logger },
): Promise<{ address: string; close(): void }> {
  const where = `multicast ${formatHostPort(group)}${localAddress ? ` on ${localAddress}` : ""}`;
  const ignoreRefused = (error: Error) => {
    if ((error as { code?: string }).code !== "ECONNREFUSED") ctx.log.warn(describeError(`qemu-mcast ${ctx.network.name} ${where}`, error));
  };
  let sender: Awaited<ReturnType<typeof openUdp>> | undefined;
  try {
    sender = await openUdp({ host: localAddress ?? "0.0.0.0", port: 0 }, () => {}, ignoreRefused);
    if (localAddress) sender.socket.setMulticastInterface(localAddress);
    sender.socket.setMulticastLoopback(true);
    const port = new DatagramPort("qemu-mcast", sender, group);
    const own = sender.socket.port;
    const receiver = await openUdp(
      group,
      function onGroupDatagram(data, _key, from) {
        const source = from() as HostPort;
        if (source.port === own && (localAddress === undefined || source.host === localAddress)) return;
        port.receive(data);
      },
      ignoreRefused,
      UDP_REUSEADDR,
    );
    if (!receiver.socket.addMembership(group.host, localAddress)) {
      receiver.close();
      throw new Error("the system refused the membership");
    }
    ctx.network.attach(port);
    return { address: receiver.address, close: () => (ctx.network.detach(port), receiver.close(), sender!.close()) };
  } catch (error) {
    sender?.close();
    throw new Error(describeError(`Cannot join ${where}`, error));
  }
}

// ───────────────────────────── DHCP packets ─────────────────────────────
//
// Every byte read here comes from a guest: the decoders check each length and field and throw
// RangeError on anything malformed (the host counts and drops it). The encoders build whole frames,
// checksums included; DHCP replies are padded to BOOTP's minimum, which some clients require.

const ETHERTYPE_IPV4 = 0x0800;
const ETHERTYPE_ARP = 0x0806;
const IP_ICMP = 1;
const IP_UDP = 17;
const DHCP_SERVER_PORT = 67;
const DHCP_CLIENT_PORT = 68;
const DNS_PORT = 53;
const DHCP_MAGIC = 0x63825363;
/** The fixed part of a DHCP message before the magic cookie. */
const DHCP_FIXED = 236;
/** BOOTP's minimum message: some clients drop shorter replies. */
const DHCP_MIN_REPLY = 300;
/** DHCP message types (option 53), by number. */
const DHCP_TYPES = ["", "DISCOVER", "OFFER", "REQUEST", "DECLINE", "ACK", "NAK", "RELEASE", "INFORM"] as const;
const [, DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM] = DHCP_TYPES.map((_, i) => i);
const OPT_MASK = 1;
const OPT_ROUTER = 3;
const OPT_DNS = 6;
const OPT_HOSTNAME = 12;
const OPT_DOMAIN = 15;
const OPT_BROADCAST = 28;
const OPT_REQUESTED = 50;
const OPT_LEASE = 51;
const OPT_OVERLOAD = 52;
const OPT_TYPE = 53;
const OPT_SERVER = 54;
const OPT_RENEWAL = 58;
const OPT_REBINDING = 59;
const OPT_FQDN = 81;
const OPT_SEARCH = 119;

/** The sum RFC 1071 folds: big-endian 16-bit words, a last odd byte padded. */
function onesSum(bytes: Uint8Array, sum = 0): number {
  const n = bytes.length;
  for (let i = 0; i + 1 < n; i += 2) sum += (bytes[i]! << 8) | bytes[i + 1]!;
  if (n & 1) sum += bytes[n - 1]! << 8;
  return sum;
}

function checksum(sum: number): number {
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

/** An IPv4 packet out of an Ethernet frame: header checked, payload cut to the total length. */
interface Ipv4Packet {
  src: number;
  dst: number;
  protocol: number;
  payload: Uint8Array;
}

/** @internal */
export function decodeIpv4(frame: Uint8Array): Ipv4Packet {
  const ip = frame.subarray(14);
  if (ip.length < 20 || ip[0]! >> 4 !== 4) throw new RangeError("Cannot decode IPv4: not an IPv4 header");
  const headerLength = (ip[0]! & 15) * 4;
  const total = (ip[2]! << 8) | ip[3]!;
  if (headerLength < 20 || total < headerLength || total > ip.length) throw new RangeError(`Cannot decode IPv4: lengths ${headerLength}/${total} do not fit ${ip.length} bytes`);
  if (checksum(onesSum(ip.subarray(0, headerLength))) !== 0) throw new RangeError("Cannot decode IPv4: bad header checksum");
  if ((((ip[6]! << 8) | ip[7]!) & 0x3fff) !== 0) throw new RangeError("Cannot decode IPv4: a fragment");
  const view = new DataView(ip.buffer, ip.byteOffset, ip.byteLength);
  return { src: view.getUint32(12), dst: view.getUint32(16), protocol: ip[9]!, payload: ip.subarray(headerLength, total) };
}

interface UdpDatagram {
  srcPort: number;
  dstPort: number;
  payload: Uint8Array;
}

/** @internal */
export function decodeUdp(bytes: Uint8Array): UdpDatagram {
  const length = bytes.length >= 8 ? (bytes[4]! << 8) | bytes[5]! : 0;
  if (length < 8 || length > bytes.length) throw new RangeError(`Cannot decode UDP: length ${length} does not fit ${bytes.length} bytes`);
  return { srcPort: (bytes[0]! << 8) | bytes[1]!, dstPort: (bytes[2]! << 8) | bytes[3]!, payload: bytes.subarray(8, length) };
}

/** An Ethernet frame with an IPv4 packet (TTL 64, checksummed) of `protocol` carrying `payload`. */
function ipv4Frame(dstMac: Uint8Array, srcMac: Uint8Array, src: number, dst: number, protocol: number, payload: Uint8Array): Uint8Array {
  const frame = new Uint8Array(34 + payload.length);
  const view = new DataView(frame.buffer);
  frame.set(dstMac, 0);
  frame.set(srcMac, 6);
  view.setUint16(12, ETHERTYPE_IPV4);
  frame[14] = 0x45;
  view.setUint16(16, 20 + payload.length);
  frame[22] = 64;
  frame[23] = protocol;
  view.setUint32(26, src);
  view.setUint32(30, dst);
  view.setUint16(24, checksum(onesSum(frame.subarray(14, 34))));
  frame.set(payload, 34);
  return frame;
}

/** A UDP datagram in an IPv4 frame, with its checksum over the pseudo-header (a client may check it). */
function udpFrame(dstMac: Uint8Array, srcMac: Uint8Array, src: number, dst: number, srcPort: number, dstPort: number, payload: Uint8Array): Uint8Array {
  const udp = new Uint8Array(8 + payload.length);
  const view = new DataView(udp.buffer);
  view.setUint16(0, srcPort);
  view.setUint16(2, dstPort);
  view.setUint16(4, udp.length);
  udp.set(payload, 8);
  const pseudo = (src >>> 16) + (src & 0xffff) + (dst >>> 16) + (dst & 0xffff) + IP_UDP + udp.length;
  view.setUint16(6, checksum(onesSum(udp, pseudo)) || 0xffff);
  return ipv4Frame(dstMac, srcMac, src, dst, IP_UDP, udp);
}

/** An ARP packet for IPv4 over Ethernet. */
interface ArpPacket {
  op: number;
  senderMac: Uint8Array;
  senderIp: number;
  targetMac: Uint8Array;
  targetIp: number;
}

/** @internal */
export function decodeArp(frame: Uint8Array): ArpPacket {
  const arp = frame.subarray(14);
  if (arp.length < 28 || arp[0] !== 0 || arp[1] !== 1 || arp[2] !== 8 || arp[3] !== 0 || arp[4] !== 6 || arp[5] !== 4) throw new RangeError("Cannot decode ARP: not IPv4 over Ethernet");
  const view = new DataView(arp.buffer, arp.byteOffset, arp.byteLength);
  return { op: view.getUint16(6), senderMac: arp.subarray(8, 14), senderIp: view.getUint32(14), targetMac: arp.subarray(18, 24), targetIp: view.getUint32(24) };
}

function arpFrame(dstMac: Uint8Array, arp: ArpPacket): Uint8Array {
  const frame = new Uint8Array(42);
  const view = new DataView(frame.buffer);
  frame.set(dstMac, 0);
  frame.set(arp.senderMac, 6);
  frame.set([0x08, 0x06, 0, 1, 8, 0, 6, 4], 12);
  view.setUint16(20, arp.op);
  frame.set(arp.senderMac, 22);
  view.setUint32(28, arp.senderIp);
  frame.set(arp.targetMac, 32);
  view.setUint32(38, arp.targetIp);
  return frame;
}

/** A DHCP message as the server reads it; options concatenated per code (RFC 3396), overload followed. */
interface DhcpMessage {
  op: number;
  xid: number;
  flags: number;
  ciaddr: number;
  yiaddr: number;
  giaddr: number;
  /** The client's hardware address (the lease's key), `52:54:00:…`. */
  chaddr: string;
  /** Option 53, 1–8 (DHCP_TYPES). */
  type: number;
  options: Map<number, Uint8Array>;
}

/** Reads options from `from` to `to` into per-code parts; the end option or the end of the field stops it. */
function readDhcpOptions(bytes: Uint8Array, from: number, to: number, parts: Map<number, Uint8Array[]>): void {
  let i = from;
  while (i < to) {
    const code = bytes[i++]!;
    if (code === 0) continue;
    if (code === 255) return;
    if (i >= to) throw new RangeError(`Cannot decode DHCP: option ${code} has no length`);
    const length = bytes[i++]!;
    if (i + length > to) throw new RangeError(`Cannot decode DHCP: option ${code} of ${length} bytes runs past the end of its field`);
    const list = parts.get(code);
    if (list === undefined) parts.set(code, [bytes.subarray(i, i + length)]);
    else list.push(bytes.subarray(i, i + length));
    i += length;
  }
}

/** @internal */
export function decodeDhcp(bytes: Uint8Array): DhcpMessage {
  if (bytes.length < DHCP_FIXED + 4) throw new RangeError(`Cannot decode DHCP: ${bytes.length} bytes is shorter than the ${DHCP_FIXED + 4} of the fixed part`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (view.getUint32(DHCP_FIXED) !== DHCP_MAGIC) throw new RangeError("Cannot decode DHCP: no magic cookie (BOOTP)");
  if (bytes[1] !== 1 || bytes[2] !== 6) throw new RangeError("Cannot decode DHCP: hardware type is not Ethernet");
  const parts = new Map<number, Uint8Array[]>();
  readDhcpOptions(bytes, DHCP_FIXED + 4, bytes.length, parts);
  // Option overload (RFC 2132 9.3): the file field, then sname, hold more options.
  const overload = parts.get(OPT_OVERLOAD)?.[0]?.[0] ?? 0;
  if (overload & 1) readDhcpOptions(bytes, 108, 236, parts);
  if (overload & 2) readDhcpOptions(bytes, 44, 108, parts);
  const options = new Map<number, Uint8Array>();
  for (const [code, list] of parts) options.set(code, list.length === 1 ? list[0]! : Buffer.concat(list));
  const type = options.get(OPT_TYPE);
  if (type === undefined || type.length !== 1 || type[0]! < 1 || type[0]! > 8) throw new RangeError("Cannot decode DHCP: no valid message type (option 53)");
  return {
    op: bytes[0]!,
    xid: view.getUint32(4),
    flags: view.getUint16(10),
    ciaddr: view.getUint32(12),
    yiaddr: view.getUint32(16),
    giaddr: view.getUint32(24),
    chaddr: formatMac(macKey(bytes, 28)),
    type: type[0]!,
    options,
  };
}

/** An IPv4 address option (50, 54); undefined when absent, RangeError when it is not 4 bytes. */
function addressOption(m: DhcpMessage, code: number): number | undefined {
  const value = m.options.get(code);
  if (value === undefined) return undefined;
  if (value.length !== 4) throw new RangeError(`Cannot decode DHCP: option ${code} is ${value.length} bytes, not an address`);
  return new DataView(value.buffer, value.byteOffset, 4).getUint32(0);
}

/** The first label of a guest's host name, lowercased, when it is a DNS label; undefined otherwise. */
function hostLabel(bytes: Uint8Array): string | undefined {
  let label = "";
  for (const byte of bytes) {
    if (byte === 0x2e || byte === 0) break;
    if (label.length >= 63) return undefined;
    label += String.fromCharCode(byte).toLowerCase();
  }
  return DNS_LABEL.test(label) ? label : undefined;
}

/** The host name a client gives: option 12, else the first label of option 81 (RFC 4702, wire or ASCII). */
function clientName(m: DhcpMessage): string | undefined {
  const hostname = m.options.get(OPT_HOSTNAME);
  if (hostname !== undefined) return hostLabel(hostname);
  const fqdn = m.options.get(OPT_FQDN);
  if (fqdn === undefined || fqdn.length < 4) return undefined;
  // E set: the name is in DNS wire format, its first byte the first label's length.
  if (fqdn[0]! & 4) return fqdn[3]! >= 1 && fqdn[3]! <= 63 && fqdn.length >= 4 + fqdn[3]! ? hostLabel(fqdn.subarray(4, 4 + fqdn[3]!)) : undefined;
  return hostLabel(fqdn.subarray(3));
}

/** A reply's fields; options go out in the order given. */
interface DhcpReply {
  type: number;
  xid: number;
  flags: number;
  ciaddr: number;
  yiaddr: number;
  server: number;
  chaddr: Uint8Array;
  options: [code: number, value: Uint8Array][];
}

function encodeDhcp(reply: DhcpReply): Uint8Array {
  const optionBytes = reply.options.reduce((n, [, value]) => n + 2 + value.length, 3);
  const out = new Uint8Array(Math.max(DHCP_MIN_REPLY, DHCP_FIXED + 4 + optionBytes + 1));
  const view = new DataView(out.buffer);
  out.set([2, 1, 6, 0]);
  view.setUint32(4, reply.xid);
  view.setUint16(10, reply.flags);
  view.setUint32(12, reply.ciaddr);
  view.setUint32(16, reply.yiaddr);
  view.setUint32(20, reply.server);
  out.set(reply.chaddr.subarray(0, 6), 28);
  view.setUint32(DHCP_FIXED, DHCP_MAGIC);
  let at = DHCP_FIXED + 4;
  out.set([OPT_TYPE, 1, reply.type], at);
  at += 3;
  for (const [code, value] of reply.options) {
    out.set([code, value.length], at);
    out.set(value, at + 2);
    at += 2 + value.length;
  }
  out[at] = 255;
  return out;
}

const u32 = (n: number) => Uint8Array.of(n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255);
const BROADCAST_MAC = new Uint8Array(6).fill(255);

/** `vm2.lab` as DNS labels (RFC 1035), for the domain search option (RFC 3397). */
function dnsWireName(name: string): Uint8Array {
  return Buffer.from(dnsPacket.name.encode(name));
}

/**
 * The gateway host's MAC: locally administered, unicast, from the relay's name and the network, so
 * a restart keeps it (guests hold it in their ARP caches). A lease file's MAC wins over it.
 */
function hostMac(relayName: string, network: string): Uint8Array {
  const mac = new Bun.CryptoHasher("sha256").update(`edge-relay host ${relayName} ${network}`).digest().subarray(0, 6);
  mac[0] = (mac[0]! & 0xfc) | 0x02;
  return new Uint8Array(mac);
}

// ───────────────────────────── gateway host ─────────────────────────────
//
// A --dhcp network gets a host of the relay's own: a port of kind "host" with a MAC derived from the
// relay id and the network, holding the gateway address. It answers ARP and ping for that address,
// DHCP (RFC 2131/2132) from a pool, and DNS for the leases' names under the network's domain (never
// recursion). Nothing a guest sent is logged but a checked name. Its DHCP replies are broadcast, so
// a relay serving the same network by mistake sees them and warns.

/** How long an ARP check waits for an answer before the address counts as free. */
const DHCP_PROBE_MS = 500;
/** Addresses tried with an ARP check per DISCOVER; the client asks again if all were in use. */
const DHCP_PROBES = 3;
/** An offer holds its address this long for the REQUEST that takes it. */
const DHCP_OFFER_HOLD_MS = 60_000;
/** An address a client declined (someone else answers for it), or an ARP check found in use, rests this long. */
const DHCP_CONFLICT_MS = 10 * 60_000;
/** Leases one VM port may hold; a tunnel, the backplane or a multicast segment (a whole site) may hold half the pool. */
const DHCP_LEASES_PER_PORT = 8;
/** Leases listed per network in /status (the counts are always given). */
const DHCP_STATUS_LEASES = 1024;
const DHCP_SAVE_DELAY_MS = 200;
/** The gateway's own name under the domain. */
const GATEWAY_NAME = "gateway";
const DNS_TTL = 60;
const DNS_NXDOMAIN = 3;
const DNS_REFUSED = 5;

type LeaseState = "probing" | "offered" | "bound" | "released";

/** One address given to (or held for) one MAC. */
interface Lease {
  mac: string;
  address: number;
  name: string | undefined;
  state: LeaseState;
  /** ms since the epoch: the lease's end, the offer's, or when it was released. */
  expires: number;
  /** The port the client's frames came in by, and the relay (site) behind it. */
  port: string;
  site: string;
}

/**
 * One lease as the lease file keeps it (#save writes it), read into a Lease's fields: a name that is
 * not a DNS label is dropped, the lease kept. An entry that fails is left out, not the file.
 */
const LeaseRecord = v.strictObject({
  mac: v.pipe(v.string(), v.transform(parseMac), v.number(), v.transform(formatMac)),
  address: v.pipe(v.string(), v.transform(ipv4Number), v.number()),
  name: v.pipe(v.nullable(v.string()), v.transform((name) => (name !== null && DNS_LABEL.test(name) ? name : undefined))),
  state: v.picklist(["bound", "released"]),
  expires: v.number(),
  port: v.optional(v.string(), "?"),
  site: v.optional(v.string(), "?"),
});

/**
 * The lease file, dhcp-NETWORK.json in the state directory. `mac` is the gateway's (files written
 * before it was kept have none; one that is not a MAC, or not text, is replaced); entries are each a LeaseRecord.
 */
const LeaseFile = v.strictObject({
  version: v.literal(1),
  network: v.string(),
  cidr: v.string(),
  mac: v.fallback(v.optional(v.pipe(v.string(), v.transform(parseMac))), undefined),
  leases: v.array(v.unknown()),
});

/** An ARP check under way: the lease record (state probing), the DISCOVER waiting for it, the timer. */
interface Probe {
  lease: Lease;
  message: DhcpMessage;
  frame: Uint8Array;
  attempts: number;
  timer: unknown;
}

interface DhcpCounters {
  discovers: number;
  offers: number;
  requests: number;
  acks: number;
  naks: number;
  declines: number;
  releases: number;
  informs: number;
  /** Messages (DHCP, DNS, ARP, ICMP) that did not decode: dropped, never logged. */
  malformed: number;
  /** DISCOVERs dropped because their port holds its share of leases. */
  portCap: number;
  /** DISCOVERs left unanswered because no address was free. */
  exhausted: number;
  /** Addresses an ARP check found in use before they were offered. */
  conflicts: number;
  /** OFFERs and ACKs seen from another DHCP server on the network, and REQUESTs taking another server's offer. */
  rogueReplies: number;
  dnsQueries: number;
  dnsAnswers: number;
  dnsNxdomain: number;
  dnsRefused: number;
  arpReplies: number;
  echoReplies: number;
}

interface DhcpSnapshot {
  cidr: string;
  gateway: string;
  mac: string;
  domain: string;
  range: string;
  pool: number;
  free: number;
  leaseSeconds: number;
  stateFile: string | null;
  leaseCount: number;
  leases: { mac: string; address: string; name: string | null; state: LeaseState; expires: string; port: string; site: string }[];
  /** Other DHCP servers seen on the network (MAC, or `?` when only a client named it, and address), at most 16. */
  rogueServers: { mac: string; address: string }[];
  counters: DhcpCounters;
}

interface GatewayHostOptions {
  spec: DhcpNetworkSpec;
  reservations: DhcpHostSpec[];
  /** Names the sites' own leases, and seeds the host's MAC. */
  relayName: string;
  /** Where the lease file (and the host's MAC) goes; none: leases live in memory only. */
  stateDir?: string;
  log: Logger;
  /** Wall-clock time (ms since the epoch) and timers; tests pass a fake one. */
  clock?: ImpairmentClock;
  probeMs?: number;
}

const WALL_CLOCK: ImpairmentClock = { ...REAL_CLOCK, now: () => Date.now() };

/**
 * The relay's own host on a --dhcp network. Frames the switch hands it are copied and handled a
 * microtask later, so its replies never re-enter the switch while it is still forwarding.
 * @internal
 */
export class GatewayHost extends Port {
  readonly mac: Uint8Array;
  readonly #macKey: number;
  /** An ARP announcement (RFC 5227) of the gateway address by this MAC. */
  readonly #announcement: Uint8Array;
  readonly counters: DhcpCounters = {
    discovers: 0, offers: 0, requests: 0, acks: 0, naks: 0, declines: 0, releases: 0, informs: 0, malformed: 0, portCap: 0,
    exhausted: 0, conflicts: 0, rogueReplies: 0, dnsQueries: 0, dnsAnswers: 0, dnsNxdomain: 0, dnsRefused: 0, arpReplies: 0, echoReplies: 0,
  };
  readonly spec: DhcpNetworkSpec;
  readonly stateFile: string | undefined;
  readonly #options: GatewayHostOptions;
  readonly #clock: ImpairmentClock;
  readonly #mask: number;
  readonly #poolSize: number;
  readonly #byMac = new Map<string, Lease>();
  readonly #byAddress = new Map<number, Lease>();
  readonly #byName = new Map<string, Lease>();
  readonly #byPort = new Map<string, Set<Lease>>();
  /** Addresses someone else answers for, and until when they rest. */
  readonly #conflicts = new Map<number, number>();
  readonly #reservedMac = new Map<string, DhcpHostSpec>();
  readonly #reservedAddress = new Map<number, DhcpHostSpec>();
  /** ARP checks under way, by address. */
  readonly #probes = new Map<number, Probe>();
  readonly #rogues = new Map<string, { mac: string; address: string }>();
  readonly #warn: (line: string) => void;
  #saveTimer: unknown;
  #closed = false;

  constructor(options: GatewayHostOptions) {
    super("host", `${ipv4Text(options.spec.gateway)} (DHCP, DNS)`);
    this.#options = options;
    this.spec = options.spec;
    this.#clock = options.clock ?? WALL_CLOCK;
    this.#mask = (0xffffffff << (32 - this.spec.prefix)) >>> 0;
    const { first, last, gateway } = this.spec;
    this.#poolSize = last - first + 1 - (gateway >= first && gateway <= last ? 1 : 0);
    for (const r of options.reservations) {
      if (!this.#inSubnet(r.address)) continue;
      this.#reservedMac.set(r.mac, r);
      this.#reservedAddress.set(r.address, r);
    }
    this.#warn = rateLimitedLog(options.log.warn, 5, 60_000).log;
    this.stateFile = options.stateDir === undefined ? undefined : `${options.stateDir}/dhcp-${this.spec.network}.json`;
    const saved = this.#load();
    this.mac = saved ?? hostMac(options.relayName, this.spec.network);
    this.#macKey = macKey(this.mac, 0);
    this.#announcement = arpFrame(BROADCAST_MAC, { op: 1, senderMac: this.mac, senderIp: gateway, targetMac: new Uint8Array(6), targetIp: gateway });
    // Written at once, so later starts keep this MAC even if the relay's name changes (a new container's host name).
    if (saved === undefined) this.#save();
  }

  /**
   * Announces the gateway's address and MAC: to every port when the host joins, then to each port
   * that joins (a VM or a site reconnecting after a restart), so guests replace a MAC they cached
   * at once rather than when their ARP entry expires. A microtask later: a tunnel's welcome goes first.
   */
  joined(port: Port): void {
    queueMicrotask(() => {
      if (this.#closed || port.network !== this.network || this.network === undefined) return;
      if (port === this) this.#send(this.#announcement);
      else this.network.deliver(this.#announcement, port);
    });
  }

  protected enqueue(frame: Uint8Array): boolean {
    // Only what the host can answer is looked at: ARP to it or to everyone, IPv4 to it, IPv4 to everyone
    // only for the DHCP server (mDNS, SSDP and the like are the network's chatter), and any DHCP reply (another server).
    if (frame.length < 42 || this.#closed) return true;
    const type = (frame[12]! << 8) | frame[13]!;
    if (type !== ETHERTYPE_ARP && type !== ETHERTYPE_IPV4) return true;
    const group = (frame[0]! & 1) === 1;
    const udp = type === ETHERTYPE_IPV4 && frame[23] === IP_UDP;
    const dhcpReply = udp && frame[34] === 0 && frame[35] === DHCP_SERVER_PORT;
    const ports = 14 + (frame[14]! & 15) * 4;
    const toServer = udp && frame[ports + 2] === 0 && frame[ports + 3] === DHCP_SERVER_PORT;
    const taken = group ? type === ETHERTYPE_ARP || toServer || dhcpReply : macKey(frame, 0) === this.#macKey || dhcpReply;
    if (taken) {
      const copy = frame.slice();
      queueMicrotask(() => this.#handle(copy, type));
    }
    return true;
  }

  /** Leaves the network; pending checks end and the lease file is written. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const probe of this.#probes.values()) this.#clock.clearTimer(probe.timer);
    this.#probes.clear();
    this.#save();
    this.network?.detach(this, "relay stopping");
  }

  #handle(frame: Uint8Array, type: number): void {
    if (this.#closed) return;
    try {
      if (type === ETHERTYPE_ARP) return this.#arp(decodeArp(frame), frame);
      const ip = decodeIpv4(frame);
      if (ip.protocol === IP_ICMP) return this.#icmp(ip, frame);
      if (ip.protocol !== IP_UDP) return;
      const udp = decodeUdp(ip.payload);
      if (udp.srcPort === DHCP_SERVER_PORT && udp.dstPort === DHCP_CLIENT_PORT) return this.#otherServer(ip, frame, decodeDhcp(udp.payload));
      if (udp.dstPort === DHCP_SERVER_PORT) return this.#dhcp(decodeDhcp(udp.payload), frame, ip);
      if (udp.dstPort === DNS_PORT && ip.dst === this.spec.gateway) return this.#dns(ip, udp, frame);
    } catch (error) {
      // Guest bytes that fail a check are dropped and counted; any other error is a bug of ours, logged too (never the bytes).
      this.counters.malformed++;
      if (!(error instanceof RangeError)) this.#warn(`${this.spec.network}: a packet from ${formatMac(macKey(frame, 6))} could not be handled: ${(error as Error).message}`);
    }
  }

  #send(frame: Uint8Array): void {
    this.receive(frame);
  }

  #arp(arp: ArpPacket, frame: Uint8Array): void {
    const senderMac = formatMac(macKey(arp.senderMac, 0));
    // Anyone else who answers for (or claims) an address under an ARP check has it.
    const probe = this.#probes.get(arp.senderIp);
    if (probe !== undefined && senderMac !== probe.lease.mac && macKey(arp.senderMac, 0) !== this.#macKey) this.#probeAnswered(arp.senderIp, probe);
    // An announcement (sender and target the same address) asks nothing.
    if (arp.op !== 1 || arp.targetIp !== this.spec.gateway || arp.senderIp === arp.targetIp) return;
    this.counters.arpReplies++;
    this.#send(arpFrame(frame.subarray(6, 12), { op: 2, senderMac: this.mac, senderIp: this.spec.gateway, targetMac: arp.senderMac, targetIp: arp.senderIp }));
  }

  #icmp(ip: Ipv4Packet, frame: Uint8Array): void {
    const icmp = ip.payload;
    if (ip.dst !== this.spec.gateway || icmp.length < 8 || icmp[0] !== 8 || icmp[1] !== 0) return;
    const reply = icmp.slice();
    reply[0] = 0;
    reply[2] = reply[3] = 0;
    const sum = checksum(onesSum(reply));
    reply[2] = sum >> 8;
    reply[3] = sum & 255;
    this.counters.echoReplies++;
    this.#send(ipv4Frame(frame.subarray(6, 12), this.mac, this.spec.gateway, ip.src, IP_ICMP, reply));
  }

  #otherServer(ip: Ipv4Packet, frame: Uint8Array, m: DhcpMessage): void {
    if (macKey(frame, 6) === this.#macKey || m.op !== 2 || (m.type !== OFFER && m.type !== ACK)) return;
    this.#rogue(formatMac(macKey(frame, 6)), ipv4Text(addressOption(m, OPT_SERVER) ?? ip.src));
  }

  /**
   * Another server on the network: seen answering, or named by a client that took its offer (its
   * OFFER may have been unicast to the client, past this port). Logged once per server.
   */
  #rogue(mac: string, address: string): void {
    this.counters.rogueReplies++;
    const key = mac === "?" ? address : mac;
    if (this.#rogues.has(key) || this.#rogues.size >= 16) return;
    this.#rogues.set(key, { mac, address });
    this.#options.log.warn(`another DHCP server on ${this.spec.network}: ${mac === "?" ? `${address} (a client took its offer)` : `${mac} ${address}`}; one relay per network should serve it (${flagOf("dhcp")})`);
  }

  // ───── DHCP ─────

  #inSubnet(address: number): boolean {
    return placeInSubnet(this.spec.base, this.spec.prefix, address) === "host";
  }

  #inPool(address: number): boolean {
    return address >= this.spec.first && address <= this.spec.last && address !== this.spec.gateway;
  }

  #active(lease: Lease, now: number): boolean {
    return lease.state !== "released" && lease.expires > now;
  }

  /** May `mac` have `address`: the pool's or its reservation, no one else's now, not resting after a conflict. */
  #allowed(address: number, mac: string, now: number): boolean {
    const reservation = this.#reservedAddress.get(address);
    if (reservation !== undefined) return reservation.mac === mac;
    if (!this.#inPool(address) || this.#reservedMac.has(mac)) return false;
    const holder = this.#byAddress.get(address);
    if (holder !== undefined && holder.mac !== mac && this.#active(holder, now)) return false;
    return (this.#conflicts.get(address) ?? 0) <= now;
  }

  /** Where a client's frames come from: its port and the relay (site) behind that port. */
  #origin(frame: Uint8Array): { port: Port | undefined; id: string; site: string } {
    const port = this.network?.macs.get(macKey(frame, 6))?.port;
    const site = port?.remoteName ?? (port !== undefined && port.trunk ? port.kind : this.#options.relayName);
    return { port, id: port?.id ?? "?", site };
  }

  /** Leases (and offers, and checks) held for MACs behind this port, against its share. */
  #overCap(port: Port | undefined, now: number): boolean {
    if (port === undefined) return false;
    const held = this.#byPort.get(port.id);
    if (held === undefined) return false;
    for (const lease of held) if (!this.#active(lease, now)) held.delete(lease);
    return held.size >= (port.trunk ? Math.max(DHCP_LEASES_PER_PORT, Math.ceil(this.#poolSize / 2)) : DHCP_LEASES_PER_PORT);
  }

  /** Records (or moves) a lease in every index. */
  #put(lease: Lease, fields: Partial<Lease>): Lease {
    this.#forget(lease);
    Object.assign(lease, fields);
    const other = this.#byAddress.get(lease.address);
    if (other !== undefined && other !== lease) this.#forget(other);
    this.#byMac.set(lease.mac, lease);
    this.#byAddress.set(lease.address, lease);
    if (lease.name !== undefined) {
      const named = this.#byName.get(lease.name);
      // The newest lease gets a name two clients give; the older one is left without.
      if (named !== undefined && named !== lease) named.name = undefined;
      this.#byName.set(lease.name, lease);
    }
    let held = this.#byPort.get(lease.port);
    if (held === undefined) this.#byPort.set(lease.port, (held = new Set()));
    held.add(lease);
    return lease;
  }

  #forget(lease: Lease): void {
    if (this.#byMac.get(lease.mac) === lease) this.#byMac.delete(lease.mac);
    if (this.#byAddress.get(lease.address) === lease) this.#byAddress.delete(lease.address);
    if (lease.name !== undefined && this.#byName.get(lease.name) === lease) this.#byName.delete(lease.name);
    const held = this.#byPort.get(lease.port);
    held?.delete(lease);
    if (held?.size === 0) this.#byPort.delete(lease.port);
  }

  /**
   * A free address for a new client: first one never leased (from a point the MAC picks, so a
   * client tends to land where it did before), else the one released or expired longest ago.
   */
  #pick(mac: string, now: number): number | undefined {
    const { first, last } = this.spec;
    const span = last - first + 1;
    let hash = 0;
    for (let i = 0; i < mac.length; i++) hash = (hash * 31 + mac.charCodeAt(i)) >>> 0;
    let oldest: Lease | undefined;
    for (let i = 0; i < span; i++) {
      const address = first + ((hash + i) % span);
      if (!this.#allowed(address, mac, now) || this.#probes.has(address) || this.#reservedAddress.has(address)) continue;
      const holder = this.#byAddress.get(address);
      if (holder === undefined) return address;
      if (oldest === undefined || holder.expires < oldest.expires) oldest = holder;
    }
    return oldest?.address;
  }

  #dhcp(m: DhcpMessage, frame: Uint8Array, ip: Ipv4Packet): void {
    if (m.op !== 1) return;
    const now = this.#clock.now();
    switch (m.type) {
      case DISCOVER:
        this.counters.discovers++;
        return this.#discover(m, frame, now);
      case REQUEST:
        this.counters.requests++;
        return this.#request(m, frame, now);
      case DECLINE: {
        this.counters.declines++;
        const lease = this.#byMac.get(m.chaddr);
        const address = addressOption(m, OPT_REQUESTED);
        if (lease === undefined || lease.address !== address || addressOption(m, OPT_SERVER) !== this.spec.gateway) return;
        this.#forget(lease);
        this.#conflicts.set(address, now + DHCP_CONFLICT_MS);
        this.#warn(`${this.spec.network}: ${m.chaddr} declined ${ipv4Text(address)}: another host uses it`);
        return this.#scheduleSave();
      }
      case RELEASE: {
        this.counters.releases++;
        const lease = this.#byMac.get(m.chaddr);
        if (lease === undefined || lease.address !== m.ciaddr || lease.state !== "bound") return;
        this.#put(lease, { state: "released", expires: now });
        return this.#scheduleSave();
      }
      case INFORM:
        this.counters.informs++;
        if (!this.#inSubnet(m.ciaddr)) return;
        return this.#reply(ACK, m, frame, 0, undefined, m.ciaddr === ip.src ? m.ciaddr : 0);
    }
  }

  #discover(m: DhcpMessage, frame: Uint8Array, now: number): void {
    const known = this.#byMac.get(m.chaddr);
    if (known?.state === "probing") return;
    const origin = this.#origin(frame);
    const reservation = this.#reservedMac.get(m.chaddr);
    let address: number | undefined;
    if (reservation !== undefined) {
      if (!this.#allowed(reservation.address, m.chaddr, now)) return void this.counters.exhausted++;
      address = reservation.address;
    } else if (known !== undefined && this.#allowed(known.address, m.chaddr, now)) address = known.address;
    // A client we know gets its address again at once; any other address is checked first.
    if (address !== undefined && known?.address === address) return this.#offer(m, frame, address, origin, now);
    if (address === undefined && this.#overCap(origin.port, now)) {
      this.counters.portCap++;
      return this.#warn(`${this.spec.network}: ${origin.id} holds its share of leases; DISCOVERs from further MACs behind it are dropped`);
    }
    const requested = addressOption(m, OPT_REQUESTED);
    address ??= requested !== undefined && this.#allowed(requested, m.chaddr, now) && !this.#probes.has(requested) ? requested : this.#pick(m.chaddr, now);
    if (address === undefined) {
      this.counters.exhausted++;
      return this.#warn(`${this.spec.network}: no free address for ${m.chaddr} (pool ${ipv4Text(this.spec.first)}-${ipv4Text(this.spec.last)} in use)`);
    }
    this.#probe(address, m, frame, origin, now, 1);
  }

  /** Asks the network who has `address` before offering it (as dnsmasq pings); silence means it is free. */
  #probe(address: number, m: DhcpMessage, frame: Uint8Array, origin: { id: string; site: string }, now: number, attempts: number): void {
    const previous = this.#byMac.get(m.chaddr);
    const lease = this.#put(previous ?? ({ mac: m.chaddr } as Lease), {
      address, name: previous?.name, state: "probing", expires: now + DHCP_OFFER_HOLD_MS, port: origin.id, site: origin.site,
    });
    const timer = this.#clock.setTimer(() => {
      this.#probes.delete(address);
      if (this.#closed || this.#byMac.get(m.chaddr) !== lease) return;
      this.#offer(m, frame, address, origin, this.#clock.now());
    }, this.#options.probeMs ?? DHCP_PROBE_MS);
    this.#probes.set(address, { lease, message: m, frame, attempts, timer });
    this.#send(arpFrame(BROADCAST_MAC, { op: 1, senderMac: this.mac, senderIp: this.spec.gateway, targetMac: new Uint8Array(6), targetIp: address }));
  }

  #probeAnswered(address: number, probe: Probe): void {
    this.#clock.clearTimer(probe.timer);
    this.#probes.delete(address);
    this.counters.conflicts++;
    const now = this.#clock.now();
    this.#conflicts.set(address, now + DHCP_CONFLICT_MS);
    this.#forget(probe.lease);
    this.#warn(`${this.spec.network}: ${ipv4Text(address)} answers ARP though no lease holds it; not offered for ${DHCP_CONFLICT_MS / 60_000} min`);
    if (probe.attempts >= DHCP_PROBES || this.#reservedMac.has(probe.lease.mac)) return;
    const next = this.#pick(probe.lease.mac, now);
    if (next !== undefined) this.#probe(next, probe.message, probe.frame, { id: probe.lease.port, site: probe.lease.site }, now, probe.attempts + 1);
  }

  #offer(m: DhcpMessage, frame: Uint8Array, address: number, origin: { id: string; site: string }, now: number): void {
    const lease = this.#byMac.get(m.chaddr);
    // A bound lease stays bound through a DISCOVER (a client rebooting): only its offer is made again.
    if (lease?.state !== "bound" || lease.address !== address || !this.#active(lease, now)) {
      this.#put(lease ?? ({ mac: m.chaddr } as Lease), {
        address, name: lease?.name, state: "offered", expires: now + DHCP_OFFER_HOLD_MS, port: origin.id, site: origin.site,
      });
    }
    this.#reply(OFFER, m, frame, address, this.#byMac.get(m.chaddr)?.name);
  }

  #request(m: DhcpMessage, frame: Uint8Array, now: number): void {
    const server = addressOption(m, OPT_SERVER);
    const requested = addressOption(m, OPT_REQUESTED);
    const lease = this.#byMac.get(m.chaddr);
    if (server !== undefined && server !== this.spec.gateway) {
      // SELECTING another server's offer: ours is withdrawn, and that server is one too many.
      if (lease !== undefined && lease.state === "offered") this.#put(lease, { state: "released", expires: now });
      return this.#rogue("?", ipv4Text(server));
    }
    const address = requested ?? m.ciaddr;
    const reservation = this.#reservedMac.get(m.chaddr);
    const ours = lease !== undefined && lease.address === address && lease.state !== "probing";
    const origin = this.#origin(frame);
    // SELECTING our offer needs the offer; INIT-REBOOT, RENEWING and REBINDING may take a free address of the pool (a server that lost its state).
    const fine =
      (reservation === undefined || reservation.address === address) &&
      this.#allowed(address, m.chaddr, now) &&
      (ours || (server === undefined && !this.#probes.has(address) && !this.#overCap(origin.port, now)));
    if (!fine) return this.#reply(NAK, m, frame, 0, undefined);
    const fresh = !(lease?.state === "bound" && lease.address === address && this.#active(lease, now));
    const name = reservation?.name ?? clientName(m) ?? (lease?.address === address ? lease.name : undefined);
    const bound = this.#put(lease ?? ({ mac: m.chaddr } as Lease), {
      address, name: name === GATEWAY_NAME ? undefined : name, state: "bound", expires: now + this.spec.leaseSeconds * 1000, port: origin.id, site: origin.site,
    });
    this.#reply(ACK, m, frame, address, bound.name, m.ciaddr);
    if (fresh) this.#options.log.info(`${this.spec.network}: ${m.chaddr} is ${ipv4Text(address)}${bound.name ? ` (${bound.name})` : ""} at ${bound.site}`);
    this.#scheduleSave();
  }

  /** Sends OFFER, ACK or NAK: broadcast, or to `unicast` (a client that has its address). */
  #reply(type: number, m: DhcpMessage, frame: Uint8Array, address: number, name: string | undefined, unicast = 0): void {
    const { gateway, leaseSeconds, domain } = this.spec;
    this.counters[type === OFFER ? "offers" : type === ACK ? "acks" : "naks"]++;
    const options: [number, Uint8Array][] = [[OPT_SERVER, u32(gateway)]];
    if (type !== NAK) {
      if (m.type !== INFORM) options.push([OPT_LEASE, u32(leaseSeconds)], [OPT_RENEWAL, u32(leaseSeconds / 2)], [OPT_REBINDING, u32(Math.floor((leaseSeconds * 7) / 8))]);
      options.push(
        [OPT_MASK, u32(this.#mask)],
        [OPT_BROADCAST, u32((this.spec.base | ~this.#mask) >>> 0)],
        [OPT_ROUTER, u32(gateway)],
        [OPT_DNS, u32(gateway)],
        [OPT_DOMAIN, new TextEncoder().encode(domain)],
        [OPT_SEARCH, dnsWireName(domain)],
      );
      if (name !== undefined) options.push([OPT_HOSTNAME, new TextEncoder().encode(name)]);
    }
    const chaddr = macBytes(parseMac(m.chaddr)!);
    const payload = encodeDhcp({ type, xid: m.xid, flags: m.flags, ciaddr: type === ACK ? m.ciaddr : 0, yiaddr: address, server: type === NAK ? 0 : gateway, chaddr, options });
    const to = unicast !== 0 && type !== NAK;
    this.#send(udpFrame(to ? frame.subarray(6, 12) : BROADCAST_MAC, this.mac, gateway, to ? unicast : 0xffffffff, DHCP_SERVER_PORT, DHCP_CLIENT_PORT, payload));
  }

  // ───── DNS ─────

  #dns(ip: Ipv4Packet, udp: UdpDatagram, frame: Uint8Array): void {
    let query: dnsPacket.DecodedPacket;
    try {
      query = dnsPacket.decode(Buffer.from(udp.payload));
    } catch (error) {
      throw new RangeError(`Cannot decode DNS: ${(error as Error).message}`);
    }
    if (query.type !== "query") return;
    this.counters.dnsQueries++;
    const question = query.questions?.length === 1 ? query.questions[0] : undefined;
    let rcode = DNS_REFUSED;
    let answers: dnsPacket.Answer[] = [];
    if (question !== undefined && query.opcode === "QUERY" && question.class === "IN") [rcode, answers] = this.#answer(question.name.toLowerCase().replace(/\.$/, ""), question.type);
    if (rcode === DNS_REFUSED) this.counters.dnsRefused++;
    else if (rcode === DNS_NXDOMAIN) this.counters.dnsNxdomain++;
    else this.counters.dnsAnswers++;
    const flags = (rcode === DNS_REFUSED ? 0 : dnsPacket.AUTHORITATIVE_ANSWER) | (query.flags! & dnsPacket.RECURSION_DESIRED) | rcode;
    const response = dnsPacket.encode({ type: "response", id: query.id, flags, questions: question ? [question] : [], answers });
    this.#send(udpFrame(frame.subarray(6, 12), this.mac, this.spec.gateway, ip.src, DNS_PORT, udp.srcPort, response));
  }

  /** The rcode (0 with answers, 0 without: the name has no such record) and the answers for one question. */
  #answer(name: string, type: string): [number, dnsPacket.Answer[]] {
    const { domain, gateway } = this.spec;
    const now = this.#clock.now();
    if (name === domain || name.endsWith(`.${domain}`)) {
      if (name === domain) return [0, []];
      const label = name.slice(0, -domain.length - 1);
      const lease = this.#byName.get(label);
      const address = label === GATEWAY_NAME ? gateway : lease !== undefined && lease.state === "bound" && this.#active(lease, now) ? lease.address : undefined;
      if (address === undefined) return [DNS_NXDOMAIN, []];
      return [0, type === "A" ? [{ type: "A", name, ttl: DNS_TTL, data: ipv4Text(address) }] : []];
    }
    const ptr = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.in-addr\.arpa$/.exec(name);
    const address = ptr ? ipv4Number(`${ptr[4]}.${ptr[3]}.${ptr[2]}.${ptr[1]}`) : undefined;
    if (address === undefined || placeInSubnet(this.spec.base, this.spec.prefix, address) === "outside") return [DNS_REFUSED, []];
    const lease = this.#byAddress.get(address);
    const host = address === gateway ? GATEWAY_NAME : lease?.state === "bound" && this.#active(lease, now) ? lease.name : undefined;
    if (host === undefined) return [DNS_NXDOMAIN, []];
    return [0, type === "PTR" ? [{ type: "PTR", name, ttl: DNS_TTL, data: `${host}.${domain}` }] : []];
  }

  // ───── leases on disk ─────

  #scheduleSave(): void {
    if (this.stateFile === undefined || this.#saveTimer !== undefined) return;
    this.#saveTimer = this.#clock.setTimer(() => this.#save(), DHCP_SAVE_DELAY_MS);
  }

  /** Writes bound and released leases to a temporary file and renames it over the lease file: a crash leaves the old or the new, never half. */
  #save(): void {
    if (this.#saveTimer !== undefined) this.#clock.clearTimer(this.#saveTimer);
    this.#saveTimer = undefined;
    if (this.stateFile === undefined) return;
    const leases = [...this.#byMac.values()]
      .filter((l) => l.state === "bound" || l.state === "released")
      .map((l) => ({ mac: l.mac, address: ipv4Text(l.address), name: l.name ?? null, state: l.state, expires: l.expires, port: l.port, site: l.site }));
    const text = JSON.stringify({ version: 1, network: this.spec.network, cidr: this.spec.cidr, mac: formatMac(this.#macKey), leases }, null, 1) + "\n";
    try {
      mkdirSync(dirname(this.stateFile), { recursive: true, mode: 0o700 });
      writeAtomically(this.stateFile, text, 0o600);
    } catch (error) {
      // writeAtomically's own line names the file again: the system call's error says it once.
      const cause = error instanceof Error && error.cause !== undefined ? error.cause : error;
      this.#warn(describeError(`${this.spec.network}: cannot write the lease file ${this.stateFile}`, cause));
    }
  }

  /**
   * Reads the lease file; an entry that is damaged or does not fit this network now (changed CIDR,
   * reservations) is left out. Returns the host's MAC the file keeps; undefined when it keeps none
   * yet (no file, or one without); null when there is nothing to write it to now (no state
   * directory, or a file that is unreadable or not a lease file: left as it is until leases change).
   */
  #load(): Uint8Array | undefined | null {
    if (this.stateFile === undefined) return null;
    let data: unknown;
    try {
      data = JSON.parse(readFileSync(this.stateFile, "utf8"));
    } catch (error) {
      if ((error as { code?: string }).code === "ENOENT") return undefined;
      this.#options.log.warn(`${this.spec.network}: the lease file ${this.stateFile} is unreadable or not JSON; starting without its leases`);
      return null;
    }
    const file = v.safeParse(LeaseFile, data);
    if (!file.success) {
      this.#options.log.warn(`${this.spec.network}: ${this.stateFile} is not a lease file (at ${v.getDotPath(file.issues[0]) ?? "the top"}); starting without its leases`);
      return null;
    }
    let skipped = 0;
    for (const entry of file.output.leases) {
      const record = v.safeParse(LeaseRecord, entry);
      if (!record.success || !this.#fits(record.output)) {
        skipped++;
        continue;
      }
      const { mac, address, name, ...rest } = record.output;
      this.#put({ mac } as Lease, { address, name: this.#reservedMac.get(mac)?.name ?? name, ...rest });
    }
    if (skipped > 0) this.#options.log.warn(`${this.spec.network}: ${skipped} entries of ${this.stateFile} are damaged or do not fit the network as configured and were left out`);
    const key = file.output.mac;
    return key !== undefined && !isGroupMac(key) ? macBytes(key) : undefined;
  }

  /** Whether a saved lease fits this network as configured now, beside the leases read before it. */
  #fits({ mac, address }: v.InferOutput<typeof LeaseRecord>): boolean {
    const reservation = this.#reservedMac.get(mac);
    return (
      this.#inSubnet(address) && address !== this.spec.gateway && !this.#byMac.has(mac) && !this.#byAddress.has(address) &&
      (reservation === undefined ? this.#inPool(address) && !this.#reservedAddress.has(address) : reservation.address === address)
    );
  }

  // ───── status ─────

  /** Leases active now, offers and checks included: what the pool has given out. */
  inUse(): number {
    const now = this.#clock.now();
    let n = 0;
    for (const lease of this.#byMac.values()) if (this.#active(lease, now)) n++;
    return n;
  }

  poolSize(): number {
    return this.#poolSize;
  }

  dhcpSnapshot(limit = DHCP_STATUS_LEASES): DhcpSnapshot {
    const now = this.#clock.now();
    const leases: DhcpSnapshot["leases"] = [];
    let inPool = 0;
    let count = 0;
    for (const l of this.#byMac.values()) {
      if (!this.#active(l, now)) continue;
      count++;
      if (this.#inPool(l.address)) inPool++;
      if (leases.length < limit) leases.push({ mac: l.mac, address: ipv4Text(l.address), name: l.name ?? null, state: l.state, expires: new Date(l.expires).toISOString(), port: l.port, site: l.site });
    }
    let resting = 0;
    for (const [address, until] of this.#conflicts) if (until > now && this.#inPool(address) && !this.#byAddress.has(address)) resting++;
    for (const address of this.#reservedAddress.keys()) if (this.#inPool(address) && !this.#byAddress.has(address)) resting++;
    leases.sort((a, b) => (ipv4Number(a.address)! - ipv4Number(b.address)!));
    return {
      cidr: this.spec.cidr,
      gateway: ipv4Text(this.spec.gateway),
      mac: formatMac(this.#macKey),
      domain: this.spec.domain,
      range: `${ipv4Text(this.spec.first)}-${ipv4Text(this.spec.last)}`,
      pool: this.#poolSize,
      free: Math.max(0, this.#poolSize - inPool - resting),
      leaseSeconds: this.spec.leaseSeconds,
      stateFile: this.stateFile ?? null,
      leaseCount: count,
      leases,
      rogueServers: [...this.#rogues.values()],
      counters: { ...this.counters },
    };
  }
}

// ───────────────────────────── status & metrics ─────────────────────────────
//
// One snapshot serves /status, /healthz and the page; /metrics reads ports and networks directly.
// Both cost per port, never per MAC, and list only the first networks and ports unless asked for
// more (the counts are always exact). Per-kind totals include closed ports, so counters never go back.

/** /status: the relay, its networks and ports, its limits, and the counters. */
export interface Snapshot extends RelayCounters {
  version: string;
  id: string;
  name: string;
  uptime: number;
  startedAt: string;
  /** A page of the networks, in the order they were made: see `networksPage`. */
  networks: (ReturnType<Network["snapshot"]> & { dhcp?: DhcpSnapshot })[];
  networksPage: { offset: number; limit: number | null; total: number };
  uplink: UplinkStatus | null;
  backplane: BackplaneSnapshot | null;
  dials: DialStatus[];
  /** Live captures and capture files: what they caught and what a slow reader lost. */
  captures: ReturnType<CaptureRegistry["snapshot"]>;
  /** Link impairments: target, canonical spec, the ports (and ways) it applies to, counters. */
  impairments: ReturnType<ImpairmentTable["snapshot"]>;
  limits: {
    networks: number;
    maxNetworks: number;
    tunnels: number;
    maxTunnels: number;
    maxTunnelsPerAddress: number;
    /** Bytes queued across every port, the budget, and frames dropped for want of it. */
    memoryUsed: number;
    memoryBudget: number;
    memoryDrops: number;
    /** --flow-control: sources pause while their unicast destination is congested (per port: `flow`). */
    flowControl: boolean;
  };
  datagrams: DatagramStatus[];
}

/** What /status lists (undefined: the default): learned MACs and ports per network, and which networks. */
interface StatusView {
  macs?: number;
  ports?: number;
  /** Networks listed, from the `offset`-th on. */
  networks?: number;
  offset?: number;
}

/** Networks, and ports per network, listed in /status unless asked for more (the counts are always given). */
const STATUS_NETWORKS = 256;
const STATUS_PORTS = 256;

/** The page of networks a view asks for, each cut to its ports and MACs; the total is always given. @internal */
export function statusNetworks(all: Iterable<Network>, total: number, view: StatusView): Pick<Snapshot, "networks" | "networksPage"> {
  const offset = view.offset ?? 0;
  const limit = view.networks ?? STATUS_NETWORKS;
  const networks: Snapshot["networks"] = [];
  let i = 0;
  for (const n of all) {
    if (networks.length >= limit) break;
    if (i++ >= offset) networks.push(n.snapshot(view.macs ?? MAC_LIST_LIMIT, view.ports ?? STATUS_PORTS));
  }
  return { networks, networksPage: { offset, limit: Number.isFinite(limit) ? limit : null, total } };
}

const PORT_METRICS: [name: string, help: string, value: (p: Port) => number][] = [
  ["edge_relay_port_rx_frames_total", "Frames received on a port and switched.", (p) => p.stats.rxFrames],
  ["edge_relay_port_rx_bytes_total", "Bytes received on a port and switched.", (p) => p.stats.rxBytes],
  ["edge_relay_port_rx_drops_total", "Frames received and dropped (runt, storm limit, MAC limit, blocked for a loop).", (p) => p.rxDrops()],
  ["edge_relay_port_tx_frames_total", "Frames handed to a port's socket.", (p) => p.stats.txFrames],
  ["edge_relay_port_tx_bytes_total", "Bytes handed to a port's socket.", (p) => p.stats.txBytes],
  ["edge_relay_port_tx_drops_total", "Frames dropped: queue or memory budget full, or refused by the socket.", (p) => p.stats.txDrops],
  ["edge_relay_port_errors_total", "Protocol errors on a port (oversize frame, malformed message).", (p) => p.stats.errors],
  ["edge_relay_port_pauses_total", "Times flow control paused reading a port because its frames' destination was congested.", (p) => p.pauses],
  ["edge_relay_port_blocked", "1 while a port is blocked for a loop.", (p) => (p.state === "blocked-loop" ? 1 : 0)],
];

const RELAY_COUNTERS: [name: string, help: string, key: keyof RelayCounters][] = [
  ["edge_relay_auth_failures_total", "Requests refused for a wrong or missing token.", "authFailures"],
  ["edge_relay_auth_throttled_total", "Wrong credentials answered 429 after repeated failures from their address.", "authThrottled"],
  ["edge_relay_protocol_errors_total", "Ports closed for malformed input.", "protocolErrors"],
  ["edge_relay_tunnels_refused_total", "Tunnels refused for the tunnel limits.", "tunnelsRefused"],
  ["edge_relay_loop_refusals_total", "Networks refused to a tunnel because its relay would make a loop.", "loopRefusals"],
  ["edge_relay_loops_detected_total", "Ports blocked after a loop probe came back.", "loopsDetected"],
  ["edge_relay_connections_refused_total", "QEMU connections closed at once for --max-connections.", "connectionsRefused"],
];

/** How much of /metrics gets series of its own: the first ports and networks (the rest are in the per-kind totals). */
interface MetricsView {
  ports: number;
  networks: number;
}

/** Ports and networks given series of their own in /metrics unless asked for more (per-kind totals cover all). */
const METRICS_PORTS = 1024;
const METRICS_NETWORKS = 1024;

const KIND_METRICS: [name: string, help: string, key: keyof KindTotals][] = [
  ["edge_relay_kind_rx_frames_total", "Frames received and switched, over every port of a kind the relay has had.", "rxFrames"],
  ["edge_relay_kind_rx_bytes_total", "Bytes received and switched, over every port of a kind.", "rxBytes"],
  ["edge_relay_kind_rx_drops_total", "Frames received and dropped, over every port of a kind.", "rxDrops"],
  ["edge_relay_kind_tx_frames_total", "Frames handed to sockets, over every port of a kind.", "txFrames"],
  ["edge_relay_kind_tx_bytes_total", "Bytes handed to sockets, over every port of a kind.", "txBytes"],
  ["edge_relay_kind_tx_drops_total", "Frames dropped on the way out, over every port of a kind.", "txDrops"],
];

/** Prometheus labels of a --qemu-udp socket; a unix path may hold any character. */
function datagramLabel(d: DatagramStatus, reason?: string): string {
  const socket = d.address.replace(/[\\"\n]/g, (c) => (c === "\n" ? "\\n" : `\\${c}`));
  return `{network="${d.network}",socket="${socket}"${reason ? `,reason="${reason}"` : ""}}`;
}

/** `edge_relay_datagram_drops_total` samples of one socket, one per reason. */
function datagramDrops(d: DatagramStatus): [string, number][] {
  return Object.entries(d.drops).map(([reason, n]) => [datagramLabel(d, reason), n]);
}

/**
 * Prometheus text exposition: the relay's counters from a snapshot (its networks not listed), the
 * ports' and networks' read from them directly, the --dhcp gateway hosts' from `gateways`. The cost
 * is per port, never per MAC.
 * @internal
 */
export function renderMetrics(
  s: Snapshot,
  networks: Iterable<Network>,
  totals: Map<string, KindTotals>,
  view: MetricsView = { ports: METRICS_PORTS, networks: METRICS_NETWORKS },
  gateways: Iterable<GatewayHost> = [],
): string {
  const lines: string[] = [];
  const metric = (name: string, help: string, type: string, samples: [string, number][]) => {
    lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    for (const [labels, value] of samples) lines.push(`${name}${labels} ${value}`);
  };
  // Series per port and per network for the first ones only: a hub with 10,000 sites would
  // otherwise answer every scrape with megabytes. The per-kind totals always cover every port.
  const nets: Network[] = [];
  const ports: Port[] = [];
  const labels: string[] = [];
  const hosts = Array.from(gateways).slice(0, view.networks);
  let omitted = 0;
  for (const n of networks) {
    if (nets.length < view.networks) nets.push(n);
    for (const p of n.ports) {
      if (ports.length >= view.ports) {
        omitted++;
        continue;
      }
      ports.push(p);
      // A site's name passed NETWORK_NAME in its hello: nothing in it needs escaping.
      const site = p.kind === "tunnel" && p.remoteName !== undefined ? `,site="${p.remoteName}"` : "";
      labels.push(`{network="${n.name}",port="${p.id}",kind="${p.kind}"${site}}`);
    }
  }
  const kinds = [...totals].sort(([a], [b]) => a.localeCompare(b));
  metric("edge_relay_kind_ports", "Ports of a kind attached now.", "gauge", kinds.map(([kind, t]) => [`{kind="${kind}"}`, t.ports]));
  for (const [name, help, key] of KIND_METRICS) metric(name, help, "counter", kinds.map(([kind, t]) => [`{kind="${kind}"}`, t[key]]));
  metric("edge_relay_metrics_ports_omitted", "Ports left out of the per-port series (see /metrics?ports=all).", "gauge", [["", omitted]]);
  // One string per metric rather than one per line: tens of thousands of ports make less garbage.
  for (const [name, help, value] of PORT_METRICS) {
    let samples = `# HELP ${name} ${help}\n# TYPE ${name} ${name.endsWith("_total") ? "counter" : "gauge"}`;
    for (let i = 0; i < ports.length; i++) samples += "\n" + name + labels[i] + " " + value(ports[i]!);
    lines.push(samples);
  }
  metric("edge_relay_network_ports", "Ports attached to a network.", "gauge", nets.map((n) => [`{network="${n.name}"}`, n.ports.size]));
  metric("edge_relay_network_macs", "Learned MAC addresses in a network.", "gauge", nets.map((n) => [`{network="${n.name}"}`, n.macs.size]));
  const dhcp = (value: (h: GatewayHost) => number): [string, number][] => hosts.map((h) => [`{network="${h.spec.network}"}`, value(h)]);
  metric("edge_relay_dhcp_leases", "Addresses a --dhcp network has given out now (leases, offers and ARP checks).", "gauge", dhcp((h) => h.inUse()));
  metric("edge_relay_dhcp_pool_addresses", "Addresses in a --dhcp network's pool.", "gauge", dhcp((h) => h.poolSize()));
  metric("edge_relay_dhcp_acks_total", "DHCP ACKs sent (leases given or renewed).", "counter", dhcp((h) => h.counters.acks));
  metric("edge_relay_dhcp_naks_total", "DHCP NAKs sent (requests for an address the client may not have).", "counter", dhcp((h) => h.counters.naks));
  metric("edge_relay_dhcp_drops_total", "DHCP DISCOVERs and guest packets dropped, by reason.", "counter", hosts.flatMap((h) =>
    (["malformed", "portCap", "exhausted"] as const).map((r): [string, number] => [`{network="${h.spec.network}",reason="${r.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)}"}`, h.counters[r]])));
  metric("edge_relay_dhcp_conflicts_total", "Addresses an ARP check found in use before they were offered.", "counter", dhcp((h) => h.counters.conflicts));
  metric("edge_relay_dhcp_rogue_replies_total", "DHCP OFFERs and ACKs seen from another server on a --dhcp network.", "counter", dhcp((h) => h.counters.rogueReplies));
  metric("edge_relay_dns_queries_total", "DNS queries to a --dhcp network's gateway.", "counter", dhcp((h) => h.counters.dnsQueries));
  for (const [name, help, key] of RELAY_COUNTERS) metric(name, help, "counter", [["", s[key]]]);
  metric("edge_relay_tunnels", "Tunnels connected to this relay.", "gauge", [["", s.limits.tunnels]]);
  metric("edge_relay_memory_queued_bytes", "Bytes queued across every port.", "gauge", [["", s.limits.memoryUsed]]);
  metric("edge_relay_memory_drops_total", "Frames dropped because the memory budget was spent.", "counter", [["", s.limits.memoryDrops]]);
  metric("edge_relay_datagram_peers", "Peers of a --qemu-udp socket.", "gauge", s.datagrams.map((d) => [datagramLabel(d), d.peers]));
  metric("edge_relay_datagram_peers_evicted_total", "Peers of a --qemu-udp socket forgotten to make room.", "counter", s.datagrams.map((d) => [datagramLabel(d), d.evicted]));
  metric("edge_relay_datagram_drops_total", "Datagrams a --qemu-udp socket dropped rather than made a port of, or lost at the socket (kernel: its receive buffer full), by reason.", "counter", s.datagrams.flatMap(datagramDrops));
  for (const key of ["delayed", "lost", "duplicated", "reordered", "corrupted", "rateDropped"] as const) {
    const name = `edge_relay_impairment_${key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)}_total`;
    metric(name, `Frames an impairment ${key === "rateDropped" ? "dropped for its rate limit" : key}.`, "counter", s.impairments.map((i) => [`{target="${i.target}"}`, i[key]]));
  }
  metric("edge_relay_uplink_up", "1 when the uplink is connected.", "gauge", s.uplink ? [["", s.uplink.state === "up" ? 1 : 0]] : []);
  const bp = s.backplane;
  metric("edge_relay_backplane_up", "1 when the NATS backplane is connected.", "gauge", bp ? [["", bp.state === "up" ? 1 : 0]] : []);
  metric("edge_relay_backplane_messages_total", "Backplane messages, by direction.", "counter", bp ? [['{direction="in"}', bp.messagesIn], ['{direction="out"}', bp.messagesOut]] : []);
  metric("edge_relay_backplane_bytes_total", "Backplane message bytes, by direction.", "counter", bp ? [['{direction="in"}', bp.bytesIn], ['{direction="out"}', bp.bytesOut]] : []);
  metric("edge_relay_backplane_drops_total", "Frames not published to the backplane (NATS down or backlogged).", "counter", bp ? [["", bp.drops]] : []);
  metric("edge_relay_backplane_errors_total", "Backplane messages from other hubs that did not decode.", "counter", bp ? [["", bp.errors]] : []);
  metric("edge_relay_backplane_subscribed", "1 for each network this hub hears on the backplane.", "gauge", bp ? bp.networks.slice(0, view.networks).map((n) => [`{network="${n}"}`, 1]) : []);
  metric("edge_relay_uptime_seconds", "Seconds since the relay started.", "gauge", [["", s.uptime]]);
  return lines.join("\n") + "\n";
}

// ───────────────────────────── hub state ─────────────────────────────
//
// A hub started with --public-url keeps in its state directory what sites need: a self-signed P-256
// certificate (its DER written out here by hand: sixty lines instead of a dependency tree, and nothing
// for `bun build --compile` or the distroless image to miss), an admin token and site tokens. A join
// string carries the URL, the certificate's SHA-256 and a token; the certificate itself is not in it:
// a site learns it from the hub before each dial and trusts it only while its hash is the pinned one.

const HUB_CERT = "hub-cert.pem";
const HUB_KEY = "hub-key.pem";
const HUB_TOKENS = "tokens.json";
const HUB_ADMIN = "admin-token";
/** The `site` token's join string, for a person to read: the hub's logs never carry it. */
const HUB_SITE_JOIN = "site-join";
/** Held (created exclusively, holding the writer's pid) while a process rewrites tokens.json. */
const HUB_LOCK = "tokens.json.lock";
const LOCK_WAIT_MS = 5_000;
/** k3s's `K10<sha256>::…` is the model: a prefix with a version, the pin, the credential, then the hub. */
const JOIN_PREFIX = "ER1";
const JOIN_STRING = /^ER1([0-9a-f]{64})::(\S+)@([^@\s]+)$/;
const JOIN_EXPECTED = `expected a join string ${JOIN_PREFIX}<SHA-256 hex>::TOKEN@HOST:PORT as a hub prints it`;
/** The close code (application range) for a tunnel or v86 port whose token was revoked. */
const TOKEN_REVOKED = 4401;

/** DER: a tag, its length, then the content. */
function der(tag: number, ...parts: Uint8Array[]): Uint8Array {
  const body = Buffer.concat(parts);
  const n = body.length;
  const length = n < 0x80 ? [n] : n < 0x100 ? [0x81, n] : [0x82, n >> 8, n & 0xff];
  return Buffer.concat([Buffer.from([tag, ...length]), body]);
}

const derSequence = (...parts: Uint8Array[]) => der(0x30, ...parts);

function derOid(text: string): Uint8Array {
  const [a, b, ...rest] = text.split(".").map(Number);
  const bytes = [40 * a! + b!];
  for (const n of rest) {
    const base128 = [n & 0x7f];
    for (let x = n >> 7; x > 0; x >>= 7) base128.unshift(0x80 | (x & 0x7f));
    bytes.push(...base128);
  }
  return der(0x06, Buffer.from(bytes));
}

/** RFC 5280: UTCTime before 2050, GeneralizedTime from then on. */
function derTime(date: Date): Uint8Array {
  const text = `${date.toISOString().replace(/[-:T]/g, "").slice(0, 14)}Z`;
  return date.getUTCFullYear() < 2050 ? der(0x17, Buffer.from(text.slice(2))) : der(0x18, Buffer.from(text));
}

/** An IP address's bytes for a subjectAltName (IPv6 with `::` expanded). */
function ipBytes(address: string): Uint8Array {
  if (isIPv4(address)) return Buffer.from(address.split(".").map(Number));
  const [head, tail] = address.split("::").map((part) => (part ? part.split(":") : []));
  const groups = tail === undefined ? head! : [...head!, ...Array(8 - head!.length - tail.length).fill("0"), ...tail];
  return Buffer.from(groups.flatMap((g) => [parseInt(g, 16) >> 8, parseInt(g, 16) & 0xff]));
}

/** PEM armour around DER. */
function pem(label: string, bytes: Uint8Array): string {
  return `-----BEGIN ${label}-----\n${Buffer.from(bytes).toString("base64").match(/.{1,64}/g)!.join("\n")}\n-----END ${label}-----\n`;
}

/**
 * A self-signed ECDSA P-256 certificate for `name` (a host name or an IP address), valid from an
 * hour ago with no end (RFC 5280's 99991231235959Z): the pin, not a date, decides whether a site trusts it.
 * @internal
 */
export function selfSignedCertificate(name: string): { cert: string; key: string } {
  const { privateKey, publicKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
  const ecdsaWithSha256 = derSequence(derOid("1.2.840.10045.4.3.2"));
  const subject = derSequence(der(0x31, derSequence(derOid("2.5.4.3"), der(0x0c, Buffer.from(name)))));
  const altName = isIP(name) === 0 ? der(0x82, Buffer.from(name)) : der(0x87, ipBytes(name));
  const serial = crypto.getRandomValues(new Uint8Array(16));
  // DER wants a positive INTEGER in its fewest bytes: a first byte of 0x01–0x7f is both, always 16 bytes.
  serial[0] = (serial[0]! % 0x7f) + 1;
  const extension = (id: string, critical: boolean, value: Uint8Array) =>
    derSequence(derOid(id), ...(critical ? [der(0x01, Buffer.from([0xff]))] : []), der(0x04, value));
  const tbs = derSequence(
    der(0xa0, der(0x02, Buffer.from([2]))),
    der(0x02, serial),
    ecdsaWithSha256,
    subject,
    derSequence(derTime(new Date(Date.now() - 3_600_000)), derTime(new Date("9999-12-31T23:59:59Z"))),
    subject,
    publicKey.export({ type: "spki", format: "der" }),
    der(0xa3, derSequence(
      extension("2.5.29.17", false, derSequence(altName)),
      extension("2.5.29.19", true, derSequence()),
      extension("2.5.29.15", true, der(0x03, Buffer.from([0x07, 0x80]))),
      extension("2.5.29.37", false, derSequence(derOid("1.3.6.1.5.5.7.3.1"))),
    )),
  );
  const signature = sign("sha256", tbs, privateKey);
  return { cert: pem("CERTIFICATE", derSequence(tbs, ecdsaWithSha256, der(0x03, Buffer.from([0]), signature))), key: privateKey.export({ type: "pkcs8", format: "pem" }) as string };
}

/** A token the hub issued: `site` (every network) at the first start, then one per invite. */
interface HubToken {
  id: string;
  token: string;
  /** Networks it may attach; absent: every network. */
  networks?: string[];
  created: string;
}

const HubTokensFile = v.strictObject({
  url: v.string(),
  /** Of the certificate the hub serves: its own, or --tls-cert's. */
  fingerprint: Fingerprint,
  tokens: v.array(
    v.strictObject({
      id: v.pipe(v.string(), v.regex(NETWORK_NAME)),
      token: AcceptedSecret,
      networks: v.optional(v.array(v.pipe(v.string(), v.regex(NETWORK_NAME)))),
      created: v.string(),
    }),
  ),
});

type HubTokens = v.InferOutput<typeof HubTokensFile>;

/** tokens.json of a state directory; an error names the file and the entry, never a value. */
function readHubTokens(dir: string): HubTokens {
  const path = join(dir, HUB_TOKENS);
  let text;
  try {
    text = readFileSync(path, "utf8");
  } catch (error) {
    const missing = (error as { code?: string }).code === "ENOENT";
    throw new Error(missing ? `no hub in ${dir}: start one there first with ${flagOf("publicUrl")} wss://NAME:PORT ${flagOf("stateDir")} ${dir}` : describeError(`Cannot read ${path}`, error));
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw new Error(`${path} is not valid JSON`);
  }
  const result = v.safeParse(HubTokensFile, json);
  if (!result.success) throw new Error(`${path} is not a hub's token file (at ${v.getDotPath(result.issues[0]) ?? "the top"})`);
  return result.output;
}

const writeHubTokens = (dir: string, tokens: HubTokens) => writeAtomically(join(dir, HUB_TOKENS), `${JSON.stringify(tokens, null, 2)}\n`, 0o600);

/**
 * Runs `change` (a read, then a write of tokens.json) holding the state directory's lock, so two
 * writers (an --invite at the shell, POST /invites, a starting hub) never lose each other's token.
 * A lock whose process is gone is taken over; one held longer than LOCK_WAIT_MS is an error.
 * @internal
 */
export function withHubLock<T>(dir: string, change: () => T): T {
  const path = join(dir, HUB_LOCK);
  const deadline = Date.now() + LOCK_WAIT_MS;
  for (;;) {
    try {
      writeFileSync(path, `${process.pid}\n`, { flag: "wx", mode: 0o600 });
      break;
    } catch (error) {
      if ((error as { code?: string }).code !== "EEXIST") throw new Error(describeError(`Cannot lock ${join(dir, HUB_TOKENS)}`, error));
    }
    if (!lockHolderAlive(path)) rmSync(path, { force: true });
    else if (Date.now() > deadline) throw new Error(`Cannot lock ${join(dir, HUB_TOKENS)}: ${path} is held by process ${readFileSync(path, "utf8").trim()}`);
    else Bun.sleepSync(10);
  }
  try {
    return change();
  } finally {
    rmSync(path, { force: true });
  }
}

/** Whether the process a lock file names runs (an empty file is a writer between create and write). */
function lockHolderAlive(path: string): boolean {
  let pid;
  try {
    pid = Number(readFileSync(path, "utf8"));
  } catch {
    return true;
  }
  if (!Number.isInteger(pid) || pid <= 0) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as { code?: string }).code !== "ESRCH";
  }
}

/** `ER1<pin>::TOKEN@HOST:PORT`: what a site needs in one argument. */
function joinString(url: string, fingerprint: string, token: string): string {
  return `${JOIN_PREFIX}${fingerprint.replace(/:/g, "").toLowerCase()}::${token}@${new URL(url).host}`;
}

/** The uplink options a join string stands for; a bad one is a ConfigError that never quotes it. */
function parseJoinString(text: string): { uplink: string; uplinkToken: string; uplinkFingerprint: string } {
  const m = JOIN_STRING.exec(text.trim());
  const address = m && parseHostPort(m[3]!);
  if (!m || !address || address.port === 0) throw new ConfigError(`${flagOf("join")}: ${JOIN_EXPECTED}`);
  return { uplink: `wss://${formatHostPort(address)}`, uplinkToken: m[2]!, uplinkFingerprint: m[1]!.toUpperCase().replace(/(..)(?!$)/g, "$1:") };
}

/**
 * What --public-url, --join and --join-file mean for the raw configuration, before it is validated:
 * the hub listens on all addresses, IPv6 and IPv4 (`[::]`: Bun's listener is dual-stack), at the URL's
 * port unless --http says otherwise; a join string
 * stands for --uplink, --uplink-token and --uplink-fingerprint, which it may not be combined with.
 */
function applyHubAndJoin(raw: Record<string, unknown>, joinFile: string | undefined, read: (option: string, path: string) => string): void {
  if (typeof raw.publicUrl === "string" && raw.http === undefined && URL.canParse(raw.publicUrl)) {
    const port = new URL(raw.publicUrl).port;
    if (port !== "") raw.http = `[::]:${port}`;
  }
  if (joinFile !== undefined) raw.join = read(flagOf("joinFile"), joinFile).trim();
  if (raw.join === undefined) return;
  if (typeof raw.join !== "string") throw new ConfigError(`${flagOf("join")}: ${JOIN_EXPECTED}`);
  for (const key of ["uplink", "uplinkToken", "uplinkFingerprint", "insecure"]) {
    if (raw[key] !== undefined && raw[key] !== false) throw new ConfigError(`${flagOf("join")}: cannot be combined with ${flagOf(key)}: the join string carries the hub's URL, certificate pin and token`);
  }
  Object.assign(raw, parseJoinString(raw.join));
}

/** A hub's state as a running hub uses it. */
export interface HubState {
  dir: string;
  url: string;
  cert: { path: string; text: string };
  key: { path: string; text: string };
  fingerprint: string;
  adminToken: string;
  adminFile: string;
  /** The `site` token's join string ("" once revoked), also in `siteFile`. */
  join: string;
  siteFile: string;
  /** Whether this start made the state (so the site line is shown, once). */
  created: boolean;
}

/**
 * Opens the hub state in `dir` for `url` (`wss://NAME:PORT`), making whatever is missing: the
 * certificate and key (unless `given`, --tls-cert's, is served instead), the admin token, the token
 * file with a `site` token. A certificate that exists but is not for NAME is an error: sites pin it,
 * so it is never replaced behind their back.
 * @internal
 */
export function openHubState(dir: string, url: string, given?: { cert: { path: string; text: string }; key: { path: string; text: string } }): HubState {
  const name = urlHost(new URL(url));
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
  } catch (error) {
    throw new Error(describeError(`${flagOf("stateDir")}: Cannot create ${dir}`, error));
  }
  const certPath = join(dir, HUB_CERT);
  const keyPath = join(dir, HUB_KEY);
  const adminFile = join(dir, HUB_ADMIN);
  let created = false;
  if (given === undefined && (!existsSync(certPath) || !existsSync(keyPath))) {
    const made = selfSignedCertificate(name);
    writeAtomically(keyPath, made.key, 0o600);
    writeAtomically(certPath, made.cert, 0o644);
    created = true;
  }
  const cert = given?.cert ?? { path: certPath, text: readFileSync(certPath, "utf8") };
  const x509 = new X509Certificate(cert.text);
  if (!(isIP(name) ? x509.checkIP(name) : x509.checkHost(name))) {
    throw new Error(`${flagOf("publicUrl")}: the certificate in ${cert.path} is not for ${name}; sites pin it, so it is not replaced: use its name, or another ${flagOf("stateDir")}`);
  }
  if (!existsSync(adminFile)) writeAtomically(adminFile, `${randomToken()}\n`, 0o600);
  const fingerprint = x509.fingerprint256;
  const tokens = withHubLock(dir, () => {
    let read: HubTokens;
    if (existsSync(join(dir, HUB_TOKENS))) read = { ...readHubTokens(dir), url, fingerprint };
    else {
      read = { url, fingerprint, tokens: [{ id: "site", token: randomToken(), created: new Date().toISOString() }] };
      created = true;
    }
    writeHubTokens(dir, read);
    return read;
  });
  const site = tokens.tokens.find((t) => t.id === "site");
  const siteJoin = site ? joinString(url, fingerprint, site.token) : "";
  const siteFile = join(dir, HUB_SITE_JOIN);
  if (site) writeAtomically(siteFile, `${siteJoin}\n`, 0o600);
  else rmSync(siteFile, { force: true });
  return {
    dir,
    url,
    cert,
    key: given?.key ?? { path: keyPath, text: readFileSync(keyPath, "utf8") },
    fingerprint,
    adminToken: readFileSync(adminFile, "utf8").trim(),
    adminFile,
    join: siteJoin,
    siteFile,
    created,
  };
}

/** A new token limited to `networks`: its id and the join string for it. @internal */
export function addInvite(dir: string, networks: string[]): { id: string; networks: string[]; join: string } {
  for (const n of networks) if (!NETWORK_NAME.test(n)) throw new ConfigError(`${flagOf("invite")}: ${JSON.stringify(n)} is not a network name`);
  if (networks.length === 0) throw new ConfigError(`${flagOf("invite")}: name at least one network`);
  const entry: HubToken = { id: Buffer.from(crypto.getRandomValues(new Uint8Array(4))).toString("hex"), token: randomToken(), networks, created: new Date().toISOString() };
  const tokens = withHubLock(dir, () => {
    const read = readHubTokens(dir);
    writeHubTokens(dir, { ...read, tokens: [...read.tokens, entry] });
    return read;
  });
  return { id: entry.id, networks, join: joinString(tokens.url, tokens.fingerprint, entry.token) };
}

/** The hub's tokens without their secrets. @internal */
export function listInvites(dir: string): Omit<HubToken, "token">[] {
  return readHubTokens(dir).tokens.map(({ token: _secret, ...shown }) => shown);
}

/** Removes the token `id` (the `site` one with its site-join file); false when there is none. */
function revokeInvite(dir: string, id: string): boolean {
  const found = withHubLock(dir, () => {
    const tokens = readHubTokens(dir);
    const kept = tokens.tokens.filter((t) => t.id !== id);
    if (kept.length === tokens.tokens.length) return false;
    writeHubTokens(dir, { ...tokens, tokens: kept });
    return true;
  });
  if (found && id === "site") rmSync(join(dir, HUB_SITE_JOIN), { force: true });
  return found;
}

/** The grants of the hub's tokens, read from its state directory. */
function hubGrants(dir: string): Grant[] {
  return makeGrants(readHubTokens(dir).tokens);
}

/**
 * Keeps `grants` equal to `fixed` plus the state directory's tokens: at once, when tokens.json
 * changes (new and revoked invites take effect without a restart) and on `reload()` (SIGHUP).
 * `revoked` hears of each reload, to close the tunnels whose token went.
 */
function watchHubTokens(dir: string, grants: Grant[], fixed: Grant[], revoked: () => void, log: Logger): { reload(): void; stop(): void } {
  let pending = false;
  const reload = () => {
    pending = false;
    let read;
    try {
      read = hubGrants(dir);
    } catch (error) {
      log.warn(`hub: keeping the tokens in use: ${(error as Error).message}`);
      return;
    }
    grants.splice(0, grants.length, ...fixed, ...read);
    log.info(`hub: ${read.length} token${read.length === 1 ? "" : "s"} in ${join(dir, HUB_TOKENS)}`);
    revoked();
  };
  const watcher = watch(dir, (_event, file) => {
    if (file !== HUB_TOKENS || pending) return;
    pending = true;
    setImmediate(reload);
  });
  return { reload, stop: () => watcher.close() };
}

/**
 * A URL's user or password as Bun's proxy dial sends it: each `%XX` escape is that byte, a `%` that
 * starts none stays itself (decodeURIComponent would throw on `50%off`).
 */
function userinfoBytes(text: string): Buffer {
  return Buffer.concat(text.split(/(%[0-9a-f]{2})/i).map((part, i) => (i % 2 === 1 ? Buffer.of(Number.parseInt(part.slice(1), 16)) : Buffer.from(part))));
}

/**
 * A TCP connection to `host`:`port` through an HTTP proxy's CONNECT (Basic credentials from its
 * URL), for the pinned certificate's first look to take the road the tunnel takes. Undefined when
 * the proxy cannot be reached or refuses: the dial that follows meets the same and says it.
 */
function connectThroughProxy(proxy: UplinkProxy, host: string, port: number, timeoutMs: number): Promise<NetSocket | undefined> {
  const via = new URL(proxy.url);
  const target = formatHostPort({ host, port });
  const credentials = via.username === "" && via.password === "" ? "" : `Proxy-Authorization: Basic ${Buffer.concat([userinfoBytes(via.username), Buffer.from(":"), userinfoBytes(via.password)]).toString("base64")}\r\n`;
  return new Promise((resolve) => {
    const socket = tcpConnect({ host: urlHost(via), port: Number(via.port || 80) }, () => socket.write(`CONNECT ${target} HTTP/1.1\r\nHost: ${target}\r\n${credentials}\r\n`));
    let head = "";
    const fail = () => (socket.destroy(), resolve(undefined));
    const onData = (chunk: Buffer) => {
      head += chunk.toString("latin1");
      const end = head.indexOf("\r\n\r\n");
      if (end < 0) return head.length > 8192 ? fail() : undefined;
      socket.off("data", onData).setTimeout(0);
      // Nothing follows the head before the TLS handshake this side starts.
      if (!/^HTTP\/1\.[01] 200/.test(head) || end + 4 !== head.length) return fail();
      resolve(socket);
    };
    // A proxy that hangs up unanswered raises no error, and a closed socket's timeout never fires.
    socket.on("data", onData).setTimeout(timeoutMs, fail).on("error", fail).on("close", fail);
  });
}

/**
 * Before each dial of a joined site: a self-signed certificate the hub presents becomes the CA the
 * dial trusts (the join string has its hash, not the certificate); one a CA signed cannot be its own
 * trust anchor and is left to the system's CAs (or --uplink-ca, when given this is not used). The
 * dial then checks the pin as --uplink-fingerprint always does, so another certificate is refused
 * with that wording. Once the pinned certificate is known it is kept: no other can replace it. With
 * a proxy, the look goes through it as the tunnel does.
 */
function learnPinnedCertificate(options: UplinkOptions): () => Promise<void> {
  const url = new URL(options.url);
  const host = urlHost(url);
  const port = Number(url.port || 443);
  return async () => {
    if (options.ca !== undefined && new X509Certificate(options.ca.text).fingerprint256 === options.fingerprint) return;
    const proxied = options.proxy && (await connectThroughProxy(options.proxy, host, port, options.handshakeMs));
    if (options.proxy && proxied === undefined) return;
    await new Promise<void>((resolve) => {
      const socket = tlsConnect({ host, port, socket: proxied, servername: isIP(host) ? undefined : host, rejectUnauthorized: false }, () => {
        const raw = socket.getPeerCertificate().raw;
        socket.destroy();
        const presented = raw && new X509Certificate(raw);
        const selfSigned = presented && presented.issuer === presented.subject && presented.verify(presented.publicKey);
        options.ca = selfSigned ? { path: "the certificate the join string pins", text: pem("CERTIFICATE", raw) } : undefined;
        resolve();
      });
      socket.setTimeout(options.handshakeMs, () => (socket.destroy(), resolve()));
      // The dial that follows meets the same failure and says it in its words.
      socket.on("error", () => resolve());
    });
  };
}

// ───────────────────────────── HTTP app ─────────────────────────────
//
// Hono routes the requests; once upgraded, a tunnel's or a v86 port's frames bypass Hono, and both
// upgrades pass one gate (client, credential, checks, admission). With an admin token every other
// route but /healthz needs it: the Bearer header, or the session cookie /login gives (never the
// token itself). The pages' HTML is in the page assets section; their CSP allows only their own.

/** Where relays before sessions kept the token itself: cleared whenever a browser that has it logs in or out. */
const TOKEN_COOKIE = "edge_relay_admin";
const LOGIN_PATH = "/login";
const LOGOUT_PATH = "/logout";
const ADMIN_SESSION_SECONDS = 12 * 3600;
/** Sessions held at once; a further login ends the oldest. */
const ADMIN_SESSIONS = 1024;
const LOGIN_BODY_LIMIT = 4096;
/** The WWW-Authenticate of a 401 for want of the admin token. */
const ADMIN_CHALLENGE = 'Bearer realm="edge-relay admin"';

/** Logged-in browsers: random ids, each valid until its expiry, logout, or a restart; at most `max` at once. @internal */
export class AdminSessions {
  readonly #expiry = new Map<string, number>();

  constructor(
    readonly max = ADMIN_SESSIONS,
    readonly lifetimeMs = ADMIN_SESSION_SECONDS * 1000,
  ) {}

  start(now = Date.now()): string {
    if (this.#expiry.size >= this.max) this.#expiry.delete(this.#expiry.keys().next().value!);
    const id = randomToken();
    this.#expiry.set(id, now + this.lifetimeMs);
    return id;
  }

  valid(id: string | undefined, now = Date.now()): boolean {
    const until = id === undefined ? undefined : this.#expiry.get(id);
    if (until === undefined) return false;
    if (until > now) return true;
    this.#expiry.delete(id!);
    return false;
  }

  end(id: string | undefined): void {
    if (id !== undefined) this.#expiry.delete(id);
  }

  get size(): number {
    return this.#expiry.size;
  }
}

/** Headers for a document of ours: its CSP allows its own inline script and style (by hash) and nothing else. */
function documentHeaders(html: string): Record<string, string> {
  const hashes = (tag: string) =>
    [...html.matchAll(new RegExp(`<${tag}>([\\s\\S]*?)</${tag}>`, "g"))]
      .map((m) => `'sha256-${new Bun.CryptoHasher("sha256").update(m[1]!).digest("base64")}'`)
      .join(" ") || "'none'";
  return {
    "Content-Security-Policy": `default-src 'none'; script-src ${hashes("script")}; style-src ${hashes("style")}; connect-src 'self'; img-src data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'`,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
  };
}

/**
 * The login form and /invites take small bodies only; a longer one is answered 413, read no further
 * than the limit. (A chunked body is read here and the request replaced by a copy whose peer Bun
 * cannot name: the app takes the client before any route runs.)
 */
const smallBody = bodyLimit({ maxSize: LOGIN_BODY_LIMIT, onError: (c) => c.text("request body too large\n", 413) });

/** The HTTP app's Hono environment: Bun's server, and the client each request comes from. */
type AppEnv = { Bindings: Server<SocketData>; Variables: { client: ClientAddress } };

/** A request's query; Bun leaves the URL of one without a Host header as the bare path, and Hono's own reader misses its query. */
function searchOf(request: Request): URLSearchParams {
  return new URL(request.url, "http://host").searchParams;
}

/**
 * Hono's path of a request, also of one without a Host header (HTTP/1.0, a load balancer's health
 * check), whose URL Bun leaves as the bare path.
 */
function requestPath(request: Request): string {
  return getPath(request.url.startsWith("/") ? ({ url: `http://host${request.url}` } as Request) : request);
}

/** Whatever a WebSocket of the HTTP listener carries: a tunnel, or a v86 port. */
type SocketData = TunnelData | V86Data;

/** What an upgrade endpoint (/tunnel, /v86/NETWORK) asks of the gate in createApp. */
interface UpgradeGate<D extends SocketData> {
  /** Named when no token is configured: `tunnel endpoint disabled`. */
  endpoint: string;
  /** Names the endpoint in refusals: `tunnel`, `v86 /v86/lab`. */
  what: string;
  /** Checked before the credential (a v86 page's origin): a refusal, or undefined to go on. */
  before?(client: ClientAddress): Response | undefined;
  /** The credential as given (a refusal says wrong or none) and the grant it matches, if any. */
  credential(): { given: string | undefined; grant: Grant | undefined };
  /** Checked once authenticated (the subprotocol, the grant's networks). */
  after?(grant: Grant, client: ClientAddress): Response | undefined;
  admission: AdmissionLimit;
  /** What the WebSocket carries from the upgrade on. */
  data(grant: Grant, client: ClientAddress): D;
  headers?: Record<string, string>;
}

interface AppContext {
  grants: Grant[];
  adminToken: string | undefined;
  /** --trusted-proxy: the peers whose X-Forwarded-For or Forwarded names the client. */
  trustedProxies: BlockList | undefined;
  /** Served over TLS: the session cookie is Secure. */
  tls: boolean;
  snapshot(view?: StatusView): Snapshot;
  /** The backplane's state for /healthz, without building a snapshot; undefined without --backplane. */
  backplaneState(): string | undefined;
  /** Every network, for /metrics. */
  networks(): Iterable<Network>;
  /** The --dhcp networks' gateway hosts, for /metrics. */
  gateways(): Iterable<GatewayHost>;
  totals: PortTotals;
  counters: RelayCounters;
  tunnels: TunnelServer;
  captures: CaptureRegistry;
  impairments: ImpairmentTable;
  v86: V86Server;
  log: Logger;
}

/**
 * Routes: /healthz, /status, /metrics, the status page at /, and the tunnel upgrade (the frames then
 * bypass Hono). With an admin token, every route but /healthz, the tunnel and v86 needs it, or the
 * session /login starts for it. A right credential is always served; an address whose wrong ones
 * keep coming is answered 429 for its further wrong ones for a while.
 */
function createApp(ctx: AppContext) {
  const app = new Hono<AppEnv>({ getPath: requestPath });
  const refusals = rateLimitedLog(ctx.log.warn, 10, 10_000);
  const throttle = new AuthThrottle();
  // The client (behind a trusted proxy, the one it names), once, from the request Bun handed over.
  app.use("*", (c, next) => {
    c.set("client", clientAddress(c.env.requestIP(c.req.raw), c.req.raw.headers, ctx.trustedProxies));
    return next();
  });
  const clientOf = (c: Context<AppEnv>) => c.get("client");
  /**
   * A request without the right credential: `answer` (a 401), counted and logged at a bounded rate.
   * A wrong credential (not a missing one) counts against its address: past the throttle's allowance
   * it gets 429 instead, with no log line.
   */
  const refused = (client: ClientAddress, what: string, credential: string | undefined, answer: () => Response): Response => {
    if (credential) {
      const wait = throttle.retryAfter(client.address);
      if (wait > 0) {
        ctx.counters.authThrottled = throttle.throttled;
        return new Response("too many failed attempts; try later\n", { status: 429, headers: { "Retry-After": String(wait) } });
      }
      throttle.failed(client.address);
    }
    ctx.counters.authFailures++;
    refusals.log(`${what}: refused ${formatClient(client)}: ${credential ? "wrong token" : "no token"}`);
    return answer();
  };
  const pageHeaders = documentHeaders(PAGE_HTML);
  let page = PAGE_HTML;
  if (ctx.adminToken !== undefined) {
    page = PAGE_HTML_WITH_LOGOUT;
    const admin = makeGrants([{ token: ctx.adminToken, networks: undefined }]);
    const sessions = new AdminSessions();
    const loginHeaders = { ...documentHeaders(LOGIN_HTML), "WWW-Authenticate": ADMIN_CHALLENGE };
    const cookie = { path: "/", httpOnly: true, sameSite: "Strict", secure: ctx.tls } as const;
    /** A 303 back to the page that sets the session cookie (or clears it), and clears a token cookie of old. */
    const toPage = (c: Context, session: string | undefined) => {
      if (session === undefined) deleteCookie(c, ADMIN_COOKIE, cookie);
      else setCookie(c, ADMIN_COOKIE, session, { ...cookie, maxAge: ADMIN_SESSION_SECONDS });
      if (getCookie(c, TOKEN_COOKIE) !== undefined) deleteCookie(c, TOKEN_COOKIE, cookie);
      c.header("Cache-Control", "no-store");
      return c.redirect("./", 303);
    };
    app.use("*", async (c, next) => {
      const path = c.req.path;
      if (path === TUNNEL_PATH || path.startsWith(`${V86_PATH}/`) || path === "/healthz" || c.req.method === "OPTIONS") return next();
      if ((path === LOGIN_PATH || path === LOGOUT_PATH) && c.req.method === "POST") return next();
      const authorization = c.req.header("authorization");
      if (authorization === undefined ? sessions.valid(getCookie(c, ADMIN_COOKIE)) : authenticate(authorization, admin)) return next();
      // The login form is the way in: showing it is no failure, nor is a session that ended (it was no guess).
      if (path === "/" && authorization === undefined) return c.html(LOGIN_HTML, 401, loginHeaders);
      return refused(clientOf(c), path, authorization, () =>
        path === "/" ? c.html(LOGIN_HTML, 401, loginHeaders) : c.text("unauthorized\n", 401, { "WWW-Authenticate": ADMIN_CHALLENGE }),
      );
    });
    app.post(LOGIN_PATH, smallBody, async (c) => {
      const token = new URLSearchParams(await c.req.text()).get("token") ?? "";
      if (!authenticateToken(token, admin)) return refused(clientOf(c), "login", token || undefined, () => c.html(LOGIN_HTML.replace("<!--message-->", LOGIN_FAILED), 401, loginHeaders));
      return toPage(c, sessions.start());
    });
    app.post(LOGOUT_PATH, (c) => {
      sessions.end(getCookie(c, ADMIN_COOKIE));
      return toPage(c, undefined);
    });
  }
  // Nothing to hide in what a route allows; HAProxy's plain `option httpchk` asks this of /.
  app.options("*", (c) => c.body(null, 204, { Allow: "GET, HEAD, POST, PUT, DELETE, OPTIONS" }));
  app.get("/", (c) => c.html(page, 200, pageHeaders));
  // A load balancer's check: a hub whose backplane is down cannot reach the other hubs' sites.
  app.get("/healthz", (c) => {
    const state = ctx.backplaneState();
    return state !== undefined && state !== "up" ? c.text(`backplane ${state}\n`, 503) : c.text("ok\n");
  });
  /** A query's number or `all`; anything else means the default (undefined). */
  const queryLimit = (value: string | undefined) => (value === "all" ? Infinity : value !== undefined && /^\d+$/.test(value) ? Number(value) : undefined);
  app.get("/status", (c) => {
    const query = searchOf(c.req.raw);
    const q = (name: string) => queryLimit(query.get(name) ?? undefined);
    return c.json(ctx.snapshot({ macs: q("macs"), networks: q("networks"), offset: q("offset"), ports: q("ports") }));
  });
  app.get("/metrics", (c) => {
    const query = searchOf(c.req.raw);
    const view: MetricsView = { ports: queryLimit(query.get("ports") ?? undefined) ?? METRICS_PORTS, networks: queryLimit(query.get("networks") ?? undefined) ?? METRICS_NETWORKS };
    const text = renderMetrics(ctx.snapshot({ networks: 0 }), ctx.networks(), ctx.totals.collect(ctx.networks()), view, ctx.gateways());
    return c.text(text, 200, { "Content-Type": "text/plain; version=0.0.4" });
  });
  // Link impairment at run time: PUT the spec as text, DELETE to restore the clean path.
  const impairTarget = (path: string) => decodeURIComponent(path.slice("/impair/".length));
  app.get("/impair", (c) => c.json(ctx.impairments.snapshot()));
  app.put("/impair/*", async (c) => {
    try {
      const spec = parseImpairment(await c.req.text());
      ctx.impairments.set(impairTarget(c.req.path), spec);
      return c.text(`${formatImpairment(spec)}\n`);
    } catch (error) {
      return c.text(`${(error as Error).message}\n`, 400);
    }
  });
  app.delete("/impair/*", (c) => {
    try {
      return ctx.impairments.set(impairTarget(c.req.path), undefined) ? c.body(null, 204) : c.text("no such impairment\n", 404);
    } catch (error) {
      return c.text(`${(error as Error).message}\n`, 400);
    }
  });
  app.get("/capture", (c) => {
    const request = parseCaptureRequest(searchOf(c.req.raw));
    if (typeof request === "string") return c.text(`${request}\n`, 400);
    // A capture may be quiet for long: no idle timeout, it ends when the reader or its limits do.
    c.env.timeout(c.req.raw, 0);
    const started = ctx.captures.open(request, clientOf(c).address);
    if (typeof started === "string") return c.text(`${started}\n`, started.startsWith("no network") ? 404 : 429);
    return new Response(started, { headers: { "Content-Type": "application/x-pcapng", "Cache-Control": "no-store" } });
  });
  /**
   * The one way in for a WebSocket: the endpoint is on (a token is configured), the client (behind
   * a trusted proxy, the one it names), what the endpoint checks first, the credential (a wrong one
   * counts toward the throttle), what it checks of the grant, admission within the limits, the upgrade.
   */
  const upgrade = <D extends SocketData>(c: Context<AppEnv>, gate: UpgradeGate<D>): Response => {
    if (ctx.grants.length === 0) return c.text(`${gate.endpoint} endpoint disabled: no token configured\n`, 404);
    const client = clientOf(c);
    const early = gate.before?.(client);
    if (early) return early;
    const { given, grant } = gate.credential();
    if (!grant) return refused(client, gate.what, given, () => c.text("unauthorized\n", 401, { "WWW-Authenticate": 'Bearer realm="edge-relay"' }));
    const late = gate.after?.(grant, client);
    if (late) return late;
    const full = gate.admission.admit(client.address);
    if (full !== undefined) return c.text(`${full}\n`, 503, { "Retry-After": "30" });
    const upgraded = c.env.upgrade(c.req.raw, { data: gate.data(grant, client), headers: gate.headers });
    return upgraded ? new Response(null) : c.text("expected a WebSocket upgrade\n", 426);
  };
  app.get(TUNNEL_PATH, (c) => {
    const authorization = c.req.header("authorization");
    return upgrade(c, {
      endpoint: "tunnel",
      what: "tunnel",
      credential: () => ({ given: authorization, grant: authenticate(authorization, ctx.grants) }),
      after() {
        const offered = (c.req.header("sec-websocket-protocol") ?? "").split(",").map((s) => s.trim());
        return offered.includes(TUNNEL_PROTOCOL) ? undefined : c.text(`expected subprotocol ${TUNNEL_PROTOCOL}\n`, 400);
      },
      admission: ctx.tunnels.admission,
      data: (grant, client): TunnelData => ({ grant, peer: formatClient(client), address: client.address }),
      headers: { "Sec-WebSocket-Protocol": TUNNEL_PROTOCOL },
    });
  });
  // v86's NIC: the token in the query string (all a browser's WebSocket can send) or a header.
  // Only the path is ever logged: the query string holds the token.
  app.get(`${V86_PATH}/:network`, (c) => {
    const name = c.req.param("network");
    const where = `v86 ${V86_PATH}/${name}`;
    const origin = c.req.header("origin");
    const shownOrigin = origin === undefined ? "" : ` (origin ${originOf(origin) === origin ? origin : JSON.stringify(origin.slice(0, 100))})`;
    const header = c.req.header("authorization");
    return upgrade(c, {
      endpoint: "v86",
      what: where,
      before(client) {
        if (!NETWORK_NAME.test(name)) return c.text("not a network name\n", 404);
        if (ctx.v86.originAllowed(origin)) return undefined;
        refusals.log(`${where}: refused ${formatClient(client)}${shownOrigin}: origin not allowed`);
        return c.text("origin not allowed\n", 403);
      },
      credential() {
        if (header !== undefined) return { given: header, grant: authenticate(header, ctx.grants) };
        const token = searchOf(c.req.raw).get("token");
        return { given: token ?? undefined, grant: authenticateToken(token, ctx.grants) };
      },
      after(grant, client) {
        if (!grant.networks || grant.networks.has(name)) return undefined;
        refusals.log(`${where}: refused ${formatClient(client)}: network not allowed for this token`);
        return c.text("network not allowed for this token\n", 403);
      },
      admission: ctx.v86.admission,
      data: (grant, client): V86Data => ({ v86: true, network: name, grant, peer: `${formatClient(client)}${shownOrigin}`, address: client.address }),
    });
  });
  return app;
}

/** POST /invites {"networks": [...]}, GET /invites, DELETE /invites/ID: behind the admin token like every other route. */
function mountInvites(app: Hono<AppEnv>, dir: string): void {
  app.get("/invites", (c) => c.json(listInvites(dir)));
  app.post("/invites", smallBody, async (c) => {
    let networks: unknown;
    try {
      networks = JSON.parse(await c.req.text())?.networks;
    } catch {
      networks = undefined;
    }
    if (!Array.isArray(networks) || !networks.every((n) => typeof n === "string")) return c.text('expected {"networks": ["NET", …]}\n', 400);
    try {
      return c.json(addInvite(dir, networks), 201);
    } catch (error) {
      return c.text(`${(error as Error).message}\n`, error instanceof ConfigError ? 400 : 500);
    }
  });
  app.delete("/invites/:id", (c) => (revokeInvite(dir, c.req.param("id")) ? c.body(null, 204) : c.text("no such invite\n", 404)));
}

// ───────────────────────────── lifecycle ─────────────────────────────
//
// startRelay reads as its steps: identity and counters, the network registry, the peers' servers,
// the HTTP listener, the backplane, the --dhcp gateway hosts, the QEMU ports, capture files, the
// uplink, the timers. A failed start stops what it started (Stoppers); networks that only tunnels
// or v86 ports brought go again when their last such port does (NetworkRegistry).

const consoleLogger: Logger = { info: (l) => console.log(l), warn: (l) => console.error(l) };

/** Bun.serve, with a failure to bind told the way every other listener's is, naming the option. */
function listenHttp<T>(address: HostPort, serve: () => T): T {
  try {
    return serve();
  } catch (error) {
    throw new Error(describeError(`--http: Cannot listen on ${formatHostPort(address)}`, error));
  }
}

/**
 * A hub's `[::]` takes IPv4 too (dual-stack, also with IPv6 switched off by sysctl); only where the
 * kernel has no IPv6 at all (`ipv6.disable=1`) does it fail, and the hub then listens on `0.0.0.0`.
 */
function listenAllAddresses<T>(host: string, hub: boolean, serve: (host: string) => T, log: Logger): [T, string] {
  if (!hub || host !== "::") return [serve(host), host];
  try {
    return [serve(host), host];
  } catch (error) {
    let ipv4;
    try {
      ipv4 = serve("0.0.0.0");
    } catch {
      throw error;
    }
    log.warn(describeError("hub: Cannot listen on IPv6 [::], so on IPv4 0.0.0.0 only", error));
    return [ipv4, "0.0.0.0"];
  }
}

/** A QEMU listener or group that fails to start, told naming its option as --http's is. */
async function startedFor<T>(key: "qemuListen" | "qemuUdp" | "qemuMcast", start: Promise<T>): Promise<T> {
  try {
    return await start;
  } catch (error) {
    throw new Error(`${flagOf(key)}: ${(error as Error).message}`);
  }
}

/** The host name as a relay name: what the name pattern allows of it. */
function defaultName(): string {
  return hostname().replace(/[^A-Za-z0-9_.-]/g, "-").replace(/^[^A-Za-z0-9]+/, "").slice(0, 64) || "relay";
}

/**
 * The relay's networks by name. Local ports' networks are made at start and stay; a tunnel or a
 * v86 port may bring one into being (up to --max-networks), and it goes again when the last port
 * other than the uplink and the backplane leaves it: checked once per event-loop turn, and only
 * for the networks that lost a port or were just made.
 * @internal
 */
export class NetworkRegistry {
  readonly #networks = new Map<string, Network>();
  /** Networks that local ports use: they stay when their ports go. */
  readonly #configured = new Set<string>();
  readonly #vacated = new Set<Network>();

  constructor(
    /** The switch settings of every network; its onDetach is the registry's. */
    readonly policy: SwitchPolicy,
    readonly maxNetworks: number,
    /** Told of every network made and released (the backplane joins and leaves, the uplink resyncs). */
    private readonly events: { made?(network: Network): void; released?(network: Network): void } = {},
  ) {
    policy.onDetach = (network) => this.#vacate(network);
  }

  get size(): number {
    return this.#networks.size;
  }

  get(name: string): Network | undefined {
    return this.#networks.get(name);
  }

  values(): IterableIterator<Network> {
    return this.#networks.values();
  }

  /** Every port of every network. */
  *ports(): Generator<Port> {
    for (const network of this.#networks.values()) yield* network.ports;
  }

  /** The network of that name, made if there is none yet: for local ports, whatever the limit. */
  getOrCreate(name: string): Network {
    let network = this.#networks.get(name);
    if (network === undefined) {
      this.#networks.set(name, (network = new Network(name, this.policy)));
      this.events.made?.(network);
    }
    return network;
  }

  /**
   * The network a peer asks for, made if need be within --max-networks. One made for an offer that
   * is then refused (a loop) goes again like one a port left.
   */
  forPeer(name: string): PeerNetwork {
    if (this.#networks.has(name)) return this.getOrCreate(name);
    if (this.#networks.size >= this.maxNetworks) return { refused: `this relay has the maximum of ${this.maxNetworks} networks` };
    const made = this.getOrCreate(name);
    this.#vacate(made);
    return made;
  }

  /** The networks made so far are the local ports' own: they stay when their ports go. */
  keepAll(): void {
    for (const name of this.#networks.keys()) this.#configured.add(name);
  }

  #vacate(network: Network): void {
    if (this.#vacated.size === 0) setImmediate(this.#release);
    this.#vacated.add(network);
  }

  readonly #release = (): void => {
    for (const n of this.#vacated) {
      if (this.#configured.has(n.name) || this.#networks.get(n.name) !== n || this.policy.stopping) continue;
      let used = false;
      for (const port of n.ports) if (port.kind !== "uplink" && port.kind !== "backplane" && (used = true)) break;
      if (!used) {
        this.#networks.delete(n.name);
        this.events.released?.(n);
      }
    }
    this.#vacated.clear();
  };
}

/** What a running relay stops, last started first (all at once); a failed start stops what it started. */
class Stoppers {
  readonly #all: (() => void | Promise<void>)[] = [];

  add(stop: () => void | Promise<void>): void {
    this.#all.push(stop);
  }

  async stopAll(): Promise<void> {
    await Promise.all(this.#all.splice(0).reverse().map((stop) => stop()));
  }
}

/** The relay's QEMU ports once bound: what they bound, and what status and the sweep timer read. */
interface QemuPorts {
  bound: BoundAddress[];
  datagrams: DatagramBinding[];
  dialers: QemuDialer[];
}

/** What binding QEMU ports needs besides the config: where ports log, what they share, and the counters. */
interface QemuPortsContext {
  log: Logger;
  budget: MemoryBudget;
  counters: RelayCounters;
  countError: () => void;
  stoppers: Stoppers;
}

/**
 * Binds every --qemu-listen, --qemu-udp and --qemu-mcast and starts every --qemu-connect dialer,
 * each on its network (made here); throws at the first that cannot be bound, its stopper added.
 */
async function bindQemuPorts(config: Config, registry: NetworkRegistry, ctx: QemuPortsContext): Promise<QemuPorts> {
  const { log, budget, countError, stoppers } = ctx;
  const ports: QemuPorts = { bound: [], datagrams: [], dialers: [] };
  // Before the first accept: the limit decides how many QEMU connections fit.
  const fdLimit = raiseFdLimit();
  const cap = config.qemuListen.length > 0 ? connectionCap(config.maxConnections, fdLimit, log, () => void ctx.counters.connectionsRefused++) : undefined;
  for (const spec of config.qemuListen) {
    const listener = await startedFor("qemuListen", listenStream(spec.address, { network: registry.getOrCreate(spec.network), log, countError, limit: config.queueBytes, budget, kind: "qemu-listen", cap }));
    stoppers.add(listener.stop);
    ports.bound.push({ what: "qemu-listen", network: spec.network, address: listener.address });
  }
  for (const spec of config.qemuUdp) {
    const ageingMs = config.macAgeing * 1000;
    const dgram = await startedFor("qemuUdp", DatagramBinding.bind(spec.address, spec.remote, { network: registry.getOrCreate(spec.network), log, ageingMs, maxPeers: config.udpPeers, countError }));
    stoppers.add(() => dgram.close());
    ports.datagrams.push(dgram);
    ports.bound.push({ what: "qemu-udp", network: spec.network, address: dgram.socket.address });
  }
  for (const spec of config.qemuMcast) {
    const mcast = await startedFor("qemuMcast", joinMulticast(spec.group, spec.localAddress, { network: registry.getOrCreate(spec.network), log }));
    stoppers.add(mcast.close);
    ports.bound.push({ what: "qemu-mcast", network: spec.network, address: mcast.address });
  }
  for (const spec of config.qemuConnect) {
    const dialer = new QemuDialer(spec.address, { network: registry.getOrCreate(spec.network), log, countError, limit: config.queueBytes, budget, kind: "qemu-connect" });
    ports.dialers.push(dialer);
    stoppers.add(() => dialer.stop());
  }
  return ports;
}

/** --dhcp: the relay's own host (DHCP, DNS, a pingable gateway) on each such network, by network name. */
function startGateways(config: Config, identity: RelayIdentity, registry: NetworkRegistry, log: Logger, stoppers: Stoppers): Map<string, GatewayHost> {
  const hosts = new Map<string, GatewayHost>();
  for (const spec of config.dhcp) {
    const host = new GatewayHost({ spec, reservations: config.dhcpHosts, relayName: identity.name, stateDir: config.stateDir, log });
    registry.getOrCreate(spec.network).attach(host);
    hosts.set(spec.network, host);
    stoppers.add(() => host.close());
  }
  return hosts;
}

/** Everything /status reads, gathered once at start. */
interface SnapshotSources {
  config: Config;
  identity: RelayIdentity;
  startedAt: number;
  registry: NetworkRegistry;
  counters: RelayCounters;
  budget: MemoryBudget;
  tunnels: TunnelServer;
  impairments: ImpairmentTable;
  captures: CaptureRegistry;
  captureFiles(): CaptureFile[];
  qemu(): QemuPorts;
  gateways(): Map<string, GatewayHost>;
  backplane: Backplane | undefined;
  uplink(): Uplink | undefined;
}

/** /status: the relay's state as `view` asks for it (the page of networks, ports and MACs listed). */
function buildSnapshot(s: SnapshotSources, view: StatusView = {}): Snapshot {
  const { config, registry, budget } = s;
  const uplink = s.uplink();
  const qemu = s.qemu();
  const gateways = s.gateways();
  const page = statusNetworks(registry.values(), registry.size, view);
  for (const n of page.networks) if (gateways.has(n.name)) n.dhcp = gateways.get(n.name)!.dhcpSnapshot();
  return {
    version: VERSION,
    id: s.identity.id,
    name: s.identity.name,
    uptime: (Date.now() - s.startedAt) / 1000,
    startedAt: new Date(s.startedAt).toISOString(),
    ...page,
    uplink: uplink ? { ...uplink.status } : null,
    backplane: s.backplane ? s.backplane.snapshot() : null,
    dials: qemu.dialers.map((d) => ({ ...d.status })),
    captures: [...s.captures.snapshot(), ...s.captureFiles().map((f) => f.snapshot())],
    impairments: s.impairments.snapshot(),
    limits: {
      networks: registry.size,
      maxNetworks: config.maxNetworks,
      tunnels: s.tunnels.admission.open,
      maxTunnels: config.maxTunnels,
      maxTunnelsPerAddress: config.maxTunnelsPerAddress,
      memoryUsed: budget.used,
      memoryBudget: budget.limit,
      memoryDrops: budget.drops,
      flowControl: config.flowControl,
    },
    datagrams: qemu.datagrams.map((d) => d.status()),
    ...s.counters,
  };
}

/** The backplane of --backplane, or none. */
function backplaneOf(config: Config, identity: RelayIdentity, log: Logger, countError: () => void): Backplane | undefined {
  if (config.backplane.length === 0) return undefined;
  return new Backplane({
    servers: config.backplane,
    cluster: config.backplaneCluster,
    token: config.backplaneToken,
    creds: config.backplaneCreds,
    ca: config.backplaneCa?.text,
    identity,
    limit: config.queueBytes,
    handshakeMs: config.handshakeTimeout * 1000,
    log,
    countError,
  });
}

/** The uplink of --uplink (not started), or none. */
function uplinkOf(config: Config, identity: RelayIdentity, proxy: UplinkProxy | undefined, budget: MemoryBudget, registry: NetworkRegistry, log: Logger, countError: () => void): Uplink | undefined {
  if (config.uplink === undefined) return undefined;
  const options: UplinkOptions = {
    url: config.uplink,
    token: config.uplinkToken!,
    identity,
    keepaliveMs: config.keepalive * 1000,
    handshakeMs: config.handshakeTimeout * 1000,
    limit: config.queueBytes,
    budget,
    ca: config.uplinkCa,
    fingerprint: config.uplinkFingerprint,
    insecure: config.insecure,
    proxy,
  };
  if (config.join !== undefined && config.uplinkCa === undefined) options.beforeDial = learnPinnedCertificate(options);
  return new Uplink(options, () => registry.values(), log, countError);
}

const MAX_MESSAGE = 1024 * 1024;

const TUNNEL_IDLE_SECONDS = 60;

/**
 * The HTTP listener: the app's routes, and one WebSocket handler set in which each socket goes to
 * the server that upgraded it (a tunnel or a v86 port). With the address it listens on (a hub's
 * `[::]` may have to be `0.0.0.0`).
 */
function serveHttp(config: Config, app: ReturnType<typeof createApp>, tunnels: TunnelServer, v86: V86Server, hub: boolean, log: Logger) {
  const v86Socket = (ws: ServerWebSocket<SocketData>): ws is ServerWebSocket<V86Data> => "v86" in ws.data;
  const serve = (host: string) => Bun.serve<SocketData>({
    hostname: host,
    port: config.http.port,
    tls: config.tlsCert && config.tlsKey ? { cert: config.tlsCert.text, key: config.tlsKey.text } : undefined,
    fetch: app.fetch,
    websocket: {
      maxPayloadLength: MAX_MESSAGE,
      // Above the tunnel's own queue bound by one message, so Bun drops only what the bound let through.
      backpressureLimit: config.queueBytes + MAX_MESSAGE,
      closeOnBackpressureLimit: false,
      perMessageDeflate: false,
      // Bun pings an idle tunnel and closes one that stays silent; clients answer pings by themselves.
      idleTimeout: TUNNEL_IDLE_SECONDS,
      sendPings: true,
      open: (ws) => (v86Socket(ws) ? v86.handlers.open(ws) : tunnels.handlers.open(ws as ServerWebSocket<TunnelData>)),
      message: (ws, m) => (v86Socket(ws) ? v86.handlers.message(ws, m) : tunnels.handlers.message(ws as ServerWebSocket<TunnelData>, m)),
      close: (ws, code, reason) => (v86Socket(ws) ? v86.handlers.close(ws, code, reason) : tunnels.handlers.close(ws as ServerWebSocket<TunnelData>, code, reason)),
    },
  });
  return listenHttp(config.http, () => listenAllAddresses(config.http.host, hub, serve, log));
}

/** Networks visited (plus ports probed, MACs looked at) per loop-probe or MAC-sweep tick: beyond it a round spans ticks. */
const TICK_BUDGET = 1024;

/**
 * Visits a collection a few entries at a time, resuming where the last call stopped, so a timer over
 * thousands of networks costs the same per tick as over a few; a round then spans several ticks.
 * @internal
 */
export class RoundRobin<T> {
  #at: Iterator<T> | undefined;

  constructor(private readonly entries: { values(): Iterator<T>; readonly size: number }) {}

  /**
   * Calls `visit` on entries in turn, each at most once per call, until `budget` is spent: each
   * visit costs 1 plus what it returns (the work it did).
   */
  step(budget: number, visit: (entry: T) => number): void {
    let spent = 0;
    for (let n = this.entries.size; n > 0 && spent < budget; n--) {
      let next = this.#at?.next();
      if (next === undefined || next.done) {
        this.#at = this.entries.values();
        next = this.#at.next();
        if (next.done) return;
      }
      spent += 1 + visit(next.value);
    }
  }
}

/**
 * The relay's timers: MAC and datagram-peer ageing, and loop probes. Both do a bounded share of
 * the networks per tick (TICK_BUDGET), not a walk over all; each relay probes at its own phase, so
 * two relays in one loop rarely both act on it.
 */
function startTimers(config: Config, registry: NetworkRegistry, datagrams: DatagramBinding[], stoppers: Stoppers): void {
  const ageingMs = config.macAgeing * 1000;
  const sweeping = new RoundRobin(registry);
  const sweep = setInterval(() => {
    sweeping.step(TICK_BUDGET, (n) => n.sweep());
    for (const d of datagrams) d.sweep();
  }, Math.min(ageingMs, 60_000) / 2);
  stoppers.add(() => clearInterval(sweep));
  const probeMs = config.loopProbe * 1000;
  if (probeMs > 0) {
    let probing: ReturnType<typeof setInterval> | undefined;
    const probes = new RoundRobin(registry);
    const probeStart = setTimeout(() => {
      probing = setInterval(() => probes.step(TICK_BUDGET, (n) => n.probe() + n.ports.size), probeMs);
    }, Math.random() * probeMs);
    stoppers.add(() => (clearTimeout(probeStart), clearInterval(probing)));
  }
}

/** The switch settings every network of the relay shares. */
function switchPolicy(
  config: Config,
  relayId: string,
  relay: { impairments: ImpairmentTable; totals: PortTotals; counters: RelayCounters; log: Logger; now: () => number },
): SwitchPolicy {
  const { log } = relay;
  return {
    totals: relay.totals,
    impairments: relay.impairments,
    ageingMs: config.macAgeing * 1000,
    now: relay.now,
    portMacs: config.portMacs,
    stormLimit: config.stormLimit,
    flowControl: config.flowControl,
    relayId,
    log,
    portLog: { info: rateLimitedLog(log.info, 20, 10_000).log, warn: log.warn },
    onLoop: () => void relay.counters.loopsDetected++,
  };
}

/** --capture-file: each network's traffic into its pcapng file. */
function startCaptureFiles(config: Config, registry: NetworkRegistry, log: Logger, stoppers: Stoppers): CaptureFile[] {
  return config.captureFile.map((spec) => {
    const file = new CaptureFile(registry.getOrCreate(spec.network), spec.path, config.captureRotate, config.captureKeep, log);
    stoppers.add(() => file.close());
    return file;
  });
}

/** The servers of the peers that dial in, tunnels and v86 clients, under the same limits; their networks come from the registry. */
function peerServers(config: Config, identity: RelayIdentity, registry: NetworkRegistry, relay: { budget: MemoryBudget; counters: RelayCounters; log: Logger }) {
  const shared = { ...relay, limit: config.queueBytes, networkForPeer: (name: string) => registry.forPeer(name) };
  return {
    tunnels: new TunnelServer({ ...shared, identity, maxTunnels: config.maxTunnels, maxTunnelsPerAddress: config.maxTunnelsPerAddress }),
    v86: new V86Server({
      ...shared,
      rate: config.v86Rate,
      origins: config.v86Origins.length ? new Set(config.v86Origins) : undefined,
      maxPorts: config.maxTunnels,
      maxPerAddress: config.maxTunnelsPerAddress,
    }),
  };
}

/** --public-url: the hub's state from --state-dir (made on the first start), and the config it completes. */
function withHubState(config: Config): { config: Config; hub: HubState | undefined } {
  if (config.publicUrl === undefined) return { config, hub: undefined };
  const given = config.tlsCert && config.tlsKey ? { cert: config.tlsCert, key: config.tlsKey } : undefined;
  const hub = openHubState(config.stateDir!, config.publicUrl, given);
  return { hub, config: { ...config, tlsCert: hub.cert, tlsKey: hub.key, adminToken: config.adminToken ?? hub.adminToken } };
}

/** --public-url: /invites on the app, and the hub's tokens file watched (SIGHUP reloads it; a revoked token's tunnels and v86 ports close). */
function serveHub(app: ReturnType<typeof createApp>, hub: HubState, grants: Grant[], fixedGrants: Grant[], servers: [TunnelServer, V86Server], log: Logger, stoppers: Stoppers) {
  mountInvites(app, hub.dir);
  const accepted = (grant: Grant) => grants.some((g) => Buffer.compare(g.digest, grant.digest) === 0);
  const revoked = () => {
    for (const server of servers) server.closeUnaccepted(accepted, TOKEN_REVOKED, "its token was revoked");
  };
  const tokens = watchHubTokens(hub.dir, grants, fixedGrants, revoked, log);
  stoppers.add(tokens.stop);
  return tokens;
}

const CLOCK_TICK_MS = 100;

/**
 * Starts every port of `config`; throws (nothing left running) if one cannot be bound. `env` is
 * where the uplink's proxy settings (HTTPS_PROXY, NO_PROXY, …) come from: main's, as for the config.
 */
export async function startRelay(given: Config, log: Logger = consoleLogger, env: Record<string, string | undefined> = process.env): Promise<RelayHandle> {
  const { config, hub } = withHubState(given);
  // Read before anything is bound: a bad proxy in the environment is a config error like a bad option.
  const proxy = config.uplink === undefined ? undefined : uplinkProxy(config.uplink, config.uplinkProxy, env);
  const startedAt = Date.now();
  const identity: RelayIdentity = { id: Buffer.from(crypto.getRandomValues(new Uint8Array(8))).toString("hex"), name: config.name ?? defaultName() };
  const stoppers = new Stoppers();
  // MAC ageing needs no finer clock than this; reading a variable beats a clock call per frame.
  let now = Date.now();
  const clock = setInterval(() => (now = Date.now()), CLOCK_TICK_MS);
  stoppers.add(() => clearInterval(clock));
  const counters: RelayCounters = { authFailures: 0, authThrottled: 0, protocolErrors: 0, tunnelsRefused: 0, loopRefusals: 0, loopsDetected: 0, connectionsRefused: 0 };
  const countError = () => void counters.protocolErrors++;
  const budget = new MemoryBudget(config.memoryBudget);
  const backplane = backplaneOf(config, identity, log, countError);
  let uplink: Uplink | undefined;
  const impairments = new ImpairmentTable(() => registry.ports());
  const totals = new PortTotals();
  const policy = switchPolicy(config, identity.id, { impairments, totals, counters, log, now: () => now });
  const registry = new NetworkRegistry(policy, config.maxNetworks, {
    made: (n) => (backplane?.join(n), uplink?.networksChanged()),
    released: (n) => (backplane?.leave(n), uplink?.networksChanged()),
  });
  for (const { target, spec } of config.impair) impairments.set(target, spec);
  const { tunnels, v86 } = peerServers(config, identity, registry, { budget, counters, log });
  const captures = new CaptureRegistry((name) => registry.get(name), config.maxCaptures);
  let captureFiles: CaptureFile[] = [];
  let qemu: QemuPorts = { bound: [], datagrams: [], dialers: [] };
  let gateways = new Map<string, GatewayHost>();
  const snapshot = (view?: StatusView) =>
    buildSnapshot({ config, identity, startedAt, registry, counters, budget, tunnels, impairments, captures, captureFiles: () => captureFiles, qemu: () => qemu, gateways: () => gateways, backplane, uplink: () => uplink }, view);
  const bound: BoundAddress[] = [];
  const fixedGrants = makeGrants(config.tokens);
  const grants = hub ? [...fixedGrants, ...hubGrants(hub.dir)] : fixedGrants;
  let hubTokens: ReturnType<typeof serveHub> | undefined;
  // Whatever fails to start, what already runs stops, so a failed start leaves nothing behind.
  const stopAll = () => {
    policy.stopping = true;
    return stoppers.stopAll();
  };
  try {
    const app = createApp({
      grants, adminToken: config.adminToken, trustedProxies: trustedProxyList(config.trustedProxies), tls: config.tlsCert !== undefined,
      snapshot, backplaneState: () => backplane?.status.state, networks: () => registry.values(), gateways: () => gateways.values(), totals, counters, tunnels, v86, captures, impairments, log,
    });
    if (hub) hubTokens = serveHub(app, hub, grants, fixedGrants, [tunnels, v86], log, stoppers);
    const [server, host] = serveHttp(config, app, tunnels, v86, hub !== undefined, log);
    stoppers.add(() => void server.stop(true));
    bound.push({ what: "http", address: `${config.tlsCert ? "https" : "http"}://${formatHostPort({ host, port: server.port! })}` });
    if (backplane) {
      backplane.start();
      stoppers.add(() => backplane.stop());
    }
    gateways = startGateways(config, identity, registry, log, stoppers);
    // Per-connection errors from QEMU ports share one limiter: a flood of bad peers is a few lines.
    const portLog: Logger = { info: log.info, warn: rateLimitedLog(log.warn, 10, 10_000).log };
    qemu = await bindQemuPorts(config, registry, { log: portLog, budget, counters, countError, stoppers });
    bound.push(...qemu.bound);
    captureFiles = startCaptureFiles(config, registry, log, stoppers);
    stoppers.add(() => captures.stop());
    if (config.uplink !== undefined && registry.size === 0) registry.getOrCreate("default");
    registry.keepAll();
    uplink = uplinkOf(config, identity, proxy, budget, registry, log, countError);
    if (uplink) {
      uplink.start();
      stoppers.add(() => uplink!.stop());
    }
    startTimers(config, registry, qemu.datagrams, stoppers);
  } catch (error) {
    await stopAll();
    throw error;
  }
  let stopping: Promise<void> | undefined;
  const handle: RelayHandle = {
    http: bound[0]!.address,
    bound,
    network: (name) => registry.get(name),
    snapshot,
    hub: hub && hubTokens && { ...hub, reload: hubTokens.reload },
    stop() {
      stopping ??= Promise.resolve().then(stopAll);
      return stopping;
    },
    [Symbol.asyncDispose]: () => handle.stop(),
  };
  return handle;
}

// ───────────────────────────── page assets ─────────────────────────────
//
// Long string constants live at the end, out of the code's way, as bottle.py keeps its templates
// after its code. Each is ASCII with no backtick or `${`, so the constant is the page;
// documentHeaders hashes its inline script and style for the CSP.

/**
 * The status page at `/`: one self-contained document, no CDN and no build step. Its script polls
 * `status?macs=200` every second and draws the answer with text nodes only (names and peers come
 * from other relays). The text is ASCII (Bun's transpiler writes any other character of a raw
 * template as a \u escape: the script spells them so itself, the HTML as entities) with no backtick
 * or `${`, so this constant is the page byte for byte; the page's CSP allows its inline script and
 * style by their hashes.
 * @internal
 */
export const PAGE_HTML = String.raw`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>edge-relay</title>
<style>
:root { color-scheme: light dark; --fg: #1f2328; --bg: #ffffff; --muted: #59636e; --line: #d1d9e0; --panel: #f6f8fa; --accent: #0969da; --bad: #cf222e; --ok: #1a7f37; --warn: #9a6700; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e6edf3; --bg: #0d1117; --muted: #9198a1; --line: #3d444d; --panel: #151b23; --accent: #4493f8; --bad: #f85149; --ok: #3fb950; --warn: #d29922; }
}
* { box-sizing: border-box; }
[hidden] { display: none !important; }
html { -webkit-text-size-adjust: 100%; text-size-adjust: 100%; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Liberation Sans", "DejaVu Sans", sans-serif; color: var(--fg); background: var(--bg); }
header { position: sticky; top: 0; z-index: 1; display: flex; flex-wrap: wrap; align-items: baseline; gap: 0.2rem 1rem; padding: 0.6rem 1rem; background: var(--panel); border-bottom: 1px solid var(--line); }
h1 { margin: 0; font-size: 1.25rem; overflow-wrap: anywhere; }
h1 small { font-size: 0.8rem; font-weight: normal; color: var(--muted); }
h2 { margin: 0 0 0.5rem; font-size: 1.05rem; }
#live { margin: 0 0 0 auto; font-size: 0.85rem; }
#logout { margin: 0; }
#logout button { font: inherit; font-size: 0.85rem; }
main { max-width: 1440px; margin: 0 auto; padding: 1rem; display: grid; grid-template-columns: minmax(0, 1fr); gap: 1rem; }
#networks { display: grid; grid-template-columns: minmax(0, 1fr); gap: 1rem; }
.overview { display: grid; grid-template-columns: minmax(0, 2fr) minmax(0, 3fr); gap: 1rem; align-items: start; }
.panel { min-width: 0; padding: 0.75rem 1rem; border: 1px solid var(--line); border-radius: 6px; }
dl { display: grid; grid-template-columns: max-content minmax(0, 1fr); gap: 0.2rem 1rem; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
.muted { color: var(--muted); }
.mono, .mac { font-family: ui-monospace, "DejaVu Sans Mono", "Liberation Mono", monospace; font-size: 0.92em; }
td.mac { white-space: nowrap; }
.error { color: var(--bad); }
.st-up, .live-ok { color: var(--ok); }
.st-down, .st-blocked-loop, .live-bad { color: var(--bad); }
.st-connecting, .st-closed, .warn { color: var(--warn); }
.scroll { overflow-x: auto; }
table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
caption { text-align: left; font-weight: 600; padding: 0.25rem 0; }
th, td { padding: 0.3rem 0.5rem; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
td { overflow-wrap: anywhere; }
th { font-weight: 600; font-size: 0.85rem; white-space: nowrap; }
thead tr:first-child th { border-bottom: 0; }
.n { text-align: right; white-space: nowrap; }
.nw { white-space: nowrap; }
.sub { display: block; font-size: 0.85em; }
caption .muted { font-weight: normal; font-size: 0.85em; }
th.group { text-align: center; border-bottom: 1px solid var(--line); }
td.rate .v { display: flex; align-items: center; gap: 0.5rem; white-space: nowrap; }
.spark { display: block; flex: none; border-bottom: 1px solid var(--line); }
.spark .in { fill: none; stroke: var(--accent); stroke-width: 1.5; }
.spark .out { fill: none; stroke: var(--fg); stroke-width: 1; stroke-dasharray: 3 2; }
details { margin-top: 0.75rem; }
summary { cursor: pointer; font-weight: 600; }
.empty { color: var(--muted); font-style: italic; }
#topology svg { display: block; max-width: 100%; height: auto; }
#topology text { font: 12px ui-monospace, "DejaVu Sans Mono", "Liberation Mono", monospace; fill: var(--fg); }
#topology text .note { fill: var(--muted); }
#topology .edge { stroke: var(--muted); stroke-width: 1.5; fill: none; }
#topology .edge.down { stroke-dasharray: 5 4; }
#topology .node { stroke: var(--fg); stroke-width: 1.5; fill: var(--bg); }
#topology .node.relay { fill: var(--accent); }
#topology .node.network { fill: var(--panel); }
.legend { margin: 0.5rem 0 0; font-size: 0.8rem; color: var(--muted); }
@media (max-width: 900px) {
  .overview { grid-template-columns: minmax(0, 1fr); }
}
@media (max-width: 720px) {
  main { padding: 0.5rem; gap: 0.75rem; }
  header { padding: 0.5rem; }
  #live { margin-left: 0; }
  .panel { padding: 0.5rem 0.6rem; }
  table.cards thead { display: none; }
  table.cards, table.cards tbody, table.cards tr, table.cards td { display: block; width: 100%; }
  table.cards caption { display: block; }
  table.cards tr { margin: 0 0 0.5rem; padding: 0.25rem 0.5rem; border: 1px solid var(--line); border-radius: 6px; }
  table.cards td { display: flex; justify-content: space-between; align-items: baseline; gap: 1rem; padding: 0.1rem 0; border: 0; text-align: right; }
  table.cards td::before { content: attr(data-label); flex: none; color: var(--muted); text-align: left; }
  table.cards td .v { min-width: 0; overflow-wrap: anywhere; }
  table.cards td.rate .v { justify-content: flex-end; }
  /* A port's card: counters in pairs, in beside out. */
  table.cards.ports tr { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); column-gap: 1.25rem; }
  table.cards.ports td { grid-column: 1 / -1; }
  table.cards.ports td.n { grid-column: auto; }
  table.cards.ports td[data-field="rx-frames"] { order: 1; }
  table.cards.ports td[data-field="tx-frames"] { order: 2; }
  table.cards.ports td[data-field="rx-bytes"] { order: 3; }
  table.cards.ports td[data-field="tx-bytes"] { order: 4; }
  table.cards.ports td[data-field="rx-drops"] { order: 5; }
  table.cards.ports td[data-field="tx-drops"] { order: 6; }
  table.cards.ports td[data-field="errors"] { order: 7; }
  table.cards.ports td[data-field="macs"] { order: 8; }
  table.cards.ports td[data-field="rate"] { order: 9; }
}
</style>
</head>
<body>
<header>
  <h1><span id="name">edge-relay</span> <small id="version"></small></h1>
  <p id="live" role="status">Connecting&hellip;</p>
  <!--logout-->
</header>
<main>
  <noscript><p>This page needs JavaScript. The same data is at <a href="status">/status</a>.</p></noscript>
  <div class="overview">
    <section class="panel" aria-labelledby="relay-h">
      <h2 id="relay-h">This relay</h2>
      <dl id="facts"><dt>Status</dt><dd>loading&hellip;</dd></dl>
    </section>
    <section class="panel" aria-labelledby="topology-h">
      <h2 id="topology-h">Topology</h2>
      <div id="topology"></div>
      <p class="legend">&#x25A0; this relay &middot; &#x25A1; hub &middot; &#x25C7; network &middot; &#x25AD; VM port &middot; &#x25CB; tunnel to a site &middot; &#x25B3; uplink to the hub &middot; &#x22EF; multicast segment. A dashed line is a link that is not up.</p>
    </section>
  </div>
  <div id="networks"></div>
  <p id="no-networks" class="empty" hidden>No networks yet.</p>
  <p id="more-networks" class="muted" hidden></p>
  <section class="panel" aria-labelledby="limits-h">
    <h2 id="limits-h">Limits and counters</h2>
    <dl id="counters"></dl>
  </section>
</main>
<script>
"use strict";
(function () {
  var POLL_MS = 1000;
  var HISTORY = 60;
  var SVG_NS = "http://www.w3.org/2000/svg";
  // Everything shown comes from /status, and names and peers come from other relays: it is only ever
  // put into the page as text nodes and attribute values, never parsed as HTML.
  function build(node, attrs, children) {
    for (var key in attrs) if (attrs[key] !== undefined && attrs[key] !== null && attrs[key] !== false) node.setAttribute(key, String(attrs[key]));
    children.flat(Infinity).forEach(function (c) {
      if (c !== undefined && c !== null && c !== false) node.append(c instanceof Node ? c : String(c));
    });
    return node;
  }
  function h(tag, attrs) { return build(document.createElement(tag), attrs || {}, [].slice.call(arguments, 2)); }
  function s(tag, attrs) { return build(document.createElementNS(SVG_NS, tag), attrs || {}, [].slice.call(arguments, 2)); }
  function $(id) { return document.getElementById(id); }
  function sameAttributes(a, b) {
    if (a.attributes.length !== b.attributes.length) return false;
    for (var i = 0; i < a.attributes.length; i++) if (b.getAttribute(a.attributes[i].name) !== a.attributes[i].value) return false;
    return true;
  }
  // Puts fresh elements in place of a parent's children (matched by data-key, else by position),
  // keeping every element, and every cell of a row, that did not change: a selection or a tooltip
  // there survives the next poll.
  function update(parent, fresh) {
    var old = new Map();
    [].forEach.call(parent.children, function (el, i) { old.set(el.getAttribute("data-key") || "#" + i, el); });
    fresh.forEach(function (el, i) {
      var key = el.getAttribute("data-key") || "#" + i;
      var was = old.get(key);
      if (was && was.tagName === el.tagName && sameAttributes(was, el)) {
        if (was.isEqualNode(el)) {
          el = was;
        } else if (was.children.length > 0 && was.children.length === el.children.length && was.childNodes.length === was.children.length && el.childNodes.length === el.children.length) {
          [].slice.call(el.children).forEach(function (c, j) { if (!was.children[j].isEqualNode(c)) was.replaceChild(c, was.children[j]); });
          el = was;
        }
      }
      if (el === was) old.delete(key);
      if (parent.children[i] !== el) parent.insertBefore(el, parent.children[i] || null);
    });
    old.forEach(function (el) { el.remove(); });
  }

  var fmt = new Intl.NumberFormat("en-US");
  function num(n) { return typeof n === "number" ? fmt.format(n) : "\u2014"; }
  function bytes(n) {
    if (typeof n !== "number") return "\u2014";
    var units = ["B", "KiB", "MiB", "GiB", "TiB"];
    var i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? String(n) : n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0)) + " " + units[i];
  }
  function rate(x) { return x < 10 ? x.toFixed(1) : fmt.format(Math.round(x)); }
  function duration(sec) {
    sec = Math.max(0, Math.floor(sec));
    var d = Math.floor(sec / 86400), hr = Math.floor(sec % 86400 / 3600), m = Math.floor(sec % 3600 / 60), x = sec % 60;
    if (d) return d + " d " + hr + " h";
    if (hr) return hr + " h " + m + " min";
    if (m) return m + " min " + x + " s";
    return x + " s";
  }
  // Every time on the page in one form: 24-hour local time, after its date (year first) unless today.
  function clock(iso) {
    var t = new Date(iso);
    if (isNaN(t)) return String(iso);
    var time = pad2(t.getHours()) + ":" + pad2(t.getMinutes()) + ":" + pad2(t.getSeconds());
    return day(t) === day(new Date()) ? time : day(t) + " " + time;
  }
  function day(t) { return t.getFullYear() + "-" + pad2(t.getMonth() + 1) + "-" + pad2(t.getDate()); }
  function pad2(n) { return (n < 10 ? "0" : "") + n; }
  function ago(iso) {
    var t = Date.parse(iso);
    return isNaN(t) ? "" : duration((Date.now() - t) / 1000) + " ago";
  }
  function plural(n, word) { return num(n) + " " + word + (n === 1 ? "" : "s"); }
  function clip(text, n) { text = String(text); return text.length > n ? text.slice(0, n - 1) + "\u2026" : text; }

  // States are told by a word and a symbol, colour only adds to them.
  var STATES = { up: "\u25CF up", down: "\u25CB down", connecting: "\u25CC connecting", closed: "\u25CB closed", "blocked-loop": "\u2298 blocked (loop)" };
  function state(word) {
    var known = Object.prototype.hasOwnProperty.call(STATES, word);
    return h("span", { class: known ? "state st-" + word : "state" }, known ? STATES[word] : String(word));
  }
  function isVm(kind) { return /^qemu-(listen|connect|udp)$/.test(kind); }

  // ----- rates: differences between polls, on the relay's own clock (uptime) -----
  var relayId = null;
  var previous = null;
  var history = new Map();
  function key(net, port) { return net + " " + port; }
  function updateRates(st) {
    if (st.id !== relayId) { relayId = st.id; previous = null; history.clear(); }
    var counts = new Map();
    st.networks.forEach(function (n) {
      n.ports.forEach(function (p) {
        var k = key(n.name, p.id);
        var now = { rx: p.rx.frames, tx: p.tx.frames, rxB: p.rx.bytes, txB: p.tx.bytes };
        counts.set(k, now);
        var hist = history.get(k);
        if (!hist) { hist = []; history.set(k, hist); }
        var before = previous && previous.counts.get(k);
        var dt = previous ? st.uptime - previous.uptime : 0;
        if (before && dt > 0) {
          hist.push({
            rx: Math.max(0, now.rx - before.rx) / dt, tx: Math.max(0, now.tx - before.tx) / dt,
            rxB: Math.max(0, now.rxB - before.rxB) / dt, txB: Math.max(0, now.txB - before.txB) / dt,
          });
          if (hist.length > HISTORY) hist.shift();
        }
      });
    });
    history.forEach(function (_, k) { if (!counts.has(k)) history.delete(k); });
    previous = { uptime: st.uptime, counts: counts };
  }
  function latest(net, port) {
    var hist = history.get(key(net, port));
    return hist && hist.length ? hist[hist.length - 1] : null;
  }

  function sparkline(net, port) {
    var hist = history.get(key(net, port)) || [];
    var W = 120, H = 28;
    var max = 1;
    hist.forEach(function (r) { max = Math.max(max, r.rx, r.tx); });
    function points(field) {
      return hist.map(function (r, i) {
        var x = W - (hist.length - 1 - i) * (W / (HISTORY - 1));
        return x.toFixed(1) + "," + (H - 1 - r[field] / max * (H - 3)).toFixed(1);
      }).join(" ");
    }
    var last = hist.length ? hist[hist.length - 1] : null;
    var label = last ? "frames per second over the last " + hist.length + " s: in " + rate(last.rx) + ", out " + rate(last.tx) + " now, peak " + rate(max) : "no rate yet";
    var svg = s("svg", { class: "spark", viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img", "aria-label": label },
      s("title", {}, label));
    if (hist.length > 1) {
      svg.append(s("polyline", { class: "in", points: points("rx") }), s("polyline", { class: "out", points: points("tx") }));
    }
    return svg;
  }
  function rateText(net, port) {
    var r = latest(net, port);
    return r ? "in " + rate(r.rx) + "/s \u00B7 out " + rate(r.tx) + "/s" : "\u2026";
  }

  // ----- this relay -----
  function facts(list, rows) {
    update(list, rows.flatMap(function (row) {
      return [h("dt", {}, row[0]), h("dd", row[2] || {}, row[1])];
    }));
  }
  function renderFacts(st) {
    var rows = [
      ["Name", st.name],
      ["Version", st.version],
      ["Relay id", h("span", { class: "mono" }, st.id)],
      ["Uptime", duration(st.uptime) + " (since " + clock(st.startedAt || new Date(Date.now() - st.uptime * 1000)) + ")"],
    ];
    var u = st.uplink;
    if (!u) {
      rows.push(["Uplink", h("span", { class: "muted" }, "none: this relay dials no hub")]);
    } else {
      rows.push(["Uplink", [state(u.state), " since ", clock(u.since)], { "data-field": "uplink-state" }]);
      rows.push(["Hub", [u.hub ? u.hub : h("span", { class: "muted" }, "not yet known"), " ", h("span", { class: "muted mono" }, u.url)]]);
      rows.push(["Carries", u.networks && u.networks.length ? u.networks.join(", ") : h("span", { class: "muted" }, "no networks")]);
      if (u.refused && u.refused.length) {
        rows.push(["Refused by hub", u.refused.map(function (r) { return r.network + ": " + r.reason; }).join("; ")]);
      }
      // Once up again, the last error is history: said as past, not in red.
      var lastError = !u.lastError ? h("span", { class: "muted" }, "none")
        : u.state === "up" ? h("span", { class: "muted" }, "last error before it reconnected " + ago(u.since) + ": " + u.lastError)
        : h("span", { class: "error" }, "\u26A0 " + u.lastError);
      rows.push(["Last error", lastError, { "data-field": "uplink-error" }]);
      rows.push(["Dials", plural(u.attempts, "attempt") + ", " + plural(u.connects, "connect")]);
    }
    (st.dials || []).forEach(function (d) {
      rows.push(["Dials VM", [d.target, " \u2192 ", d.network, ": ", state(d.state), " after " + plural(d.attempts, "attempt"),
        d.lastError ? h("span", { class: "error" }, " \u26A0 " + d.lastError) : ""]]);
    });
    facts($("facts"), rows);
  }

  function renderCounters(st) {
    var l = st.limits || {};
    facts($("counters"), [
      ["Networks", num(l.networks) + " of " + num(l.maxNetworks)],
      ["Tunnels", num(l.tunnels) + " of " + num(l.maxTunnels) + " (" + num(l.maxTunnelsPerAddress) + " per address)"],
      ["Queued", bytes(l.memoryUsed) + " of " + bytes(l.memoryBudget) + ", " + num(l.memoryDrops) + " frames dropped for want of it"],
      ["Auth failures", num(st.authFailures) + " (" + num(st.authThrottled) + " answered 429)"],
      ["Protocol errors", num(st.protocolErrors)],
      ["Tunnels refused", num(st.tunnelsRefused)],
      ["Loops", num(st.loopsDetected) + " detected, " + num(st.loopRefusals) + " refused"],
    ]);
  }

  // ----- topology: an indented tree, hub above this relay, networks below it, ports below them -----
  var ROW = 26, INDENT = 24, PAD = 10, CHAR = 7.3, TOPOLOGY_PORTS = 32;
  function glyph(type, x, y) {
    var r = 6;
    switch (type) {
      case "relay": return s("rect", { class: "node relay", x: x - r, y: y - r, width: 2 * r, height: 2 * r });
      case "hub": return s("rect", { class: "node", x: x - r, y: y - r, width: 2 * r, height: 2 * r, rx: 2 });
      case "network": return s("polygon", { class: "node network", points: [x, y - r - 1, x + r + 1, y, x, y + r + 1, x - r - 1, y].join(" ") });
      case "vm": return s("rect", { class: "node", x: x - r - 1, y: y - r + 2, width: 2 * r + 2, height: 2 * r - 4 });
      case "tunnel": return s("circle", { class: "node", cx: x, cy: y, r: r });
      case "uplink": return s("polygon", { class: "node", points: [x, y - r, x + r, y + r - 1, x - r, y + r - 1].join(" ") });
      case "more": return s("g", {});
      default: return s("g", {}, [-5, 0, 5].map(function (dx) { return s("circle", { class: "node", cx: x + dx, cy: y, r: 2 }); }));
    }
  }
  function portNode(n, p, st) {
    var type = isVm(p.kind) ? "vm" : p.kind === "tunnel" ? "tunnel" : p.kind === "uplink" ? "uplink" : "segment";
    var label = type === "vm" ? "VM " + p.peer
      : type === "tunnel" ? "tunnel from " + p.peer
      : type === "uplink" ? "uplink to hub " + (st.uplink && st.uplink.hub ? st.uplink.hub : p.peer)
      : p.kind + " " + p.peer;
    var words = p.state === "up" ? "" : (STATES[p.state] || p.state) + " \u00B7 ";
    return { depth: 2, type: type, label: label, note: words + rateText(n.name, p.id), down: p.state !== "up", title: p.id + " (" + p.kind + "): " + p.peer + ", " + p.state };
  }
  function renderTopology(st) {
    var rows = [];
    var u = st.uplink;
    if (u) rows.push({ depth: 0, type: "hub", label: "hub " + (u.hub || "(not connected yet)"), note: (STATES[u.state] || u.state), title: "uplink " + u.url + ": " + u.state + (u.lastError ? " (" + u.lastError + ")" : ""), hub: true });
    rows.push({ depth: 0, type: "relay", label: "this relay: " + st.name, note: "v" + st.version, title: st.name + " " + st.id, down: u ? u.state !== "up" : false });
    st.networks.forEach(function (n) {
      rows.push({ depth: 1, type: "network", label: "network " + n.name, note: plural(n.portCount === undefined ? n.ports.length : n.portCount, "port") + " \u00B7 " + plural(n.macCount, "MAC"), title: "network " + n.name });
      n.ports.slice(0, TOPOLOGY_PORTS).forEach(function (p) { rows.push(portNode(n, p, st)); });
      if (n.ports.length > TOPOLOGY_PORTS) {
        var more = n.ports.length - TOPOLOGY_PORTS;
        rows.push({ depth: 2, type: "more", label: "and " + plural(more, "more port"), note: "(in the table below)", title: plural(more, "more port") });
      }
    });
    var width = 0;
    rows.forEach(function (r) {
      r.label = clip(r.label, 44);
      r.note = clip(r.note, 40);
      width = Math.max(width, PAD + r.depth * INDENT + 14 + (r.label.length + 2 + r.note.length) * CHAR);
    });
    width = Math.ceil(width + PAD);
    var height = rows.length * ROW + PAD;
    var edges = s("g", {}), nodes = s("g", {});
    var parents = [];
    rows.forEach(function (r, i) {
      var x = PAD + 8 + r.depth * INDENT, y = PAD / 2 + i * ROW + ROW / 2;
      r.x = x; r.y = y;
      if (r.hub) {
        // The uplink: from the hub down to this relay.
        edges.append(s("path", { class: "edge" + (u.state === "up" ? "" : " down"), d: "M" + x + " " + (y + 7) + "V" + (y + ROW - 7) }));
      } else if (r.depth > 0) {
        var parent = parents[r.depth - 1];
        edges.append(s("path", { class: "edge" + (r.down ? " down" : ""), d: "M" + parent.x + " " + (parent.y + 8) + "V" + y + "H" + (x - 9) }));
      }
      parents[r.depth] = r;
      nodes.append(s("g", { "data-type": r.type }, s("title", {}, r.title), glyph(r.type, x, y),
        s("text", { x: x + 14, y: y + 4 }, s("tspan", {}, r.label), s("tspan", { class: "note", dx: CHAR }, r.note))));
    });
    update($("topology"), [s("svg", { viewBox: "0 0 " + width + " " + height, width: width, height: height, role: "img", "aria-label": "Topology: " + rows.map(function (r) { return r.label; }).join(", ") }, edges, nodes)]);
  }

  // ----- networks -----
  var sections = new Map();
  function cell(label, field, cls) {
    var content = [].slice.call(arguments, 3);
    return h("td", { "data-label": label, "data-field": field, class: cls }, h("span", { class: "v" }, content));
  }
  function head(groups, columns) {
    var rows = [];
    if (groups) rows.push(h("tr", {}, groups.map(function (g) { return h("th", { colspan: g[1], class: g[2], scope: "colgroup" }, g[0]); })));
    rows.push(h("tr", {}, columns.map(function (c) { return h("th", { class: c[1], scope: "col" }, c[0]); })));
    return h("thead", {}, rows);
  }
  function networkSection(name) {
    var sec = {
      summary: h("p", { class: "muted" }),
      ports: h("tbody"),
      macs: h("tbody"),
      closed: h("tbody"),
      macsTitle: h("summary"),
      closedTitle: h("summary"),
      fresh: true,
    };
    sec.macsTable = h("div", { class: "scroll" }, h("table", { class: "macs" }, head(null, [["MAC"], ["Port"], ["Age", "n"]]), sec.macs));
    sec.macsBox = h("details", { class: "macs" }, sec.macsTitle, sec.macsTable);
    sec.closedTable = h("div", { class: "scroll" }, h("table", { class: "cards closed" },
      head(null, [["Port"], ["Peer"], ["Closed"], ["Reason"], ["In frames", "n"], ["Out frames", "n"], ["Drops in / out", "n"]]), sec.closed));
    sec.closedBox = h("details", { class: "closed", open: "" }, sec.closedTitle, sec.closedTable);
    sec.root = h("section", { class: "panel network", "data-network": name },
      h("h2", {}, "Network ", h("span", { class: "mono" }, name)),
      sec.summary,
      h("div", { class: "scroll" }, h("table", { class: "cards ports" },
        h("caption", {}, "Ports ", h("span", { class: "muted" }, "(rate lines: solid in, dashed out)")),
        head([["", 3], ["Received", 3, "group"], ["Sent", 3, "group"], ["", 3]],
          [["Port"], ["Peer"], ["State"], ["frames", "n"], ["bytes", "n"], ["drops", "n"], ["frames", "n"], ["bytes", "n"], ["drops", "n"], ["Errors", "n"], ["MACs", "n"], ["Frames/s, last minute"]]),
        sec.ports)),
      sec.macsBox, sec.closedBox);
    return sec;
  }
  function drops(count, title) {
    return count > 0 ? h("span", { class: "warn", title: title }, "\u26A0 " + num(count)) : h("span", { title: title }, num(count));
  }
  // --dhcp: the address and name leased to a MAC, and the leases behind each port.
  function leaseText(l) {
    return l.address + (l.name ? " " + l.name : "");
  }
  function portLeases(n, p) {
    var held = (n.dhcp ? n.dhcp.leases : []).filter(function (l) { return l.port === p.id && l.state === "bound"; });
    if (held.length === 0) return "";
    var shown = held.slice(0, 4).map(leaseText).join(", ") + (held.length > 4 ? ", \u2026 (" + num(held.length) + ")" : "");
    return h("span", { class: "muted sub", "data-field": "leases" }, shown);
  }
  function portRow(n, p) {
    var rx = p.rx, tx = p.tx;
    var why = "runts " + num(rx.runts) + ", storm limit " + num(rx.storm) + ", MAC limit " + num(rx.macLimit) + ", blocked for a loop " + num(rx.loop);
    return h("tr", { "data-key": "p " + p.id, "data-port": p.id },
      cell("Port", "id", "nw", h("strong", {}, p.id), h("span", { class: "muted sub" }, " (" + p.kind + ")")),
      cell("Peer", "peer", null, p.peer, portLeases(n, p)),
      cell("State", "state", "nw", state(p.state), h("span", { class: "muted sub" }, " since " + clock(p.since))),
      cell("In frames", "rx-frames", "n", num(rx.frames)),
      cell("In bytes", "rx-bytes", "n", h("span", { title: num(rx.bytes) + " bytes" }, bytes(rx.bytes))),
      cell("In drops", "rx-drops", "n", drops(rx.drops, why)),
      cell("Out frames", "tx-frames", "n", num(tx.frames)),
      cell("Out bytes", "tx-bytes", "n", h("span", { title: num(tx.bytes) + " bytes" }, bytes(tx.bytes))),
      cell("Out drops", "tx-drops", "n", drops(tx.drops, "queue or memory budget full, or refused by the socket")),
      cell("Errors", "errors", "n", drops(p.errors, "protocol errors")),
      cell("MACs", "macs", "n", num(p.macs)),
      cell("Rate", "rate", "rate", sparkline(n.name, p.id), h("span", { class: "muted" }, rateText(n.name, p.id))));
  }
  function fillNetwork(sec, n) {
    var ports = n.ports || [], macs = n.macs || [], closed = (n.closedPorts || []).slice().reverse();
    var portCount = n.portCount === undefined ? ports.length : n.portCount;
    sec.summary.textContent = plural(portCount, "port") + (ports.length < portCount ? " (the first " + num(ports.length) + " listed)" : "") + " \u00B7 " + plural(n.macCount, "learned MAC");
    var dhcp = n.dhcp, leased = new Map();
    if (dhcp) {
      sec.summary.textContent += " \u00B7 DHCP " + dhcp.cidr + ", gateway " + dhcp.gateway + ", pool " + dhcp.range + ": " + plural(dhcp.leaseCount, "lease") + ", " + num(dhcp.free) + " free" +
        (dhcp.rogueServers.length ? " \u00B7 \u26A0 another DHCP server: " + dhcp.rogueServers.map(function (r) { return r.mac + " " + r.address; }).join(", ") : "");
      dhcp.leases.forEach(function (l) { if (l.state === "bound") leased.set(l.mac, l); });
    }
    update(sec.ports, ports.length ? ports.map(function (p) { return portRow(n, p); })
      : [h("tr", { "data-key": "none" }, h("td", { colspan: 12, class: "empty" }, "No ports."))]);
    var byId = new Map(ports.map(function (p) { return [p.id, p]; }));
    sec.macsTitle.textContent = "Learned MACs (" + (macs.length < n.macCount ? "first " + num(macs.length) + " of " : "") + num(n.macCount) + ")";
    if (sec.fresh && n.macCount > 0) { sec.macsBox.open = n.macCount <= 32; sec.fresh = false; }
    sec.macsTable.hidden = macs.length === 0;
    update(sec.macs, macs.map(function (m) {
      var port = byId.get(m.port);
      var l = leased.get(m.mac);
      return h("tr", { "data-key": "m " + m.mac, "data-mac": m.mac },
        h("td", { class: "mac" }, m.mac, l ? h("span", { class: "muted sub", "data-field": "lease" }, leaseText(l)) : ""),
        h("td", {}, m.port, port ? h("span", { class: "muted" }, " " + port.peer) : ""),
        h("td", { class: "n" }, (m.age < 10 ? m.age.toFixed(1) : Math.round(m.age)) + " s"));
    }));
    sec.closedTitle.textContent = "Recently closed ports (" + closed.length + ")";
    sec.closedTable.hidden = closed.length === 0;
    update(sec.closed, closed.map(function (p) {
      return h("tr", { "data-key": "c " + p.id + " " + p.since, "data-port": p.id },
        cell("Port", "id", "nw", h("strong", {}, p.id), h("span", { class: "muted sub" }, " (" + p.kind + ")")),
        cell("Peer", "peer", null, p.peer),
        cell("Closed", "since", "nw", clock(p.since), h("span", { class: "muted sub" }, " (" + ago(p.since) + ")")),
        cell("Reason", "reason", null, p.reason !== undefined && p.reason !== null && p.reason !== "" ? String(p.reason) : h("span", { class: "muted" }, "\u2014")),
        cell("In frames", "rx-frames", "n", num(p.rx && p.rx.frames)),
        cell("Out frames", "tx-frames", "n", num(p.tx && p.tx.frames)),
        cell("Drops in / out", "drops", "n", num(p.rx && p.rx.drops) + " / " + num(p.tx && p.tx.drops)));
    }));
  }
  function renderNetworks(st) {
    var box = $("networks");
    var names = new Set(st.networks.map(function (n) { return n.name; }));
    sections.forEach(function (sec, name) { if (!names.has(name)) { sec.root.remove(); sections.delete(name); } });
    st.networks.forEach(function (n, i) {
      var sec = sections.get(n.name);
      if (!sec) { sec = networkSection(n.name); sections.set(n.name, sec); }
      if (box.children[i] !== sec.root) box.insertBefore(sec.root, box.children[i] || null);
      fillNetwork(sec, n);
    });
    $("no-networks").hidden = st.networks.length > 0;
    var page = st.networksPage, more = page ? page.total - st.networks.length : 0;
    $("more-networks").hidden = more <= 0;
    $("more-networks").textContent = more > 0 ? "The first " + num(st.networks.length) + " of " + num(page.total) + " networks; status?networks=all&offset=N lists the others." : "";
  }

  // ----- polling -----
  function live(ok) {
    $("live").className = ok ? "live-ok" : "live-bad";
    $("live").replaceChildren.apply($("live"), [].slice.call(arguments, 1));
  }
  function render(st) {
    updateRates(st);
    document.title = st.name + " \u00B7 edge-relay";
    $("name").textContent = st.name;
    $("version").textContent = "edge-relay " + st.version;
    renderFacts(st);
    renderTopology(st);
    renderNetworks(st);
    renderCounters(st);
  }
  async function poll() {
    // Counted from the request's start, so the page refreshes once a second however long a fetch takes.
    var started = Date.now();
    var delay = POLL_MS;
    var abort = new AbortController();
    var timer = setTimeout(function () { abort.abort(); }, 5000);
    try {
      var res = await fetch("status?macs=200", { credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" }, signal: abort.signal });
      if (res.status === 401) {
        live(false, "\u26A0 Not authorised: the admin token is missing or has changed. ", h("a", { href: "./" }, "Log in"));
        return;
      }
      if (res.status === 429) {
        var wait = Number(res.headers.get("Retry-After")) || 60;
        delay = wait * 1000;
        throw new Error("too many failed logins from here; next try in " + wait + " s");
      }
      if (!res.ok) throw new Error("HTTP " + res.status);
      render(await res.json());
      live(true, "\u25CF Live, updated " + clock(new Date()));
    } catch (e) {
      live(false, "\u26A0 Cannot read the relay's status (" + (e && e.name === "AbortError" ? "timed out" : e && e.message || e) + "); retrying");
    } finally {
      clearTimeout(timer);
    }
    setTimeout(poll, Math.max(0, delay - (Date.now() - started)));
  }
  poll();
})();
</script>
</body>
</html>
`;

/** The page as a relay with an admin token serves it: with a button that ends the session. @internal */
export const PAGE_HTML_WITH_LOGOUT = PAGE_HTML.replace("<!--logout-->", '<form id="logout" method="post" action="logout"><button type="submit">Log out</button></form>');

/** What `/` answers without the admin token: a form that posts it to /login. */
const LOGIN_HTML = String.raw`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>edge-relay: log in</title>
<style>
:root { color-scheme: light dark; }
body { margin: 0; min-height: 100vh; display: grid; place-items: center; font: 15px/1.45 system-ui, "Liberation Sans", "DejaVu Sans", sans-serif; }
form { display: grid; gap: 0.75rem; width: min(22rem, calc(100vw - 2rem)); padding: 1.25rem; border: 1px solid #8c959f; border-radius: 6px; }
h1 { margin: 0; font-size: 1.2rem; }
label { display: grid; gap: 0.25rem; }
input, button { font: inherit; padding: 0.4rem 0.5rem; }
p { margin: 0; }
</style>
</head>
<body>
<form method="post" action="login">
  <h1>edge-relay</h1>
  <p>This relay's status needs its admin token.</p>
  <!--message-->
  <label>Admin token <input type="password" name="token" autocomplete="current-password" required autofocus></label>
  <button type="submit">Log in</button>
</form>
</body>
</html>
`;

const LOGIN_FAILED = '<p role="alert"><strong>⚠ That is not this relay\'s admin token.</strong></p>';

// ───────────────────────────── CLI ─────────────────────────────
//
// Flags, the config file and the environment merge into one object that parseConfig checks; a
// mistake is one line and exit status 2. `main` is last, behind `import.meta.main`: nothing runs
// on import.

const HELP_COLUMN = 34;

/** The usage text, built from the option table. @internal */
export function helpText(program = "bun relay.ts"): string {
  const out = [
    `edge-relay ${VERSION}: share Ethernet segments between QEMU VMs across hosts`,
    "",
    `Usage: ${program} [options]`,
    "",
    "With no options: a local switch with --http 127.0.0.1:8080 and --qemu-listen 127.0.0.1:10000.",
    "At start it prints a QEMU command line per QEMU port; give each VM a MAC of its own.",
    'NET is a network name (default "default"); every network is its own learning switch.',
  ];
  const table = Object.entries(OPTIONS as Record<string, OptionSpec>);
  for (const [group, heading] of Object.entries(OPTION_GROUPS)) {
    out.push("", heading);
    for (const [key, spec] of table) {
      if (spec.group !== group) continue;
      const fallback = spec.schema && v.getDefault(spec.schema as v.GenericSchema);
      const lines = spec.help.split("\n");
      if (typeof fallback === "number" || (typeof fallback === "string" && fallback !== "")) lines[lines.length - 1] += ` (${fallback})`;
      const name = `  ${spec.short ? `-${spec.short}, ` : ""}${flagOf(key)}${spec.arg ? ` ${spec.arg}` : ""}`;
      if (name.length >= HELP_COLUMN) out.push(name, ...lines.map((l) => " ".repeat(HELP_COLUMN) + l));
      else out.push(name.padEnd(HELP_COLUMN) + lines[0], ...lines.slice(1).map((l) => " ".repeat(HELP_COLUMN) + l));
    }
  }
  return out.join("\n") + "\n";
}

type Flags = Record<string, string | true | string[]>;

/**
 * Parses the command line against the option table: `--flag VALUE`, `--flag=VALUE`, `-h`. Every
 * mistake is one line in the relay's words naming the option. A value may start with `-` (a
 * negative number is the schema's to refuse), but not with `--`: that is the next option, and the
 * value was forgotten.
 */
function parseFlags(argv: string[]): Flags {
  const byFlag = new Map<string, [string, OptionSpec]>();
  for (const [key, spec] of Object.entries(OPTIONS as Record<string, OptionSpec>)) {
    byFlag.set(flagOf(key), [key, spec]);
    if (spec.short) byFlag.set(`-${spec.short}`, [key, spec]);
  }
  const flags: Flags = {};
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const eq = arg.startsWith("--") ? arg.indexOf("=") : -1;
    const name = eq > 0 ? arg.slice(0, eq) : arg;
    const found = byFlag.get(name);
    if (!found) {
      const what = !arg.startsWith("-") ? `unexpected argument ${JSON.stringify(arg)}` : `unknown option ${JSON.stringify(name)}`;
      throw new ConfigError(`${what} (see --help)`);
    }
    const [key, spec] = found;
    const flag = flagOf(key);
    let value: string | true = true;
    if (spec.arg) {
      if (eq > 0) value = arg.slice(eq + 1);
      else if (i + 1 < argv.length && !argv[i + 1]!.startsWith("--")) value = argv[++i]!;
      else {
        // Name the next option only, never its value (`--admin-token=…`), nor text that is no option: it may be a secret.
        const next = i + 1 < argv.length ? argv[i + 1]!.split("=")[0]! : undefined;
        throw new ConfigError(`${flag}: missing value ${spec.arg}${next !== undefined && byFlag.has(next) ? ` (before ${next})` : ""}`);
      }
    } else if (eq > 0) throw new ConfigError(`${flag}: takes no value`);
    if (spec.multiple) ((flags[key] ??= []) as string[]).push(value as string);
    else if (key in flags) throw new ConfigError(`${flag}: given twice`);
    else flags[key] = value;
  }
  return flags;
}

function readTextFile(option: string, path: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch (error) {
    throw new ConfigError(`${option}: ${describeError(`cannot read ${path}`, error)}`);
  }
}

/** --token-file's tokens: one a line; `#` starts a comment. */
function tokenFileLines(path: string): string[] {
  return readTextFile(flagOf("tokenFile"), path).split("\n").map((l) => l.replace(/#.*/, "").trim()).filter(Boolean);
}

const DEFAULT_QEMU_LISTEN = "127.0.0.1:10000";

/** Merges the config file, environment and flags (flags win) into one validated Config. */
export function loadConfig(argv: string[], env: Record<string, string | undefined>): Config | "help" | "version" {
  return configOf(parseFlags(argv), env);
}

/** loadConfig's work on flags already parsed: main parses them once for this and its commands. */
function configOf(flags: Flags, env: Record<string, string | undefined>): Config | "help" | "version" {
  if (flags.help) return "help";
  if (flags.version) return "version";
  let raw: Record<string, unknown> = {};
  const configFile = flags.config as string | undefined;
  if (configFile !== undefined) {
    const option = flagOf("config");
    try {
      raw = JSON.parse(readTextFile(option, configFile));
    } catch (error) {
      if (error instanceof ConfigError) throw error;
      // The parser's message quotes the offending text, which may be a secret.
      throw new ConfigError(`${option}: ${configFile} is not valid JSON`);
    }
    if (typeof raw !== "object" || raw === null || Array.isArray(raw)) throw new ConfigError(`${option}: ${configFile} must hold a JSON object`);
  }
  const number = (text: string) => (text.trim() === "" ? NaN : Number(text));
  const addTo = (key: string, entries: string[]) => {
    if (entries.length) raw[key] = [...(Array.isArray(raw[key]) ? raw[key] : []), ...entries];
  };
  const table = Object.entries(OPTIONS as Record<string, OptionSpec>);
  for (const [key, spec] of table) {
    if (!spec.schema) continue;
    const value = flags[key];
    const fromEnv = spec.env === undefined ? undefined : env[spec.env];
    if (spec.cumulative) addTo(key, [...((value as string[] | undefined) ?? []), ...(fromEnv ?? "").split(",").map((t) => t.trim()).filter(Boolean)]);
    else if (value !== undefined) raw[key] = spec.numeric ? number(value as string) : value;
    else if (fromEnv !== undefined && raw[key] === undefined) raw[key] = fromEnv;
  }
  if (flags.tokenFile !== undefined) addTo("tokens", tokenFileLines(flags.tokenFile as string));
  if (raw.stateDir === undefined && configFile !== undefined) raw.stateDir = dirname(resolvePath(configFile));
  if (typeof raw.stateDir === "string") raw.stateDir = raw.stateDir.split(":")[0];
  applyHubAndJoin(raw, flags.joinFile as string | undefined, readTextFile);
  const nothingConfigured = table.every(
    ([key, spec]) => !spec.givesPorts || raw[key] === undefined || (Array.isArray(raw[key]) && (raw[key] as unknown[]).length === 0),
  );
  if (nothingConfigured) raw.qemuListen = [DEFAULT_QEMU_LISTEN];
  return parseConfig(raw);
}

/** A locally administered MAC in QEMU's range, fresh each call: VMs started from one hint must differ. */
function randomVmMac(): string {
  const [a, b, c] = crypto.getRandomValues(new Uint8Array(3));
  return formatMac(0x5254_0000_0000 + ((a! << 16) | (b! << 8) | c!));
}

/** QEMU's stream/dgram address options for a socket address, e.g. `addr.type=inet,addr.host=…,addr.port=…`. */
function qemuAddress(prefix: string, address: SocketAddress): string {
  if (!("path" in address)) return `${prefix}.type=inet,${prefix}.host=${address.host},${prefix}.port=${address.port}`;
  return address.path.startsWith("@")
    ? `${prefix}.type=unix,${prefix}.path=${address.path.slice(1)},${prefix}.abstract=on`
    : `${prefix}.type=unix,${prefix}.path=${address.path}`;
}

/**
 * The QEMU command lines that attach a VM to each QEMU port: the QEMU ≥ 7.2 form and, where one
 * exists, the older `-netdev socket` form; each with a MAC of its own, and saying that a second VM
 * started from the same line needs another (two VMs with one MAC cannot talk).
 */
function qemuHints(config: Config, bound: BoundAddress[]): string[] {
  const lines: string[] = [];
  const hint = (network: string, form: string, netdev: string) =>
    lines.push(`attach a VM to ${network} (${form}; change mac= for each further VM): qemu-system-x86_64 … -netdev ${netdev} -device virtio-net-pci,netdev=n0,mac=${randomVmMac()}`);
  const boundOf = (what: string) => bound.filter((b) => b.what === what);
  for (const b of boundOf("qemu-listen")) {
    const address = parseSocketAddress(b.address)!;
    hint(b.network!, "QEMU ≥ 7.2", `stream,id=n0,server=off,${qemuAddress("addr", address)}`);
    if (!("path" in address)) hint(b.network!, "older QEMU", `socket,id=n0,connect=${b.address}`);
  }
  for (const spec of config.qemuConnect) {
    hint(spec.network, "QEMU ≥ 7.2, the VM listens", `stream,id=n0,server=on,${qemuAddress("addr", spec.address)}`);
    if (!("path" in spec.address)) hint(spec.network, "older QEMU, the VM listens", `socket,id=n0,listen=${formatAddress(spec.address)}`);
  }
  boundOf("qemu-udp").forEach((b, i) => {
    const relay = parseSocketAddress(b.address)!;
    const spec = config.qemuUdp[i]!;
    const vm: SocketAddress = spec.remote ?? ("path" in relay ? { path: `${relay.path}.vm` } : { host: relay.host, port: 0 });
    hint(b.network!, "QEMU ≥ 7.2", `dgram,id=n0,${qemuAddress("local", vm)},${qemuAddress("remote", relay)}`);
    if (!("path" in relay)) hint(b.network!, "older QEMU", `socket,id=n0,udp=${b.address},localaddr=${formatAddress(vm)}`);
  });
  for (const spec of config.qemuMcast) {
    const local = spec.localAddress ? `,local.type=inet,local.host=${spec.localAddress},local.port=0` : "";
    hint(spec.network, "QEMU ≥ 7.2", `dgram,id=n0,${qemuAddress("remote", spec.group)}${local}`);
    hint(spec.network, "older QEMU", `socket,id=n0,mcast=${formatHostPort(spec.group)}${spec.localAddress ? `,localaddr=${spec.localAddress}` : ""}`);
  }
  return lines;
}

/** Where --install-service puts things, below --install-root (the unit template's own paths). */
const INSTALL_BINARY = "/usr/local/bin/edge-relay";
const INSTALL_UNIT = "/etc/systemd/system/edge-relay.service";
const INSTALL_ENV = "/etc/edge-relay/env";
/** The unit's StateDirectory=edge-relay (systemd's STATE_DIRECTORY). */
const INSTALL_STATE = "/var/lib/edge-relay";
/** Options that configure the installing, or that the service replaces (its StateDirectory, the secrets' environment file). */
const NOT_IN_UNIT = new Set(["installService", "installRoot", "stateDir", "joinFile", "tokenFile"]);

/** An ExecStart argument, quoted for systemd when it needs it (`%` and `$` doubled: they are specifiers there). */
function unitArgument(text: string): string {
  const escaped = text.replace(/%/g, "%%").replace(/\$/g, "$$$$");
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(text) ? escaped : `"${escaped.replace(/["\\]/g, "\\$&")}"`;
}

/**
 * A value for systemd's EnvironmentFile: in double quotes, where systemd (env-file.c, as a POSIX
 * shell does) takes a backslash before `"`, a backslash, `` ` `` or `$` as that character and keeps
 * everything else (`'`, spaces) as it is.
 * @internal
 */
export function environmentFileValue(text: string): string {
  return `"${text.replace(/["\\`$]/g, "\\$&")}"`;
}

/**
 * Copies the state directory `from` into the service's `to`, modes kept, so an installed hub keeps
 * the certificate and tokens its sites pin. A file that is already in `to` with other content is
 * another hub's: a ConfigError, and nothing is copied. Returns how many files were copied.
 */
function copyStateDirectory(from: string, to: string): number {
  const files: string[] = [];
  const walk = (relative: string) => {
    for (const entry of readdirSync(join(from, relative), { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))) {
      const path = join(relative, entry.name);
      if (entry.isDirectory()) walk(path);
      else if (entry.isFile() && !entry.name.endsWith(".tmp") && entry.name !== HUB_LOCK) files.push(path);
    }
  };
  walk("");
  for (const file of files) {
    const there = join(to, file);
    if (existsSync(there) && !readFileSync(there).equals(readFileSync(join(from, file)))) {
      throw new ConfigError(`${flagOf("installService")}: ${flagOf("stateDir")} ${from}: ${there} differs from ${join(from, file)} (another hub's state?); move one of them aside`);
    }
  }
  for (const file of files) {
    const source = join(from, file);
    mkdirSync(dirname(join(to, file)), { recursive: true, mode: statSync(dirname(source)).mode & 0o7777 });
    copyFileSync(source, join(to, file));
    chmodSync(join(to, file), statSync(source).mode & 0o7777);
  }
  if (files.length > 0) chmodSync(to, statSync(from).mode & 0o7777);
  return files.length;
}

/**
 * --install-service: this command line, less the installing options, as the systemd service
 * edge-relay: the binary (this one, or compiled from this script), the unit (deploy/edge-relay.service
 * with its hardening and StateDirectory, ExecStart this command line) and the environment file
 * (0600) with every secret, from the options, their environment variables and --join-file or
 * --token-file, so none is on the command line `ps` shows. A --state-dir's files are copied to the
 * service's StateDirectory (a hub's sites keep their pins). Under `root` (tests, images) nothing is
 * started; at / on a host where systemd runs, systemctl enables and starts it.
 */
function installService(flags: Flags, env: Record<string, string | undefined>, root: string): string[] {
  const table = OPTIONS as Record<string, OptionSpec>;
  const secrets = new Map<string, string[]>();
  const addSecret = (key: string, values: string[]) => {
    const spec = table[key]!;
    if (spec.env === undefined) throw new ConfigError(`${flagOf("installService")}: ${flagOf(key)} holds a secret and has no environment variable: give it in the ${flagOf("config")} file`);
    secrets.set(spec.env, [...(secrets.get(spec.env) ?? []), ...values]);
  };
  const args: string[] = [];
  for (const [key, value] of Object.entries(flags)) {
    const spec = table[key]!;
    if (NOT_IN_UNIT.has(key)) continue;
    const values = value === true ? [] : Array.isArray(value) ? value : [value];
    if (spec.secret) addSecret(key, values);
    else if (value === true) args.push(flagOf(key));
    else for (const one of values) args.push(flagOf(key), key === "config" ? resolvePath(one) : one);
  }
  for (const [key, spec] of Object.entries(table)) {
    const fromEnv = spec.env && spec.secret ? env[spec.env]?.trim() : undefined;
    if (fromEnv && !secrets.has(spec.env!)) addSecret(key, [fromEnv]);
  }
  if (typeof flags.joinFile === "string") addSecret("join", [readTextFile(flagOf("joinFile"), flags.joinFile).trim()]);
  if (typeof flags.tokenFile === "string") addSecret("tokens", tokenFileLines(flags.tokenFile));
  const under = (path: string) => join(root, path);
  const state = typeof flags.stateDir === "string" ? resolvePath(flags.stateDir) : undefined;
  const copied = state !== undefined && state !== under(INSTALL_STATE) && existsSync(state) ? copyStateDirectory(state, under(INSTALL_STATE)) : 0;
  for (const dir of [dirname(INSTALL_BINARY), dirname(INSTALL_UNIT), dirname(INSTALL_ENV)]) mkdirSync(under(dir), { recursive: true, mode: 0o755 });

  const binary = under(INSTALL_BINARY);
  if (Bun.main.startsWith("/$bunfs/")) {
    copyFileSync(process.execPath, `${binary}.tmp`);
    chmodSync(`${binary}.tmp`, 0o755);
    renameSync(`${binary}.tmp`, binary);
  } else {
    const build = Bun.spawnSync([process.execPath, "build", "--compile", "--minify", Bun.main, "--outfile", binary], { stdout: "ignore", stderr: "pipe" });
    if (build.exitCode !== 0) throw new Error(`Cannot compile ${Bun.main} to ${binary}: ${build.stderr.toString().trim().split("\n").at(-1)}`);
  }
  const execStart = [INSTALL_BINARY, ...args].map(unitArgument).join(" ");
  const unit = UNIT_TEMPLATE.slice(UNIT_TEMPLATE.indexOf("[Unit]")).replace(/^ExecStart=.*$/m, `ExecStart=${execStart}`);
  writeAtomically(under(INSTALL_UNIT), `# Written by edge-relay ${flagOf("installService")} from deploy/edge-relay.service; secrets are in ${INSTALL_ENV}.\n\n${unit}`, 0o644);
  writeAtomically(under(INSTALL_ENV), [...secrets].map(([name, values]) => `${name}=${environmentFileValue(values.join(","))}\n`).join(""), 0o600);
  const lines = [
    `installed ${binary}`,
    `installed ${under(INSTALL_UNIT)}: ExecStart=${execStart}`,
    `installed ${under(INSTALL_ENV)} (0600): ${[...secrets.keys()].join(", ") || "no secrets"}`,
  ];
  if (copied > 0) lines.push(`copied ${state} to ${under(INSTALL_STATE)} (${copied} file${copied === 1 ? "" : "s"}, modes kept): the service's StateDirectory, so its certificate and tokens stay`);
  if (flags.publicUrl !== undefined) lines.push(`the hub keeps its state in ${INSTALL_STATE}; the site's join string (not logged) is there once it has started: sudo cat ${INSTALL_STATE}/${HUB_SITE_JOIN}`);
  if (root === "/" && existsSync("/run/systemd/system")) {
    for (const command of [["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", "edge-relay"]]) {
      const run = Bun.spawnSync(command, { stdout: "ignore", stderr: "pipe" });
      if (run.exitCode !== 0) throw new Error(`${command.join(" ")} failed: ${run.stderr.toString().trim()}`);
    }
    lines.push("started: systemctl status edge-relay");
  } else lines.push(`not started (${root === "/" ? "systemd is not running here" : `installed below ${root}`}); where systemd runs: systemctl daemon-reload && systemctl enable --now edge-relay`);
  return lines;
}

/**
 * How the user runs this program: the compiled binary's own name, else Bun on the script. `npx bun`
 * when this Bun is a project's own (under node_modules) and `bun` in the user's shell would not run
 * it: npx and npm scripts put node_modules/.bin on the PATH, so that shell's PATH is this one without
 * those entries. Its `bun` may be a global one (also under node_modules after `npm install -g bun`).
 */
function programName(): string {
  if (Bun.main.startsWith("/$bunfs/")) return basename(process.execPath);
  const PATH = (process.env.PATH ?? "").split(":").filter((dir) => !/(^|\/)node_modules\/\.bin\/?$/.test(dir)).join(":");
  const bun = Bun.which("bun", { PATH });
  const global = !process.execPath.includes("/node_modules/") || (bun !== null && realpathSync(bun) === realpathSync(process.execPath));
  return `${global ? "" : "npx "}bun ${basename(Bun.main)}`;
}

/**
 * --invite, --invites and --revoke: run against the hub in the state directory, print, and give
 * the exit status (2: a bad request, 1: the state could not be read or written).
 */
function runHubCommand(flags: Flags, stateDir: string | undefined, program: string): number {
  const option = flags.invite !== undefined ? flagOf("invite") : flags.revoke !== undefined ? flagOf("revoke") : flagOf("invites");
  if (stateDir === undefined) {
    console.error(`edge-relay: ${option}: needs ${flagOf("stateDir")} DIR (or STATE_DIRECTORY), the hub's`);
    return 2;
  }
  try {
    if (typeof flags.invite === "string") {
      const invite = addInvite(stateDir, flags.invite.split(",").map((n) => n.trim()));
      console.log(`invite ${invite.id} (networks: ${invite.networks.join(", ")}); on that site, run: ${program} --join ${invite.join}`);
    } else if (typeof flags.revoke === "string") {
      if (!revokeInvite(stateDir, flags.revoke)) {
        console.error(`edge-relay: ${option}: no token ${JSON.stringify(flags.revoke)} in ${stateDir} (see ${flagOf("invites")})`);
        return 2;
      }
      console.log(`revoked ${flags.revoke}: a running hub closes its tunnels and v86 ports now`);
    } else {
      for (const t of listInvites(stateDir)) console.log(`${t.id}\t${t.networks?.join(",") ?? "(every network)"}\t${t.created}`);
    }
    return 0;
  } catch (error) {
    console.error(`edge-relay: ${option}: ${(error as Error).message}`);
    return error instanceof ConfigError ? 2 : 1;
  }
}

/**
 * What a hub says about joining it. The site line holds the site token, so it is shown once, at the
 * first start, and only to a person at a terminal: under systemd or podman (or into a pipe) stdout is
 * a log, and the line says which file holds the join string instead.
 * @internal
 */
export function hubStartLines(hub: HubState, program: string, terminal: boolean): string[] {
  const another = `for another: ${program} ${flagOf("stateDir")} ${hub.dir} ${flagOf("invite")} NET[,NET…]`;
  if (!hub.created || hub.join === "") return [`hub: sites keep their join lines; ${another}`];
  if (terminal) return [`hub: on each site, run: ${program} --join ${hub.join}`, `hub: (the join string is also in ${hub.siteFile}; ${another})`];
  return [`hub: on each site, run: ${program} --join JOIN, JOIN being the contents of ${hub.siteFile} (not logged: it holds the site token)`];
}

export async function main(argv = Bun.argv.slice(2), env: Record<string, string | undefined> = process.env): Promise<void> {
  let flags, config;
  try {
    flags = parseFlags(argv);
    config = configOf(flags, env);
  } catch (error) {
    if (!(error instanceof ConfigError)) throw error;
    console.error(`edge-relay: ${error.message}`);
    process.exit(2);
  }
  if (config === "help") return void process.stdout.write(helpText(programName()));
  if (config === "version") return void console.log(`edge-relay ${VERSION} (bun ${Bun.version})`);
  if (flags.invite !== undefined || flags.invites !== undefined || flags.revoke !== undefined) process.exit(runHubCommand(flags, config.stateDir, programName()));
  if (flags.installService !== undefined) {
    try {
      for (const line of installService(flags, env, typeof flags.installRoot === "string" ? resolvePath(flags.installRoot) : "/")) console.log(line);
      process.exit(0);
    } catch (error) {
      console.error(`edge-relay: ${(error as Error).message}`);
      process.exit(error instanceof ConfigError ? 2 : 1);
    }
  }
  let relay: RelayHandle;
  try {
    relay = await startRelay(config, consoleLogger, env);
  } catch (error) {
    console.error(`edge-relay: ${(error as Error).message}`);
    // A setting found bad only at start (a proxy from the environment) exits as a bad option does.
    process.exit(error instanceof ConfigError ? 2 : 1);
  }
  const shutdown = async (signal: string) => {
    console.log(`${signal}: stopping`);
    await relay.stop();
    process.exit(0);
  };
  process.once("SIGINT", shutdown);
  process.once("SIGTERM", shutdown);
  for (const b of relay.bound) console.log(`${b.what}${b.network ? ` ${b.network}` : ""}: listening on ${b.address}`);
  for (const line of qemuHints(config, relay.bound)) console.log(line);
  if (relay.hub) {
    const hub = relay.hub;
    process.on("SIGHUP", () => hub.reload());
    for (const line of hubStartLines(hub, programName(), process.stdout.isTTY === true)) console.log(line);
    console.log(`hub: certificate SHA-256 ${hub.fingerprint}; the admin token (for /status, /metrics, /invites) is in ${hub.adminFile}`);
  }
  console.log("ready");
}

if (import.meta.main) await main();
