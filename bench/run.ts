/**
 * `npm run bench` = `npx bun bench/run.ts [case ...] [--json FILE]`
 *
 * Cases (all by default): selftest tcp1500 tcp1500-observed local tcp64k udp latency fanout memory backplane scale transport.
 * (`backplane`: site A → hub 1 → NATS → hub 2 → site B against the single-hub chain, 1500 B.)
 * (`tcp1500-observed`: the tcp1500 chain plain, with a live capture on site A read flat out, and
 * with `--impair uplink=delay 1ms` on site A; ratios to the plain runs of the same run.)
 * (`local`: one relay as a plain switch, gen and sink on the same --qemu-listen: the switch's own cost
 * without the tunnel.)
 * (`transport`: no relay; the tunnel's messages, 32 × 1500 B frames or one 64 KiB frame, one way
 * over a WebSocket (plain, TLS), a TLS stream and plain TCP, 2.5 s each (BENCH_TRANSPORT_SECONDS):
 * what the transport itself costs each end of a hop, against plain TCP in the same run.)
 * (`flow`: unpaced 1500 B goodput through the chain with --flow-control on and off, against the
 * chain's lossless paced rate without it.)
 * Each case runs the direct baseline (generator → sink) and the relay chain
 * (generator → site A → hub → site B → sink) in the same run and prints one table.
 *
 * Env: BENCH_SECONDS (throughput run length, default 5), BENCH_OVERLOAD_SECONDS (default 10),
 *      BENCH_SAMPLES (latency samples, default 3000), BENCH_UDP_RATE (paced UDP run, default 50000),
 *      BENCH_TCP_RATE (paced 1500 B TCP run, default 500000 = the target),
 *      BENCH_64K_RATE (a paced 64 KiB run too, frames/s: relay CPU per frame at a fixed load; default none),
 *      BENCH_UDP_STEP_SECONDS (each step of the UDP lossless-rate ladder, default 2),
 *      BENCH_SCALE_TUNNELS (10000), BENCH_SCALE_V86 (10000, fewer if the open-file limit says so),
 *      BENCH_SCALE_RECONNECT (1000), BENCH_SCALE_CLIENTS (load-client processes per kind, 4).
 */
import { existsSync } from "node:fs";
import { RELAY, freePort, spawnRelay, startNats, testCertificate, waitUntil, type RelayProcess } from "../tests/helpers.ts";
import { openTunnels } from "./tunnels.ts";

const PEER = new URL("./peer.ts", import.meta.url).pathname;
const SECONDS = Number(process.env.BENCH_SECONDS ?? 5);
const OVERLOAD_SECONDS = Number(process.env.BENCH_OVERLOAD_SECONDS ?? 10);
const TCP_RATE = Number(process.env.BENCH_TCP_RATE ?? 500_000);
const RATE_64K = Number(process.env.BENCH_64K_RATE ?? 0);
const UDP_RATE = Number(process.env.BENCH_UDP_RATE ?? 50_000);
const SAMPLES = Number(process.env.BENCH_SAMPLES ?? 3000);
const TOKEN = "bench-token-" + Math.random().toString(36).slice(2);
const HOST = "127.0.0.1";

const argv = process.argv.slice(2);
let jsonOut: string | undefined;
const wanted: string[] = [];
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === "--json") jsonOut = argv[++i];
  else wanted.push(argv[i]!);
}
const ALL = ["selftest", "tcp1500", "tcp1500-observed", "flow", "local", "tcp64k", "udp", "latency", "fanout", "memory", "backplane", "scale", "transport"];
for (const w of wanted) if (!ALL.includes(w)) throw new Error(`unknown case ${w}; cases: ${ALL.join(" ")}`);
const cases = wanted.length ? wanted : ALL;
const haveRelay = existsSync(RELAY);

// ------------------------------------------------------------------------------------ /proc
const TICK = 100; // USER_HZ
function cpuSeconds(pid: number | undefined, which: "all" | "sys" = "all"): number {
  if (!pid) return NaN;
  try {
    const s = require("node:fs").readFileSync(`/proc/${pid}/stat`, "utf8") as string;
    const rest = s.slice(s.lastIndexOf(")") + 2).split(" ");
    return (which === "sys" ? Number(rest[12]) : Number(rest[11]) + Number(rest[12])) / TICK;
  } catch {
    return NaN;
  }
}
function rssMB(pid: number | undefined): number {
  if (!pid) return NaN;
  try {
    const s = require("node:fs").readFileSync(`/proc/${pid}/status`, "utf8") as string;
    const m = /VmRSS:\s+(\d+) kB/.exec(s);
    return m ? Number(m[1]) / 1024 : NaN;
  } catch {
    return NaN;
  }
}

// ------------------------------------------------------------------------------------ peers
class Peer {
  proc: ReturnType<typeof Bun.spawn>;
  events: any[] = [];
  private waiters = new Set<() => void>();
  private err = "";
  constructor(
    public name: string,
    args: string[],
    script = PEER,
  ) {
    this.proc = Bun.spawn([process.execPath, script, ...args], { stdin: "pipe", stdout: "pipe", stderr: "pipe" });
    void this.pump(this.proc.stdout as ReadableStream<Uint8Array>, (line) => {
      try {
        this.events.push(JSON.parse(line));
      } catch {
        this.err += line + "\n";
      }
    });
    void this.pump(this.proc.stderr as ReadableStream<Uint8Array>, (line) => (this.err += line + "\n"));
    this.proc.exited.then(() => this.notify());
  }
  get pid() {
    return this.proc.pid;
  }
  private notify() {
    for (const w of this.waiters) w();
  }
  private async pump(stream: ReadableStream<Uint8Array>, onLine: (l: string) => void) {
    const dec = new TextDecoder();
    let buf = "";
    for await (const chunk of stream) {
      buf += dec.decode(chunk, { stream: true });
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        onLine(buf.slice(0, i));
        buf = buf.slice(i + 1);
      }
      this.notify();
    }
  }
  send(cmd: string) {
    const stdin = this.proc.stdin as import("bun").FileSink;
    stdin.write(cmd + "\n");
    stdin.flush();
  }
  /** Waits for the `n`-th (from `from`) event named `name`. */
  wait(name: string, timeoutMs = 15_000, from = 0): Promise<any> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.delete(check);
        reject(new Error(`${this.name}: timed out waiting for "${name}"; stderr:\n${this.err}`));
      }, timeoutMs);
      const check = () => {
        const e = this.events.slice(from).find((x) => x.event === name);
        if (e) {
          clearTimeout(timer);
          this.waiters.delete(check);
          resolve(e);
        } else if (this.proc.exitCode !== null || this.proc.signalCode !== null) {
          clearTimeout(timer);
          this.waiters.delete(check);
          reject(new Error(`${this.name} exited (${this.proc.exitCode ?? this.proc.signalCode}) before "${name}":\n${this.err}`));
        }
      };
      this.waiters.add(check);
      check();
    });
  }
  async request(cmd: string, name: string, timeoutMs = 5000) {
    const from = this.events.length;
    this.send(cmd);
    return this.wait(name, timeoutMs, from);
  }
  async stop() {
    if (this.proc.exitCode === null && this.proc.signalCode === null) {
      try {
        this.send("quit");
      } catch {}
      const t = setTimeout(() => this.proc.kill("SIGKILL"), 2000);
      await this.proc.exited;
      clearTimeout(t);
    }
  }
}

// ------------------------------------------------------------------------------------ relays
interface Chain {
  hub: RelayProcess;
  a: RelayProcess;
  b: RelayProcess;
  all: RelayProcess[];
  stop(): Promise<void>;
}

function uplinkUrl(hub: RelayProcess) {
  return hub.base.replace(/^http/, "ws");
}

/** BENCH_PROFILE=DIR: the relays write CPU profiles (.cpuprofile and .md) there on exit. */
const PROFILE = process.env.BENCH_PROFILE;
let chainCount = 0;
function relayOptions(role: string) {
  if (!PROFILE) return {};
  const name = `${++chainCount}-${role}`;
  return { env: { BUN_OPTIONS: `--cpu-prof --cpu-prof-md --cpu-prof-dir=${PROFILE} --cpu-prof-name=${name}` } };
}

async function startChain(aArgs: string[], bArgs: string[], allArgs: string[] = []): Promise<Chain> {
  const started: RelayProcess[] = [];
  try {
    // The fan-out case dials 200 tunnels from one address: above the per-address default.
    const hub = await spawnRelay(["--http", `${HOST}:0`, "--token", TOKEN, "--max-tunnels-per-address", "1000", ...allArgs], relayOptions("hub"));
    started.push(hub);
    const up = ["--uplink", uplinkUrl(hub), "--uplink-token", TOKEN];
    const a = await spawnRelay(["--http", `${HOST}:0`, ...aArgs, ...up, ...allArgs], relayOptions("A"));
    started.push(a);
    const b = await spawnRelay(["--http", `${HOST}:0`, ...bArgs, ...up, ...allArgs], relayOptions("B"));
    started.push(b);
    await waitUntil(
      async () => (await a.status()).uplink?.state === "up" && (await b.status()).uplink?.state === "up",
      "both sites' uplinks up",
      15_000,
    );
    return {
      hub,
      a,
      b,
      all: [a, hub, b],
      async stop() {
        await Promise.all(started.map((r) => r.stop()));
      },
    };
  } catch (e) {
    await Promise.all(started.map((r) => r.stop("SIGKILL")));
    throw e;
  }
}

/** Sum of `drops` over every port of every network, and of every datagram socket, in a relay's /status. */
async function relayDrops(r: RelayProcess): Promise<number> {
  try {
    const s = await r.status();
    let d = 0;
    const walk = (x: any) => {
      if (!x || typeof x !== "object") return;
      for (const [k, v] of Object.entries(x)) {
        if (k === "drops" && typeof v === "number") d += v;
        else walk(v);
      }
    };
    walk(s.networks);
    // --qemu-udp sockets: datagrams dropped before they became frames, the kernel's included.
    for (const g of s.datagrams ?? []) for (const n of Object.values(g.drops ?? {})) d += n as number;
    return d;
  } catch {
    return NaN;
  }
}

