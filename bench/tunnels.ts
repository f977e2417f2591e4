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
