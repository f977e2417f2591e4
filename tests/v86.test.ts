/**
 * The v86 endpoint (issue 11): `GET /v86/NETWORK` upgraded to a WebSocket, one bare Ethernet frame
 * per binary message each way, as v86's NIC speaks it. Plain WebSocket clients play v86 here (the
 * real emulator is in tests/vm/vm.e2e.ts); the relays are CLI processes on loopback.
 */
import { describe, expect, test } from "bun:test";
import { RateLimit } from "../relay.ts";
import {
  BROADCAST,
  attachVm,
  fromMac,
  makeFrame,
  runCli,
  sameBytes,
  tempDir,
  uplinkUp,
  waitUntil,
  type RelayProcess,
  scenario,
} from "./helpers.ts";

const TOKEN = "v86-test-secret-51c3a9";
const LAB_ONLY = "v86-lab-only-secret-e0f2";
const V86_MAC = "02:00:00:00:86:01";
const VM_MAC = "02:00:00:00:00:0b";

const wsBase = (relay: RelayProcess) => relay.base.replace(/^http/, "ws");

/** A client speaking v86's framing: every binary message it gets is one frame. */
interface V86Client extends AsyncDisposable {
  ws: WebSocket;
  messages: Uint8Array[];
  texts: string[];
  closed: Promise<{ code: number; reason: string }>;
  /** Resolves once `n` messages in all have arrived. */
  received(n: number, timeoutMs?: number): Promise<Uint8Array[]>;
}

/** Opens a WebSocket the way v86 does (no subprotocol; the token in the URL) and waits for it to open. */
async function v86Client(url: string, options: ConstructorParameters<typeof WebSocket>[1] = {}): Promise<V86Client> {
  const ws = new WebSocket(url, options);
  ws.binaryType = "arraybuffer";
  const messages: Uint8Array[] = [];
  const texts: string[] = [];
  ws.onmessage = (e) => {
    if (typeof e.data === "string") texts.push(e.data);
    else messages.push(new Uint8Array(e.data as ArrayBuffer));
  };
  const closed = new Promise<{ code: number; reason: string }>((r) => ws.addEventListener("close", (e) => r({ code: e.code, reason: e.reason })));
  await new Promise<void>((resolve, reject) => {
    ws.onopen = () => resolve();
    ws.onerror = (e) => reject(new Error((e as ErrorEvent).message || "WebSocket error"));
  });
  return {
    ws,
    messages,
    texts,
    closed,
    received: (n, timeoutMs = 5_000) => waitUntil(() => messages.length >= n && messages, `${n} messages (have ${messages.length})`, timeoutMs),
    async [Symbol.asyncDispose]() {
      if (ws.readyState !== WebSocket.CLOSED) ws.close();
      await closed;
    },
  };
}

/** Why a WebSocket dial failed: Bun says "Expected 101 status code: 401". */
async function refusal(url: string, options: ConstructorParameters<typeof WebSocket>[1] = {}): Promise<string> {
  try {
    await using client = await v86Client(url, options);
  } catch (error) {
    return (error as Error).message;
  }
  throw new Error(`${url} was accepted`);
}

/** The relay's port of kind v86 on `network` (status), once it is there. */
const v86Port = (relay: RelayProcess, network: string, index = 0) =>
  waitUntil(async () => {
    const n = (await relay.status()).networks.find((x: any) => x.name === network);
    return n?.ports.filter((p: any) => p.kind === "v86")[index];
  }, `a v86 port on ${network}`);

const noV86Port = (relay: RelayProcess) =>
  waitUntil(async () => !(await relay.status()).networks.some((n: any) => n.ports.some((p: any) => p.kind === "v86")), "the v86 port to be gone");

