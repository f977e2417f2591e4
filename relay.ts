#!/usr/bin/env bun
/**
 * edge-relay: share Ethernet segments between QEMU virtual machines on different hosts.
 *
 * A relay hosts named networks; each network is a learning Ethernet switch. QEMU links (TCP and
 * unix stream connections, UDP and unix datagram peers, multicast segments) and WebSocket tunnels to
 * other relays are ports on a network. Sites dial out to a hub over an authenticated WebSocket
 * (`ws://`, or `wss://` with --tls-cert/--tls-key on the hub), so NAT is no obstacle; hub and site
 * are this same program with different ports configured.
 *
 * ```sh
 * # one host: a local switch on 127.0.0.1:10000, status on http://127.0.0.1:8080/status
 * bun relay.ts
 *
 * # hub (public host) and two sites behind NAT
 * RELAY_TOKENS=s3cret bun relay.ts --http 0.0.0.0:8080 --admin-token adm1n
 * RELAY_UPLINK_TOKEN=s3cret bun relay.ts --qemu-listen 127.0.0.1:10000 --uplink ws://hub.example:8080
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
 * @module
 */

import { parseArgs } from "node:util";
import { lstatSync, readFileSync, rmSync, unlinkSync } from "node:fs";
import { constants as osConstants } from "node:os";
import { dlopen, FFIType, read } from "bun:ffi";
import { timingSafeEqual } from "node:crypto";
import { checkServerIdentity, type PeerCertificate } from "node:tls";
import type { Server, ServerWebSocket, Socket, udp } from "bun";
import { Hono } from "hono";
import * as v from "valibot";

// ───────────────────────────── constants ─────────────────────────────

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
/** A batch is sent once it passes this size, so one message or write never gets huge. */
const BATCH_BYTES = 256 * 1024;
const MAX_MESSAGE = 1024 * 1024;
const MAX_MACS_PER_NETWORK = 16_384;
const DEFAULT_PORT_MACS = 256;
const DEFAULT_STORM_LIMIT = 5_000;
/** Tokens shorter than this are refused at start. */
const MIN_TOKEN_LENGTH = 16;
/** The largest --queue-bytes: a tunnel's WebSocket backpressure limit is derived from it. */
const MAX_QUEUE_BYTES = 64 * 1024 * 1024;
/** Learned datagram peers are forgotten after this much silence, or the MAC ageing time if shorter. */
const UDP_PEER_AGEING_MS = 60_000;
/** New peers one --qemu-udp socket learns per second: a spoofed flood cannot churn the table faster. */
const NEW_UDP_PEERS_PER_SECOND = 16;
const MAX_TUNNEL_NETWORKS = 64;
const CLOSED_PORTS_KEPT = 16;
const HELLO_TIMEOUT_MS = 10_000;
const TUNNEL_IDLE_SECONDS = 60;
const CLOCK_TICK_MS = 100;
const UPLINK_BACKOFF_MIN_MS = 250;
const UPLINK_BACKOFF_MAX_MS = 30_000;
const DIAL_BACKOFF_MIN_MS = 100;
const DIAL_BACKOFF_MAX_MS = 5_000;
const DEFAULT_HTTP = "127.0.0.1:8080";
const DEFAULT_QEMU_LISTEN = "127.0.0.1:10000";
const NETWORK_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
/** Bun.udpSocket's undocumented flag for SO_REUSEADDR (what node:dgram passes for reuseAddr). */
const UDP_REUSEADDR = 16;
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

// ───────────────────────────── config ─────────────────────────────

export interface HostPort {
  host: string;
  port: number;
}

/** Parses `HOST:PORT` or `[IPv6]:PORT`; `null` when it is neither. */
export function parseHostPort(text: string): HostPort | null {
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:\s\[\]]+)):(\d{1,5})$/.exec(text);
  if (!m) return null;
  const port = Number(m[3]);
  if (port > 65_535) return null;
  return { host: m[1] ?? m[2]!, port };
}

/** `127.0.0.1:80`, `[::1]:80`. */
export function formatHostPort({ host, port }: HostPort): string {
  return host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
}

/** A unix socket path; `@name` is a Linux abstract name. */
export interface UnixPath {
  path: string;
}

export type SocketAddress = HostPort | UnixPath;

/** `HOST:PORT`, `[IPv6]:PORT` or `unix:PATH`. */
export function parseSocketAddress(text: string): SocketAddress | null {
  if (!text.startsWith("unix:")) return parseHostPort(text);
  const path = text.slice(5);
  return path.length > 1 || (path.length === 1 && path !== "@") ? { path } : null;
}

export function formatAddress(address: SocketAddress): string {
  return "path" in address ? `unix:${address.path}` : formatHostPort(address);
}

/** Bun spells a Linux abstract socket name with a leading NUL. */
function bunUnixPath(path: string): string {
  return path.startsWith("@") ? `\0${path.slice(1)}` : path;
}

/**
 * Splits `[NET=]REST` into the network name (default `default`) and the rest. A prefix with a `:`
 * is part of the address (`unix:/run/a=b.sock`), not a network name.
 */
function splitNetwork(text: string): { network: string; rest: string } {
  const eq = text.indexOf("=");
  if (eq < 0 || text.slice(0, eq).includes(":")) return { network: "default", rest: text };
  return { network: text.slice(0, eq), rest: text.slice(eq + 1) };
}

