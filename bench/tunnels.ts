/**
 * Extra tunnel clients for the fan-out case: N WebSocket connections to a hub speaking the tunnel
 * protocol directly (see relay.ts: GET /tunnel, subprotocol edge-relay.v1, Bearer token; binary
 * messages: 0x00 + JSON control {hello|welcome|ping|pong}, 0x01 + u16 channel + (u32 BE length +
 * frame)*). Each announces network `default` and sends `macsEach` frames with distinct source MACs,
 * addressed to its own first MAC so the hub learns them without flooding.
 */
import type { RelayProcess } from "../tests/helpers.ts";
import { KIND_ANNOUNCE, buildFrame } from "./frames.ts";

const PROTOCOL = "edge-relay.v1";
const enc = new TextEncoder();
const control = (msg: object) => {
  const json = enc.encode(JSON.stringify(msg));
  const out = new Uint8Array(1 + json.length);
  out[0] = 0x00;
  out.set(json, 1);
  return out;
};

export async function openTunnels(
  hubWs: string,
  token: string,
  count: number,
  macsEach: number,
  hub: RelayProcess,
): Promise<{ learned: number | undefined; close(): Promise<void> }> {
  const url = hubWs.replace(/\/+$/, "") + "/tunnel";
  const sockets: WebSocket[] = [];
  const opened: Promise<void>[] = [];
  let rx = 0;
  for (let t = 0; t < count; t++) {
    const ws = new WebSocket(url, {
      headers: { Authorization: `Bearer ${token}` },
      protocols: [PROTOCOL],
      perMessageDeflate: false,
    } as any);
    ws.binaryType = "arraybuffer";
    sockets.push(ws);
    opened.push(
      new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`tunnel ${t}: no welcome within 15 s`)), 15_000);
        ws.onopen = () => ws.send(control({ type: "hello", version: 1, networks: ["default"] }));
        ws.onerror = (e) => reject(new Error(`tunnel ${t}: ${(e as ErrorEvent).message ?? "error"}`));
        ws.onclose = (e) => reject(new Error(`tunnel ${t}: closed ${e.code} ${e.reason}`));
        ws.onmessage = (e) => {
          const m = new Uint8Array(e.data as ArrayBuffer);
          if (m[0] !== 0x00) {
            rx++;
            return;
          }
          const c = JSON.parse(new TextDecoder().decode(m.subarray(1)));
          if (c.type === "ping") ws.send(control({ type: "pong" }));
          if (c.type !== "welcome") return;
          if (!c.accepted?.includes("default")) return reject(new Error(`tunnel ${t}: hub refused default`));
          clearTimeout(timer);
          // One data message on channel 0 with macsEach frames from distinct MACs.
          const first = Uint8Array.of(0x02, 0, 0, 0x02, t & 255, 0);
          const frames: Uint8Array[] = [];
          for (let i = 0; i < macsEach; i++) {
            const src = Uint8Array.of(0x02, 0, 0, 0x02, t & 255, i);
            frames.push(buildFrame(64, first, src, KIND_ANNOUNCE, i));
          }
          const msg = new Uint8Array(3 + frames.reduce((n, f) => n + 4 + f.length, 0));
          const view = new DataView(msg.buffer);
          msg[0] = 0x01; // data, channel 0
          let at = 3;
          for (const f of frames) {
            view.setUint32(at, f.length);
            msg.set(f, at + 4);
            at += 4 + f.length;
          }
          ws.send(msg);
          ws.onclose = null;
          resolve();
        };
      }),
    );
  }
  const close = async () => {
    for (const ws of sockets) {
      ws.onclose = null;
      ws.onerror = null;
      ws.close(1000, "bench done");
    }
    await Bun.sleep(100);
  };
  try {
    await Promise.all(opened);
  } catch (e) {
    await close();
    throw e;
  }
  // Wait until the hub learnt them all (or give up after 10 s and report what it has).
  let learned: number | undefined;
  const want = count * macsEach;
  const deadline = performance.now() + 10_000;
  while (performance.now() < deadline) {
    const s = await hub.status().catch(() => undefined);
    learned = s?.networks?.find((n: any) => n.name === "default")?.macs?.length;
    if (learned !== undefined && learned >= want) break;
    await Bun.sleep(100);
  }
  void rx;
  return { learned, close };
}

// ───────────── idle load client for the scale case (a process of its own) ─────────────
//
// `npx bun bench/tunnels.ts idle --url http://HOST:PORT --token T --kind tunnel|v86 --count N --first K`
// opens N connections, `--concurrency` at a time: tunnels announce network `sK+i` each and wait
// for the welcome; v86 sockets join `/v86/sK+i`. Then they sit idle (Bun answers the hub's pings).
// stdout: JSON events `ready` (with every hello→welcome time in ms), `reconnected`; stdin commands
// `reconnect R` (close the first R tunnels and dial them again all at once) and `quit`.

interface Idle {
  ws: WebSocket;
  /** hello sent → welcome received, ms (tunnels). */
  helloMs: number;
  /** dial → WebSocket open, ms. */
  openMs: number;
}