/** Secrets and query strings appear nowhere the relay writes. */
async function expectNoSecrets(relay: RelayProcess, ...secrets: string[]) {
  const status = JSON.stringify(await relay.status());
  const metrics = await (await fetch(`${relay.base}/metrics`)).text();
  for (const text of [relay.stdout(), relay.stderr(), status, metrics]) {
    for (const secret of secrets) expect(text).not.toContain(secret);
    expect(text).not.toContain("token=");
    expect(text).not.toContain("?token");
  }
}

describe("v86 endpoint: framing", () => {
  test("frames both ways, byte-exact, one per message, learnt and switched like any port", async () => {
    await using relay = await scenario().listen("lab").hub(TOKEN).spawn();
    await using vm = await attachVm(relay, "lab");
    await using v86 = await v86Client(`${wsBase(relay)}/v86/lab?token=${TOKEN}`);
    const port = await v86Port(relay, "lab");
    expect(port.id).toBe("lab/v86-1");
    expect(port.peer).toMatch(/^127\.0\.0\.1:\d+$/);

    // v86 → VM: a broadcast first (the switch learns V86_MAC), then unicast of every size.
    const sizes = [14, 42, 60, 64, 1514, 1518, 9000];
    const fromV86 = sizes.map((n, i) => makeFrame(i === 0 ? BROADCAST : VM_MAC, V86_MAC, n - 14));
    for (const f of fromV86) v86.ws.send(f);
    for (const f of fromV86) expect(sameBytes(await vm.frames.next(fromMac(V86_MAC)), f)).toBe(true);

    // VM → v86: unicast to the learnt MAC; each frame is one message, nothing batched or prefixed.
    const fromVm = sizes.map((n) => makeFrame(V86_MAC, VM_MAC, n - 14));
    vm.send(...fromVm);
    const got = await v86.received(fromVm.length);
    expect(got.map((m) => m.length)).toEqual(sizes);
    got.forEach((m, i) => expect(sameBytes(m, fromVm[i]!)).toBe(true));
    expect(v86.texts).toEqual([]);

    const seen = await v86Port(relay, "lab");
    expect(seen.rx).toMatchObject({ frames: sizes.length, bytes: sizes.reduce((a, b) => a + b), drops: 0 });
    expect(seen.tx).toEqual({ frames: sizes.length, bytes: sizes.reduce((a, b) => a + b), drops: 0 });
    expect(seen.macs).toBe(1);
    const status = await relay.status();
    const lab = status.networks.find((n: any) => n.name === "lab");
    expect(lab.macs.find((m: any) => m.mac === V86_MAC).port).toBe("lab/v86-1");
    expect(status.limits.memoryUsed).toBe(0);
    expect(relay.stdout()).toContain(`lab/v86-1 up: v86 ${port.peer}`);

    await v86.ws.close();
    await noV86Port(relay);
    expect(relay.stdout()).toMatch(/lab\/v86-1 down: v86 127\.0\.0\.1:\d+: peer closed/);
    await expectNoSecrets(relay, TOKEN);
  });

  test("runts and messages longer than a frame are dropped and counted; a text message closes with 1003", async () => {
    await using relay = await scenario().listen("lab").hub(TOKEN).spawn();
    await using vm = await attachVm(relay, "lab");
    await using v86 = await v86Client(`${wsBase(relay)}/v86/lab?token=${TOKEN}`);
    v86.ws.send(new Uint8Array(13));
    v86.ws.send(new Uint8Array(0));
    v86.ws.send(makeFrame(BROADCAST, V86_MAC, 69_633 - 14));
    const marker = makeFrame(BROADCAST, V86_MAC, "after the bad ones");
    v86.ws.send(marker);
    // The marker is the first thing the VM sees: nothing of the bad ones went through.
    expect(sameBytes(await vm.frames.next(), marker)).toBe(true);
    const port = await v86Port(relay, "lab");
    expect(port.rx).toMatchObject({ frames: 1, runts: 2, oversize: 1, drops: 3 });

    v86.ws.send("hello");
    expect((await v86.closed).code).toBe(1003);
    await noV86Port(relay);
    const closed = (await relay.status()).networks.find((n: any) => n.name === "lab").closedPorts.find((p: any) => p.kind === "v86");
    expect(closed).toMatchObject({ id: "lab/v86-1", errors: 1, reason: "text message (frames are binary messages)" });
    expect((await relay.status()).protocolErrors).toBe(1);
    expect(vm.frames.frames).toHaveLength(1);
  });

  test("a slow reader: its queue is bounded, the excess dropped and counted, the budget given back", async () => {
    const queueBytes = 256 * 1024;
    await using relay = await scenario().listen("lab").hub(TOKEN).with("--queue-bytes", String(queueBytes)).spawn();
    await using vm = await attachVm(relay, "lab");
    await using raw = await rawV86Client(relay, `/v86/lab?token=${TOKEN}`);
    raw.sendBinary(makeFrame(BROADCAST, V86_MAC, 46));
    await vm.frames.next(fromMac(V86_MAC));
    raw.socket.pause();
    // 40 MB toward a client that reads nothing: far beyond what the kernel's buffers hold.
    const count = 4_000;
    const frame = makeFrame(V86_MAC, VM_MAC, 10_000 - 14);
    for (let i = 0; i < count; i += 100) await vm.writeAll(encodeMany(frame, 100));
    const port = await waitUntil(async () => {
      const p = await v86Port(relay, "lab");
      return p.tx.frames + p.tx.drops === count && p;
    }, "every frame forwarded or dropped");
    expect(port.tx.drops).toBeGreaterThan(0);
    const status = await relay.status();
    expect(status.limits.memoryUsed).toBeLessThanOrEqual(queueBytes + 16 * 1024);
    raw.socket.end();
    await noV86Port(relay);
    expect((await relay.status()).limits.memoryUsed).toBe(0);
  });
});