// ------------------------------------------------------------------------------------ flows
interface Flow {
  fps: number;
  /** What the generator managed to send, frames/s. */
  offered: number;
  mbps: number;
  sent: number;
  received: number;
  lost: number;
  reordered: number;
  dup: number;
  corrupt: number;
  cpu: Record<string, number>; // CPU seconds (user + system) during the run, per process
  cpuSys: Record<string, number>; // of which in the kernel
  wall: number;
  relayDrops?: number;
  dropsBy?: Record<string, number>;
  /** Datagrams the kernel dropped at a peer's UDP socket (receive buffer full), by peer. */
  peerKernelDrops?: Record<string, number>;
  /** Frame counts hop by hop (gen, each relay's ports by kind, sink). */
  path?: string;
  rssMax?: Record<string, number>;
}

type Endpoints = { gen: string[]; sink: string[] };

/**
 * Spawns gen (first: it waits for the sink's announce) and sink, runs the generator, waits for the
 * sink to go quiet and collects counters and CPU of every process involved.
 */
async function runFlow(
  ep: Endpoints,
  opts: {
    size: number;
    seconds: number;
    genRate?: number;
    sinkRate?: number;
    relays?: Record<string, RelayProcess>;
    sampleRss?: boolean;
    /** Other processes whose CPU to count (e.g. a capture client), by name. */
    others?: Record<string, number>;
    /** Runs once the sink listens, before the generator starts (sinkListenFirst only). */
    beforeGen?: (sinkPort: number) => Promise<void>;
    /** UDP ports of peers (by name) whose kernel drops to count. */
    udpPorts?: Record<string, number>;
  },
  sinkListenFirst = false,
): Promise<Flow> {
  const genBase = ["--size", String(opts.size), "--seconds", String(opts.seconds)];
  if (opts.genRate) genBase.push("--rate", String(opts.genRate));
  const sinkBase = opts.sinkRate ? ["--rate", String(opts.sinkRate)] : [];
  let gen: Peer | undefined;
  let sink: Peer | undefined;
  const rssMax: Record<string, number> = {};
  let sampler: ReturnType<typeof setInterval> | undefined;
  try {
    if (sinkListenFirst) {
      sink = new Peer("sink", ["sink", ...ep.sink, ...sinkBase]);
      const { port } = await sink.wait("listening");
      await opts.beforeGen?.(port);
      gen = new Peer("gen", ["gen", ...ep.gen.map((a) => a.replace("SINKPORT", String(port))), ...genBase]);
    } else {
      gen = new Peer("gen", ["gen", ...ep.gen, ...genBase]);
      if (ep.gen.includes("--udp-bind")) await gen.wait("listening");
      sink = new Peer("sink", ["sink", ...ep.sink, ...sinkBase]);
    }
    await gen.wait("ready", 15_000);
    const pids: Record<string, number> = { gen: gen.pid, sink: sink.pid };
    for (const [k, r] of Object.entries(opts.relays ?? {})) pids[k] = r.proc.pid;
    Object.assign(pids, opts.others);
    const drops0 = opts.relays ? await sumDrops(opts.relays) : 0;
    const byRelay0 = lastDropsByRelay;
    const hops0 = new Map<string, Hops>();
    for (const [k, r] of Object.entries(opts.relays ?? {})) hops0.set(k, await hops(r));
    const kernel0 = Object.fromEntries(Object.entries(opts.udpPorts ?? {}).map(([k, p]) => [k, udpDrops(p)]));
    const cpu0 = Object.fromEntries(Object.entries(pids).map(([k, p]) => [k, cpuSeconds(p)]));
    const sys0 = Object.fromEntries(Object.entries(pids).map(([k, p]) => [k, cpuSeconds(p, "sys")]));
    if (opts.sampleRss) {
      const sample = () => {
        for (const [k, r] of Object.entries(opts.relays ?? {})) rssMax[k] = Math.max(rssMax[k] ?? 0, rssMB(r.proc.pid));
      };
      sample();
      sampler = setInterval(sample, 100);
    }
    const t0 = performance.now();
    const done = await gen.request("start", "done", opts.seconds * 1000 + 30_000);
    // Wait for the pipe to go quiet: every frame arrived, or no progress for 600 ms.
    let last = -1;
    let rep: any;
    let still = 0;
    for (;;) {
      rep = await sink.request("report", "report");
      if (rep.received >= done.sent) break;
      if (rep.received === last) {
        if (++still >= 3) break;
      } else still = 0;
      last = rep.received;
      await Bun.sleep(200);
    }
    const wall = (performance.now() - t0) / 1000;
    if (sampler) clearInterval(sampler);
    const cpu = Object.fromEntries(Object.entries(pids).map(([k, p]) => [k, cpuSeconds(p) - cpu0[k]!]));
    const cpuSys = Object.fromEntries(Object.entries(pids).map(([k, p]) => [k, cpuSeconds(p, "sys") - sys0[k]!]));
    const drops1 = opts.relays ? await sumDrops(opts.relays) : 0;
    const peerKernelDrops = Object.fromEntries(Object.entries(opts.udpPorts ?? {}).map(([k, p]) => [k, udpDrops(p) - kernel0[k]!]));
    const path: string[] = [`gen sent ${si(done.sent)}`];
    for (const [k, r] of Object.entries(opts.relays ?? {})) path.push(`${k}: ${hopText(hops0.get(k)!, await hops(r))}`);
    path.push(`sink got ${si(rep.received)}`);
    return {
      fps: rep.fps,
      offered: done.sent / done.seconds,
      mbps: rep.fps * opts.size / 1e6,
      sent: done.sent,
      received: rep.received,
      lost: done.sent - rep.received, // received includes corrupt frames
      reordered: rep.reordered,
      dup: rep.dup,
      corrupt: rep.corrupt,
      cpu,
      cpuSys,
      wall,
      relayDrops: opts.relays ? drops1 - drops0 : undefined,
      path: path.join(" | "),
      dropsBy: opts.relays ? Object.fromEntries(Object.entries(lastDropsByRelay).map(([k, v]) => [k, v - (byRelay0[k] ?? 0)])) : undefined,
      rssMax: opts.sampleRss ? rssMax : undefined,
      peerKernelDrops: opts.udpPorts ? peerKernelDrops : undefined,
    };
  } finally {
    if (sampler) clearInterval(sampler);
    await Promise.all([gen?.stop(), sink?.stop()]);
  }
}

/** Per-port frame counters of a relay, keyed by port id: where along the path frames went missing. */
type Hops = Map<string, { kind: string; rx: number; tx: number; txDrops: number }>;
async function hops(r: RelayProcess): Promise<Hops> {
  const m: Hops = new Map();
  try {
    const s = await r.status();
    for (const n of s.networks ?? [])
      for (const p of n.ports ?? []) m.set(p.id, { kind: p.kind, rx: p.rx?.frames ?? 0, tx: p.tx?.frames ?? 0, txDrops: p.tx?.drops ?? 0 });
  } catch {}
  return m;
}
/** "A: qemu-listen rx 2.5M → uplink tx 2.3M (drop 200k)": per relay, per port kind, deltas. */
function hopText(before: Hops, after: Hops): string {
  const by: Record<string, { rx: number; tx: number; txDrops: number }> = {};
  for (const [id, a] of after) {
    const b = before.get(id) ?? { rx: 0, tx: 0, txDrops: 0 };
    const k = (by[a.kind] ??= { rx: 0, tx: 0, txDrops: 0 });
    k.rx += a.rx - b.rx;
    k.tx += a.tx - b.tx;
    k.txDrops += a.txDrops - b.txDrops;
  }
  const rx = Object.entries(by).filter(([, v]) => v.rx > 1000).map(([k, v]) => `${k} rx ${si(v.rx)}`);
  const tx = Object.entries(by).filter(([, v]) => v.tx > 1000 || v.txDrops > 0).map(([k, v]) => `${k} tx ${si(v.tx)}${v.txDrops ? ` (drop ${si(v.txDrops)})` : ""}`);
  return `${rx.join(", ")} → ${tx.join(", ")}`;
}

/** The kernel's `drops` of the UDP socket bound to 127.0.0.1:`port` (/proc/net/udp). */
function udpDrops(port: number): number {
  const local = `0100007F:${port.toString(16).toUpperCase().padStart(4, "0")}`;
  const text = require("node:fs").readFileSync("/proc/net/udp", "utf8") as string;
  for (const line of text.split("\n")) {
    const f = line.trim().split(/\s+/);
    if (f[1] === local) return Number(f[12]);
  }
  return NaN;
}

let lastDropsByRelay: Record<string, number> = {};
async function sumDrops(relays: Record<string, RelayProcess>) {
  let d = 0;
  lastDropsByRelay = {};
  for (const [k, r] of Object.entries(relays)) d += lastDropsByRelay[k] = await relayDrops(r);
  return d;
}

// ------------------------------------------------------------------------------------ table
type Row = { case: string; metric: string; direct: string; chain: string; ratio: string; target: string; result: string };
const rows: Row[] = [];
const json: Record<string, unknown> = {};
const row = (r: Partial<Row> & { case: string; metric: string }) =>
  rows.push({ direct: "", chain: "", ratio: "", target: "", result: "", ...r });

const si = (x: number, digits = 3) => {
  if (!Number.isFinite(x)) return "n/a";
  const a = Math.abs(x);
  if (a >= 1e9) return (x / 1e9).toPrecision(digits) + "G";
  if (a >= 1e6) return (x / 1e6).toPrecision(digits) + "M";
  if (a >= 1e3) return (x / 1e3).toPrecision(digits) + "k";
  return x.toPrecision(digits).replace(/\.0+$/, "");
};
const f1 = (x: number | undefined) => (x === undefined || !Number.isFinite(x) ? "n/a" : x.toFixed(1));
const f2 = (x: number | undefined) => (x === undefined || !Number.isFinite(x) ? "n/a" : x.toFixed(2));
const pass = (ok: boolean) => (ok ? "pass" : "MISS");
const dropsText = (f: Flow) =>
  f.dropsBy ? Object.entries(f.dropsBy).map(([k, v]) => `${k} ${si(v)}`).join(", ") : si(f.relayDrops ?? NaN);