function dialIdle(base: string, token: string, kind: "tunnel" | "v86", network: string): Promise<Idle> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    let hello = 0;
    const ws =
      kind === "tunnel"
        ? new WebSocket(`${base}/tunnel`, { headers: { Authorization: `Bearer ${token}` }, protocols: [PROTOCOL], perMessageDeflate: false } as any)
        : new WebSocket(`${base}/v86/${network}?token=${encodeURIComponent(token)}`, { perMessageDeflate: false } as any);
    ws.binaryType = "arraybuffer";
    const timer = setTimeout(() => (ws.close(), reject(new Error(`${kind} ${network}: not up within 60 s`))), 60_000);
    const idle: Idle = { ws, helloMs: NaN, openMs: NaN };
    ws.onerror = (e) => (clearTimeout(timer), reject(new Error(`${kind} ${network}: ${(e as ErrorEvent).message ?? "error"}`)));
    ws.onclose = (e) => (clearTimeout(timer), reject(new Error(`${kind} ${network}: closed ${e.code} ${e.reason}`)));
    ws.onopen = () => {
      idle.openMs = performance.now() - t0;
      if (kind === "v86") {
        clearTimeout(timer);
        ws.onmessage = null;
        return resolve(idle);
      }
      hello = performance.now();
      // A real site names itself: the hub then treats its tunnel as a link to another relay.
      const id = Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join("");
      ws.send(control({ type: "hello", version: 1, networks: [network], id, name: `site-${network}` }));
    };
    ws.onmessage = (e) => {
      const m = new Uint8Array(e.data as ArrayBuffer);
      if (m[0] !== 0x00) return;
      const c = JSON.parse(new TextDecoder().decode(m.subarray(1)));
      if (c.type !== "welcome") return;
      idle.helloMs = performance.now() - hello;
      clearTimeout(timer);
      ws.onmessage = null;
      if (!c.accepted?.includes(network)) return reject(new Error(`tunnel ${network}: hub refused it: ${JSON.stringify(c.refused)}`));
      resolve(idle);
    };
  });
}

/** Runs `work(i)` for i < n, at most `limit` at a time. */
async function pool<T>(n: number, limit: number, work: (i: number) => Promise<T>): Promise<T[]> {
  const out: T[] = new Array(n);
  let next = 0;
  const runner = async () => {
    while (next < n) {
      const i = next++;
      out[i] = await work(i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, n) }, runner));
  return out;
}

async function idleMain(args: string[]) {
  const opt = (name: string, fallback?: string) => {
    const i = args.indexOf(`--${name}`);
    if (i >= 0) return args[i + 1]!;
    if (fallback === undefined) throw new Error(`--${name} missing`);
    return fallback;
  };
  const base = opt("url").replace(/^http/, "ws").replace(/\/+$/, "");
  const token = opt("token");
  const kind = opt("kind") as "tunnel" | "v86";
  const count = Number(opt("count"));
  const first = Number(opt("first", "0"));
  const concurrency = Number(opt("concurrency", "64"));
  const emit = (event: string, data: object) => console.log(JSON.stringify({ event, ...data }));
  const name = (i: number) => `s${first + i}`;
  const t0 = performance.now();
  const conns = await pool(count, concurrency, (i) => dialIdle(base, token, kind, name(i)));
  emit("ready", { count, seconds: (performance.now() - t0) / 1000, helloMs: conns.map((c) => c.helloMs).filter((x) => x === x) });
  let lost = 0;
  const watch = (c: Idle) => (c.ws.onclose = () => void lost++);
  conns.forEach(watch);
  for await (const line of console) {
    const [cmd, arg] = line.trim().split(/\s+/);
    if (cmd === "quit") break;
    if (cmd === "lost") emit("lost", { lost });
    if (cmd === "reconnect") {
      // A site that lost its hub dials again at once: close R tunnels, then dial all R together.
      const r = Math.min(count, Number(arg));
      for (let i = 0; i < r; i++) {
        conns[i]!.ws.onclose = null;
        conns[i]!.ws.close(1001, "reconnect");
      }
      const started = performance.now();
      const again = await Promise.all(Array.from({ length: r }, (_, i) => dialIdle(base, token, kind, name(i))));
      again.forEach((c, i) => ((conns[i] = c), watch(c)));
      emit("reconnected", { count: r, seconds: (performance.now() - started) / 1000, helloMs: again.map((c) => c.helloMs), openMs: again.map((c) => c.openMs) });
    }
  }
  for (const c of conns) (c.ws.onclose = null), c.ws.close(1000, "bench done");
  await Bun.sleep(200);
  process.exit(0);
}

if (import.meta.main) {
  const [mode, ...rest] = process.argv.slice(2);
  if (mode !== "idle") throw new Error("usage: npx bun bench/tunnels.ts idle --url URL --token T --kind tunnel|v86 --count N [--first K]");
  await idleMain(rest);
}