describe("v86 endpoint: who may connect", () => {
  test("tokens: the query string or an Authorization header; wrong ones 401, counted, never logged; a forbidden network 403", async () => {
    await using dir = await tempDir();
    const config = `${dir.path}/relay.json`;
    await Bun.write(config, JSON.stringify({ tokens: [TOKEN, { token: LAB_ONLY, networks: ["lab"] }] }));
    await using relay = await scenario().with("--config", config).spawn();
    const base = wsBase(relay);
    expect(await refusal(`${base}/v86/lab?token=wrong-token-0000000000`)).toContain("401");
    expect(await refusal(`${base}/v86/lab`)).toContain("401");
    expect(await refusal(`${base}/v86/lab?token=`)).toContain("401");
    expect(await refusal(`${base}/v86/lab`, { headers: { Authorization: "Bearer wrong-token-0000000000" } })).toContain("401");
    // A header, when given, is the credential: a good token in the query does not rescue a bad header.
    expect(await refusal(`${base}/v86/lab?token=${TOKEN}`, { headers: { Authorization: "Bearer wrong-token-0000000000" } })).toContain("401");
    expect((await relay.status()).authFailures).toBe(5);
    expect(await refusal(`${base}/v86/other?token=${LAB_ONLY}`)).toContain("403");
    expect(await refusal(`${base}/v86/not%20a%20name?token=${TOKEN}`)).toContain("404");

    await using byQuery = await v86Client(`${base}/v86/lab?token=${LAB_ONLY}`);
    await using byHeader = await v86Client(`${base}/v86/other`, { headers: { Authorization: `Bearer ${TOKEN}` } });
    await v86Port(relay, "lab");
    await v86Port(relay, "other");
    expect(relay.stderr()).toContain("v86 /v86/lab: refused 127.0.0.1:");
    expect(relay.stderr()).toContain("v86 /v86/other: refused 127.0.0.1:");
    expect(relay.stderr()).toContain(": network not allowed for this token");
    await expectNoSecrets(relay, TOKEN, LAB_ONLY, "wrong-token-0000000000");
    // A network that only a v86 port brought into being goes with it, as with tunnels.
    byHeader.ws.close();
    await waitUntil(async () => !(await relay.status()).networks.some((n: any) => n.name === "other"), "network other to go");
    expect((await relay.status()).networks.map((n: any) => n.name)).toEqual(["lab"]);
  });

  test("after 10 failures an address's further wrong tokens get 429; the right token is still served", async () => {
    await using relay = await scenario().hub(TOKEN).spawn();
    for (let i = 0; i < 10; i++) expect((await fetch(`${relay.base}/v86/lab?token=wrong-token-${i}-00000000`)).status).toBe(401);
    expect(await refusal(`${wsBase(relay)}/v86/lab?token=wrong-token-x-00000000`)).toContain("429");
    await using client = await v86Client(`${wsBase(relay)}/v86/lab?token=${TOKEN}`);
    await v86Port(relay, "lab");
    const status = await relay.status();
    expect(status.authFailures).toBe(10);
    expect(status.authThrottled).toBe(1);
  });

  test("no tokens: no v86 endpoint (404); the admin token does not guard it", async () => {
    await using off = await scenario().spawn();
    expect((await fetch(`${off.base}/v86/default?token=${TOKEN}`)).status).toBe(404);
    const admin = "v86-admin-secret-9f8e7d6c";
    await using relay = await scenario().hub(TOKEN).with("--admin-token", admin).spawn();
    await using v86 = await v86Client(`${wsBase(relay)}/v86/lab?token=${TOKEN}`);
    expect((await fetch(`${relay.base}/status`)).status).toBe(401);
    const status = await (await fetch(`${relay.base}/status`, { headers: { Authorization: `Bearer ${admin}` } })).json();
    expect(status.networks.find((n: any) => n.name === "lab").ports[0].kind).toBe("v86");
  });

  test("--v86-origin: browsers from other origins get 403; listed ones and clients without an Origin connect", async () => {
    await using relay = await scenario().hub(TOKEN).with("--v86-origin", "https://lab.example.org", "--v86-origin", "http://localhost:8000/").spawn();
    const url = `${wsBase(relay)}/v86/lab?token=${TOKEN}`;
    expect(await refusal(url, { headers: { Origin: "https://evil.example.org" } })).toContain("403");
    expect(await refusal(url, { headers: { Origin: "null" } })).toContain("403");
    expect(await refusal(url, { headers: { Origin: "https://lab.example.org.evil.example" } })).toContain("403");
    // Refused before the token is looked at: no authentication failure, no throttling.
    expect(await refusal(`${wsBase(relay)}/v86/lab?token=wrong-token-0000000000`, { headers: { Origin: "https://evil.example.org" } })).toContain("403");
    expect((await relay.status()).authFailures).toBe(0);
    expect(relay.stderr()).toContain("v86 /v86/lab: refused 127.0.0.1:");
    expect(relay.stderr()).toContain("(origin https://evil.example.org): origin not allowed");

    await using fromLab = await v86Client(url, { headers: { Origin: "https://lab.example.org" } });
    await using fromLocal = await v86Client(url, { headers: { Origin: "http://localhost:8000" } });
    await using noOrigin = await v86Client(url);
    const peers = await waitUntil(async () => {
      const ports = (await relay.status()).networks.find((n: any) => n.name === "lab")?.ports ?? [];
      return ports.length === 3 && ports.map((p: any) => p.peer);
    }, "three v86 ports");
    for (const shape of [/^127\.0\.0\.1:\d+ \(origin http:\/\/localhost:8000\)$/, /^127\.0\.0\.1:\d+ \(origin https:\/\/lab\.example\.org\)$/, /^127\.0\.0\.1:\d+$/]) {
      expect(peers.filter((p: string) => shape.test(p))).toHaveLength(1);
    }
    await expectNoSecrets(relay, TOKEN);
  });

  test("option mistakes are one line naming the option", async () => {
    expect(await runCli(["--v86-origin", "https://x.example/path"])).toMatchObject({
      stderr: 'edge-relay: --v86-origin (v86Origins[0]): expected an origin such as https://example.org or http://localhost:8000, got "https://x.example/path"\n',
      code: 2,
    });
    expect(await runCli(["--v86-rate", "fast"])).toMatchObject({
      stderr: "edge-relay: --v86-rate: expected FRAMES,BYTES per second, e.g. 200,40000 (0: no limit on that count)\n",
      code: 2,
    });
    const help = (await runCli(["--help"])).stdout;
    expect(help).toContain("--v86-origin ORIGIN");
    expect(help).toContain("--v86-rate FRAMES,BYTES");
  });
});