const errs = (f: Flow) => `${f.lost}/${f.reordered + f.dup}/${f.corrupt}`;

function printTable() {
  const head: Row = { case: "case", metric: "metric", direct: "direct", chain: "relay chain", ratio: "chain/direct", target: "target", result: "" };
  const all = [head, ...rows];
  const keys = Object.keys(head) as (keyof Row)[];
  const w = Object.fromEntries(keys.map((k) => [k, Math.max(...all.map((r) => r[k].length))]));
  const line = (r: Row) => "| " + keys.map((k) => r[k].padEnd(w[k]!)).join(" | ") + " |";
  const out = [line(head), "|" + keys.map((k) => "-".repeat(w[k]! + 2)).join("|") + "|", ...rows.map(line)];
  console.log(out.join("\n"));
}

// ------------------------------------------------------------------------------------ cases
function cpuText(f: Flow, keys: string[]) {
  return keys.map((k) => `${k} ${f2(f.cpu[k])} (sys ${f2(f.cpuSys[k])})`).join(", ");
}

/** CPU µs per frame the sink received, user and kernel apart, of each process: "A 0.66 u + 0.67 k". */
function perFrame(f: Flow, keys: string[]): string {
  const us = (s: number | undefined) => (f.received && s !== undefined ? f2((s / f.received) * 1e6) : "n/a");
  return keys.map((k) => `${k} ${us(f.cpu[k]! - f.cpuSys[k]!)} u + ${us(f.cpuSys[k])} k`).join(", ");
}
/** User-space µs per frame delivered of one process. */
const userPerFrame = (f: Flow, k: string) => (f.received ? ((f.cpu[k]! - f.cpuSys[k]!) / f.received) * 1e6 : NaN);

interface Setup {
  ep: Endpoints;
  sinkListenFirst: boolean;
}

async function throughputCase(name: string, size: number, udp: boolean, target?: number, pacedRate?: number) {
  const label = udp ? `udp ${size} B` : `tcp ${size >= 65536 ? "64 KiB" : size + " B"}`;
  const [pg, ps] = udp ? [await freePort("udp"), await freePort("udp")] : [0, 0];
  const directSetup: Setup = udp
    ? {
        ep: {
          gen: ["--udp-bind", `${HOST}:${pg}`, "--udp-to", `${HOST}:${ps}`],
          sink: ["--udp-bind", `${HOST}:${ps}`, "--udp-to", `${HOST}:${pg}`],
        },
        sinkListenFirst: false,
      }
    : { ep: { gen: ["--tcp-connect", `${HOST}:SINKPORT`], sink: ["--tcp-listen", `${HOST}:0`] }, sinkListenFirst: true };
  const udpPorts = udp ? { sink: ps } : undefined;
  const direct = await runFlow(directSetup.ep, { size, seconds: SECONDS, udpPorts }, directSetup.sinkListenFirst);
  // The byte-pump baseline: gen → three socat hops → sink, as many TCP connections as the chain.
  const socat = !udp && SOCAT ? await socatFlow(size) : undefined;
  // UDP has no backpressure: also run at a rate the direct path takes, to tell loss in the relay
  // from loss in the peers' socket buffers.
  const directPaced = udp && pacedRate ? await runFlow(directSetup.ep, { size, seconds: SECONDS, genRate: pacedRate, udpPorts }) : undefined;
  // UDP: the highest paced rate each path carries with ≤ 0.1 % lost, a figure that does not depend
  // on how badly a flood overruns a socket buffer.
  const directLossless = udp ? await losslessRate(directSetup.ep, direct.offered, { size, udpPorts }) : undefined;
  let chainLossless: Lossless | undefined;
  let chain: Flow | undefined;
  let paced: Flow | undefined;
  let chainErr = "";
  if (haveRelay) {
    let c: Chain | undefined;
    try {
      c = udp
        ? await startChain(["--qemu-udp", `${HOST}:0,${HOST}:${pg}`], ["--qemu-udp", `${HOST}:0,${HOST}:${ps}`])
        : await startChain(["--qemu-listen", `${HOST}:0`], ["--qemu-listen", `${HOST}:0`]);
      const ep: Endpoints = udp
        ? {
            gen: ["--udp-bind", `${HOST}:${pg}`, "--udp-to", `${HOST}:${c.a.port("qemu-udp")}`],
            sink: ["--udp-bind", `${HOST}:${ps}`, "--udp-to", `${HOST}:${c.b.port("qemu-udp")}`],
          }
        : {
            gen: ["--tcp-connect", `${HOST}:${c.a.port("qemu-listen")}`],
            sink: ["--tcp-connect", `${HOST}:${c.b.port("qemu-listen")}`],
          };
      const relays = { A: c.a, hub: c.hub, B: c.b };
      chain = await runFlow(ep, { size, seconds: SECONDS, relays, udpPorts });
      if (pacedRate) paced = await runFlow(ep, { size, seconds: SECONDS, relays, genRate: pacedRate, udpPorts });
      if (directLossless) chainLossless = await losslessRate(ep, directLossless.rate || direct.offered, { size, udpPorts, relays });
    } catch (e) {
      chainErr = String(e).split("\n")[0]!.slice(0, 100);
      console.error(`${name}: chain failed: ${e}`);
    } finally {
      await c?.stop();
    }
  } else chainErr = "relay.ts missing";
  json[name] = { direct, directPaced, socat, chain, paced, directLossless, chainLossless };
  const ch = chain;
  const clean = (f: Flow) => f.lost + f.reordered + f.dup + f.corrupt === 0;
  row({
    case: label,
    metric: "frames/s, unpaced",
    direct: si(direct.fps),
    chain: ch ? si(ch.fps) : chainErr,
    ratio: ch ? f2(ch.fps / direct.fps) : "",
    target: target ? `≥ ${si(target)}` : udp ? "≥ 0.50 × direct" : "",
    result: target && ch ? pass(ch.fps >= target) : udp && ch ? pass(ch.fps >= 0.5 * direct.fps) : "",
  });
  row({ case: label, metric: "MB/s, unpaced", direct: si(direct.mbps), chain: ch ? si(ch.mbps) : "", ratio: ch ? f2(ch.mbps / direct.mbps) : "" });
  if (!udp) {
    row({
      case: label,
      metric: "MB/s unpaced: socat chain (3 hops) → relay chain; ratio relay/socat",
      direct: socat ? `socat ${si(socat.mbps)}; ${errs(socat)}` : "socat missing",
      chain: ch ? si(ch.mbps) : "",
      ratio: socat && ch ? f2(ch.mbps / socat.mbps) : "",
      target: "≥ 2.00 × socat",
      result: socat && ch ? pass(ch.mbps >= 2 * socat.mbps) : "",
    });
  }
  // UDP: a frame may also be lost in the sink's socket buffer; the relays count their sockets' own.
  const sinkKernel = (f: Flow) => f.peerKernelDrops?.sink ?? 0;
  const kernelText = (f: Flow) => (udp ? `; sink's kernel drops ${si(sinkKernel(f))}` : "");
  const accounted = (f: Flow) => f.lost === (f.relayDrops ?? 0) + sinkKernel(f) && f.reordered + f.dup + f.corrupt === 0;
  row({
    case: label,
    metric: "lost/reord/corrupt, unpaced",
    direct: errs(direct) + kernelText(direct),
    chain: ch ? `${errs(ch)} (relay drops: ${dropsText(ch)}${kernelText(ch)})` : "",
    target: udp ? "lost = relay (incl. kernel) + sink kernel drops" : "lost = relay drops",
    result: ch ? pass(accounted(ch)) : "",
  });
  if (pacedRate) {
    const d = directPaced;
    row({
      case: label,
      metric: `paced ${si(pacedRate)}/s: sent → received frames/s; lost/reord/corrupt`,
      direct: d ? `${si(d.offered)} → ${si(d.fps)}; ${errs(d)}${kernelText(d)}` : "",
      chain: paced ? `${si(paced.offered)} → ${si(paced.fps)}; ${errs(paced)} (relay drops: ${dropsText(paced)}${kernelText(paced)})` : chainErr,
      target: udp ? "lost accounted for" : `0/0/0 at ${si(pacedRate)}/s`,
      result: paced ? pass(udp ? accounted(paced) : clean(paced) && paced.fps >= pacedRate * 0.95) : "",
    });
  }
  if (directLossless) {
    const c = chainLossless;
    row({
      case: label,
      metric: `highest lossless rate (≤ 0.1 % lost; paced ladder ×${LADDER_STEP} from the direct rate, ${UDP_STEP_SECONDS} s a step)`,
      direct: `${si(directLossless.rate)}/s (${ladderText(directLossless)})`,
      chain: c ? `${si(c.rate)}/s (${ladderText(c)})` : chainErr,
      ratio: c && directLossless.rate > 0 ? f2(c.rate / directLossless.rate) : "",
      target: "≥ 0.50 × direct",
      // No lossless step on the direct link (its sink's socket buffer overran at every rate tried): no ratio.
      result: c && directLossless.rate > 0 ? pass(c.rate >= 0.5 * directLossless.rate) : "",
    });
    const at = c?.flow;
    if (at) row({ case: label, metric: "at the chain's lossless rate: CPU µs/frame, user + kernel", chain: perFrame(at, ["A", "hub", "B", "gen", "sink"]) });
    if (at?.path) row({ case: label, metric: "path at the chain's lossless rate", chain: at.path });
  }
  row({ case: label, metric: "frames sent, unpaced", direct: si(direct.sent), chain: ch ? si(ch.sent) : "" });
  if (ch?.path) row({ case: label, metric: "path, unpaced", chain: ch.path });
  if (paced?.path) row({ case: label, metric: `path, paced ${si(pacedRate!)}/s`, chain: paced.path });
  if (ch) {
    row({
      case: label,
      metric: "CPU s (of which kernel), unpaced run",
      direct: cpuText(direct, ["gen", "sink"]),
      chain: cpuText(ch, ["A", "hub", "B", "gen", "sink"]) + ` | ${f1(ch.wall)} s wall`,
    });
    for (const [what, f] of [["unpaced", ch], [`paced`, paced]] as const) {
      if (!f) continue;
      const worst = Math.max(...["A", "hub", "B"].map((k) => userPerFrame(f, k)));
      const userTarget = size >= 65536 ? 10 : size <= 1500 && !udp ? 0.3 : undefined;
      row({
        case: label,
        metric: `relay CPU µs/frame delivered, user (u) + kernel (k), ${what}`,
        chain: perFrame(f, ["A", "hub", "B"]),
        target: userTarget ? `user ≤ ${userTarget} µs each` : "",
        result: userTarget ? pass(worst <= userTarget) : "",
      });
    }
    if (socat) row({ case: label, metric: "socat CPU µs/frame delivered, user (u) + kernel (k), unpaced", chain: perFrame(socat, ["socat1", "socat2", "socat3"]) });
    row({ case: label, metric: "peers' CPU µs/frame, user + kernel (direct | chain)", direct: perFrame(direct, ["gen", "sink"]), chain: perFrame(ch, ["gen", "sink"]) });
  } else {
    row({ case: label, metric: "CPU s, unpaced run", direct: cpuText(direct, ["gen", "sink"]) });
  }
}

