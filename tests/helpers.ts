/**
 * Test helpers shared by every suite: start the relay CLI as a user would, read the addresses it
 * logs, and wait for conditions instead of sleeping.
 */
import type { Subprocess } from "bun";
import { readFileSync } from "node:fs";
import { StreamDecoder, encodeFrames } from "../relay.ts";

export const RELAY = new URL("../relay.ts", import.meta.url).pathname;

/** One address the relay logged as bound, e.g. `qemu-listen lab: listening on 127.0.0.1:40123`. */
export interface Bound {
  what: string;
  network: string | undefined;
  address: string;
}

export interface RelayProcess extends AsyncDisposable {
  proc: Subprocess<"ignore", "pipe", "pipe">;
  /** `http://127.0.0.1:PORT` (or `https://…`). */
  base: string;
  bound: Bound[];
  /** The TCP/UDP port number of the first bound address of that kind (and network). */
  port(what: string, network?: string): number;
  stdout(): string;
  stderr(): string;
  status(): Promise<any>;
  /** Resolves when a line matching `re` has appeared on stdout or stderr. */
  waitForLine(re: RegExp, timeoutMs?: number): Promise<string>;
  stop(signal?: NodeJS.Signals | number): Promise<number>;
}

/** Polls `check` until it returns a truthy value; fails with `what` after `timeoutMs`. */
export async function waitUntil<T>(
  check: () => T | Promise<T>,
  what: string,
  timeoutMs = 10_000,
): Promise<NonNullable<T>> {
  const deadline = performance.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const value = await check();
      if (value) return value as NonNullable<T>;
    } catch (error) {
      last = error;
    }
    if (performance.now() > deadline) {
      throw new Error(`Timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${last}` : ""}`);
    }
    await Bun.sleep(5);
  }
}

const BOUND_LINE = /^(\S+?)(?: (\S+))?: listening on (\S+)$/;

/**
 * Spawns `bun relay.ts ...args` and resolves once it printed `ready`, with the addresses it bound.
 * Rejects with the relay's output if it exits first.
 */
export async function spawnRelay(
  args: string[],
  options: {
    /** Added to the test's environment; undefined leaves a variable out. */
    env?: Record<string, string | undefined>;
    cwd?: string;
    timeoutMs?: number;
    /** A command that execs the relay, e.g. `["ip", "netns", "exec", NAME]` (must keep the pid). */
    prefix?: string[];
    /** What runs the relay instead of `bun relay.ts`: a compiled binary, `podman run … IMAGE`. */
    command?: string[];
    /**
     * Run it in a process group of its own and signal the whole group, as a terminal does on
     * Ctrl-C: for a command that does not pass signals on (npx gives SIGTERM to its shell, not to
     * the relay, which would outlive it).
     */
    group?: boolean;
  } = {},
): Promise<RelayProcess> {
  const proc = Bun.spawn([...(options.prefix ?? []), ...(options.command ?? [process.execPath, RELAY]), ...args], {
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
    cwd: options.cwd,
    env: { ...process.env, ...options.env },
    detached: options.group,
  });
  const kill = (signal: NodeJS.Signals | number) => {
    if (!options.group) {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      return;
    }
    // The group may outlive its leader (npx gone, the relay not).
    try {
      process.kill(-proc.pid, signal);
    } catch {
      // ESRCH: every process of the group is gone
    }
  };
  let out = "";
  let err = "";
  const waiters = new Set<() => void>();
  const notify = () => {
    for (const w of waiters) w();
  };
  const pump = async (stream: ReadableStream<Uint8Array>, append: (s: string) => void) => {
    const decoder = new TextDecoder();
    for await (const chunk of stream) {
      append(decoder.decode(chunk, { stream: true }));
      notify();
    }
  };
  const pumped = Promise.all([
    pump(proc.stdout, (s) => (out += s)),
    pump(proc.stderr, (s) => (err += s)),
  ]);
  proc.exited.then(notify);

  const waitForLine = (re: RegExp, timeoutMs = options.timeoutMs ?? 15_000) =>
    new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => {
        waiters.delete(check);
        reject(new Error(`Timed out waiting for ${re} from relay ${args.join(" ")}\nstdout:\n${out}\nstderr:\n${err}`));
      }, timeoutMs);
      function check() {
        const line = `${out}\n${err}`.split("\n").find((l) => re.test(l));
        if (line !== undefined) {
          clearTimeout(timer);
          waiters.delete(check);
          resolve(line);
        } else if (proc.exitCode !== null || proc.signalCode !== null) {
          clearTimeout(timer);
          waiters.delete(check);
          reject(new Error(`Relay exited (${proc.exitCode ?? proc.signalCode}) before ${re}\nstdout:\n${out}\nstderr:\n${err}`));
        }
      }
      waiters.add(check);
      check();
    });

  await waitForLine(/^ready$/).catch((error) => {
    kill("SIGKILL");
    throw error;
  });
  const bound: Bound[] = [];
  for (const line of out.split("\n")) {
    const m = BOUND_LINE.exec(line);
    if (m) bound.push({ what: m[1]!, network: m[2], address: m[3]! });
  }
  const http = bound.find((b) => b.what === "http");
  const base = http ? http.address : "";
  let stopped: Promise<number> | undefined;
  const handle: RelayProcess = {
    proc,
    base,
    bound,
    port(what, network) {
      const b = bound.find((x) => x.what === what && (network === undefined || x.network === network));
      if (!b) throw new Error(`relay bound no ${what} ${network ?? ""}: ${JSON.stringify(bound)}`);
      return Number(new URL(b.address.includes("://") ? b.address : `x://${b.address}`).port);
    },
    stdout: () => out,
    stderr: () => err,
    async status() {
      const res = await fetch(`${base}/status`);
      if (!res.ok) throw new Error(`GET /status: ${res.status}`);
      return res.json();
    },
    waitForLine,
    stop(signal = "SIGTERM") {
      stopped ??= (async () => {
        kill(signal);
        const code = await proc.exited;
        // Its output ends when the last process holding it (the relay, under npx) is gone.
        await pumped;
        return code;
      })();
      return stopped;
    },
    async [Symbol.asyncDispose]() {
      await handle.stop("SIGKILL");
    },
  };
  return handle;
}