describe("v86 endpoint: rate limit and reach", () => {
  test("--v86-rate bounds each direction of one port; the excess is dropped and counted", async () => {
    await using relay = await scenario().listen("lab").hub(TOKEN).with("--v86-rate", "20,0").spawn();
    await using vm = await attachVm(relay, "lab");
    await using v86 = await v86Client(`${wsBase(relay)}/v86/lab?token=${TOKEN}`);
    const sent = 200;
    const started = performance.now();
    for (let i = 0; i < sent; i++) v86.ws.send(makeFrame(BROADCAST, V86_MAC, `in ${i}`));
    const port = await waitUntil(async () => {
      const p = await v86Port(relay, "lab");
      return p.rx.frames + p.rx.rate === sent && p;
    }, "every frame from the client counted");
    const seconds = (performance.now() - started) / 1000;
    // A second's burst, then 20 a second.
    expect(port.rx.frames).toBeGreaterThanOrEqual(20);
    expect(port.rx.frames).toBeLessThanOrEqual(20 + Math.ceil(20 * seconds) + 1);
    expect(port.rx.rate).toBe(sent - port.rx.frames);
    await vm.frames.count(port.rx.frames);

    vm.send(...Array.from({ length: sent }, (_, i) => makeFrame(V86_MAC, VM_MAC, `out ${i}`)));
    const out = await waitUntil(async () => {
      const p = await v86Port(relay, "lab");
      return p.tx.frames + p.tx.drops === sent && p;
    }, "every frame toward the client counted");
    expect(out.tx.drops).toBeGreaterThanOrEqual(sent - 20 - Math.ceil(20 * ((performance.now() - started) / 1000)) - 1);
    expect(out.tx.frames).toBeGreaterThanOrEqual(1);
    await v86.received(out.tx.frames);
  });

  test("wss:// at the hub reaches a VM at a site, and back", async () => {
    await using dir = await tempDir();
    const cert = `${dir.path}/hub.crt`;
    const key = `${dir.path}/hub.key`;
    await Bun.$`openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ${key} -out ${cert} -days 1 -subj /CN=edge-relay-test -addext subjectAltName=IP:127.0.0.1,DNS:localhost`.quiet();
    const ca = await Bun.file(cert).text();
    await using hub = await scenario().hub(TOKEN).with("--tls-cert", cert, "--tls-key", key).spawn();
    const hubPort = hub.port("http");
    await using site = await scenario().listen("lab").uplink(`wss://127.0.0.1:${hubPort}`, TOKEN).with("--uplink-ca", cert).spawn();
    await uplinkUp(site);
    await using vm = await attachVm(site, "lab");
    await using v86 = await v86Client(`wss://127.0.0.1:${hubPort}/v86/lab?token=${TOKEN}`, { tls: { ca } });
    const hello = makeFrame(BROADCAST, V86_MAC, "hello from a browser VM");
    v86.ws.send(hello);
    expect(sameBytes(await vm.frames.next(fromMac(V86_MAC)), hello)).toBe(true);
    const reply = makeFrame(V86_MAC, VM_MAC, "hello from a QEMU VM at a site");
    vm.send(reply);
    const [got] = await v86.received(1);
    expect(sameBytes(got!, reply)).toBe(true);
    const status: any = await fetch(`${hub.base}/status`, { tls: { ca } }).then((r) => r.json());
    const lab = status.networks.find((n: any) => n.name === "lab");
    expect(lab.ports.map((p: any) => p.kind).sort()).toEqual(["tunnel", "v86"]);
    for (const text of [hub.stdout(), hub.stderr(), JSON.stringify(status)]) expect(text).not.toContain(TOKEN);
  });
});