const SOCAT = Bun.which("socat");

const UDP_STEP_SECONDS = Number(process.env.BENCH_UDP_STEP_SECONDS ?? 2);
const LADDER_STEP = 0.75;
interface Lossless {
  /** Frames/s received at the highest lossless step; 0 when none was. */
  rate: number;
  /** That step's flow. */
  flow?: Flow;
  steps: { rate: number; flow: Flow }[];
}
const lossless = (f: Flow) => f.lost <= f.sent * 0.001 && f.reordered + f.dup + f.corrupt === 0;
const ladderText = (l: Lossless) => l.steps.map((x) => `${si(x.rate)} → ${si(x.flow.fps)}, lost ${f1((100 * x.flow.lost) / x.flow.sent)} %`).join("; ");

/**
 * Steps the paced rate down from `start` (×LADDER_STEP) until a step loses ≤ 0.1 % (at most 12
 * steps), then tries once halfway (geometric) back toward the step above it.
 */
async function losslessRate(ep: Endpoints, start: number, opts: { size: number; udpPorts?: Record<string, number>; relays?: Record<string, RelayProcess> }): Promise<Lossless> {
  const steps: Lossless["steps"] = [];
  const at = async (rate: number) => {
    const flow = await runFlow(ep, { ...opts, seconds: UDP_STEP_SECONDS, genRate: Math.round(rate) });
    steps.push({ rate: Math.round(rate), flow });
    return flow;
  };
  let rate = start;
  let found: Flow | undefined;
  for (let i = 0; i < 12 && !found; i++, rate *= LADDER_STEP) {
    const f = await at(rate);
    if (lossless(f)) found = f;
  }
  if (!found) return { rate: 0, steps };
  rate /= LADDER_STEP;
  if (steps.length > 1) {
    const f = await at(rate / Math.sqrt(LADDER_STEP));
    if (lossless(f)) found = f;
  }
  return { rate: found.fps, flow: found, steps };
}

/** gen → socat → socat → socat → sink: four TCP connections, like gen → A → hub → B → sink. */
async function socatFlow(size: number): Promise<Flow> {
  await using chain = new SocatChain();
  const pids: Record<string, number> = {};
  return await runFlow(
    { gen: ["--tcp-connect", `${HOST}:${await chain.entry()}`], sink: ["--tcp-listen", `${HOST}:0`] },
    {
      size,
      seconds: SECONDS,
      others: pids,
      async beforeGen(sinkPort: number) {
        Object.assign(pids, await chain.start(sinkPort));
      },
    },
    true,
  );
}

/**
 * Three `socat TCP-LISTEN TCP` hops on loopback ending at the sink's port: the relay chain's
 * process count and topology (each hop a process with a connection on each side), as a byte pump.
 */
class SocatChain {
  readonly #hops: ReturnType<typeof Bun.spawn>[] = [];
  #ports: number[] = [];

  /**
   * `nodelay`: TCP_NODELAY on both sides of each hop, as the relays have on every socket; without
   * it a pong that meets the sink's announce waits for a delayed ACK (≈ 40 ms round trip).
   */
  constructor(readonly nodelay = false) {}

  /** The port the generator connects to (the first hop's). */
  async entry(): Promise<number> {
    this.#ports = [await freePort(), await freePort(), await freePort()];
    return this.#ports[0]!;
  }