function endpointSchema<T extends object>(shape: string, parse: (rest: string) => T | null) {
  return v.pipe(
    v.string(),
    v.rawTransform(({ dataset, addIssue, NEVER }) => {
      const { network, rest } = splitNetwork(dataset.value);
      const parsed = parse(rest);
      if (!NETWORK_NAME.test(network)) {
        addIssue({ message: `network name ${JSON.stringify(network)} must be letters, digits, '.', '_' or '-'` });
        return NEVER;
      }
      if (!parsed) {
        addIssue({ message: `expected ${shape}, got ${JSON.stringify(dataset.value)}` });
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

const IPV4 = /^\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}$/;
const IPV6 = /^[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*$/;

/**
 * A fixed datagram peer must be something a socket can send to: a unix path with a unix socket, or
 * an IP literal with a port, of the local address's family (Bun sends to IPs only, no names).
 */
function validRemote(local: SocketAddress, remote: SocketAddress): boolean {
  if ("path" in local || "path" in remote) return "path" in local && "path" in remote;
  const family = (host: string) => (IPV4.test(host) ? 4 : IPV6.test(host) ? 6 : 0);
  const localFamily = family(local.host);
  return remote.port > 0 && family(remote.host) !== 0 && (localFamily === 0 || localFamily === family(remote.host));
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
  if (localAddress !== undefined && !IPV4.test(localAddress)) return null;
  return { group, localAddress };
});

/**
 * One line for a failed system call: `Cannot listen on 127.0.0.1:10000: address already in use
 * (EADDRINUSE)`, `cannot read /x: no such file or directory (ENOENT)`.
 */
export function describeError(action: string, error: unknown): string {
  const code = (error as { code?: unknown })?.code;
  if (typeof code === "string" && ERRNO_TEXT[code]) return `${action}: ${ERRNO_TEXT[code]} (${code})`;
  const message = error instanceof Error ? error.message : String(error);
  return `${action}: ${message}${typeof code === "string" && !message.includes(code) ? ` (${code})` : ""}`;
}

/** A PEM file named by the option: read while validating, so a missing file is a config error. */
const PemFile = v.pipe(
  v.string(),
  v.rawTransform(({ dataset, addIssue, NEVER }) => {
    try {
      return { path: dataset.value, text: readFileSync(dataset.value, "utf8") };
    } catch (error) {
      addIssue({ message: describeError(`cannot read ${dataset.value}`, error) });
      return NEVER;
    }
  }),
);

const Fingerprint = v.pipe(
  v.string(),
  v.regex(/^(?:[0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}$/, "expected a SHA-256 fingerprint: 64 hex digits, colons optional"),
  v.transform((f) => f.replace(/:/g, "").toUpperCase().replace(/(..)(?!$)/g, "$1:")),
);

const HttpAddress = v.pipe(
  v.string(),
  v.rawTransform(({ dataset, addIssue, NEVER }) => {
    const addr = parseHostPort(dataset.value);
    if (addr) return addr;
    addIssue({ message: `expected HOST:PORT, got ${JSON.stringify(dataset.value)}` });
    return NEVER;
  }),
);

/** Secrets: the message never repeats the value. */
const Secret = v.pipe(
  v.string("expected a string"),
  v.check((s) => s.length > 0 && !/\s/.test(s), "must be non-empty and contain no white space"),
);

const Seconds = v.pipe(v.number("expected a number of seconds"), v.minValue(0.01, "must be positive"), v.maxValue(86_400, "must be at most a day"));

/** A whole number in a range, e.g. `count("bytes", 1, 10)`. */
function count(what: string, min: number, max: number) {
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

type OptionGroup = keyof typeof OPTION_GROUPS;

const OPTION_GROUPS = {
  qemu: "QEMU ports (repeatable). ADDR is HOST:PORT, [IPv6]:PORT, unix:PATH or unix:@ABSTRACT_NAME:",
  tunnel: "Tunnel:",
  http: "HTTP (status, metrics, tunnel endpoint):",
  switch: "Switch:",
  limits: "Limits (each refusal or drop is counted and shown in /status):",
  other: "Other:",
};

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
  group: OptionGroup;
  /** Lines of help; the default, if any, is added from the schema. */
  help: string;
  /** Validates the config value; options without one exist on the command line only. */
  schema?: v.GenericSchema;
}

/**
 * Every option, once: the config schema, the command-line parser, --help and the names in error
 * messages all come from this table. Keys are the config file's (camelCase).
 */
export const OPTIONS = {
  qemuListen: {
    arg: "[NET=]ADDR", multiple: true, group: "qemu", schema: list(StreamEndpoint, "[NET=]HOST:PORT or [NET=]unix:PATH"),
    help: "accept QEMU stream clients: -netdev stream,server=off,… or\n-netdev socket,connect=HOST:PORT; each connection is a port",
  },
  qemuConnect: {
    arg: "[NET=]ADDR", multiple: true, group: "qemu", schema: list(StreamEndpoint, "[NET=]HOST:PORT or [NET=]unix:PATH"),
    help: "dial QEMU -netdev stream,server=on,… or -netdev socket,listen=…;\nretried with backoff until it answers and after it restarts",
  },
  qemuUdp: {
    arg: "[NET=]ADDR[,REMOTE]", multiple: true, group: "qemu", schema: list(UdpEndpoint, "[NET=]HOST:PORT[,REMOTE]"),
    help: "datagram socket for -netdev dgram,… (inet or unix) or\n-netdev socket,udp=…,localaddr=…; each source address is a port;\nREMOTE (same family) fixes the peer: only it is then accepted",
  },
  qemuMcast: {
    arg: "[NET=]GROUP:PORT[,LOCALADDR]", multiple: true, group: "qemu", schema: list(McastEndpoint, "[NET=]GROUP:PORT[,LOCALADDR]"),
    help: "bridge a -netdev socket,mcast=GROUP:PORT / -netdev dgram multicast\nsegment into NET as one port",
  },
  allowRemoteQemu: {
    group: "qemu", schema: v.optional(v.boolean("expected true or false"), false),
    help: "let QEMU ports use a non-loopback address: anyone who can reach\nit gets a port on the segment",
  },
  tokens: {
    flag: "token", arg: "SECRET", multiple: true, env: "RELAY_TOKENS", group: "tunnel", schema: list(TokenGrant, "tokens"),
    help: `accept tunnels that present this token (repeatable, at least\n${MIN_TOKEN_LENGTH} characters); also RELAY_TOKENS (comma-separated) and\n--token-file; none: tunnels off`,
  },
  tokenFile: { arg: "FILE", group: "tunnel", help: "one token per line (# comments allowed)" },
  uplink: {
    arg: "URL", group: "tunnel",
    schema: v.optional(
      v.pipe(
        v.string("expected a ws:// or wss:// URL"),
        v.url("expected a ws:// or wss:// URL"),
        v.check((u) => /^wss?:$/.test(new URL(u).protocol), "expected a ws:// or wss:// URL"),
      ),
    ),
    help: "dial another relay (ws://HOST:PORT or wss://…) and carry every\nlocal network over it, and networks that appear later",
  },
  uplinkToken: { arg: "SECRET", env: "RELAY_UPLINK_TOKEN", group: "tunnel", schema: v.optional(Secret), help: "the token for --uplink; also RELAY_UPLINK_TOKEN" },
  name: {
    arg: "NAME", group: "tunnel",
    schema: v.optional(v.pipe(v.string("expected a name"), v.regex(NETWORK_NAME, "expected letters, digits, '.', '_' or '-' (at most 64)"))),
    help: "this relay's name in the hub's logs and status (the host name)",
  },
  keepalive: { arg: "SECONDS", numeric: true, group: "tunnel", schema: v.optional(Seconds, 10), help: "uplink ping interval; no answer for 3 intervals redials" },
  uplinkCa: { arg: "FILE", group: "tunnel", schema: v.optional(PemFile), help: "trust this CA (PEM) for a wss:// uplink instead of the system's" },
  uplinkFingerprint: { arg: "SHA256", group: "tunnel", schema: v.optional(Fingerprint), help: "also require the hub certificate's SHA-256 fingerprint (pinning)" },
  insecure: { group: "tunnel", schema: v.optional(v.boolean("expected true or false"), false), help: "do not verify the hub's certificate (logged on every connect)" },
  http: { arg: "HOST:PORT", group: "http", schema: v.optional(HttpAddress, DEFAULT_HTTP), help: "listen address" },
  adminToken: {
    arg: "SECRET", env: "RELAY_ADMIN_TOKEN", group: "http", schema: v.optional(AcceptedSecret),
    help: "Bearer token for /healthz, /status, /metrics; required when --http\nis not a loopback address; also RELAY_ADMIN_TOKEN",
  },
  tlsCert: { arg: "FILE", group: "http", schema: v.optional(PemFile), help: "serve HTTPS and wss:// with this certificate (PEM)" },
  tlsKey: { arg: "FILE", group: "http", schema: v.optional(PemFile), help: "the certificate's private key (PEM)" },
  macAgeing: { arg: "SECONDS", numeric: true, group: "switch", schema: v.optional(Seconds, 300), help: "forget a MAC not seen for this long" },
  queueBytes: {
    arg: "BYTES", numeric: true, group: "switch", schema: v.optional(count("bytes", MAX_FRAME + 4, MAX_QUEUE_BYTES), 4 * 1024 * 1024),
    help: "send queue bound per port; beyond it frames are dropped",
  },
  portMacs: {
    arg: "N", numeric: true, group: "switch", schema: v.optional(count("MACs", 1, MAX_MACS_PER_NETWORK), DEFAULT_PORT_MACS),
    help: "MACs learned behind one VM port; frames from further source MACs\nare dropped (a tunnel may fill the network's table)",
  },
  stormLimit: {
    arg: "FRAMES", numeric: true, group: "switch", schema: v.optional(count("frames per second", 0, 10_000_000), DEFAULT_STORM_LIMIT),
    help: "broadcast and multicast frames per second one port may send into\nthe switch; the excess is dropped (0: no limit)",
  },
  maxNetworks: { arg: "N", numeric: true, group: "limits", schema: v.optional(count("networks", 1, 1_000_000), 1024), help: "networks on this relay" },
  maxTunnels: { arg: "N", numeric: true, group: "limits", schema: v.optional(count("tunnels", 1, 1_000_000), 4096), help: "tunnels connected to this relay" },
  maxTunnelsPerAddress: {
    arg: "N", numeric: true, group: "limits", schema: v.optional(count("tunnels", 1, 1_000_000), 64),
    help: "tunnels from one source address",
  },
  maxConnections: {
    arg: "N", numeric: true, group: "limits", schema: v.optional(count("connections", 1, 1_000_000), 4096),
    help: "QEMU stream connections; further ones are closed at once",
  },
  udpPeers: {
    arg: "N", numeric: true, group: "limits", schema: v.optional(count("peers", 1, 65_536), 64),
    help: "peers one --qemu-udp socket learns (the least recent goes)",
  },
  memoryBudget: {
    arg: "BYTES", numeric: true, group: "limits", schema: v.optional(count("bytes", 1024 * 1024, 2 ** 40), 256 * 1024 * 1024),
    help: "bytes queued across all ports; beyond it frames drop",
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

/** `--qemu-listen` for `qemuListen`. */
export function flagOf(key: string): string {
  const spec = (OPTIONS as Record<string, OptionSpec>)[key];
  return `--${spec?.flag ?? key.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`;
}

const configEntries = Object.fromEntries(
  Object.entries(OPTIONS as Record<string, OptionSpec>).flatMap(([key, spec]) => (spec.schema ? [[key, spec.schema]] : [])),
) as ConfigEntries;

export const ConfigSchema = v.pipe(
  v.strictObject(configEntries),
  v.forward(
    v.check((c) => c.uplink === undefined || c.uplinkToken !== undefined, "required with --uplink (or set RELAY_UPLINK_TOKEN)"),
    ["uplinkToken"],
  ),
  v.forward(
    v.check((c) => isLoopback(c.http.host) || c.adminToken !== undefined, "required when --http is not a loopback address"),
    ["adminToken"],
  ),
  v.forward(
    v.check((c) => (c.tlsCert === undefined) === (c.tlsKey === undefined), "--tls-cert and --tls-key go together"),
    ["tlsKey"],
  ),
  v.forward(
    v.check(
      (c) => !(c.insecure && c.uplinkFingerprint),
      "cannot be combined with --insecure: a pin is checked only on a verified chain; give the hub's certificate as --uplink-ca instead",
    ),
    ["uplinkFingerprint"],
  ),
  v.forward(
    v.check(
      (c) => new Set(c.qemuMcast.map((m) => formatHostPort(m.group))).size === c.qemuMcast.length,
      "a multicast group may be bridged once: twice would forward each copy to the other forever",
    ),
    ["qemuMcast"],
  ),
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
        addIssue({ message: `${message}; add --allow-remote-qemu`, path });
      });
    }
  }),
);

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

export type Config = v.InferOutput<typeof ConfigSchema>;

export function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || /^127\.\d+\.\d+\.\d+$/.test(host);
}

// ───────────────────────────── errors ─────────────────────────────

/** A bad option or config file: the CLI prints the message and exits with status 2. */
export class ConfigError extends Error {
  override name = "ConfigError";
}

/** Keys whose values are credentials: no message may quote them. */
const SECRET_KEYS = new Set(["tokens", "uplinkToken", "adminToken"]);

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

// ───────────────────────────── framing (pure) ─────────────────────────────

const EMPTY = new Uint8Array(0);

/**
 * Reassembles QEMU stream framing (4-byte big-endian length, then the frame) from chunks split
 * anywhere. Frames that arrive whole are handed out as views of the chunk, without a copy.
 */
export class StreamDecoder {
  #head = new Uint8Array(4);
  #headUsed = 0;
  #frame: Uint8Array | null = null;
  #frameUsed = 0;

  /** Calls `onFrame` for every complete frame; throws RangeError on a length above MAX_FRAME. */
  push(data: Uint8Array, onFrame: (frame: Uint8Array) => void): void {
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
          onFrame(frame);
        }
        continue;
      }
      let length: number;
      if (this.#headUsed > 0 || n - i < 4) {
        const take = Math.min(n - i, 4 - this.#headUsed);
        this.#head.set(chunk.subarray(i, i + take), this.#headUsed);
        this.#headUsed += take;
        i += take;
        if (this.#headUsed < 4) return;
        this.#headUsed = 0;
        length = readLength(this.#head, 0);
      } else {
        length = readLength(chunk, i);
        i += 4;
        if (n - i >= length) {
          onFrame(chunk.subarray(i, i + length));
          i += length;
          continue;
        }
      }
      if (length === 0) {
        onFrame(EMPTY);
        continue;
      }
      this.#frame = new Uint8Array(length);
      this.#frameUsed = 0;
    }
  }

  /** Bytes held back waiting for the rest of a frame. */
  get buffered(): number {
    return this.#headUsed + this.#frameUsed;
  }
}

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

/**
 * A growable buffer of length-prefixed frames behind a fixed header: a stream write (no header) or
 * a tunnel data message (type and channel). Reused between batches, so steady traffic allocates nothing.
 */
export class FrameBatch {
  bytes: Uint8Array;
  used: number;
  constructor(readonly header: Uint8Array = EMPTY) {
    this.bytes = header.length ? header.slice() : EMPTY;
    this.used = header.length;
  }

  get empty(): boolean {
    return this.used === this.header.length;
  }

  append(frame: Uint8Array): void {
    const need = this.used + 4 + frame.length;
    if (need > this.bytes.length) {
      const grown = new Uint8Array(Math.max(need, Math.min(this.bytes.length * 2, BATCH_BYTES), 4096));
      grown.set(this.bytes.subarray(0, this.used));
      this.bytes = grown;
    }
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

  /** The batch so far; valid until the next append or reset. */
  view(): Uint8Array {
    return this.bytes.subarray(0, this.used);
  }

  /** The batch so far, for keeping: the next append starts a new buffer. */
  take(): Uint8Array {
    const taken = this.view();
    this.bytes = this.header.length ? this.header.slice() : EMPTY;
    this.used = this.header.length;
    return taken;
  }

  reset(): void {
    this.used = this.header.length;
  }
}

/** Stream framing for a list of frames (tests, tools). */
export function encodeFrames(frames: Uint8Array[]): Uint8Array {
  const batch = new FrameBatch();
  for (const f of frames) batch.append(f);
  return batch.view().slice();
}

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

export type ControlMessage = v.InferOutput<typeof ControlSchema>;
export type Refusal = v.InferOutput<typeof Refusal>;

/** Validates a decoded control message; throws TypeError naming the first bad field. */
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

export function encodeControl(message: ControlMessage): Uint8Array {
  const json = new TextEncoder().encode(JSON.stringify(message));
  const out = new Uint8Array(1 + json.length);
  out[0] = MSG_CONTROL;
  out.set(json, 1);
  return out;
}

export function dataHeader(channel: number): Uint8Array {
  return Uint8Array.of(MSG_DATA, channel >>> 8, channel & 0xff);
}

/**
 * Decodes one tunnel message. Throws RangeError/SyntaxError on anything malformed; the caller
 * closes the tunnel that sent it.
 */
export function decodeTunnelMessage(
  data: Uint8Array,
  onControl: (control: ControlMessage) => void,
  onFrame: (channel: number, frame: Uint8Array) => void,
): void {
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
    return;
  }
  if (type !== MSG_DATA) throw new RangeError(`Cannot decode tunnel message: unknown type ${type}`);
  if (message.length < 3) throw new RangeError("Cannot decode tunnel message: data message shorter than its header");
  const channel = (message[1]! << 8) | message[2]!;
  let i = 3;
  while (i < message.length) {
    if (message.length - i < 4) throw new RangeError("Cannot decode tunnel message: truncated frame length");
    const length = readLength(message, i);
    i += 4;
    if (message.length - i < length) {
      throw new RangeError(`Cannot decode tunnel message: frame of ${length} bytes overruns the message`);
    }
    onFrame(channel, message.subarray(i, i + length));
    i += length;
  }
}

/** A MAC address (6 bytes at `at`) as a number: no string on the hot path. */
export function macKey(frame: Uint8Array, at: number): number {
  return (
    frame[at]! * 0x100_0000_0000 +
    frame[at + 1]! * 0x1_0000_0000 +
    (((frame[at + 2]! << 24) | (frame[at + 3]! << 16) | (frame[at + 4]! << 8) | frame[at + 5]!) >>> 0)
  );
}

export function formatMac(key: number): string {
  return key.toString(16).padStart(12, "0").replace(/(..)(?!$)/g, "$1:");
}

// ───────────────────────────── switch ─────────────────────────────

export interface PortStats {
  rxFrames: number;
  rxBytes: number;
  /** Runt and 0-length frames received and dropped. */
  rxDrops: number;
  txFrames: number;
  txBytes: number;
  /** Frames not sent because the port's queue was full (or the frame cannot travel on it). */
  txDrops: number;
  /** Protocol errors: an oversize length, a malformed message. */
  errors: number;
}

export interface PortSnapshot {
  id: string;
  kind: string;
  peer: string;
  state: "up" | "closed";
  since: string;
  rx: { frames: number; bytes: number; drops: number };
  tx: { frames: number; bytes: number; drops: number };
  errors: number;
}

let portSerial = 0;

/** Anything that carries frames into and out of one network. */
export abstract class Port {
  readonly id: string;
  readonly stats: PortStats = { rxFrames: 0, rxBytes: 0, rxDrops: 0, txFrames: 0, txBytes: 0, txDrops: 0, errors: 0 };
  state: "up" | "closed" = "up";
  since = Date.now();
  network: Network | undefined;

  constructor(
    readonly kind: string,
    readonly peer: string,
  ) {
    this.id = `${kind}-${++portSerial}`;
  }

  /** Queues a frame for sending; false when it had to be dropped. */
  protected abstract enqueue(frame: Uint8Array): boolean;

  /** Queues a frame; a port that cannot take it counts a drop, and never throws back into the switch. */
  send(frame: Uint8Array): void {
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
  }

  /** Hands a received frame to the switch. */
  readonly receive = (frame: Uint8Array): void => {
    this.network?.forward(frame, this);
  };

  snapshot(): PortSnapshot {
    const s = this.stats;
    return {
      id: this.id,
      kind: this.kind,
      peer: this.peer,
      state: this.state,
      since: new Date(this.since).toISOString(),
      rx: { frames: s.rxFrames, bytes: s.rxBytes, drops: s.rxDrops },
      tx: { frames: s.txFrames, bytes: s.txBytes, drops: s.txDrops },
      errors: s.errors,
    };
  }
}

interface MacEntry {
  port: Port;
  seen: number;
}

/** A learning Ethernet switch. */
export class Network {
  readonly ports = new Set<Port>();
  readonly macs = new Map<number, MacEntry>();
  readonly closed: PortSnapshot[] = [];

  constructor(
    readonly name: string,
    readonly ageingMs: number,
    readonly now: () => number = Date.now,
  ) {}

  attach(port: Port): void {
    port.network = this;
    this.ports.add(port);
  }

  detach(port: Port): void {
    if (!this.ports.delete(port)) return;
    port.state = "closed";
    port.since = this.now();
    for (const [key, entry] of this.macs) if (entry.port === port) this.macs.delete(key);
    this.closed.push(port.snapshot());
    if (this.closed.length > CLOSED_PORTS_KEPT) this.closed.shift();
  }

  /** Learns the source, then forwards to the known port or floods; never back out of `from`. */
  forward(frame: Uint8Array, from: Port): void {
    const stats = from.stats;
    if (frame.length < MIN_FRAME) {
      stats.rxDrops++;
      return;
    }
    stats.rxFrames++;
    stats.rxBytes += frame.length;
    const now = this.now();
    if ((frame[6]! & 1) === 0) this.learn(macKey(frame, 6), from, now);
    if ((frame[0]! & 1) === 0) {
      const entry = this.macs.get(macKey(frame, 0));
      if (entry !== undefined && now - entry.seen < this.ageingMs) {
        if (entry.port !== from) entry.port.send(frame);
        return;
      }
    }
    for (const port of this.ports) if (port !== from) port.send(frame);
  }

  private learn(key: number, port: Port, now: number): void {
    const entry = this.macs.get(key);
    if (entry !== undefined) {
      entry.port = port;
      entry.seen = now;
    } else if (this.macs.size < MAX_MACS_PER_NETWORK) {
      this.macs.set(key, { port, seen: now });
    }
  }

  /** Forgets MAC entries older than the ageing time. */
  sweep(): void {
    const now = this.now();
    for (const [key, entry] of this.macs) if (now - entry.seen >= this.ageingMs) this.macs.delete(key);
  }

  snapshot() {
    const now = this.now();
    return {
      name: this.name,
      ports: [...this.ports].map((p) => p.snapshot()),
      closedPorts: [...this.closed],
      macs: [...this.macs].map(([key, e]) => ({ mac: formatMac(key), port: e.port.id, age: (now - e.seen) / 1000 })),
    };
  }
}

/**
 * The send side of a byte stream: frames are batched per event-loop turn into one write; a partial
 * write keeps its remainder for `drain`; past `limit` queued bytes new frames are refused.
 */
export class StreamWriter {
  readonly #batch = new FrameBatch();
  readonly #pending: Uint8Array[] = [];
  #pendingBytes = 0;
  #blocked = false;
  #scheduled = false;

  constructor(
    private readonly write: (data: Uint8Array) => number,
    private readonly limit: number,
  ) {}

  get queued(): number {
    return this.#pendingBytes + this.#batch.used;
  }

  push(frame: Uint8Array): boolean {
    if (this.queued + 4 + frame.length > this.limit) return false;
    if (this.#batch.used + 4 + frame.length > BATCH_BYTES) {
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
    if (this.#blocked) return;
    while (this.#pending.length > 0) {
      const chunk = this.#pending[0]!;
      const n = Math.max(0, this.write(chunk));
      this.#pendingBytes -= n;
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
}

// ───────────────────────────── tunnel & auth ─────────────────────────────

export interface Logger {
  info(line: string): void;
  warn(line: string): void;
}

export interface Grant {
  digest: Uint8Array;
  /** Networks this token may attach to; undefined means all. */
  networks: Set<string> | undefined;
}

function sha256(text: string): Uint8Array {
  return new Bun.CryptoHasher("sha256").update(text).digest() as Uint8Array;
}

export function makeGrants(tokens: Config["tokens"]): Grant[] {
  return tokens.map((t) => ({ digest: sha256(t.token), networks: t.networks && new Set(t.networks) }));
}

/** Compares against every grant in constant time (digests hide the length); the grant or undefined. */
export function authenticate(authorization: string | null | undefined, grants: Grant[]): Grant | undefined {
  const m = /^Bearer\s+(\S+)\s*$/i.exec(authorization ?? "");
  const given = sha256(m?.[1] ?? "");
  let found: Grant | undefined;
  for (const grant of grants) if (timingSafeEqual(given, grant.digest) && m) found ??= grant;
  return found;
}

/** The two ends of a tunnel differ only in how they send and report buffered bytes. */
export interface TunnelSocket {
  send(data: Uint8Array): void;
  buffered(): number;
  close(code: number, reason: string): void;
}

/** One network carried over a tunnel: a port whose frames are batched into data messages. */
export class TunnelPort extends Port {
  readonly #batch: FrameBatch;
  #scheduled = false;
  /** Bytes the batch may still grow to, sampled from the socket once per batch (a native call). */
  #room = 0;

  constructor(
    kind: string,
    peer: string,
    private readonly socket: TunnelSocket,
    channel: number,
    private readonly limit: number,
  ) {
    super(kind, peer);
    this.#batch = new FrameBatch(dataHeader(channel));
  }

  protected enqueue(frame: Uint8Array): boolean {
    if (this.state !== "up") return false;
    const need = 4 + frame.length;
    if (this.#batch.used + need > BATCH_BYTES) this.flush();
    if (this.#batch.empty) this.#room = this.limit - this.socket.buffered();
    if (this.#batch.used + need > this.#room) return false;
    this.#batch.append(frame);
    if (!this.#scheduled) {
      this.#scheduled = true;
      setImmediate(this.flush);
    }
    return true;
  }

  /** Sends the batch as one message; both Bun WebSocket ends copy it, so the buffer is reused. */
  readonly flush = (): void => {
    this.#scheduled = false;
    if (this.#batch.empty || this.state !== "up") return;
    this.socket.send(this.#batch.view());
    this.#batch.reset();
  };
}

export interface TunnelEvents {
  /** Server side: a hello arrived; answer with the channels to attach. */
  onHello?(link: TunnelLink, networks: string[]): void;
  /** Client side: the welcome arrived. */
  onWelcome?(link: TunnelLink, accepted: string[], refused: string[]): void;
}

/** The state of one tunnel WebSocket, either end: its channels and the ports behind them. */
export class TunnelLink {
  readonly ports: (TunnelPort | undefined)[] = [];
  helloDone = false;
  readonly openedAt = Date.now();
  lastHeard = Date.now();
  closed = false;

  constructor(
    readonly socket: TunnelSocket,
    readonly kind: "tunnel" | "uplink",
    readonly peer: string,
    readonly limit: number,
    readonly log: Logger,
    readonly events: TunnelEvents,
    readonly countError: () => void,
  ) {}

  attach(channel: number, network: Network): TunnelPort {
    const port = new TunnelPort(this.kind, this.peer, this.socket, channel, this.limit);
    this.ports[channel] = port;
    network.attach(port);
    return port;
  }

  readonly #onFrame = (channel: number, frame: Uint8Array): void => {
    const port = this.ports[channel];
    if (port === undefined) throw new RangeError(`Cannot decode tunnel message: channel ${channel} is not attached`);
    port.receive(frame);
  };

  readonly #onControl = (control: ControlMessage): void => {
    if (control.type === "ping") this.socket.send(encodeControl({ type: "pong" }));
    else if (control.type === "hello" && this.events.onHello && !this.helloDone) {
      this.helloDone = true;
      this.events.onHello(this, control.networks);
    } else if (control.type === "welcome" && this.events.onWelcome && !this.helloDone) {
      this.helloDone = true;
      this.events.onWelcome(this, control.accepted, control.refused.map((r) => r.network));
    }
  };

  /** Decodes a message; a malformed one closes this tunnel only, counted and logged once. */
  receive(message: Uint8Array): void {
    this.lastHeard = Date.now();
    if (this.closed) return;
    try {
      if (!this.helloDone && message[0] !== MSG_CONTROL) {
        throw new RangeError("Cannot decode tunnel message: data before the handshake");
      }
      decodeTunnelMessage(message, this.#onControl, this.#onFrame);
    } catch (error) {
      this.fail(error);
    }
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
    this.closed = true;
    for (const port of this.ports) if (port) port.network?.detach(port);
  }
}

/** The uplink's view for status: where it dials and how it is doing. */
export interface UplinkStatus {
  url: string;
  state: "connecting" | "up" | "down";
  since: string;
  connects: number;
  /** Dials so far, successful or not. */
  attempts: number;
  lastError: string | undefined;
  networks: string[];
  refused: string[];
}

export interface UplinkOptions {
  /** The hub's base URL (ws:// or wss://); the tunnel path is added. */
  url: string;
  token: string;
  keepaliveMs: number;
  /** Send-queue bound of each tunnel port. */
  limit: number;
  /** Extra CA (PEM) for a wss:// hub. */
  ca?: string;
  /** Required SHA-256 fingerprint of the hub's certificate, `AB:CD:…`. */
  fingerprint?: string;
  /** Skip certificate verification (logged on every connect). */
  insecure?: boolean;
}

/** TLS options for the uplink: system CAs by default, plus a CA, a pinned fingerprint, or none. */
function uplinkTls(options: UplinkOptions) {
  if (options.insecure) return { rejectUnauthorized: false };
  const pin = options.fingerprint;
  return {
    ...(options.ca !== undefined && { ca: options.ca }),
    ...(pin !== undefined && {
      checkServerIdentity(host: string, cert: PeerCertificate) {
        const mismatch = checkServerIdentity(host, cert);
        if (mismatch) return mismatch;
        if (cert.fingerprint256 !== pin) return new Error(`certificate fingerprint ${cert.fingerprint256} does not match --uplink-fingerprint`);
        return undefined;
      },
    }),
  };
}

/** A URL without credentials, for logs and status. */
function displayUrl(url: URL): string {
  return `${url.protocol}//${url.host}${url.pathname}`;
}

export function tunnelUrl(base: string): URL {
  const url = new URL(base);
  url.pathname = url.pathname.replace(/\/+$/, "") + TUNNEL_PATH;
  url.search = "";
  url.hash = "";
  return url;
}

/**
 * Dials a hub and keeps the tunnel up: exponential backoff with jitter (capped at 30 s), keepalive
 * pings, and a redial when the hub stops answering. Local switching never waits for it.
 */
export class Uplink {
  readonly url: URL;
  status: UplinkStatus;
  #ws: WebSocket | undefined;
  #link: TunnelLink | undefined;
  #failures = 0;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #keepalive: ReturnType<typeof setInterval> | undefined;
  #stopped = false;
  #lastLogged = "";

  constructor(
    private readonly options: UplinkOptions,
    private readonly networks: () => Network[],
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
      networks: [],
      refused: [],
    };
  }

  start(): void {
    this.#dial();
  }

  #setState(state: UplinkStatus["state"], error?: string): void {
    if (this.status.state !== state) this.status.since = new Date().toISOString();
    this.status.state = state;
    if (error !== undefined) this.status.lastError = error;
  }

  /** Logs only when the line differs from the last one: one line per state change, not per try. */
  #logChange(line: string, warn = false): void {
    if (line === this.#lastLogged) return;
    this.#lastLogged = line;
    (warn ? this.log.warn : this.log.info)(line);
  }

  #dial(): void {
    if (this.#stopped) return;
    const nets = this.networks();
    this.status.attempts++;
    const ws = new WebSocket(this.url.href, {
      headers: { Authorization: `Bearer ${this.options.token}` },
      protocols: [TUNNEL_PROTOCOL],
      perMessageDeflate: false,
      tls: uplinkTls(this.options),
    });
    ws.binaryType = "arraybuffer";
    this.#ws = ws;
    let failure: string | undefined;
    const socket: TunnelSocket = {
      send: (data) => ws.send(data),
      buffered: () => ws.bufferedAmount,
      close: (code, reason) => ws.close(code, reason),
    };
    const link = new TunnelLink(socket, "uplink", this.status.url, this.options.limit, this.log, {
      onWelcome: (l, accepted, refused) => {
        for (const name of new Set(accepted)) {
          const channel = nets.findIndex((n) => n.name === name);
          if (channel >= 0) l.attach(channel, nets[channel]!);
        }
        this.#failures = 0;
        this.status.connects++;
        this.status.networks = accepted;
        this.status.refused = refused;
        this.#setState("up");
        const extra = refused.length ? `; refused by the hub: ${refused.join(", ")}` : "";
        this.#logChange(`uplink: connected to ${this.status.url} (networks: ${accepted.join(", ") || "none"}${extra})`);
        if (this.options.insecure && this.url.protocol === "wss:") {
          this.log.warn(`uplink: --insecure: the certificate of ${this.status.url} was NOT verified`);
        }
      },
    }, this.countError);
    this.#link = link;
    ws.onopen = () => {
      ws.send(encodeControl({ type: "hello", version: TUNNEL_VERSION, networks: nets.map((n) => n.name) }));
    };
    ws.onmessage = (event) => link.receive(new Uint8Array(event.data as ArrayBuffer));
    ws.onerror = (event) => {
      failure = (event as ErrorEvent).message || "connection failed";
    };
    ws.onclose = (event) => this.#lost(ws, link, failure ?? `closed (${event.code}${event.reason ? ` ${event.reason}` : ""})`);
    this.#keepalive ??= setInterval(() => this.#tick(), this.options.keepaliveMs);
  }

  /** The tunnel is gone (closed, failed, or silent): detach its ports and redial after a backoff. */
  #lost(ws: WebSocket, link: TunnelLink, why: string): void {
    link.detachAll();
    if (this.#ws !== ws) return;
    this.#ws = undefined;
    this.#link = undefined;
    if (this.#stopped) return;
    this.#setState("down", why);
    this.#logChange(`uplink: ${this.status.url} ${why}; retrying with backoff`, true);
    this.#timer = setTimeout(() => this.#dial(), this.#backoff());
  }

  #backoff(): number {
    const ceiling = Math.min(UPLINK_BACKOFF_MAX_MS, UPLINK_BACKOFF_MIN_MS * 2 ** this.#failures++);
    return ceiling / 2 + (Math.random() * ceiling) / 2;
  }

  /** Pings the hub; one that has not been heard from for three intervals is closed and redialled. */
  #tick(): void {
    const ws = this.#ws;
    const link = this.#link;
    if (!ws || !link || ws.readyState !== WebSocket.OPEN) return;
    const silent = Date.now() - link.lastHeard > 3 * this.options.keepaliveMs;
    const unwelcomed = !link.helloDone && Date.now() - link.openedAt > HELLO_TIMEOUT_MS;
    if (silent || unwelcomed) {
      this.#lost(ws, link, silent ? "stopped answering keepalive pings" : "sent no welcome within 10 s");
      // No closing handshake with a hub that does not answer: drop the connection.
      ws.terminate();
      return;
    }
    ws.send(encodeControl({ type: "ping" }));
  }

  stop(): void {
    this.#stopped = true;
    clearTimeout(this.#timer);
    clearInterval(this.#keepalive);
    this.#link?.detachAll();
    this.#ws?.close(1001, "relay stopping");
  }
}

// ───────────────────────────── logging ─────────────────────────────

/**
 * At most `burst` lines per `windowMs`, so a scanner cannot flood the log; what was held back is
 * summed up in the first line of the next window.
 */
function rateLimitedLog(write: (line: string) => void, burst: number, windowMs: number) {
  let windowStart = 0;
  let written = 0;
  let held = 0;
  return {
    log(line: string) {
      const now = Date.now();
      if (now - windowStart >= windowMs) {
        if (held > 0) write(`${held} more like it not logged in the last ${windowMs / 1000} s`);
        windowStart = now;
        written = 0;
        held = 0;
      }
      if (written++ < burst) write(line);
      else held++;
    },
  };
}

// ───────────────────────────── QEMU ports ─────────────────────────────

// Unix sockets go through libc (bun:ffi) where Bun has no API: datagrams, and telling a stale
// socket file from a live one.
const AF_UNIX = 1;
const SOCK_STREAM = 1;
const SOCK_DGRAM = 2;
const SOCK_CLOEXEC = 0x80000;
const MSG_DONTWAIT_NOSIGNAL = 0x40 | 0x4000;
const SOL_SOCKET = 1;
const SO_RCVTIMEO = 20;
const MSG_TRUNC = 0x20;
const EINTR = 4;
const EAGAIN = 11;
const RLIMIT_NOFILE = 7;

let libcSymbols: ReturnType<typeof loadLibc> | undefined;
/** libc's socket calls, loaded on first use. */
function libc() {
  return (libcSymbols ??= loadLibc());
}
function loadLibc() {
  return dlopen("libc.so.6", {
    socket: { args: [FFIType.i32, FFIType.i32, FFIType.i32], returns: FFIType.i32 },
    bind: { args: [FFIType.i32, FFIType.ptr, FFIType.u32], returns: FFIType.i32 },
    connect: { args: [FFIType.i32, FFIType.ptr, FFIType.u32], returns: FFIType.i32 },
    setsockopt: { args: [FFIType.i32, FFIType.i32, FFIType.i32, FFIType.ptr, FFIType.u32], returns: FFIType.i32 },
    sendto: { args: [FFIType.i32, FFIType.ptr, FFIType.u64, FFIType.i32, FFIType.ptr, FFIType.u32], returns: FFIType.i32 },
    close: { args: [FFIType.i32], returns: FFIType.i32 },
    getrlimit: { args: [FFIType.i32, FFIType.ptr], returns: FFIType.i32 },
    setrlimit: { args: [FFIType.i32, FFIType.ptr], returns: FFIType.i32 },
    __errno_location: { args: [], returns: FFIType.ptr },
  }).symbols;
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
export function raiseFdLimit(): number {
  const c = libc();
  const limit = new BigUint64Array(2);
  if (c.getrlimit(RLIMIT_NOFILE, limit) !== 0) throw errnoError("getrlimit");
  if (limit[0]! < limit[1]! && c.setrlimit(RLIMIT_NOFILE, BigUint64Array.of(limit[1]!, limit[1]!)) === 0) limit[0] = limit[1]!;
  return Number(limit[0]);
}

/** QEMU stream connections open across every --qemu-listen, and what happens beyond the cap. */
export interface ConnectionCap {
  open: number;
  readonly max: number;
  refuse(peer: string): void;
}

/**
 * The cap on accepted QEMU connections, kept under the open-file limit: at that limit accept fails
 * with EMFILE, which the event loop retries at full speed, and nothing else gets a descriptor.
 */
export function connectionCap(max: number, fdLimit: number, log: Logger, countRefused: () => void): ConnectionCap {
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

/** A QEMU stream connection (TCP): length-prefixed frames both ways. */
export class StreamPort extends Port {
  readonly decoder = new StreamDecoder();
  readonly writer: StreamWriter;

  constructor(
    kind: string,
    peer: string,
    readonly socket: Socket<StreamPort>,
    limit: number,
  ) {
    super(kind, peer);
    this.writer = new StreamWriter((data) => socket.write(data), limit);
  }

  protected enqueue(frame: Uint8Array): boolean {
    // QEMU 7.2 stops receiving for good after a 0-length frame; runts never enter the switch anyway.
    return frame.length > 0 && this.writer.push(frame);
  }

  /** Decodes a chunk; an oversize length closes this connection only, counted and logged once. */
  data(chunk: Uint8Array, log: Logger, countError: () => void): void {
    if (this.state !== "up") return;
    try {
      this.decoder.push(chunk, this.receive);
    } catch (error) {
      this.stats.errors++;
      countError();
      this.state = "closed";
      log.warn(`${this.id} ${this.peer}: ${(error as Error).message}; closing the connection`);
      this.socket.end();
    }
  }
}

interface StreamContext {
  network: Network;
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
      const port = new StreamPort(ctx.kind, peer, socket, ctx.limit);
      socket.data = port;
      ctx.network.attach(port);
    },
    data(socket: Socket<StreamPort>, chunk: Uint8Array) {
      socket.data.data(chunk, ctx.log, ctx.countError);
    },
    drain(socket: Socket<StreamPort>) {
      socket.data.writer.drain();
    },
    close(socket: Socket<StreamPort>) {
      if (socket.data) {
        ctx.network.detach(socket.data);
        if (ctx.cap !== undefined) ctx.cap.open--;
      }
      ctx.onClose?.();
    },
    error(socket: Socket<StreamPort>, error: Error) {
      if (socket.data) socket.data.stats.errors++;
      ctx.log.warn(describeError(`${socket.data?.id ?? ctx.kind} ${socket.data?.peer ?? ""}`.trim(), error));
    },
  };
}

/** A TCP or unix listener for QEMU stream clients; each connection becomes a port. */
export async function listenStream(address: SocketAddress, ctx: StreamContext): Promise<{ address: string; stop(): void }> {
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

/** How a --qemu-connect dialer is doing, for status. */
export interface DialStatus {
  network: string;
  target: string;
  state: "connecting" | "up";
  since: string;
  attempts: number;
  lastError: string | undefined;
}

/** Dials a listening QEMU until it answers, and again (with backoff) whenever it goes away. */
export function dialStream(address: SocketAddress, ctx: StreamContext): { status: DialStatus; stop(): void } {
  const target = formatAddress(address);
  const status: DialStatus = { network: ctx.network.name, target, state: "connecting", since: new Date().toISOString(), attempts: 0, lastError: undefined };
  const setState = (state: DialStatus["state"]) => {
    if (status.state !== state) status.since = new Date().toISOString();
    status.state = state;
  };
  let failures = 0;
  let timer: ReturnType<typeof setTimeout> | undefined;
  let socket: Socket<StreamPort> | undefined;
  let stopped = false;
  let lastLogged = "";
  const logChange = (line: string) => {
    if (line !== lastLogged) ctx.log.info((lastLogged = line));
  };
  const retry = () => {
    socket = undefined;
    if (stopped) return;
    if (status.state === "up") logChange(`qemu-connect ${ctx.network.name}: disconnected from ${target}; redialling`);
    setState("connecting");
    const delay = Math.min(DIAL_BACKOFF_MAX_MS, DIAL_BACKOFF_MIN_MS * 2 ** failures++);
    timer = setTimeout(dial, delay);
  };
  const handlers = streamHandlers({ ...ctx, unixPeer: target, onClose: retry });
  const open = handlers.open;
  handlers.open = (s) => {
    open(s);
    failures = 0;
    setState("up");
    logChange(`qemu-connect ${ctx.network.name}: connected to ${target}`);
  };
  async function dial() {
    status.attempts++;
    try {
      socket =
        "path" in address
          ? await Bun.connect<StreamPort>({ unix: bunUnixPath(address.path), socket: handlers })
          : await Bun.connect<StreamPort>({ hostname: address.host, port: address.port, socket: handlers });
      if (stopped) socket.end();
    } catch (error) {
      status.lastError = describeError("cannot connect", error);
      logChange(`qemu-connect ${ctx.network.name}: ${status.lastError.replace("cannot connect", `cannot connect to ${target}`)}; retrying with backoff`);
      retry();
    }
  }
  void dial();
  return {
    status,
    stop() {
      stopped = true;
      clearTimeout(timer);
      socket?.end();
    },
  };
}

/** What a datagram port needs from its socket: one frame to one address, and nothing kept. */
export interface DatagramSocket {
  /** The bound address, as logged. */
  readonly address: string;
  /** The largest frame one datagram carries. */
  readonly maxFrame: number;
  /** The key `OnDatagram` gets for datagrams from `address`. */
  keyOf(address: SocketAddress): string;
  send(frame: Uint8Array, to: SocketAddress): boolean;
  /** Datagrams dropped because the relay fell behind (unix sockets; a UDP socket's kernel buffer drops them uncounted). */
  overruns(): number;
  close(): void | Promise<void>;
}

/** Called per datagram with a key naming the sender; `from` builds its address only when needed. */
type OnDatagram = (data: Uint8Array, key: string, from: () => SocketAddress) => void;

/** A datagram peer (UDP or unix) or a multicast group: one frame per datagram. */
export class DatagramPort extends Port {
  lastHeard = Date.now();
  constructor(
    kind: string,
    private readonly socket: DatagramSocket,
    readonly to: SocketAddress,
  ) {
    super(kind, formatAddress(to));
  }

  protected enqueue(frame: Uint8Array): boolean {
    return frame.length > 0 && frame.length <= this.socket.maxFrame && this.socket.send(frame, this.to);
  }
}

/** Bun names a sender in canonical form (`::1`); a configured IPv6 remote may be spelled otherwise. */
function canonicalIp(host: string): string {
  return host.includes(":") ? new URL(`http://[${host}]`).hostname.slice(1, -1) : host;
}

async function openUdp(address: HostPort, onDatagram: OnDatagram, onError: (error: Error) => void, flags = 0): Promise<DatagramSocket & { socket: udp.Socket<"buffer"> }> {
  const options: udp.SocketOptions<"buffer"> & { flags: number } = {
    hostname: address.host,
    port: address.port,
    flags,
    socket: {
      data(_socket, data, port, host) {
        onDatagram(data, `${host}:${port}`, () => ({ host, port }));
      },
      // Bun calls it as error(err), whatever its type says.
      error: onError as unknown as udp.SocketHandler<"buffer">["error"],
    },
  };
  const socket = await Bun.udpSocket(options);
  return {
    socket,
    address: formatHostPort({ host: address.host, port: socket.port }),
    maxFrame: MAX_DATAGRAM,
    keyOf: (to) => `${canonicalIp((to as HostPort).host)}:${(to as HostPort).port}`,
    send: (frame, to) => socket.send(frame, (to as HostPort).port, (to as HostPort).host),
    overruns: () => 0,
    close: () => socket.close(),
  };
}

/** Bytes of datagrams a unix receiver may have posted to the main thread that it has not yet taken. */
export const UNIX_DGRAM_BACKLOG = 4 * 1024 * 1024;
/** What one posted message counts against the backlog besides its bytes: an empty one is not free. */
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
  worker.onmessage = function onReceived({ data }) {
    if (data.cost) Atomics.sub(state, RX_BACKLOG, data.cost);
    if (Atomics.load(state, RX_OVERRUNS) !== overruns) events.overrun?.((overruns = Atomics.load(state, RX_OVERRUNS)));
    if (data.data) {
      const from = new Uint8Array(data.from);
      // An unbound sender has no address to answer to.
      if (from.length <= 2) return;
      onDatagram(new Uint8Array(data.data), sockaddrKey(from), (): UnixPeer => ({ path: displaySockaddr(from), sockaddr: from }));
    } else if (data.oversize) events.oversize?.(data.oversize);
    else if (data.errno) receiverGone(describeError("receiving stopped", errnoError("recvfrom", data.errno)));
    else if (data.done) receiverGone(undefined);
  };
  worker.postMessage({ fd, shared });
  return {
    address: formatAddress({ path }),
    maxFrame: MAX_FRAME,
    keyOf: (to) => sockaddrKey(sockaddrUnix((to as UnixPath).path)),
    send(frame, to) {
      const peer = to as UnixPeer;
      const addr = (peer.sockaddr ??= sockaddrUnix(peer.path));
      return c.sendto(fd, frame, frame.length, MSG_DONTWAIT_NOSIGNAL, addr, addr.length) === frame.length;
    },
    overruns: () => Atomics.load(state, RX_OVERRUNS),
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
export interface DatagramStatus {
  network: string;
  address: string;
  /** The fixed REMOTE: then nothing else is accepted. */
  remote: string | undefined;
  peers: number;
  /** Learned peers forgotten to make room for a new one. */
  evicted: number;
  /** Datagrams dropped rather than made a port of. */
  drops: {
    /** From a source other than the fixed REMOTE. */
    foreign: number;
    /** Shorter than an Ethernet header, from a source not yet a peer. */
    runts: number;
    /** From new sources beyond the new-peer rate. */
    throttled: number;
    /** While the relay was behind (unix sockets); see DatagramSocket.overruns. */
    overruns: number;
  };
}

/** Prometheus labels of a --qemu-udp socket; a unix path may hold any character. */
export function datagramLabel(d: DatagramStatus, reason?: string): string {
  const socket = d.address.replace(/[\\"\n]/g, (c) => (c === "\n" ? "\\n" : `\\${c}`));
  return `{network="${d.network}",socket="${socket}"${reason ? `,reason="${reason}"` : ""}}`;
}

/** `edge_relay_datagram_drops_total` samples of one socket, one per reason. */
export function datagramDrops(d: DatagramStatus): [string, number][] {
  return Object.entries(d.drops).map(([reason, n]) => [datagramLabel(d, reason), n]);
}

/**
 * A datagram socket for QEMU dgram/udp netdevs: every distinct source address is its own port, or,
 * with a fixed remote, that remote is the only port and other sources are dropped and counted.
 */
export async function bindDatagram(
  address: SocketAddress,
  remote: SocketAddress | undefined,
  ctx: { network: Network; log: Logger; ageingMs: number; maxPeers: number; countError: () => void },
): Promise<{ socket: DatagramSocket; sweep(): void; status(): DatagramStatus }> {
  let where = `qemu-udp ${ctx.network.name} ${formatAddress(address)}`;
  let oversized = 0;
  const peers = new Map<string, DatagramPort>();
  const peerAgeingMs = Math.min(ctx.ageingMs, UDP_PEER_AGEING_MS);
  let socket: DatagramSocket;
  let fixed: DatagramPort | undefined;
  let fixedKey: string | undefined;
  const status: DatagramStatus = {
    network: ctx.network.name,
    address: formatAddress(address),
    remote: remote && formatAddress(remote),
    peers: 0,
    evicted: 0,
    drops: { foreign: 0, runts: 0, throttled: 0, overruns: 0 },
  };
  const { drops } = status;
  const limited = () => rateLimitedLog(ctx.log.warn, 1, 60_000);
  const logs = { foreign: limited(), runts: limited(), throttled: limited(), evicted: limited(), overruns: limited() };
  /** With a fixed remote anyone else could inject frames into the segment, so only it is heard. */
  const onFixedDatagram: OnDatagram = (data, key, from) => {
    if (key === fixedKey) fixed!.receive(data);
    else {
      drops.foreign++;
      logs.foreign.log(`${where}: dropped a datagram from ${formatAddress(from())}, not the fixed remote ${status.remote}; further ones are counted in /status`);
    }
  };
  let windowStart = 0;
  let learnedInWindow = 0;
  /**
   * A source that is not a peer yet becomes one only with a whole frame and within the new-peer
   * rate; a full table forgets its least recently heard peer, so a flood cannot lock a VM out.
   */
  function learn(data: Uint8Array, key: string, from: () => SocketAddress): void {
    if (data.length < MIN_FRAME) {
      drops.runts++;
      logs.runts.log(`${where}: dropped a ${data.length}-byte datagram from ${formatAddress(from())}, not a frame, from a source that is not a peer; further ones are counted in /status`);
      return;
    }
    const now = ctx.network.now();
    if (now - windowStart >= 1000) {
      windowStart = now;
      learnedInWindow = 0;
    }
    if (learnedInWindow >= NEW_UDP_PEERS_PER_SECOND) {
      drops.throttled++;
      logs.throttled.log(`${where}: more than ${NEW_UDP_PEERS_PER_SECOND} new peers in a second; dropping datagrams from new sources (first ${formatAddress(from())}); further ones are counted in /status`);
      return;
    }
    learnedInWindow++;
    if (peers.size >= ctx.maxPeers) {
      const [oldKey, oldest] = peers.entries().next().value!;
      peers.delete(oldKey);
      ctx.network.detach(oldest);
      status.evicted++;
      logs.evicted.log(`${where}: ${ctx.maxPeers} peers (--udp-peers); forgot ${oldest.peer}, the least recently heard; further ones are counted in /status`);
    }
    const peer = new DatagramPort("qemu-udp", socket, from());
    peer.lastHeard = now;
    peers.set(key, peer);
    ctx.network.attach(peer);
    peer.receive(data);
  }
  const onDatagram: OnDatagram = (data, key, from) => {
    const peer = peers.get(key);
    if (peer === undefined) {
      learn(data, key, from);
      return;
    }
    const now = ctx.network.now();
    if (peer.lastHeard !== now) {
      // Moved to the end at most once per clock tick: the map runs from least to most recently heard.
      peer.lastHeard = now;
      peers.delete(key);
      peers.set(key, peer);
    }
    peer.receive(data);
  };
  const receive = remote ? onFixedDatagram : onDatagram;
  const onError = (error: Error) => {
    // ICMP port unreachable: the peer is not there (yet); QEMU dgram peers come and go.
    if ((error as { code?: string }).code !== "ECONNREFUSED") {
      ctx.log.warn(describeError(where, error));
    }
  };
  try {
    socket =
      "path" in address
        ? await openUnixDgram(address.path, receive, {
            oversize(bytes) {
              ctx.countError();
              if (oversized++ === 0) ctx.log.warn(`${where}: dropped a ${bytes}-byte datagram (frames are at most ${MAX_FRAME} bytes); further ones are only counted`);
            },
            overrun: (total) => logs.overruns.log(`${where}: the relay fell behind and dropped datagrams (${total} so far); further ones are counted in /status`),
            failed: (message) => ctx.log.warn(`${where}: ${message}`),
          })
        : await openUdp(address, receive, onError);
  } catch (error) {
    throw new Error(describeError(`Cannot listen on ${"path" in address ? "" : "udp "}${formatAddress(address)}`, error));
  }
  // Logs name the bound port, not the :0 asked for.
  where = `qemu-udp ${ctx.network.name} ${socket.address}`;
  status.address = socket.address;
  if (remote) {
    fixed = new DatagramPort("qemu-udp", socket, remote);
    fixedKey = socket.keyOf(remote);
    peers.set(fixedKey, fixed);
    ctx.network.attach(fixed);
  }
  return {
    socket,
    /** Learned peers silent for their ageing time are forgotten; a fixed remote stays. */
    sweep() {
      const now = Date.now();
      for (const [key, peer] of peers) {
        if (peer !== fixed && now - peer.lastHeard >= peerAgeingMs) {
          peers.delete(key);
          ctx.network.detach(peer);
        }
      }
    },
    status: () => ({ ...status, peers: peers.size, drops: { ...drops, overruns: socket.overruns() } }),
  };
}

/**
 * Bridges a QEMU multicast segment into a network as one port. QEMU members share the group port
 * (SO_REUSEADDR) and loop multicast back, so the relay joins with the same flag and sends from a
 * socket of its own, whose looped-back copies it recognises by source and drops.
 */
export async function joinMulticast(
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
      (data, _key, from) => {
        const source = from() as HostPort;
        if (source.port === own && (localAddress === undefined || source.host === localAddress)) return;
        port.receive(data);
      },
      ignoreRefused,
      UDP_REUSEADDR,
    );
    if (!receiver.socket.addMembership(group.host, localAddress)) {
      receiver.close();
      throw new Error("cannot join the group");
    }
    ctx.network.attach(port);
    return { address: receiver.address, close: () => (receiver.close(), sender!.close()) };
  } catch (error) {
    sender?.close();
    throw new Error(describeError(`Cannot join ${where}`, error));
  }
}

// ───────────────────────────── HTTP app ─────────────────────────────

export interface RelayCounters {
  authFailures: number;
  protocolErrors: number;
  connectionsRefused: number;
}

export interface Snapshot {
  version: string;
  uptime: number;
  startedAt: string;
  networks: ReturnType<Network["snapshot"]>[];
  uplink: UplinkStatus | null;
  dials: DialStatus[];
  datagrams: DatagramStatus[];
  authFailures: number;
  protocolErrors: number;
  connectionsRefused: number;
}

const METRICS: [name: string, help: string, type: "counter" | "gauge", value: (p: PortSnapshot) => number][] = [
  ["edge_relay_port_rx_frames_total", "Frames received on a port.", "counter", (p) => p.rx.frames],
  ["edge_relay_port_rx_bytes_total", "Bytes received on a port.", "counter", (p) => p.rx.bytes],
  ["edge_relay_port_rx_drops_total", "Runt or empty frames received and dropped.", "counter", (p) => p.rx.drops],
  ["edge_relay_port_tx_frames_total", "Frames sent on a port.", "counter", (p) => p.tx.frames],
  ["edge_relay_port_tx_bytes_total", "Bytes sent on a port.", "counter", (p) => p.tx.bytes],
  ["edge_relay_port_tx_drops_total", "Frames dropped because the port's queue was full.", "counter", (p) => p.tx.drops],
  ["edge_relay_port_errors_total", "Protocol errors on a port (oversize frame, malformed message).", "counter", (p) => p.errors],
];

/** Prometheus text exposition of a snapshot. */
export function renderMetrics(s: Snapshot): string {
  const lines: string[] = [];
  const metric = (name: string, help: string, type: string, samples: [string, number][]) => {
    lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    for (const [labels, value] of samples) lines.push(`${name}${labels} ${value}`);
  };
  const ports = s.networks.flatMap((n) => n.ports.map((p) => [n.name, p] as const));
  const label = (net: string, p: PortSnapshot) => `{network="${net}",port="${p.id}",kind="${p.kind}"}`;
  for (const [name, help, type, value] of METRICS) {
    metric(name, help, type, ports.map(([net, p]) => [label(net, p), value(p)]));
  }
  metric("edge_relay_network_ports", "Ports attached to a network.", "gauge", s.networks.map((n) => [`{network="${n.name}"}`, n.ports.length]));
  metric("edge_relay_network_macs", "Learned MAC addresses in a network.", "gauge", s.networks.map((n) => [`{network="${n.name}"}`, n.macs.length]));
  metric("edge_relay_auth_failures_total", "Tunnel connections refused for a wrong or missing token.", "counter", [["", s.authFailures]]);
  metric("edge_relay_protocol_errors_total", "Ports closed for malformed input.", "counter", [["", s.protocolErrors]]);
  metric("edge_relay_connections_refused_total", "QEMU connections closed at once for --max-connections.", "counter", [["", s.connectionsRefused]]);
  metric("edge_relay_datagram_peers", "Peers of a --qemu-udp socket.", "gauge", s.datagrams.map((d) => [datagramLabel(d), d.peers]));
  metric("edge_relay_datagram_peers_evicted_total", "Peers of a --qemu-udp socket forgotten to make room.", "counter", s.datagrams.map((d) => [datagramLabel(d), d.evicted]));
  metric("edge_relay_datagram_drops_total", "Datagrams a --qemu-udp socket dropped rather than made a port of, by reason.", "counter", s.datagrams.flatMap(datagramDrops));
  metric("edge_relay_uplink_up", "1 when the uplink is connected.", "gauge", s.uplink ? [["", s.uplink.state === "up" ? 1 : 0]] : []);
  metric("edge_relay_uptime_seconds", "Seconds since the relay started.", "gauge", [["", s.uptime]]);
  return lines.join("\n") + "\n";
}

export interface TunnelData {
  grant: Grant;
  peer: string;
  link?: TunnelLink;
  helloTimer?: ReturnType<typeof setTimeout>;
}

interface AppContext {
  grants: Grant[];
  adminToken: string | undefined;
  snapshot(): Snapshot;
  counters: RelayCounters;
  log: Logger;
}

/** Routes: /healthz, /status, /metrics, and the tunnel upgrade (the frames then bypass Hono). */
export function createApp(ctx: AppContext) {
  const app = new Hono<{ Bindings: Server<TunnelData> }>();
  const refusals = rateLimitedLog(ctx.log.warn, 10, 10_000);
  if (ctx.adminToken !== undefined) {
    const admin = makeGrants([{ token: ctx.adminToken, networks: undefined }]);
    app.use("*", async (c, next) => {
      if (c.req.path === TUNNEL_PATH) return next();
      if (!authenticate(c.req.header("authorization"), admin)) {
        return c.text("unauthorized\n", 401, { "WWW-Authenticate": 'Bearer realm="edge-relay admin"' });
      }
      return next();
    });
  }
  app.get("/healthz", (c) => c.text("ok\n"));
  app.get("/status", (c) => c.json(ctx.snapshot()));
  app.get("/metrics", (c) => c.text(renderMetrics(ctx.snapshot()), 200, { "Content-Type": "text/plain; version=0.0.4" }));
  app.get(TUNNEL_PATH, (c) => {
    if (ctx.grants.length === 0) return c.text("tunnel endpoint disabled: no token configured\n", 404);
    const peerAddress = c.env.requestIP(c.req.raw);
    const peer = peerAddress ? formatHostPort({ host: peerAddress.address, port: peerAddress.port }) : "unknown";
    const grant = authenticate(c.req.header("authorization"), ctx.grants);
    if (!grant) {
      ctx.counters.authFailures++;
      refusals.log(`tunnel: refused ${peer}: ${c.req.header("authorization") ? "wrong token" : "no token"}`);
      return c.text("unauthorized\n", 401, { "WWW-Authenticate": 'Bearer realm="edge-relay"' });
    }
    const offered = (c.req.header("sec-websocket-protocol") ?? "").split(",").map((s) => s.trim());
    if (!offered.includes(TUNNEL_PROTOCOL)) return c.text(`expected subprotocol ${TUNNEL_PROTOCOL}\n`, 400);
    const upgraded = c.env.upgrade(c.req.raw, {
      data: { grant, peer },
      headers: { "Sec-WebSocket-Protocol": TUNNEL_PROTOCOL },
    });
    return upgraded ? new Response(null) : c.text("expected a WebSocket upgrade\n", 426);
  });
  return app;
}

// ───────────────────────────── lifecycle ─────────────────────────────

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
}

const consoleLogger: Logger = { info: (l) => console.log(l), warn: (l) => console.error(l) };

/** Starts every port of `config`; throws (nothing left running) if one cannot be bound. */
export async function startRelay(config: Config, log: Logger = consoleLogger): Promise<RelayHandle> {
  const startedAt = Date.now();
  const ageingMs = config.macAgeing * 1000;
  const networks = new Map<string, Network>();
  // MAC ageing needs no finer clock than this; reading a variable beats a clock call per frame.
  let now = Date.now();
  const coarseNow = () => now;
  const clock = setInterval(() => (now = Date.now()), CLOCK_TICK_MS);
  const network = (name: string) => {
    let n = networks.get(name);
    if (!n) networks.set(name, (n = new Network(name, ageingMs, coarseNow)));
    return n;
  };
  /** Networks that local ports or the uplink use; the others exist while a tunnel attaches to them. */
  const configured = new Set<string>();
  const counters: RelayCounters = { authFailures: 0, protocolErrors: 0, connectionsRefused: 0 };
  const countError = () => void counters.protocolErrors++;
  const grants = makeGrants(config.tokens);
  const bound: BoundAddress[] = [];
  const stoppers: (() => void | Promise<void>)[] = [() => clearInterval(clock)];
  const sweepers: (() => void)[] = [];
  let uplink: Uplink | undefined;
  const dialers: ReturnType<typeof dialStream>[] = [];
  const datagramSockets: Awaited<ReturnType<typeof bindDatagram>>[] = [];

  const snapshot = (): Snapshot => ({
    version: VERSION,
    uptime: (Date.now() - startedAt) / 1000,
    startedAt: new Date(startedAt).toISOString(),
    networks: [...networks.values()].map((n) => n.snapshot()),
    uplink: uplink ? { ...uplink.status } : null,
    dials: dialers.map((d) => ({ ...d.status })),
    datagrams: datagramSockets.map((d) => d.status()),
    authFailures: counters.authFailures,
    protocolErrors: counters.protocolErrors,
    connectionsRefused: counters.connectionsRefused,
  });

  // Whatever fails to bind, stop what already runs so a failed start leaves nothing behind.
  const stopAll = async () => {
    await Promise.all(stoppers.splice(0).reverse().map((stop) => stop()));
  };
  try {
    const tunnelClosed = (ws: ServerWebSocket<TunnelData>) => {
      clearTimeout(ws.data.helloTimer);
      ws.data.link?.detachAll();
      // Networks that only tunnels brought into being go when their last port does.
      for (const [name, n] of networks) if (n.ports.size === 0 && !configured.has(name)) networks.delete(name);
    };
    const server = Bun.serve<TunnelData>({
      hostname: config.http.host,
      port: config.http.port,
      tls: config.tlsCert && config.tlsKey ? { cert: config.tlsCert.text, key: config.tlsKey.text } : undefined,
      fetch: createApp({ grants, adminToken: config.adminToken, snapshot, counters, log }).fetch,
      websocket: {
        maxPayloadLength: MAX_MESSAGE,
        perMessageDeflate: false,
        // Bun pings an idle tunnel and closes one that stays silent; clients answer pings by themselves.
        idleTimeout: TUNNEL_IDLE_SECONDS,
        sendPings: true,
        open(ws) {
          const socket: TunnelSocket = {
            send: (data) => void ws.send(data),
            buffered: () => ws.getBufferedAmount(),
            close: (code, reason) => ws.close(code, reason),
          };
          ws.data.link = new TunnelLink(socket, "tunnel", ws.data.peer, config.queueBytes, log, {
            onHello(link, names) {
              clearTimeout(ws.data.helloTimer);
              const allowed = ws.data.grant.networks;
              const accepted: string[] = [];
              const refused: string[] = [];
              names.forEach((name, channel) => {
                if (NETWORK_NAME.test(name) && (!allowed || allowed.has(name))) {
                  link.attach(channel, network(name));
                  accepted.push(name);
                } else refused.push(name);
              });
              socket.send(encodeControl({ type: "welcome", version: TUNNEL_VERSION, accepted, refused: refused.map((network) => ({ network, reason: "not allowed for this token" })) }));
              // Names come from the network: quoted and cut short, so a log line stays one short line.
              const shown = refused.map((name) => JSON.stringify(name.length > 64 ? `${name.slice(0, 64)}…` : name));
              const extra = refused.length ? `; refused (not allowed for this token): ${shown.join(", ")}` : "";
              log.info(`tunnel: ${ws.data.peer} attached (networks: ${accepted.join(", ") || "none"}${extra})`);
            },
          }, countError);
          ws.data.helloTimer = setTimeout(() => ws.data.link?.fail(new RangeError("no hello within 10 s")), HELLO_TIMEOUT_MS);
        },
        message(ws, message) {
          if (typeof message === "string") ws.data.link!.fail(new TypeError("Cannot decode tunnel message: text messages are not part of the protocol"));
          else ws.data.link!.receive(message);
        },
        close(ws) {
          if (ws.data.link && !ws.data.link.closed) log.info(`tunnel: ${ws.data.peer} disconnected`);
          tunnelClosed(ws);
        },
      },
    });
    stoppers.push(() => void server.stop(true));
    const httpUrl = `${config.tlsCert ? "https" : "http"}://${formatHostPort({ host: config.http.host, port: server.port! })}`;
    bound.push({ what: "http", address: httpUrl });

    // Before the first accept: the limit decides how many QEMU connections fit.
    const fdLimit = raiseFdLimit();
    const cap = config.qemuListen.length > 0 ? connectionCap(config.maxConnections, fdLimit, log, () => void counters.connectionsRefused++) : undefined;
    for (const spec of config.qemuListen) {
      const listener = await listenStream(spec.address, { network: network(spec.network), log, countError, limit: config.queueBytes, kind: "qemu-listen", cap });
      stoppers.push(listener.stop);
      bound.push({ what: "qemu-listen", network: spec.network, address: listener.address });
    }
    for (const spec of config.qemuUdp) {
      const dgram = await bindDatagram(spec.address, spec.remote, { network: network(spec.network), log, ageingMs, maxPeers: config.udpPeers, countError });
      stoppers.push(() => dgram.socket.close());
      sweepers.push(dgram.sweep);
      datagramSockets.push(dgram);
      bound.push({ what: "qemu-udp", network: spec.network, address: dgram.socket.address });
    }
    for (const spec of config.qemuMcast) {
      const mcast = await joinMulticast(spec.group, spec.localAddress, { network: network(spec.network), log });
      stoppers.push(mcast.close);
      bound.push({ what: "qemu-mcast", network: spec.network, address: mcast.address });
    }
    for (const spec of config.qemuConnect) {
      const dialer = dialStream(spec.address, { network: network(spec.network), log, countError, limit: config.queueBytes, kind: "qemu-connect" });
      dialers.push(dialer);
      stoppers.push(dialer.stop);
    }
    if (config.uplink !== undefined) {
      const localNetworks = [...networks.values()];
      if (localNetworks.length === 0) localNetworks.push(network("default"));
      const options: UplinkOptions = {
        url: config.uplink,
        token: config.uplinkToken!,
        keepaliveMs: config.keepalive * 1000,
        limit: config.queueBytes,
        ca: config.uplinkCa?.text,
        fingerprint: config.uplinkFingerprint,
        insecure: config.insecure,
      };
      uplink = new Uplink(options, () => localNetworks, log, countError);
      uplink.start();
      stoppers.push(() => uplink!.stop());
    }
    for (const name of networks.keys()) configured.add(name);
    const sweep = setInterval(() => {
      for (const n of networks.values()) n.sweep();
      for (const s of sweepers) s();
    }, Math.min(ageingMs, 60_000) / 2);
    stoppers.push(() => clearInterval(sweep));
  } catch (error) {
    await stopAll();
    throw error;
  }

  let stopping: Promise<void> | undefined;
  const handle: RelayHandle = {
    http: bound[0]!.address,
    bound,
    network: (name) => networks.get(name),
    snapshot,
    stop() {
      stopping ??= Promise.resolve().then(stopAll);
      return stopping;
    },
    [Symbol.asyncDispose]: () => handle.stop(),
  };
  return handle;
}

// ───────────────────────────── CLI ─────────────────────────────

const HELP_COLUMN = 34;

/** The usage text, built from the option table. */
export function helpText(program = "bun relay.ts"): string {
  const out = [
    `edge-relay ${VERSION}: share Ethernet segments between QEMU VMs across hosts`,
    "",
    `Usage: ${program} [options]`,
    "",
    "With no options: a local switch with --http 127.0.0.1:8080 and --qemu-listen 127.0.0.1:10000.",
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

/** node:util's parseArgs options, from the table. */
const CLI_OPTIONS = Object.fromEntries(
  Object.entries(OPTIONS as Record<string, OptionSpec>).map(([key, spec]) => [
    flagOf(key).slice(2),
    { type: spec.arg ? "string" : "boolean", multiple: spec.multiple ?? false, ...(spec.short && { short: spec.short }) },
  ]),
) as Record<string, { type: "string" | "boolean"; multiple: boolean; short?: string }>;

function readTextFile(option: string, path: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch (error) {
    throw new ConfigError(`${option}: ${describeError(`cannot read ${path}`, error)}`);
  }
}

/** Merges the config file, environment and flags (flags win) into one validated Config. */
export function loadConfig(argv: string[], env: Record<string, string | undefined>): Config | "help" | "version" {
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options: CLI_OPTIONS, strict: true, allowPositionals: false });
  } catch (error) {
    throw new ConfigError(`${(error as Error).message.split(/\.(?: |\n|$)/)[0]} (see --help)`);
  }
  const flags = parsed.values as Record<string, string | boolean | string[] | undefined>;
  if (flags.help) return "help";
  if (flags.version) return "version";
  let raw: Record<string, unknown> = {};
  const configFile = flags.config as string | undefined;
  if (configFile !== undefined) {
    try {
      raw = JSON.parse(readTextFile("--config", configFile));
    } catch (error) {
      if (error instanceof ConfigError) throw error;
      // The parser's message quotes the offending text, which may be a secret.
      throw new ConfigError(`--config: ${configFile} is not valid JSON`);
    }
    if (typeof raw !== "object" || raw === null || Array.isArray(raw)) throw new ConfigError(`--config: ${configFile} must hold a JSON object`);
  }
  const number = (text: string) => (text.trim() === "" ? NaN : Number(text));
  for (const [key, spec] of Object.entries(OPTIONS as Record<string, OptionSpec>)) {
    if (!spec.schema || key === "tokens") continue;
    const value = flags[flagOf(key).slice(2)] as string | boolean | string[] | undefined;
    if (value !== undefined) raw[key] = spec.numeric ? number(value as string) : value;
    else if (spec.env !== undefined && raw[key] === undefined && env[spec.env] !== undefined) raw[key] = env[spec.env];
  }
  const extraTokens = [
    ...((flags.token as string[] | undefined) ?? []),
    ...(env.RELAY_TOKENS ?? "").split(",").map((t) => t.trim()).filter(Boolean),
    ...(flags["token-file"] === undefined
      ? []
      : readTextFile("--token-file", flags["token-file"] as string).split("\n").map((l) => l.replace(/#.*/, "").trim()).filter(Boolean)),
  ];
  if (extraTokens.length) raw.tokens = [...(Array.isArray(raw.tokens) ? raw.tokens : []), ...extraTokens];
  const nothingConfigured = ["qemuListen", "qemuConnect", "qemuUdp", "qemuMcast", "uplink", "tokens"].every(
    (k) => raw[k] === undefined || (Array.isArray(raw[k]) && (raw[k] as unknown[]).length === 0),
  );
  if (nothingConfigured) raw.qemuListen = [DEFAULT_QEMU_LISTEN];
  return parseConfig(raw);
}

/** The QEMU command line that attaches a VM to a --qemu-listen address. */
export function qemuHint(address: string): string {
  const parsed = parseSocketAddress(address)!;
  const addr =
    "path" in parsed
      ? parsed.path.startsWith("@")
        ? `addr.type=unix,addr.path=${parsed.path.slice(1)},addr.abstract=on`
        : `addr.type=unix,addr.path=${parsed.path}`
      : `addr.type=inet,addr.host=${parsed.host},addr.port=${parsed.port}`;
  return `qemu-system-x86_64 … -netdev stream,id=n0,server=off,${addr} -device virtio-net-pci,netdev=n0`;
}

export async function main(argv = Bun.argv.slice(2), env: Record<string, string | undefined> = process.env): Promise<void> {
  let config;
  try {
    config = loadConfig(argv, env);
  } catch (error) {
    if (!(error instanceof ConfigError)) throw error;
    console.error(`edge-relay: ${error.message}`);
    process.exit(2);
  }
  if (config === "help") return void process.stdout.write(helpText());
  if (config === "version") return void console.log(VERSION);
  let relay: RelayHandle;
  try {
    relay = await startRelay(config);
  } catch (error) {
    console.error(`edge-relay: ${(error as Error).message}`);
    process.exit(1);
  }
  const shutdown = async (signal: string) => {
    console.log(`${signal}: stopping`);
    await relay.stop();
    process.exit(0);
  };
  process.once("SIGINT", shutdown);
  process.once("SIGTERM", shutdown);
  for (const b of relay.bound) console.log(`${b.what}${b.network ? ` ${b.network}` : ""}: listening on ${b.address}`);
  for (const b of relay.bound) if (b.what === "qemu-listen") console.log(`attach a VM to ${b.network}: ${qemuHint(b.address)}`);
  console.log("ready");
}

if (import.meta.main) await main();