describe("RateLimit", () => {
  test("a second's burst, then the rate; frames and bytes each bound it; a big frame overdraws rather than starves", () => {
    const frames = new RateLimit({ frames: 10, bytes: 0 }, 0);
    expect(Array.from({ length: 15 }, () => frames.allow(100, 0)).filter(Boolean)).toHaveLength(10);
    expect(frames.allow(100, 50)).toBe(false);
    expect(frames.allow(100, 100)).toBe(true);
    expect(frames.allow(100, 100)).toBe(false);
    expect(Array.from({ length: 30 }, (_, i) => frames.allow(100, 10_000 + i)).filter(Boolean)).toHaveLength(10);

    const bytes = new RateLimit({ frames: 0, bytes: 1000 }, 0);
    expect(bytes.allow(600, 0)).toBe(true);
    expect(bytes.allow(600, 0)).toBe(true); // overdrawn by 200
    expect(bytes.allow(1, 0)).toBe(false);
    expect(bytes.allow(1, 199)).toBe(false);
    expect(bytes.allow(1, 201)).toBe(true);
    const big = new RateLimit({ frames: 0, bytes: 100 }, 0);
    expect(big.allow(1500, 0)).toBe(true);
    expect(big.allow(1, 14_000)).toBe(false);
    expect(big.allow(1, 14_010)).toBe(true);
  });
});