  /** Starts the hops, last first, each once the one after it listens; their pids by name. */
  async start(sinkPort: number): Promise<Record<string, number>> {
    const ports = this.#ports;
    const next = [...ports.slice(1), sinkPort];
    const pids: Record<string, number> = {};
    for (let i = 2; i >= 0; i--) {
      const nd = this.nodelay ? ",nodelay" : "";
      const listen = `TCP-LISTEN:${ports[i]},bind=${HOST},reuseaddr${nd}`;
      const p = Bun.spawn([SOCAT!, listen, `TCP:${HOST}:${next[i]}${nd}`], { stdout: "ignore", stderr: "inherit" });
      this.#hops.push(p);
      pids[`socat${i + 1}`] = p.pid;
      await waitUntil(async () => (await Bun.$`ss -Hltn sport = :${ports[i]}`.quiet().text()).trim() !== "", `socat on ${ports[i]}`, 5000);
    }
    return pids;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    for (const p of this.#hops) p.kill();
    await Promise.all(this.#hops.map((p) => p.exited));
  }
}

async function latencyRun(ep: Endpoints, sinkListenFirst: boolean, beforeGen?: (sinkPort: number) => Promise<unknown>): Promise<any> {
  let ping: Peer | undefined;
  let sink: Peer | undefined;
  try {
    const args = ["--samples", String(SAMPLES), "--warmup", "300", "--size", "64"];
    if (sinkListenFirst) {
      sink = new Peer("sink", ["sink", ...ep.sink]);
      const { port } = await sink.wait("listening");
      await beforeGen?.(port);
      ping = new Peer("ping", ["ping", ...ep.gen.map((a) => a.replace("SINKPORT", String(port))), ...args]);
    } else {
      ping = new Peer("ping", ["ping", ...ep.gen, ...args]);
      sink = new Peer("sink", ["sink", ...ep.sink]);
    }
    await ping.wait("ready");
    return await ping.request("start", "done", 120_000);
  } finally {
    await Promise.all([ping?.stop(), sink?.stop()]);
  }
}

/** gen → three socat hops → sink: what the chain's shape costs on this machine without any relay. */
async function socatLatency(): Promise<any> {
  await using chain = new SocatChain(true);
  const entry = await chain.entry();
  return await latencyRun({ gen: ["--tcp-connect", `${HOST}:${entry}`], sink: ["--tcp-listen", `${HOST}:0`] }, true, (port) => chain.start(port));
}

/**
 * Direct, the relay chain, then a socat chain of the same shape (three processes, four TCP
 * connections): the socat chain's added latency is the machine's share (wake-ups of three more
 * processes on shared cores, loopback copies); the relay chain's minus it is the relays' own.
 */
async function latencyCase() {
  const direct = await latencyRun({ gen: ["--tcp-connect", `${HOST}:SINKPORT`], sink: ["--tcp-listen", `${HOST}:0`] }, true);
  let chain: any;
  let chainErr = "relay.ts missing";
  if (haveRelay) {
    let c: Chain | undefined;
    try {
      c = await startChain(["--qemu-listen", `${HOST}:0`], ["--qemu-listen", `${HOST}:0`]);
      chain = await latencyRun(
        {
          gen: ["--tcp-connect", `${HOST}:${c.a.port("qemu-listen")}`],
          sink: ["--tcp-connect", `${HOST}:${c.b.port("qemu-listen")}`],
        },
        false,
      );
    } catch (e) {
      chainErr = String(e).split("\n")[0]!.slice(0, 100);
      console.error(`latency: chain failed: ${e}`);
    } finally {
      await c?.stop();
    }
  }
  const socat = SOCAT ? await socatLatency() : undefined;
  json.latency = { direct, chain, socat };
  const label = "latency 64 B (one-way)";
  const us = (x: number) => `${x.toFixed(1)} µs`;
  const plus = (x: number) => `${x < 0 ? "−" : "+"}${Math.abs(x).toFixed(1)}`;
  for (const [p, target] of [
    ["p50", 50],
    ["p90", undefined],
    ["p99", 150],
    ["max", undefined],
  ] as const) {
    const added = chain ? chain[p] - direct[p] : NaN;
    row({
      case: label,
      metric: `${p}${target ? " (added)" : ""}`,
      direct: us(direct[p]),
      chain: chain ? `${us(chain[p])} (${plus(added)})` : chainErr,
      ratio: chain ? f1(chain[p] / direct[p]) : "",
      target: target ? `added ≤ ${target} µs` : "",
      result: target && chain ? pass(added <= target) : "",
    });
  }
  row({ case: label, metric: "samples/lost", direct: `${direct.samples}/${direct.lost}`, chain: chain ? `${chain.samples}/${chain.lost}` : "" });
  for (const p of ["p50", "p99"] as const) {
    const socatAdded = socat ? socat[p] - direct[p] : NaN;
    const relayAdded = chain ? chain[p] - direct[p] : NaN;
    row({
      case: label,
      metric: `${p} added: socat chain (3 hops) → relay chain; relay − socat`,
      direct: socat ? `socat ${us(socat[p])} (${plus(socatAdded)})` : "socat missing",
      chain: chain ? plus(relayAdded) : chainErr,
      ratio: socat && chain ? `${plus(relayAdded - socatAdded)} µs` : "",
    });
  }
  if (socat) row({ case: label, metric: "socat chain: max, samples/lost", direct: `${us(socat.max)}, ${socat.samples}/${socat.lost}` });
}

/**
 * One chain; the 2-site rate is measured before and after the 200-site run (198 extra tunnels
 * open, ≥ 2,000 MACs learnt) and averaged, so drift on a shared machine does not pose as a ratio.
 */
async function fanoutCase() {
  if (!haveRelay) {
    row({ case: "fan-out 1500 B", metric: "frames/s 200 vs 2 sites", chain: "relay.ts missing", target: "≥ 0.80" });
    return;
  }
  const extra = 198;
  let two: Flow[] = [];
  let many: Flow | undefined;
  let macs: number | undefined;
  let hubPorts: number | undefined;
  let err = "";
  const c = await startChain(["--qemu-listen", `${HOST}:0`], ["--qemu-listen", `${HOST}:0`]);
  try {
    const ep = {
      gen: ["--tcp-connect", `${HOST}:${c.a.port("qemu-listen")}`],
      sink: ["--tcp-connect", `${HOST}:${c.b.port("qemu-listen")}`],
    };
    const opts = { size: 1500, seconds: SECONDS, relays: { A: c.a, hub: c.hub, B: c.b } };
    two.push(await runFlow(ep, opts));
    const tunnels = await openTunnels(uplinkUrl(c.hub), TOKEN, extra, Math.ceil(2000 / extra), c.hub);
    try {
      macs = tunnels.learned;
      hubPorts = (await c.hub.status()).networks?.find((n: any) => n.name === "default")?.ports?.length;
      many = await runFlow(ep, opts);
    } finally {
      await tunnels.close();
    }
    two.push(await runFlow(ep, opts));
  } catch (e) {
    err = String(e).split("\n")[0]!.slice(0, 100);
    console.error(`fanout failed: ${e}`);
  } finally {
    await c.stop();
  }
  json.fanout = { two, many, macs, hubPorts };
  const twoFps = two.length ? two.reduce((n, f) => n + f.fps, 0) / two.length : NaN;
  row({
    case: "fan-out 1500 B",
    metric: "frames/s A→hub→B, unpaced",
    direct: two.length ? `2 sites: ${si(twoFps)} (${two.map((f) => si(f.fps)).join(", ")})` : err,
    chain: many ? `200 sites (hub ports ${hubPorts ?? "?"}, MACs ${macs ?? "?"}): ${si(many.fps)}` : err,
    ratio: two.length && many ? f2(many.fps / twoFps) : "",
    target: "≥ 0.80",
    result: two.length && many ? pass(many.fps / twoFps >= 0.8) : "",
  });
  const hubUs = (fs: Flow[]) => f2(fs.reduce((n, f) => n + f.cpu.hub!, 0) / fs.reduce((n, f) => n + f.received, 0) * 1e6);
  if (two.length && many)
    row({
      case: "fan-out 1500 B",
      metric: "lost/reord/corrupt; hub CPU µs/frame delivered",
      direct: `${two.map(errs).join(", ")}; ${hubUs(two)}`,
      chain: `${errs(many)}; ${hubUs([many])}`,
    });
}

/**
 * What observing costs: the tcp1500 chain (unpaced) plain, with a live capture client on site A's
 * `default` network reading the pcapng stream flat out, and with `--impair uplink=delay 1ms` on site
 * A. Each run gets a fresh chain; the plain run comes first and last and the ratios are to their
 * mean, so drift on a shared machine does not pose as a cost. No target: the ratio is the figure.
 */
async function observedCase() {
  const label = "tcp 1500 B observed";
  if (!haveRelay) return row({ case: label, metric: "frames/s", chain: "relay.ts missing" });
  type Run = { mode: "plain" | "capture" | "delay"; flow: Flow; capture?: any; captureStatus?: any; impair?: any };
  const runs: Run[] = [];
  for (const mode of ["plain", "capture", "delay", "plain"] as const) {
    const aArgs = ["--qemu-listen", `${HOST}:0`];
    if (mode === "delay") aArgs.push("--impair", "uplink=delay 1ms");
    const c = await startChain(aArgs, ["--qemu-listen", `${HOST}:0`]);
    let cap: Peer | undefined;
    try {
      const ep = {
        gen: ["--tcp-connect", `${HOST}:${c.a.port("qemu-listen")}`],
        sink: ["--tcp-connect", `${HOST}:${c.b.port("qemu-listen")}`],
      };
      const others: Record<string, number> = {};
      if (mode === "capture") {
        cap = new Peer("capture", ["capture", "--url", `${c.a.base}/capture?network=default`]);
        await cap.wait("ready");
        await waitUntil(async () => ((await c.a.status()).captures ?? []).length > 0, "capture attached on A", 5000);
        others.capture = cap.pid;
      }
      const flow = await runFlow(ep, { size: 1500, seconds: SECONDS, relays: { A: c.a, hub: c.hub, B: c.b }, others });
      const st = await c.a.status();
      const r: Run = { mode, flow };
      if (cap) {
        r.captureStatus = (st.captures ?? []).find((x: any) => x.network === "default");
        // The client may still be reading what the relay queued (up to 4 MiB): wait until it stops growing.
        let last = -1;
        for (let i = 0; i < 20; i++) {
          r.capture = await cap.request("report", "report");
          if (r.capture.bytes === last) break;
          last = r.capture.bytes;
          await Bun.sleep(100);
        }
      }
      if (mode === "delay") r.impair = st.impairments;
      runs.push(r);
    } catch (e) {
      console.error(`tcp1500-observed (${mode}) failed: ${e}`);
      row({ case: label, metric: `${mode}: error`, chain: String(e).split("\n")[0]!.slice(0, 120) });
    } finally {
      await cap?.stop();
      await c.stop();
    }
  }
  json["tcp1500-observed"] = runs;
  const plain = runs.filter((r) => r.mode === "plain").map((r) => r.flow);
  const plainFps = plain.length ? plain.reduce((n, f) => n + f.fps, 0) / plain.length : NaN;
  const plainText = `plain ${si(plainFps)} (${plain.map((f) => si(f.fps)).join(", ")})`;
  const cleanish = (f: Flow, extraDrops = 0) => f.lost === (f.relayDrops ?? NaN) + extraDrops && f.reordered + f.dup + f.corrupt === 0;
  row({
    case: label,
    metric: "plain (first, last): lost/reord/corrupt",
    chain: plain.map((f) => `${errs(f)} (relay drops: ${dropsText(f)})`).join("; "),
    target: "lost = relay drops",
    result: plain.length ? pass(plain.every((f) => cleanish(f))) : "",
  });
  for (const [i, f] of plain.entries()) {
    row({ case: label, metric: `plain ${i + 1}: relay CPU µs/frame delivered, user + kernel`, chain: perFrame(f, ["A", "hub", "B"]) });
    if (f.path) row({ case: label, metric: `plain ${i + 1}: path`, chain: f.path });
  }
  for (const r of runs) {
    if (r.mode === "plain") continue;
    const f = r.flow;
    const what = r.mode === "capture" ? "+ live capture on A (read flat out)" : "+ --impair uplink=delay 1ms on A";
    row({ case: label, metric: `frames/s unpaced, ${what}`, direct: plainText, chain: si(f.fps), ratio: f2(f.fps / plainFps) });
    const impDrops = r.impair ? (r.impair as any[]).reduce((n, i) => n + (i.rateDropped ?? 0) + (i.lost ?? 0), 0) : 0;
    row({
      case: label,
      metric: `${r.mode}: lost/reord/corrupt`,
      chain: `${errs(f)} (relay drops: ${dropsText(f)}${r.impair ? `; impairment drops ${si(impDrops)}` : ""})`,
      target: r.mode === "delay" ? "lost = drops, 0 reord, 0 corrupt" : "lost = relay drops",
      result: pass(cleanish(f, impDrops)),
    });
    if (r.mode === "capture") {
      const c = r.capture ?? {};
      const s = r.captureStatus ?? {};
      const taps = (s.frames ?? 0) + (s.drops ?? 0);
      row({
        case: label,
        metric: "capture: client read; relay captured / dropped (/status captures[])",
        chain:
          `${si(c.bytes ?? NaN)}B in ${si(c.packets ?? NaN)} packet blocks (${si((c.bytes ?? NaN) / f.wall / 1e6)} MB/s over ${f1(f.wall)} s wall; ` +
          `${f2((c.packets ?? NaN) / f.sent)} per frame sent); captured ${si(s.frames ?? NaN)}, dropped ${si(s.drops ?? NaN)} ` +
          `(${f1((100 * (s.drops ?? NaN)) / taps)} % of ${si(taps)} taps)`,
      });
    }
    if (r.impair)
      row({
        case: label,
        metric: "delay: impairment counters on A (/status impairments[])",
        chain: (r.impair as any[])
          .map((i) => `${i.target}: delayed ${si(i.delayed ?? NaN)}, queue-full drops ${si(i.rateDropped ?? NaN)}, lost ${si(i.lost ?? NaN)}`)
          .join("; "),
      });
    row({
      case: label,
      metric: `${r.mode}: relay CPU µs/frame delivered, user + kernel`,
      chain: perFrame(f, r.mode === "capture" ? ["A", "hub", "B", "capture"] : ["A", "hub", "B"]),
    });
    if (f.path) row({ case: label, metric: `${r.mode}: path`, chain: f.path });
  }
}

/** Times flow control paused reading a port, summed over a relay's ports (closed ones too: the generator's). */
async function relayPauses(r: RelayProcess): Promise<number> {
  const s = await r.status().catch(() => undefined);
  const ports = (s?.networks ?? []).flatMap((x: any) => [...x.ports, ...x.closedPorts]);
  return ports.reduce((n: number, p: any) => n + (p.flow?.pauses ?? 0), 0);
}

/**
 * Goodput under overload with and without flow control: the unpaced 1500 B chain with
 * --flow-control on (the default) and off, each on a fresh chain, against the chain's lossless paced
 * rate: the highest rate of a descending ladder (fractions of the flow-controlled goodput) that the
 * chain without flow control carries with 0 lost and ≥ 95 % of it received.
 */
async function flowCase() {
  const label = "flow control 1500 B";
  if (!haveRelay) return row({ case: label, metric: "frames/s", chain: "relay.ts missing" });
  const run = async (mode: "on" | "off", rates: (unpaced: Flow) => number[]) => {
    const c = await startChain(["--qemu-listen", `${HOST}:0`], ["--qemu-listen", `${HOST}:0`], ["--flow-control", mode]);
    try {
      const ep = { gen: ["--tcp-connect", `${HOST}:${c.a.port("qemu-listen")}`], sink: ["--tcp-connect", `${HOST}:${c.b.port("qemu-listen")}`] };
      const relays = { A: c.a, hub: c.hub, B: c.b };
      const unpaced = await runFlow(ep, { size: 1500, seconds: SECONDS, relays });
      const pauses = await Promise.all(c.all.map(relayPauses));
      const paced: { rate: number; flow: Flow }[] = [];
      for (const rate of rates(unpaced)) {
        const flow = await runFlow(ep, { size: 1500, seconds: SECONDS, relays, genRate: rate });
        paced.push({ rate, flow });
        if (flow.lost === 0 && flow.fps >= rate * 0.95) break;
      }
      return { unpaced, pauses, paced };
    } finally {
      await c.stop();
    }
  };
  let on: Awaited<ReturnType<typeof run>> | undefined;
  let off: Awaited<ReturnType<typeof run>> | undefined;
  try {
    on = await run("on", () => []);
    const goodput = on.unpaced.fps;
    off = await run("off", () => [1.2, 1, 0.85, 0.7, 0.55, 0.4, 0.25].map((f) => Math.round(goodput * f)));
  } catch (e) {
    console.error(`flow failed: ${e}`);
    return row({ case: label, metric: "error", chain: String(e).split("\n")[0]!.slice(0, 120) });
  }
  json.flow = { on, off };
  const lossless = off.paced.find((p) => p.flow.lost === 0 && p.flow.fps >= p.rate * 0.95);
  const ladder = off.paced.map((p) => `${si(p.rate)}/s → ${si(p.flow.fps)}, lost ${si(p.flow.lost)}`).join("; ");
  row({
    case: label,
    metric: "lossless paced rate, flow control off (ladder: offered → received, lost)",
    chain: lossless ? `${si(lossless.flow.fps)} (${ladder})` : `below ${si(off.paced.at(-1)?.rate ?? NaN)} (${ladder})`,
  });
  const L = lossless?.flow.fps ?? 0;
  for (const [mode, r] of [["on", on], ["off", off]] as const) {
    const f = r.unpaced;
    row({
      case: label,
      metric: `frames/s unpaced, flow control ${mode} / lossless paced rate`,
      direct: lossless ? si(L) : "n/a",
      chain: si(f.fps),
      ratio: L ? f2(f.fps / L) : "",
      target: mode === "on" ? "unpaced ≥ paced lossless" : "",
      result: mode === "on" ? pass(f.fps >= L) : "",
    });
    row({
      case: label,
      metric: `flow control ${mode}: sent, lost/reord/corrupt; pauses per relay`,
      chain: `${si(f.sent)}, ${errs(f)} (relay drops: ${dropsText(f)}); pauses ${["A", "hub", "B"].map((k, i) => `${k} ${si(r.pauses[i]!)}`).join(", ")}`,
      target: "lost = relay drops",
      result: pass(f.lost === f.relayDrops && f.reordered + f.dup + f.corrupt === 0),
    });
    row({ case: label, metric: `flow control ${mode}: relay CPU µs/frame delivered, user + kernel`, chain: perFrame(f, ["A", "hub", "B"]) });
    if (f.path) row({ case: label, metric: `flow control ${mode}: path`, chain: f.path });
  }
  if (on.unpaced.fps && off.unpaced.fps)
    row({ case: label, metric: "unpaced goodput, on / off", chain: `${si(on.unpaced.fps)} / ${si(off.unpaced.fps)}`, ratio: f2(on.unpaced.fps / off.unpaced.fps) });
}

/** One relay, no tunnel: gen and sink are two QEMU ports of the same switch. */
async function localCase() {
  if (!haveRelay) return row({ case: "local switch 1500 B", metric: "frames/s", chain: "relay.ts missing" });
  const r = await spawnRelay(["--http", `${HOST}:0`, "--qemu-listen", `${HOST}:0`], relayOptions("local"));
  try {
    const ep = { gen: ["--tcp-connect", `${HOST}:${r.port("qemu-listen")}`], sink: ["--tcp-connect", `${HOST}:${r.port("qemu-listen")}`] };
    const un = await runFlow(ep, { size: 1500, seconds: SECONDS, relays: { relay: r } });
    const pa = await runFlow(ep, { size: 1500, seconds: SECONDS, relays: { relay: r }, genRate: 500_000 });
    json.local = { unpaced: un, paced: pa };
    const per = (f: Flow) => perFrame(f, ["relay"]).replace(/^relay /, "");
    row({
      case: "local switch 1500 B",
      metric: "unpaced: frames/s; lost/reord/corrupt; relay µs/frame user + kernel",
      chain: `${si(un.fps)}; ${errs(un)} (drops ${si(un.relayDrops ?? NaN)}); ${per(un)}`,
    });
    row({
      case: "local switch 1500 B",
      metric: "paced 500k/s: sent → received frames/s; lost/reord/corrupt; relay µs/frame user + kernel",
      chain: `${si(pa.offered)} → ${si(pa.fps)}; ${errs(pa)} (drops ${si(pa.relayDrops ?? NaN)}); ${per(pa)}`,
    });
  } finally {
    await r.stop();
  }
}

async function selftestCase() {
  const p = Bun.spawn([process.execPath, new URL("./selftest.ts", import.meta.url).pathname], { stdout: "pipe", stderr: "inherit" });
  const out = (await new Response(p.stdout as ReadableStream).text()).trim();
  const code = await p.exited;
  row({ case: "sink self-test", metric: "1 reordered, 1 dup, 3 damaged in split chunks", chain: out, result: pass(code === 0) });
}

async function memoryCase() {
  if (!haveRelay) {
    row({ case: "memory", metric: "RSS MB", chain: "relay.ts missing" });
    return;
  }
  const c = await startChain(["--qemu-listen", `${HOST}:0`], ["--qemu-listen", `${HOST}:0`]);
  let vms: Peer | undefined;
  try {
    const rss = () => Object.fromEntries(Object.entries({ A: c.a, hub: c.hub, B: c.b }).map(([k, r]) => [k, rssMB(r.proc.pid)]));
    const bare = rss();
    vms = new Peer("vms", ["vms", "--tcp-connect", `${HOST}:${c.a.port("qemu-listen")}`, "--count", "100"]);
    await vms.wait("ready", 30_000);
    await Bun.sleep(1500); // let floods settle and the GC run
    Bun.gc(true);
    const idle = rss();
    const st = await c.a.status().catch(() => undefined);
    const portsA = st?.networks?.reduce?.((n: number, x: any) => n + (x.ports?.length ?? 0), 0);
    const fmt = (r: Record<string, number>) => ["A", "hub", "B"].map((k) => `${k} ${f1(r[k])}`).join(", ");
    row({ case: "memory", metric: "RSS MB idle, no VMs", chain: fmt(bare) });
    const maxIdle = Math.max(...Object.values(idle));
    row({
      case: "memory",
      metric: `RSS MB idle, 100 VMs on A (A ports ${portsA ?? "?"})`,
      chain: fmt(idle),
      target: "≤ 60 each",
      result: pass(maxIdle <= 60),
    });
    // Overload: the generator sends 10× what the sink reads.
    const sinkRate = 20_000;
    const over = await runFlow(
      {
        gen: ["--tcp-connect", `${HOST}:${c.a.port("qemu-listen")}`],
        sink: ["--tcp-connect", `${HOST}:${c.b.port("qemu-listen")}`],
      },
      { size: 1500, seconds: OVERLOAD_SECONDS, genRate: sinkRate * 10, sinkRate, relays: { A: c.a, hub: c.hub, B: c.b }, sampleRss: true },
    );
    json.memory = { bare, idle, overload: over };
    const maxOver = Math.max(...Object.values(over.rssMax!));
    row({
      case: "memory",
      metric: `RSS MB max, ${OVERLOAD_SECONDS} s overload (gen ${si(sinkRate * 10)}/s → sink ${si(sinkRate)}/s)`,
      chain: fmt(over.rssMax!),
      target: "≤ 150 each",
      result: pass(maxOver <= 150),
    });
    row({
      case: "memory",
      metric: "overload sent/received/lost; relay drops",
      chain: `${si(over.sent)}/${si(over.received)}/${si(over.lost)}; ${si(over.relayDrops ?? NaN)}; reord ${over.reordered + over.dup}, corrupt ${over.corrupt}`,
    });
    if (over.path) row({ case: "memory", metric: "overload path", chain: over.path });
  } finally {
    await vms?.stop();
    await c.stop();
  }
}

/**
 * Two hubs sharing the network through a local nats-server: site A → hub 1 → NATS → hub 2 → site B,
 * unpaced 1500 B, against the single-hub chain (site A → hub → site B) in the same run.
 */
async function backplaneCase() {
  const label = "backplane 1500 B";
  if (!haveRelay) return row({ case: label, metric: "frames/s", chain: "relay.ts missing" });
  const listen = ["--qemu-listen", `${HOST}:0`];
  const flowThrough = async (a: RelayProcess, b: RelayProcess, relays: Record<string, RelayProcess>, others?: Record<string, number>) =>
    runFlow({ gen: ["--tcp-connect", `${HOST}:${a.port("qemu-listen")}`], sink: ["--tcp-connect", `${HOST}:${b.port("qemu-listen")}`] }, { size: 1500, seconds: SECONDS, relays, others });
  const single = await startChain(listen, listen);
  let one: Flow;
  try {
    one = await flowThrough(single.a, single.b, { A: single.a, hub: single.hub, B: single.b });
  } finally {
    await single.stop();
  }
  await using nats = await startNats();
  const started: RelayProcess[] = [];
  let two: Flow;
  let three: Flow;
  let perMessage = NaN;
  try {
    const hubArgs = ["--http", `${HOST}:0`, "--token", TOKEN, "--backplane", nats.url];
    const hub1 = await spawnRelay(hubArgs, relayOptions("hub1"));
    started.push(hub1);
    const hub2 = await spawnRelay(hubArgs, relayOptions("hub2"));
    started.push(hub2);
    const a = await spawnRelay(["--http", `${HOST}:0`, ...listen, "--uplink", uplinkUrl(hub1), "--uplink-token", TOKEN], relayOptions("A"));
    started.push(a);
    const b = await spawnRelay(["--http", `${HOST}:0`, ...listen, "--uplink", uplinkUrl(hub2), "--uplink-token", TOKEN], relayOptions("B"));
    started.push(b);
    await waitUntil(async () => {
      const [s1, s2] = [(await hub1.status()).backplane, (await hub2.status()).backplane];
      return s1.networks.includes("default") && s2.networks.includes("default");
    }, "both hubs subscribed to the network", 15_000);
    two = await flowThrough(a, b, { A: a, hub1, hub2, B: b }, { nats: nats.proc.pid });
    const s1 = await hub1.status();
    const port = s1.networks[0].ports.find((p: any) => p.kind === "backplane");
    perMessage = port.tx.frames / s1.backplane.messagesOut;
    // A third hub with a site on the network but no traffic of its own: it hears all of A → B's
    // unicast and drops it. What it and nats-server spend on that is what per-hub subjects would save.
    const hub3 = await spawnRelay(hubArgs, relayOptions("hub3"));
    started.push(hub3);
    const c = await spawnRelay(["--http", `${HOST}:0`, ...listen, "--uplink", uplinkUrl(hub3), "--uplink-token", TOKEN], relayOptions("C"));
    started.push(c);
    await waitUntil(async () => (await hub3.status()).backplane.networks.includes("default"), "hub 3 subscribed to the network", 15_000);
    three = await flowThrough(a, b, { A: a, hub1, hub2, hub3, B: b }, { nats: nats.proc.pid });
  } finally {
    await Promise.all(started.map((r) => r.stop()));
  }
  json.backplane = { single: one, backplane: two, thirdHub: three };
  const ok = two.reordered + two.dup + two.corrupt === 0;
  row({
    case: label,
    metric: "frames/s unpaced: single hub → two hubs over NATS",
    direct: si(one.fps),
    chain: si(two.fps),
    ratio: f2(two.fps / one.fps),
    target: "≥ 0.50, 0 reord/corrupt",
    result: pass(two.fps / one.fps >= 0.5 && ok),
  });
  row({
    case: label,
    metric: "lost/reord/corrupt (relay drops)",
    direct: `${errs(one)} (${dropsText(one)})`,
    chain: `${errs(two)} (${dropsText(two)})`,
    target: "lost = relay drops",
    result: pass(two.lost === two.relayDrops && ok),
  });
  if (two.path) row({ case: label, metric: "path", chain: two.path });
  row({ case: label, metric: "nats-server (the first on PATH)", chain: new TextDecoder().decode(Bun.spawnSync(["nats-server", "--version"]).stdout).trim() });
  row({ case: label, metric: "frames per NATS message (hub 1)", chain: f1(perMessage) });
  const perM = (f: Flow, k: string) => (f.received ? (f.cpu[k]! / f.received) * 1e6 : NaN);
  row({
    case: label,
    metric: "relay CPU µs/frame delivered, user + kernel",
    direct: perFrame(one, ["A", "hub", "B"]),
    chain: perFrame(two, ["A", "hub1", "hub2", "B", "nats"]),
  });
  row({
    case: label,
    metric: "frames/s with a third hub on the network (idle site): two hubs → three",
    direct: si(two.fps),
    chain: `${si(three.fps)}; ${errs(three)} (${dropsText(three)})`,
    ratio: f2(three.fps / two.fps),
  });
  row({
    case: label,
    metric: "third hub: CPU µs/frame it dropped; nats-server µs/frame, two hubs → three",
    chain: `hub3 ${f2(perM(three, "hub3"))}; nats ${f2(perM(two, "nats"))} → ${f2(perM(three, "nats"))}`,
  });
}

const SCALE_TUNNELS = Number(process.env.BENCH_SCALE_TUNNELS ?? 10_000);
const SCALE_V86 = Number(process.env.BENCH_SCALE_V86 ?? 10_000);
const SCALE_RECONNECT = Number(process.env.BENCH_SCALE_RECONNECT ?? 1_000);
const SCALE_CLIENTS = Number(process.env.BENCH_SCALE_CLIENTS ?? 4);
const TUNNELS_SCRIPT = new URL("./tunnels.ts", import.meta.url).pathname;

/** Milliseconds of each of `n` GETs of `path` (one at a time), and the size of the last answer. */
async function timeGets(base: string, path: string, n = 5): Promise<{ ms: number[]; bytes: number }> {
  const ms: number[] = [];
  let bytes = 0;
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    const res = await fetch(base + path);
    const body = await res.arrayBuffer();
    ms.push(performance.now() - t);
    if (!res.ok) throw new Error(`GET ${path}: ${res.status}`);
    bytes = body.byteLength;
  }
  return { ms, bytes };
}

const quantile = (xs: number[], q: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)]! : NaN;
};