/**
 * A relay's command line as a test builds it: `--http 127.0.0.1:0` (port 0: the kernel picks),
 * then each port or option in the words of the test, e.g.
 * `await scenario().listen("lab").noProbe().spawn()`. Every QEMU port binds port 0 on loopback.
 */
export class Scenario {
  readonly args: string[] = ["--http", "127.0.0.1:0"];

  /** `--qemu-listen [NET=]127.0.0.1:0`. */
  listen(network?: string): this {
    return this.with("--qemu-listen", `${network ? `${network}=` : ""}127.0.0.1:0`);
  }

  /** `--qemu-udp [NET=]127.0.0.1:0`. */
  udp(network?: string): this {
    return this.with("--qemu-udp", `${network ? `${network}=` : ""}127.0.0.1:0`);
  }

  /** A hub: `--token TOKEN`. */
  hub(token: string): this {
    return this.with("--token", token);
  }

  /** A site: `--uplink URL --uplink-token TOKEN`; an http(s) base is dialled as ws(s). */
  uplink(url: string, token: string): this {
    return this.with("--uplink", url.replace(/^http/, "ws"), "--uplink-token", token);
  }

  /** `--loop-probe 0`: no loop probes among the test's own frames. */
  noProbe(): this {
    return this.with("--loop-probe", "0");
  }

  /** Any further arguments, as given. */
  with(...args: string[]): this {
    this.args.push(...args);
    return this;
  }

  spawn(options?: Parameters<typeof spawnRelay>[1]): Promise<RelayProcess> {
    return spawnRelay(this.args, options);
  }
}

export function scenario(): Scenario {
  return new Scenario();
}

// ───────────── fake QEMU peers: real sockets speaking QEMU's framing ─────────────

/** `02:00:00:00:00:01` → bytes. */
export function mac(text: string): Uint8Array {
  return Uint8Array.from(text.split(":"), (h) => parseInt(h, 16));
}

export const BROADCAST = "ff:ff:ff:ff:ff:ff";