// ───────────── a WebSocket client by hand, for a reader that stops reading ─────────────

function encodeMany(frame: Uint8Array, n: number): Uint8Array {
  const out = new Uint8Array(n * (4 + frame.length));
  for (let i = 0; i < n; i++) {
    const at = i * (4 + frame.length);
    new DataView(out.buffer).setUint32(at, frame.length);
    out.set(frame, at + 4);
  }
  return out;
}

/** A WebSocket client on a raw TCP socket: it can stop reading, which Bun's WebSocket cannot. */
async function rawV86Client(relay: RelayProcess, path: string) {
  const { promise: upgraded, resolve, reject } = Promise.withResolvers<void>();
  let head = "";
  const socket = await Bun.connect({
    hostname: "127.0.0.1",
    port: relay.port("http"),
    socket: {
      data(_s, chunk) {
        if (head.includes("\r\n\r\n")) return;
        head += new TextDecoder().decode(chunk);
        if (head.includes("\r\n\r\n")) (head.startsWith("HTTP/1.1 101") ? resolve() : reject(new Error(head)));
      },
      close() {
        reject(new Error("closed during the handshake"));
      },
    },
  });
  const key = Buffer.from(crypto.getRandomValues(new Uint8Array(16))).toString("base64");
  socket.write(`GET ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`);
  await upgraded;
  return {
    socket,
    /** One masked binary message (clients must mask). */
    sendBinary(payload: Uint8Array) {
      if (payload.length >= 126) throw new Error("short messages only");
      const mask = crypto.getRandomValues(new Uint8Array(4));
      const out = new Uint8Array(6 + payload.length);
      out[0] = 0x82;
      out[1] = 0x80 | payload.length;
      out.set(mask, 2);
      payload.forEach((b, i) => (out[6 + i] = b ^ mask[i % 4]!));
      socket.write(out);
    },
    async [Symbol.asyncDispose]() {
      socket.end();
    },
  };
}