/** Open files a process may have (soft limit), from /proc. */
function fdLimit(pid: number): number {
  const s = require("node:fs").readFileSync(`/proc/${pid}/limits`, "utf8") as string;
  return Number(/Max open files\s+(\d+)/.exec(s)?.[1] ?? NaN);
}

/**
 * Connection scale: one hub, SCALE_TUNNELS idle tunnels (one network each, `sN`) and SCALE_V86 idle
 * v86 WebSockets (on the same networks) from load-client processes; the hub's RSS per connection,
 * /status and /metrics latency with all of them up, the hub's CPU while idle (its timers), and
 * hello→welcome while SCALE_RECONNECT sites drop and dial again at once.
 */
async function scaleCase() {
  const label = "scale";
  if (!haveRelay) {
    row({ case: label, metric: "RSS per idle tunnel", chain: "relay.ts missing", target: "≤ 20 KB" });
    return;
  }
  const most = 1_000_000;
  const hub = await spawnRelay(
    ["--http", `${HOST}:0`, "--token", TOKEN, "--name", "hub", "--max-tunnels", String(most), "--max-tunnels-per-address", String(most), "--max-networks", String(most)],
    relayOptions("scale-hub"),
  );
  const clients: Peer[] = [];
  try {
    const pid = hub.proc.pid;
    // Each connection is a descriptor in the hub; the hard limit here cannot be raised (no CAP_SYS_RESOURCE).
    const fds = fdLimit(pid);
    const tunnelsWanted = Math.min(SCALE_TUNNELS, fds - 100);
    const v86Wanted = Math.min(SCALE_V86, fds - tunnelsWanted - 100);
    await Bun.sleep(1000);
    const rss0 = rssMB(pid);
    const emptyStatus = await timeGets(hub.base, "/status");
    const spawnClients = async (kind: "tunnel" | "v86", total: number) => {
      const mine: Peer[] = [];
      const per = Math.ceil(total / SCALE_CLIENTS);
      for (let k = 0, first = 0; first < total; k++, first += per) {
        const n = Math.min(per, total - first);
        mine.push(new Peer(`${kind}-${k}`, ["idle", "--url", hub.base, "--token", TOKEN, "--kind", kind, "--count", String(n), "--first", String(first)], TUNNELS_SCRIPT));
      }
      clients.push(...mine);
      const t = performance.now();
      const ready = await Promise.all(mine.map((p) => p.wait("ready", 600_000)));
      return { mine, ready, seconds: (performance.now() - t) / 1000 };
    };
    const tunnels = await spawnClients("tunnel", tunnelsWanted);
    await Bun.sleep(3000); // let the hub's allocations settle (no way to force its GC from here)
    const rss1 = rssMB(pid);
    const v86 = v86Wanted > 0 ? await spawnClients("v86", v86Wanted) : undefined;
    await Bun.sleep(3000);
    const rss2 = rssMB(pid);
    const st = await hub.status();
    const perTunnelKB = ((rss1 - rss0) * 1024) / tunnelsWanted;
    const perV86KB = v86Wanted > 0 ? ((rss2 - rss1) * 1024) / v86Wanted : NaN;
    row({
      case: label,
      metric: `hub RSS per idle tunnel (${si(tunnelsWanted)} tunnels, one network each)`,
      chain: `${f1(perTunnelKB)} KB (RSS ${f1(rss0)} → ${f1(rss1)} MB; connected in ${f1(tunnels.seconds)} s)`,
      target: "≤ 20 KB",
      result: pass(perTunnelKB <= 20),
    });
    row({
      case: label,
      metric: `hub RSS per idle v86 port (${si(v86Wanted)} on the same networks)`,
      chain: v86 ? `${f1(perV86KB)} KB (RSS → ${f1(rss2)} MB; connected in ${f1(v86.seconds)} s)` : "none: no descriptors left",
      target: "≤ 20 KB",
      result: v86 ? pass(perV86KB <= 20) : "",
    });
    if (v86Wanted < SCALE_V86) row({ case: label, metric: "v86 ports opened", chain: `${v86Wanted} of ${SCALE_V86}: the hub's open-file limit is ${fds}` });
    const ports = st.limits?.tunnels;
    const statusNow = await timeGets(hub.base, "/status");
    const statusAll = await timeGets(hub.base, "/status?networks=all", 3);
    const metrics = await timeGets(hub.base, "/metrics");
    const ms = (t: { ms: number[]; bytes: number }) => `median ${f1(quantile(t.ms, 0.5))} ms, max ${f1(Math.max(...t.ms))} ms (${si(t.bytes)}B)`;
    const within = (t: { ms: number[] }) => Math.max(...t.ms) <= 200;
    row({ case: label, metric: "GET /status, nothing connected", chain: ms(emptyStatus) });
    row({ case: label, metric: `GET /status, all connected (${st.limits?.networks} networks, ${ports} tunnels)`, chain: ms(statusNow), target: "≤ 200 ms", result: pass(within(statusNow)) });
    row({ case: label, metric: "GET /status?networks=all (every network in full)", chain: ms(statusAll) });
    row({ case: label, metric: "GET /metrics, all connected", chain: ms(metrics), target: "≤ 200 ms", result: pass(within(metrics)) });
    // The hub's timers with everything idle: CPU over 10 s.
    const cpu0 = cpuSeconds(pid);
    await Bun.sleep(10_000);
    const idleCpu = (cpuSeconds(pid) - cpu0) / 10;
    row({ case: label, metric: "hub CPU while idle (timers, pings), % of a core", chain: `${f1(idleCpu * 100)} %` });
    // Sites dropping and dialing again at once (a hub restart as the sites see it), spread over the clients.
    const each = Math.ceil(SCALE_RECONNECT / tunnels.mine.length);
    const froms = tunnels.mine.map((p) => p.events.length);
    const cpu1 = cpuSeconds(pid);
    const clientCpu = () => tunnels.mine.reduce((n, p) => n + cpuSeconds(p.pid), 0);
    const clientCpu1 = clientCpu();
    tunnels.mine.forEach((p) => p.send(`reconnect ${each}`));
    const back = await Promise.all(tunnels.mine.map((p, i) => p.wait("reconnected", 120_000, froms[i])));
    const reconnectCpu = cpuSeconds(pid) - cpu1;
    const reconnectClientCpu = clientCpu() - clientCpu1;
    const hello = back.flatMap((e) => e.helloMs as number[]);
    const open = back.flatMap((e) => e.openMs as number[]);
    const p99 = quantile(hello, 0.99);
    row({
      case: label,
      metric: `hello→welcome while ${hello.length} sites reconnect at once (${si(tunnelsWanted + v86Wanted)} connections up)`,
      chain: `p50 ${f1(quantile(hello, 0.5))} ms, p99 ${f1(p99)} ms, max ${f1(Math.max(...hello))} ms; dial→open p99 ${f1(quantile(open, 0.99))} ms; all back in ${f1(Math.max(...back.map((e) => e.seconds)))} s; CPU: hub ${f2(reconnectCpu)} s, the ${back.length} clients ${f2(reconnectClientCpu)} s`,
      target: "p99 ≤ 10 ms",
      result: pass(p99 <= 10),
    });
    json.scale = { tunnels: tunnelsWanted, v86: v86Wanted, rss: [rss0, rss1, rss2], perTunnelKB, perV86KB, emptyStatus, statusNow, statusAll, metrics, idleCpu, hello, open, reconnectCpu, reconnectClientCpu };
  } finally {
    await Promise.all(clients.map((c) => c.stop()));
    await hub.stop();
  }
}