/** An Ethernet frame: dst, src, ethertype 0x88B5 (local experimental), then `payload` or `size` bytes. */
export function makeFrame(dst: string, src: string, payload: Uint8Array | string | number = 46): Uint8Array {
  const body =
    typeof payload === "number"
      ? Uint8Array.from({ length: payload }, (_, i) => (i * 7 + 3) & 0xff)
      : typeof payload === "string"
        ? new TextEncoder().encode(payload)
        : payload;
  const frame = new Uint8Array(14 + body.length);
  frame.set(mac(dst), 0);
  frame.set(mac(src), 6);
  frame[12] = 0x88;
  frame[13] = 0xb5;
  frame.set(body, 14);
  return frame;
}

/** Frames received by a fake peer, waited for by condition rather than by time. */
export class FrameQueue {
  readonly frames: Uint8Array[] = [];
  #taken = 0;
  #waiters = new Set<() => void>();

  push(frame: Uint8Array): void {
    // Relays' loop probes (EtherType 0x9000) are control traffic, not what a test sent.
    if (frame[12] === 0x90 && frame[13] === 0x00) return;
    this.frames.push(new Uint8Array(frame)); // a copy, and a plain Uint8Array even when given a Buffer
    for (const w of this.#waiters) w();
  }

  /** The next frame not yet taken that matches `match`, or a timeout error. */
  next(match: (f: Uint8Array) => boolean = () => true, timeoutMs = 5_000): Promise<Uint8Array> {
    return new Promise((resolve, reject) => {
      const check = () => {
        while (this.#taken < this.frames.length) {
          const f = this.frames[this.#taken++]!;
          if (match(f)) {
            clearTimeout(timer);
            this.#waiters.delete(check);
            resolve(f);
            return;
          }
        }
      };
      const timer = setTimeout(() => {
        this.#waiters.delete(check);
        reject(new Error(`Timed out after ${timeoutMs} ms waiting for a frame (${this.frames.length} received)`));
      }, timeoutMs);
      this.#waiters.add(check);
      check();
    });
  }

  /** Resolves when `count` frames in all have arrived. */
  async count(count: number, timeoutMs = 5_000): Promise<Uint8Array[]> {
    await waitUntil(() => this.frames.length >= count, `${count} frames (have ${this.frames.length})`, timeoutMs);
    return this.frames;
  }
}

export interface StreamPeer extends AsyncDisposable {
  /** This end's address as the relay sees it: `127.0.0.1:PORT`. */
  local: string;
  frames: FrameQueue;
  closed: Promise<void>;
  send(...frames: Uint8Array[]): void;
  /** Raw bytes, for malformed input; throws on a short write (use writeAll for bulk). */
  write(bytes: Uint8Array): void;
  /** Writes everything, waiting for `drain` whenever the kernel is full. */
  writeAll(bytes: Uint8Array): Promise<void>;
  pause(): void;
  resume(): void;
  close(): void;
  /** Closes with a TCP reset (RST), as a killed VM with unread data does, not a FIN. */
  reset(): void;
}

/** Per-connection state of a fake peer; `drained` wakes a writeAll waiting for the kernel. */
interface PeerState {
  decoder: StreamDecoder;
  frames: FrameQueue;
  done: () => void;
  drained?: () => void;
}

const peerHandlers = {
  data(socket: import("bun").Socket<PeerState>, chunk: Uint8Array) {
    socket.data.decoder.push(chunk, (f) => socket.data.frames.push(f));
  },
  drain(socket: import("bun").Socket<PeerState>) {
    socket.data.drained?.();
  },
  close(socket: import("bun").Socket<PeerState>) {
    socket.data.done();
  },
  error(socket: import("bun").Socket<PeerState>) {
    socket.data.done();
  },
};

function newPeerState(): { state: PeerState; closed: Promise<void> } {
  const { promise, resolve } = Promise.withResolvers<void>();
  return { state: { decoder: new StreamDecoder(), frames: new FrameQueue(), done: () => resolve() }, closed: promise };
}

function streamPeer(socket: import("bun").Socket<PeerState>, closed: Promise<void>): StreamPeer {
  const peer: StreamPeer = {
    local: socket.localAddress?.includes(":") ? `[${socket.localAddress}]:${socket.localPort}` : `${socket.localAddress}:${socket.localPort}`,
    frames: socket.data.frames,
    closed,
    send: (...f) => peer.write(encodeFrames(f)),
    write(bytes) {
      const n = socket.write(bytes);
      if (n !== bytes.length) throw new Error(`short write in test peer (${n} of ${bytes.length})`);
    },
    async writeAll(bytes) {
      let rest = bytes;
      while (rest.length > 0) {
        const n = socket.write(rest);
        if (n < 0) throw new Error("test peer socket closed while writing");
        rest = rest.subarray(n);
        if (rest.length > 0) await new Promise<void>((r) => (socket.data.drained = r));
      }
    },
    pause: () => socket.pause(),
    resume: () => socket.resume(),
    close: () => socket.end(),
    reset: () => socket.terminate(),
    async [Symbol.asyncDispose]() {
      socket.end();
      await closed;
    },
  };
  return peer;
}

/** Bun spells a Linux abstract socket name with a leading NUL; the relay's CLI with `@`. */
export const bunUnix = (path: string) => (path.startsWith("@") ? `\0${path.slice(1)}` : path);

/** A fake `-netdev stream,server=off` VM: connects to the relay's --qemu-listen (a port, or a unix path). */
export async function connectStream(target: number | string, host = "127.0.0.1"): Promise<StreamPeer> {
  const { state, closed } = newPeerState();
  const socket =
    typeof target === "string"
      ? await Bun.connect<PeerState>({ unix: bunUnix(target), data: state, socket: peerHandlers })
      : await Bun.connect<PeerState>({ hostname: host, port: target, data: state, socket: peerHandlers });
  return streamPeer(socket, closed);
}

export interface StreamServerPeer extends AsyncDisposable {
  port: number;
  /** Resolves with the next connection the relay makes. */
  accepted(): Promise<StreamPeer>;
  stop(): void;
}

/**
 * A fake VM on a relay's --qemu-listen, returned once the relay has attached it as a port (a frame
 * sent to it earlier could be flooded before the relay's accept runs).
 */
export async function attachVm(relay: RelayProcess, network?: string): Promise<StreamPeer> {
  const bound = relay.bound.find((b) => b.what === "qemu-listen" && (network === undefined || b.network === network));
  const host = bound?.address.startsWith("[") ? bound.address.slice(1, bound.address.indexOf("]")) : "127.0.0.1";
  const peer = await connectStream(relay.port("qemu-listen", network), host);
  await waitUntil(async () => {
    const status = await relay.status();
    return status.networks.some((n: any) => n.ports.some((p: any) => p.peer === peer.local));
  }, `relay attached ${peer.local}`);
  return peer;
}

/** A fake `-netdev stream,server=on` VM: the relay's --qemu-connect dials it (a port, or a unix path). */
export function listenStream(target: number | string = 0, host = "127.0.0.1"): StreamServerPeer {
  const queue: StreamPeer[] = [];
  const waiting: ((p: StreamPeer) => void)[] = [];
  const socket = {
    ...peerHandlers,
    open(s: import("bun").Socket<PeerState>) {
      const { state, closed } = newPeerState();
      s.data = state;
      const peer = streamPeer(s, closed);
      const w = waiting.shift();
      if (w) w(peer);
      else queue.push(peer);
    },
  };
  const listener =
    typeof target === "string"
      ? Bun.listen<PeerState>({ unix: bunUnix(target), socket })
      : Bun.listen<PeerState>({ hostname: host, port: target, socket });
  return {
    port: (listener as { port?: number }).port ?? 0,
    accepted: () => {
      const p = queue.shift();
      return p ? Promise.resolve(p) : new Promise((r) => waiting.push(r));
    },
    stop: () => listener.stop(true),
    async [Symbol.asyncDispose]() {
      listener.stop(true);
    },
  };
}

export interface UdpPeer extends Disposable {
  port: number;
  frames: FrameQueue;
  send(frame: Uint8Array, port: number, host?: string): void;
}

/** A fake `-netdev dgram` VM: one frame per datagram. */
export async function udpPeer(host = "127.0.0.1"): Promise<UdpPeer> {
  const frames = new FrameQueue();
  const socket = await Bun.udpSocket({
    hostname: host,
    socket: {
      data(_s, buf) {
        frames.push(buf);
      },
    },
  });
  return {
    port: socket.port,
    frames,
    send(frame, port, to = host) {
      socket.send(frame, port, to);
    },
    [Symbol.dispose]() {
      socket.close();
    },
  };
}

export function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

/** A fresh temporary folder, removed on dispose. */
export async function tempDir(): Promise<AsyncDisposable & { path: string }> {
  const path = (await Bun.$`mktemp -d /tmp/edge-relay-test.XXXXXX`.text()).trim();
  return { path, [Symbol.asyncDispose]: () => Bun.$`rm -rf ${path}`.quiet().then(() => {}) };
}

/**
 * A port that nobody listens on, for a peer that must not be there yet (or must come back on the
 * same port). It is picked below the kernel's ephemeral range, so no `port 0` bind of a relay or a
 * test can be handed the same number between our check and its use.
 */
export async function freePort(kind: "tcp" | "udp" = "tcp"): Promise<number> {
  const [low] = (await Bun.file("/proc/sys/net/ipv4/ip_local_port_range").text()).trim().split(/\s+/).map(Number);
  for (;;) {
    const port = 10_000 + Math.floor(Math.random() * (low! - 10_000));
    try {
      if (kind === "tcp") Bun.listen({ hostname: "127.0.0.1", port, socket: { data() {} } }).stop(true);
      else (await Bun.udpSocket({ hostname: "127.0.0.1", port })).close();
      return port;
    } catch {
      // taken: try another
    }
  }
}

/** Matches frames whose source MAC is `src`. */
export const fromMac = (src: string) => (f: Uint8Array) => sameBytes(f.subarray(6, 12), mac(src));

/** Each VM sends a broadcast from its MAC and the other receives it: every switch between them has learned both. */
export async function introduce(vmA: StreamPeer, a: string, vmB: StreamPeer, b: string): Promise<void> {
  vmB.send(makeFrame(BROADCAST, b));
  await vmA.frames.next(fromMac(b));
  vmA.send(makeFrame(BROADCAST, a));
  await vmB.frames.next(fromMac(a));
}

/** Resolves once the relay's uplink is up for the `connects`-th time. */
export const uplinkUp = (relay: RelayProcess, connects = 1) =>
  waitUntil(async () => {
    const s = await relay.status();
    return s.uplink?.state === "up" && s.uplink.connects >= connects;
  }, `uplink of ${relay.base} up (connect #${connects})`);

/** The uplink's status once a dial has failed (a next dial is scheduled). */
export const uplinkFailed = (relay: RelayProcess, what = "a failed dial") =>
  waitUntil(async () => {
    const uplink = (await relay.status()).uplink;
    return uplink.nextDial && uplink;
  }, what);

/** The checkout's root, with a trailing slash. */
export const ROOT = new URL("..", import.meta.url).pathname;

/** The README as it is in the checkout. */
export const readme = () => Bun.file(`${ROOT}README.md`).text();

/** The shell block after `<!-- recipe: NAME -->` in the README, or undefined. */
export const recipe = async (name: string) => new RegExp(`<!-- recipe: ${name} -->\\n\`\`\`sh\\n([\\s\\S]*?)\`\`\``).exec(await readme())?.[1];

/** Every process under `pid` (children first, then theirs), from /proc; none once it is gone. */
export function descendants(pid: number): number[] {
  let text = "";
  try {
    text = readFileSync(`/proc/${pid}/task/${pid}/children`, "utf8");
  } catch {
    // gone already
  }
  return text.trim().split(/\s+/).filter(Boolean).map(Number).flatMap((child) => [child, ...descendants(child)]);
}

/**
 * Runs the CLI to completion, as a user would: stdout, stderr and the exit code. One still running
 * after `timeoutMs` (a relay that should have refused to start) is killed and reported. `command`
 * replaces `bun relay.ts` (`npx bun relay.ts` with `cwd` the project, a compiled binary).
 */
export async function runCli(
  args: string[],
  env: Record<string, string> = {},
  timeoutMs = 10_000,
  { command = [process.execPath, RELAY], cwd }: { command?: string[]; cwd?: string } = {},
) {
  const proc = Bun.spawn([...command, ...args], { stdout: "pipe", stderr: "pipe", stdin: "ignore", cwd, env: { ...process.env, ...env } });
  const timer = setTimeout(() => proc.kill("SIGKILL"), timeoutMs);
  const [stdout, stderr, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  clearTimeout(timer);
  if (proc.signalCode === "SIGKILL") throw new Error(`relay ${args.join(" ")} still ran after ${timeoutMs} ms\nstdout:\n${stdout}\nstderr:\n${stderr}`);
  return { stdout, stderr, code };
}

// ───────────── other programs the suites run: HAProxy, nats-server ─────────────

export interface Daemon extends AsyncDisposable {
  proc: Subprocess<"ignore", "pipe", "pipe">;
  /** Everything it printed so far (stdout and stderr). */
  log(): string;
  /** Resolves when its output matches `re`; rejects if it exits first. */
  waitForLog(re: RegExp, timeoutMs?: number): Promise<void>;
  /** Kills it (SIGKILL unless told) and waits for it to exit. */
  stop(signal?: NodeJS.Signals): Promise<void>;
}

/** Starts a program from the distribution (`haproxy`, `nats-server`), failing clearly when it is not installed. */
export function spawnDaemon(command: string[]): Daemon {
  if (!Bun.which(command[0]!)) throw new Error(`${command[0]} is not installed: apt-get install ${command[0]} (.ci/run does)`);
  const proc = Bun.spawn(command, { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  let log = "";
  const pumped = Promise.all(
    [proc.stdout, proc.stderr].map(async (stream) => {
      const decoder = new TextDecoder();
      for await (const chunk of stream) log += decoder.decode(chunk, { stream: true });
    }),
  );
  const daemon: Daemon = {
    proc,
    log: () => log,
    waitForLog: (re, timeoutMs = 10_000) =>
      waitUntil(() => {
        if (re.test(log)) return true;
        if (proc.exitCode !== null) throw new Error(`${command[0]} exited (${proc.exitCode}):\n${log}`);
        return false;
      }, `${command[0]} to print ${re}\n${log}`, timeoutMs).then(() => {}),
    async stop(signal = "SIGKILL") {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      await proc.exited;
      await pumped;
    },
    [Symbol.asyncDispose]: () => daemon.stop(),
  };
  return daemon;
}

/**
 * A nats-server of our own on loopback (on `port`, or a free one), resolved once it takes clients;
 * `config`: a configuration file for it (its address and port are given on the command line).
 */
export async function startNats(port?: number, config?: string): Promise<Daemon & { url: string; port: number }> {
  const p = port ?? (await freePort());
  const nats = spawnDaemon(["nats-server", ...(config ? ["-c", config] : []), "-a", "127.0.0.1", "-p", String(p)]);
  await nats.waitForLog(/Server is ready/);
  return Object.assign(nats, { url: `nats://127.0.0.1:${p}`, port: p });
}

/** A test CA in `dir` (ca.pem) and a certificate it signs for 127.0.0.1 and localhost (hub.crt, hub.key, hub.pem = both). */
export async function testCertificate(dir: string): Promise<{ ca: string; pem: string }> {
  await Bun.write(`${dir}/san.ext`, "subjectAltName=IP:127.0.0.1,DNS:localhost\n");
  await Bun.$`openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ${dir}/ca.key -out ${dir}/ca.pem -days 1 -subj /CN=edge-relay-test-ca`.quiet();
  await Bun.$`openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ${dir}/hub.key -out ${dir}/hub.csr -subj /CN=relay.test`.quiet();
  await Bun.$`openssl x509 -req -in ${dir}/hub.csr -CA ${dir}/ca.pem -CAkey ${dir}/ca.key -CAcreateserial -out ${dir}/hub.crt -days 1 -extfile ${dir}/san.ext`.quiet();
  await Bun.write(`${dir}/hub.pem`, (await Bun.file(`${dir}/hub.crt`).text()) + (await Bun.file(`${dir}/hub.key`).text()));
  return { ca: `${dir}/ca.pem`, pem: `${dir}/hub.pem` };
}