// ------------------------------------------------------------------------------------ transport
const TRANSPORT = new URL("./transport.ts", import.meta.url).pathname;
const TRANSPORT_SECONDS = Number(process.env.BENCH_TRANSPORT_SECONDS ?? 2.5);

interface Leg {
  mbps: number;
  frames: number;
  /** CPU µs per frame, user and kernel, of the sender (s) and the receiver (r). */
  su: number;
  sk: number;
  ru: number;
  rk: number;
}

/** One transport, flat out for TRANSPORT_SECONDS after half a second's warm-up: MB/s and each end's CPU per frame. */
async function transportLeg(kind: string, messageBytes: number, framesPerMessage: number, cert: { ca: string; pem: string }): Promise<Leg> {
  const tls = kind === "wss" || kind === "tls";
  const recv = new Peer(`transport-recv-${kind}`, ["recv", kind, ...(tls ? [cert.pem] : [])], TRANSPORT);
  let send: Peer | undefined;
  try {
    const { port } = await recv.wait("listening");
    send = new Peer(`transport-send-${kind}`, ["send", kind, String(port), String(messageBytes), ...(tls ? [cert.ca] : [])], TRANSPORT);
    await send.wait("connected");
    send.send("go");
    await Bun.sleep(500);
    const snap = async () => {
      const { bytes, messages } = await recv.request("count", "count");
      return { t: performance.now(), bytes: bytes as number, messages: messages as number, s: cpuSeconds(send!.pid), sSys: cpuSeconds(send!.pid, "sys"), r: cpuSeconds(recv.pid), rSys: cpuSeconds(recv.pid, "sys") };
    };
    const a = await snap();
    await Bun.sleep(TRANSPORT_SECONDS * 1000);
    const b = await snap();
    const frames = (b.messages - a.messages) * framesPerMessage;
    if (frames <= 0) throw new Error(`transport ${kind}: nothing arrived`);
    const us = (x: number) => (x / frames) * 1e6;
    return {
      mbps: (b.bytes - a.bytes) / 1e6 / ((b.t - a.t) / 1000),
      frames,
      su: us(b.s - b.sSys - (a.s - a.sSys)),
      sk: us(b.sSys - a.sSys),
      ru: us(b.r - b.rSys - (a.r - a.rSys)),
      rk: us(b.rSys - a.rSys),
    };
  } finally {
    await send?.stop();
    await recv.stop();
  }
}

/**
 * What the tunnel's transport costs a hop, without the relay: the same tunnel-sized messages one
 * way over a WebSocket (plain and TLS, Bun.serve ← Bun's client, as hub and site), a TLS stream
 * and plain TCP (Bun.listen ← Bun.connect), each end its own process; ratios against plain TCP.
 */
async function transportCase() {
  const label = "transport";
  const dir = (await Bun.$`mktemp -d /tmp/edge-relay-bench.XXXXXX`.text()).trim();
  try {
    const cert = await testCertificate(dir);
    const sizes: [string, number, number][] = [
      ["32 × 1500 B frames a message", 3 + 32 * (4 + 1500), 32],
      ["one 64 KiB frame a message", 3 + 4 + 65536, 1],
    ];
    const kinds: [string, string][] = [
      ["tcp", "plain TCP stream"],
      ["tls", "TLS stream (Bun.listen ← Bun.connect)"],
      ["ws", "WebSocket (Bun.serve ← WebSocket client)"],
      ["wss", "WebSocket over TLS"],
    ];
    const results: Record<string, Record<string, Leg>> = {};
    for (const [what, bytes, frames] of sizes) {
      const legs: Record<string, Leg> = (results[what] = {});
      for (const [kind] of kinds) legs[kind] = await transportLeg(kind, bytes, frames, cert);
      const tcp = legs.tcp!;
      for (const [kind, name] of kinds) {
        const l = legs[kind]!;
        row({
          case: label,
          metric: `${what}: ${name}: MB/s; CPU µs/frame, sender / receiver, user (u) + kernel (k)`,
          chain: `${si(l.mbps)} MB/s; sender ${f2(l.su)} u + ${f2(l.sk)} k / receiver ${f2(l.ru)} u + ${f2(l.rk)} k`,
          ratio: kind === "tcp" ? "" : `MB/s ${f2(l.mbps / tcp.mbps)}×, sender u+k ${f2((l.su + l.sk) / (tcp.su + tcp.sk))}×, receiver u+k ${f2((l.ru + l.rk) / (tcp.ru + tcp.rk))}× TCP's`,
        });
      }
    }
    json.transport = results;
  } finally {
    await Bun.$`rm -rf ${dir}`.quiet();
  }
}

// ------------------------------------------------------------------------------------ main
const loadavg = () => require("node:fs").readFileSync("/proc/loadavg", "utf8").split(" ").slice(0, 3).join(" ");
/** Other CPU-heavy programs (the machine is shared): QEMU guests and the like, by name. */
function busyOthers(): string {
  const fs = require("node:fs");
  const names: Record<string, number> = {};
  for (const pid of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(pid)) continue;
    try {
      const comm = fs.readFileSync(`/proc/${pid}/comm`, "utf8").trim();
      if (/^qemu|^cc1|^node$|^cargo|^rustc|^go$/.test(comm)) names[comm] = (names[comm] ?? 0) + 1;
    } catch {}
  }
  return Object.entries(names).map(([n, c]) => `${c}× ${n}`).join(", ");
}
const loadStart = loadavg();
const otherBusy = busyOthers();
const started = performance.now();
console.error(`bench: cases ${cases.join(", ")}; ${SECONDS} s per throughput run; relay ${haveRelay ? RELAY : "missing (baselines only)"}`);
for (const c of cases) {
  const t = performance.now();
  try {
    if (c === "tcp1500") await throughputCase(c, 1500, false, 500_000, TCP_RATE);
    else if (c === "tcp1500-observed") await observedCase();
    else if (c === "flow") await flowCase();
    else if (c === "tcp64k") await throughputCase(c, 65536, false, undefined, RATE_64K || undefined);
    else if (c === "udp") await throughputCase(c, 1500, true, undefined, UDP_RATE);
    else if (c === "latency") await latencyCase();
    else if (c === "fanout") await fanoutCase();
    else if (c === "local") await localCase();
    else if (c === "selftest") await selftestCase();
    else if (c === "memory") await memoryCase();
    else if (c === "backplane") await backplaneCase();
    else if (c === "scale") await scaleCase();
    else if (c === "transport") await transportCase();
  } catch (e) {
    console.error(`case ${c} failed: ${e}`);
    row({ case: c, metric: "error", chain: String(e).split("\n")[0]!.slice(0, 120) });
  }
  console.error(`bench: ${c} done in ${((performance.now() - t) / 1000).toFixed(1)} s`);
}
console.log(
  `\nedge-relay bench — ${new Date().toISOString()} — ${navigator.hardwareConcurrency} cores — ${((performance.now() - started) / 1000).toFixed(0)} s` +
    ` — load average at start ${loadStart}, end ${loadavg()}${otherBusy ? ` — also running: ${otherBusy}` : ""}\n`,
);
printTable();
if (jsonOut) await Bun.write(jsonOut, JSON.stringify(json, null, 2));
process.exit(0);
