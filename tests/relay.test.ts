import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { hostname } from "node:os";
import { Backoff, MAX_FRAME, TUNNEL_PROTOCOL, encodeControl, encodeFrames } from "../relay.ts";
import { ChaosProxy } from "./chaos/proxy.ts";
import {
  BROADCAST,
  type RelayProcess,
  attachVm,
  freePort,
  fromMac,
  listenStream,
  makeFrame,
  mac,
  sameBytes,
  type StreamPeer,
  spawnRelay,
  tempDir,
  uplinkUp,
  udpPeer,
  waitUntil,
  uplinkFailed,
  scenario,
  introduce,
} from "./helpers.ts";

const TOKEN = "tunnel-secret-4f9a";
const wsUrl = (relay: RelayProcess) => relay.base.replace(/^http/, "ws");

function site(hub: RelayProcess, relay = scenario()) {
  return relay.uplink(wsUrl(hub), TOKEN).spawn();
}

/** Sends broadcasts from `from` (source MAC `src`) until one arrives at `to`; resolves with the ms it took. */
async function forwarding(from: StreamPeer, to: StreamPeer, src: string, timeoutMs = 10_000): Promise<number> {
  const start = performance.now();
  const seen = fromMac(src);
  await waitUntil(() => {
    from.send(makeFrame(BROADCAST, src, "are we through?"));
    return to.frames.frames.some(seen);
  }, `a frame from ${src} forwarded`, timeoutMs);
  return performance.now() - start;
}

describe("Backoff", () => {
  test("next() doubles its ceiling from min to max and draws each wait from the ceiling's upper half, so dialers that failed together spread out", () => {
    const ceilings = [250, 500, 1_000, 2_000, 3_000, 3_000];
    const seen: number[][] = ceilings.map(() => []);
    for (let round = 0; round < 200; round++) {
      const backoff = new Backoff(250, 3_000, 30_000);
      ceilings.forEach((_, i) => seen[i]!.push(backoff.next()));
    }
    ceilings.forEach((ceiling, i) => {
      for (const wait of seen[i]!) {
        expect(wait).toBeGreaterThanOrEqual(ceiling / 2);
        expect(wait).toBeLessThanOrEqual(ceiling);
      }
      // Jitter: 200 dialers do not all wait the same, and their waits fill both halves of the band.
      expect(new Set(seen[i]!).size).toBeGreaterThan(150);
      expect(seen[i]!.some((w) => w < ceiling * 0.75) && seen[i]!.some((w) => w > ceiling * 0.75)).toBe(true);
    });
  });

  test("exhaust() waits the final backoff from then on, and reset() starts again from min", () => {
    const backoff = new Backoff(250, 3_000, 30_000);
    backoff.next();
    backoff.exhaust();
    for (let i = 0; i < 20; i++) expect(backoff.next()).toBeGreaterThanOrEqual(15_000);
    backoff.reset();
    expect(backoff.next()).toBeLessThanOrEqual(250);
  });
});

describe("relay over a hub (three CLI processes)", () => {
  let hub: RelayProcess;
  let siteA: RelayProcess;
  let siteB: RelayProcess;
  let udpB: Awaited<ReturnType<typeof udpPeer>>;

  beforeAll(async () => {
    udpB = await udpPeer();
    hub = await scenario().hub(TOKEN).spawn();
    // One at a time, so afterAll can stop whichever started if the other fails.
    siteA = await site(hub, scenario().listen().udp());
    siteB = await site(hub, scenario().listen().with("--qemu-udp", `127.0.0.1:0,127.0.0.1:${udpB.port}`));
    await Promise.all([uplinkUp(siteA), uplinkUp(siteB)]);
  });
  afterAll(async () => {
    await Promise.all([siteA?.stop(), siteB?.stop(), hub?.stop()]);
    udpB?.[Symbol.dispose]();
    for (const r of [hub, siteA, siteB]) expect(r.stdout() + r.stderr()).not.toContain(TOKEN);
  });

  test("frames cross site A → hub → site B over TCP both ways, byte-exact", async () => {
    await using vmA = await attachVm(siteA);
    await using vmB = await attachVm(siteB);
    const [A, B] = ["02:00:00:00:0a:01", "02:00:00:00:0b:01"];
    const hello = makeFrame(BROADCAST, B, "who has A?");
    vmB.send(hello);
    expect(await vmA.frames.next(fromMac(B))).toEqual(hello);
    const sizes = [60, 1514, 9014, 65_000, MAX_FRAME];
    const toB = sizes.map((n) => makeFrame(B, A, n - 14));
    vmA.send(...toB);
    for (const f of toB) expect(await vmB.frames.next(fromMac(A))).toEqual(f);
    const toA = sizes.map((n, i) => makeFrame(A, B, new Uint8Array(n - 14).fill(0x50 + i)));
    vmB.send(...toA);
    for (const f of toA) expect(await vmA.frames.next(fromMac(B))).toEqual(f);
    const status = await hub.status();
    const def = status.networks.find((n: any) => n.name === "default");
    expect(def.macs.map((m: any) => m.mac)).toEqual(expect.arrayContaining([A, B]));
  });

  test("unicast between two known MACs (the switches' cut-through): every frame arrives byte-exact and in order, and every hop counts each frame and learns both MACs", async () => {
    await using vmA = await attachVm(siteA);
    await using vmB = await attachVm(siteB);
    const [A, B] = ["02:00:00:00:0a:21", "02:00:00:00:0b:21"];
    await introduce(vmA, A, vmB, B);
    type Totals = { rx: number; rxBytes: number; tx: number; txBytes: number };
    const totals = async (relay: RelayProcess, kind: string): Promise<Totals> => {
      const ports = (await relay.status()).networks.find((n: any) => n.name === "default").ports.filter((p: any) => p.kind === kind);
      return ports.reduce((t: Totals, p: any) => ({ rx: t.rx + p.rx.frames, rxBytes: t.rxBytes + p.rx.bytes, tx: t.tx + p.tx.frames, txBytes: t.txBytes + p.tx.bytes }), { rx: 0, rxBytes: 0, tx: 0, txBytes: 0 });
    };
    const before = await Promise.all([totals(siteA, "qemu-listen"), totals(siteA, "uplink"), totals(hub, "tunnel"), totals(siteB, "uplink"), totals(siteB, "qemu-listen")]);
    // One write: whole runs of frames in each chunk, batched into tunnel messages.
    const frames = Array.from({ length: 300 }, (_, i) => makeFrame(B, A, 46 + ((i * 97) % 1400)));
    vmA.send(...frames);
    for (const f of frames) expect(await vmB.frames.next(fromMac(A))).toEqual(f);
    const bytes = frames.reduce((n, f) => n + f.length, 0);
    const after = await Promise.all([totals(siteA, "qemu-listen"), totals(siteA, "uplink"), totals(hub, "tunnel"), totals(siteB, "uplink"), totals(siteB, "qemu-listen")]);
    const delta = after.map((a, i) => ({ rx: a.rx - before[i]!.rx, rxBytes: a.rxBytes - before[i]!.rxBytes, tx: a.tx - before[i]!.tx, txBytes: a.txBytes - before[i]!.txBytes }));
    const n = frames.length;
    expect(delta).toEqual([
      { rx: n, rxBytes: bytes, tx: 0, txBytes: 0 }, // A's VM port
      { rx: 0, rxBytes: 0, tx: n, txBytes: bytes }, // A's uplink
      { rx: n, rxBytes: bytes, tx: n, txBytes: bytes }, // the hub's two tunnels
      { rx: n, rxBytes: bytes, tx: 0, txBytes: 0 }, // B's uplink
      { rx: 0, rxBytes: 0, tx: n, txBytes: bytes }, // B's VM port
    ]);
    for (const relay of [siteA, hub, siteB]) {
      const macs = (await relay.status()).networks.find((x: any) => x.name === "default").macs.map((m: any) => m.mac);
      expect(macs).toEqual(expect.arrayContaining([A, B]));
    }
  });

  test("UDP peers at both sites exchange frames byte-exact", async () => {
    using udpA = await udpPeer();
    const [UA, UB] = ["02:00:00:00:0a:02", "02:00:00:00:0b:02"];
    const first = makeFrame(BROADCAST, UA, "from A");
    udpA.send(first, siteA.port("qemu-udp"));
    expect(await udpB.frames.next(fromMac(UA))).toEqual(first);
    const reply = makeFrame(UA, UB, 60_000);
    udpB.send(reply, siteB.port("qemu-udp"));
    expect(await udpA.frames.next(fromMac(UB))).toEqual(reply);
  });

  test("frames cross between a TCP VM at one site and a UDP VM at the other", async () => {
    await using vmA = await attachVm(siteA);
    const [A, UB] = ["02:00:00:00:0a:03", "02:00:00:00:0b:03"];
    const announce = makeFrame(BROADCAST, UB, "udp here");
    udpB.send(announce, siteB.port("qemu-udp"));
    expect(await vmA.frames.next(fromMac(UB))).toEqual(announce);
    const frames = [makeFrame(UB, A, 1500), makeFrame(UB, A, 30_000)];
    vmA.send(...frames);
    for (const f of frames) expect(await udpB.frames.next(fromMac(A))).toEqual(f);
  });

  test("a hello naming a network twice is refused: it would multiply every frame", async () => {
    const ws = new WebSocket(`${wsUrl(hub)}/tunnel`, { headers: { Authorization: `Bearer ${TOKEN}` }, protocols: [TUNNEL_PROTOCOL] });
    const closed = new Promise<number>((r) => (ws.onclose = (e) => r(e.code)));
    await new Promise((r) => (ws.onopen = r));
    const errorsBefore = (await hub.status()).protocolErrors;
    ws.send(encodeControl({ type: "hello", version: 1, networks: ["default", "default"] }));
    expect(await closed).toBe(1008);
    await hub.waitForLine(/Cannot decode control message: networks: a network is named twice; closing/);
    expect((await hub.status()).protocolErrors).toBe(errorsBefore + 1);
    expect(hub.stderr().match(/named twice/g)).toHaveLength(1);
    expect((await hub.status()).networks.find((n: any) => n.name === "default").ports.map((p: any) => p.kind)).toEqual(["tunnel", "tunnel"]);
  });

  test("a network a tunnel detaches from goes from the hub at once when nothing else uses it", async () => {
    const ws = new WebSocket(`${wsUrl(hub)}/tunnel`, { headers: { Authorization: `Bearer ${TOKEN}` }, protocols: [TUNNEL_PROTOCOL] });
    ws.binaryType = "arraybuffer";
    const welcomed = new Promise((r) => (ws.onmessage = r));
    const closed = new Promise((r) => (ws.onclose = r));
    await new Promise((r) => (ws.onopen = r));
    ws.send(encodeControl({ type: "hello", version: 1, networks: ["keep-x", "drop-y"] }));
    await welcomed;
    const names = async () => (await hub.status()).networks.map((n: any) => n.name);
    expect(await names()).toEqual(expect.arrayContaining(["keep-x", "drop-y"]));
    ws.send(encodeControl({ type: "detach", networks: ["drop-y"] }));
    await waitUntil(async () => !(await names()).includes("drop-y"), "drop-y gone from the hub");
    expect(await names()).toContain("keep-x");
    ws.close();
    await closed;
    await waitUntil(async () => !(await names()).includes("keep-x"), "keep-x gone with its tunnel");
  });

  test("a malformed tunnel message closes only that tunnel, counted", async () => {
    const ws = new WebSocket(`${wsUrl(hub)}/tunnel`, {
      headers: { Authorization: `Bearer ${TOKEN}` },
      protocols: [TUNNEL_PROTOCOL],
    });
    const closed = new Promise<number>((r) => (ws.onclose = (e) => r(e.code)));
    await new Promise((r) => (ws.onopen = r));
    const errorsBefore = (await hub.status()).protocolErrors;
    ws.send(encodeControl({ type: "hello", version: 1, networks: ["default"] }));
    ws.send(Uint8Array.of(1, 0, 0, 0, 0, 0, 99, 1, 2));
    expect(await closed).toBe(1008);
    await hub.waitForLine(/overruns the message; closing/);
    expect((await hub.status()).protocolErrors).toBe(errorsBefore + 1);
    expect(hub.stderr().match(/overruns the message/g)).toHaveLength(1);
    // the sites' tunnels are untouched
    await using vmA = await attachVm(siteA);
    await using vmB = await attachVm(siteB);
    const probe = makeFrame(BROADCAST, "02:00:00:00:0a:04", "still here");
    vmA.send(probe);
    expect(await vmB.frames.next(fromMac("02:00:00:00:0a:04"))).toEqual(probe);
  });
});

describe("VM ports coming up and going down", () => {
  test("ports are numbered per network in attach order, a closed port's number is not reused, and each change is one log line", async () => {
    await using relay = await scenario().listen("lab").listen("dev").spawn();
    const ports = async () => Object.fromEntries((await relay.status()).networks.map((n: any) => [n.name, n.ports.map((p: any) => [p.id, p.peer])]));
    const lab1 = await attachVm(relay, "lab");
    await using lab2 = await attachVm(relay, "lab");
    await using dev1 = await attachVm(relay, "dev");
    expect(await ports()).toEqual({ lab: [["lab/qemu-listen-1", lab1.local], ["lab/qemu-listen-2", lab2.local]], dev: [["dev/qemu-listen-1", dev1.local]] });
    lab1.close();
    await relay.waitForLine(new RegExp(`^lab/qemu-listen-1 down: qemu-listen ${RegExp.escape(lab1.local)}: peer closed$`));
    await using lab3 = await attachVm(relay, "lab");
    expect(await ports()).toEqual({ lab: [["lab/qemu-listen-2", lab2.local], ["lab/qemu-listen-3", lab3.local]], dev: [["dev/qemu-listen-1", dev1.local]] });
    const lab = (await relay.status()).networks.find((n: any) => n.name === "lab");
    expect(lab.closedPorts).toEqual([expect.objectContaining({ id: "lab/qemu-listen-1", peer: lab1.local, state: "closed", reason: "peer closed" })]);
    await relay.waitForLine(/^lab\/qemu-listen-3 up: /);
    expect(relay.stdout().split("\n").filter((l) => / (up|down): /.test(l))).toEqual([
      `lab/qemu-listen-1 up: qemu-listen ${lab1.local}`,
      `lab/qemu-listen-2 up: qemu-listen ${lab2.local}`,
      `dev/qemu-listen-1 up: qemu-listen ${dev1.local}`,
      `lab/qemu-listen-1 down: qemu-listen ${lab1.local}: peer closed`,
      `lab/qemu-listen-3 up: qemu-listen ${lab3.local}`,
    ]);
  });

  test("a VM that resets its connection goes down with the read error as the reason", async () => {
    await using relay = await scenario().listen().spawn();
    const vm = await attachVm(relay);
    vm.reset();
    const reason = "read error: connection reset by peer (ECONNRESET)";
    await relay.waitForLine(new RegExp(`^default/qemu-listen-1 down: qemu-listen ${RegExp.escape(vm.local)}: ${RegExp.escape(reason)}$`));
    expect((await relay.status()).networks[0].closedPorts).toEqual([expect.objectContaining({ peer: vm.local, reason })]);
  });

  test("a --qemu-udp peer silent for its ageing time goes down as aged out", async () => {
    await using relay = await scenario().udp().with("--mac-ageing", "1").spawn();
    using vm = await udpPeer();
    vm.send(makeFrame(BROADCAST, "02:00:00:00:14:01", "then silence"), relay.port("qemu-udp"));
    await relay.waitForLine(new RegExp(`^default/qemu-udp-1 up: qemu-udp 127\\.0\\.0\\.1:${vm.port}$`));
    await relay.waitForLine(new RegExp(`^default/qemu-udp-1 down: qemu-udp 127\\.0\\.0\\.1:${vm.port}: aged out$`));
    expect((await relay.status()).networks[0].closedPorts).toEqual([expect.objectContaining({ peer: `127.0.0.1:${vm.port}`, reason: "aged out" })]);
  });

  test("a --qemu-udp peer pushed out of a full table goes down as evicted", async () => {
    await using relay = await scenario().udp().with("--udp-peers", "1").spawn();
    using first = await udpPeer();
    using second = await udpPeer();
    first.send(makeFrame(BROADCAST, "02:00:00:00:15:01", "first"), relay.port("qemu-udp"));
    await relay.waitForLine(/^default\/qemu-udp-1 up: /);
    second.send(makeFrame(BROADCAST, "02:00:00:00:15:02", "second"), relay.port("qemu-udp"));
    await relay.waitForLine(new RegExp(`^default/qemu-udp-1 down: qemu-udp 127\\.0\\.0\\.1:${first.port}: evicted: --udp-peers full$`));
    const net = (await relay.status()).networks[0];
    expect(net.ports.map((p: any) => [p.id, p.peer])).toEqual([["default/qemu-udp-2", `127.0.0.1:${second.port}`]]);
    expect(net.closedPorts).toEqual([expect.objectContaining({ id: "default/qemu-udp-1", reason: "evicted: --udp-peers full" })]);
  });
});

describe("site names at the hub", () => {
  test("a site's --name, or else its host name, names its tunnel in the hub's status, log and metrics", async () => {
    await using hub = await scenario().hub(TOKEN).spawn();
    await using named = await site(hub, scenario().listen().with("--name", "site-a"));
    await uplinkUp(named);
    await using unnamed = await site(hub, scenario().listen());
    await uplinkUp(unnamed);
    const [a, b] = (await hub.status()).networks[0].ports;
    const host = RegExp.escape(hostname());
    expect([a.kind, a.peer, b.kind, b.peer]).toEqual(["tunnel", expect.stringMatching(/^site-a \(127\.0\.0\.1:\d+\)$/), "tunnel", expect.stringMatching(new RegExp(`^${host} \\(127\\.0\\.0\\.1:\\d+\\)$`))]);
    for (const port of [a, b]) await hub.waitForLine(new RegExp(`^tunnel: ${RegExp.escape(port.peer)} attached \\(networks: default\\)$`));
    const metrics = await (await fetch(`${hub.base}/metrics`)).text();
    expect(metrics).toContain(`\nedge_relay_port_rx_frames_total{network="default",port="${a.id}",kind="tunnel",site="site-a"} 0\n`);
    expect(metrics).toContain(`\nedge_relay_port_tx_frames_total{network="default",port="${b.id}",kind="tunnel",site="${hostname()}"} `);
  });
});

describe("--qemu-connect", () => {
  test("dials a VM that is not listening yet, and redials after it restarts, logging state changes only", async () => {
    const port = await freePort();
    await using relay = await scenario().with("--qemu-connect", `127.0.0.1:${port}`).listen().spawn();
    await using other = await attachVm(relay);
    await waitUntil(async () => (await relay.status()).dials[0].attempts >= 3, "three failed dials");
    expect(relay.stdout().match(/cannot connect/g)).toEqual(["cannot connect"]);
    expect(relay.stdout()).toContain(`qemu-connect default: cannot connect to 127.0.0.1:${port}: connection refused (ECONNREFUSED); retrying with backoff`);
    const X = "02:00:00:00:0c:01";
    const seen = new Set<string>();
    for (let round = 1; round <= 2; round++) {
      await using vm = listenStream(port);
      const conn = await vm.accepted();
      // the relay attaches the port when its connect completes, which may come after our accept
      await waitUntil(async () => (await relay.status()).networks[0].ports.some((p: any) => p.kind === "qemu-connect" && !seen.has(p.id) && seen.add(p.id)), "a new qemu-connect port attached");
      const frame = makeFrame(BROADCAST, X, `round ${round}`);
      other.send(frame);
      expect(await conn.frames.next(fromMac(X))).toEqual(frame);
      const back = makeFrame(X, "02:00:00:00:0c:02", `reply ${round}`);
      conn.send(back);
      expect(await other.frames.next((f) => sameBytes(f, back))).toEqual(back);
      vm.stop();
      await conn.closed;
      await waitUntil(() => (relay.stdout().match(/disconnected from/g)?.length ?? 0) >= round, `disconnect #${round} logged`);
    }
    expect(relay.stdout().match(/qemu-connect default: connected to/g)?.length).toBe(2);
    expect((await relay.status()).dials[0]).toMatchObject({ target: `127.0.0.1:${port}`, network: "default" });
  });
});

describe("uplink", () => {
  test("local switching goes on while the hub is down; the uplink comes up when it appears", async () => {
    const hubPort = await freePort();
    await using siteR = await scenario().listen().uplink(`ws://127.0.0.1:${hubPort}`, TOKEN).spawn();
    await using vm1 = await attachVm(siteR);
    await using vm2 = await attachVm(siteR);
    const f = makeFrame(BROADCAST, "02:00:00:00:0d:01", "local");
    vm1.send(f);
    expect(await vm2.frames.next()).toEqual(f);
    const down = await siteR.status();
    expect(down.uplink.state).not.toBe("up");
    expect(down.uplink.lastError).toBeString();
    await using hub = await spawnRelay(["--http", `127.0.0.1:${hubPort}`, "--token", TOKEN]);
    await uplinkUp(siteR);
    expect(siteR.stderr().match(/uplink: .* retrying with backoff/g)?.length).toBe(1);
    expect(hub.stdout()).toContain("attached (networks: default)");
  });

  test("a hub killed with SIGKILL and restarted is redialled and carries frames again", async () => {
    // A port below the ephemeral range: no port-0 bind can take it while the hub is down.
    const hubArgs = ["--http", `127.0.0.1:${await freePort()}`, "--token", TOKEN];
    let hub = await spawnRelay(hubArgs);
    await using _hubs = { [Symbol.asyncDispose]: () => hub.stop("SIGKILL").then(() => {}) };
    await using siteA = await site(hub, scenario().listen());
    await using siteB = await site(hub, scenario().listen());
    await Promise.all([uplinkUp(siteA), uplinkUp(siteB)]);
    await hub.stop("SIGKILL");
    await waitUntil(async () => (await siteA.status()).uplink.state === "down", "site A notices the hub is gone");
    hub = await spawnRelay(hubArgs);
    await Promise.all([uplinkUp(siteA, 2), uplinkUp(siteB, 2)]);
    await using vmA = await attachVm(siteA);
    await using vmB = await attachVm(siteB);
    const f = makeFrame(BROADCAST, "02:00:00:00:0e:01", "after restart");
    vmA.send(f);
    expect(await vmB.frames.next(fromMac("02:00:00:00:0e:01"))).toEqual(f);
  });

  test("a stalled tunnel drops frames, counted, with bounded memory, while local switching goes on", async () => {
    await using hub = await scenario().hub(TOKEN).spawn();
    await using siteA = await site(hub, scenario().listen().with("--queue-bytes", "200000", "--keepalive", "60"));
    await using siteB = await site(hub, scenario().listen());
    await Promise.all([uplinkUp(siteA), uplinkUp(siteB)]);
    await using remote = await attachVm(siteB);
    await using sender = await attachVm(siteA);
    await using neighbour = await attachVm(siteA);
    const R = "02:00:00:00:13:01";
    remote.send(makeFrame(BROADCAST, R, "I am behind the hub"));
    await sender.frames.next(fromMac(R));
    const rss = () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${siteA.proc.pid}/status`, "utf8"))![1]) / 1024;
    const rssBefore = rss();
    hub.proc.kill("SIGSTOP");
    try {
      const burst = encodeFrames(Array.from({ length: 100 }, (_, i) => makeFrame(R, "02:00:00:00:13:02", new Uint8Array(60_000).fill(i))));
      for (let i = 0; i < 10; i++) await sender.writeAll(burst);
      const uplinkPort = await waitUntil(async () => {
        const ports = (await siteA.status()).networks[0].ports;
        const u = ports.find((p: any) => p.kind === "uplink");
        return u.tx.frames + u.tx.drops === 1000 && u;
      }, "all 1000 frames sent or dropped at the uplink");
      expect(uplinkPort.tx.drops).toBeGreaterThan(500);
      const ping = makeFrame(BROADCAST, "02:00:00:00:13:03", "still switching locally");
      neighbour.send(ping);
      expect(await sender.frames.next((f) => sameBytes(f, ping))).toEqual(ping);
      expect(rss() - rssBefore).toBeLessThan(64);
    } finally {
      hub.proc.kill("SIGCONT");
    }
  });

  test("after a 10 s hub outage the site is back within a few seconds: no dial is ever scheduled more than 3 s ahead", async () => {
    const hubArgs = ["--http", `127.0.0.1:${await freePort()}`, "--token", TOKEN];
    let hub = await spawnRelay(hubArgs);
    await using _hubs = { [Symbol.asyncDispose]: () => hub.stop("SIGKILL").then(() => {}) };
    await using siteR = await site(hub, scenario().listen());
    await uplinkUp(siteR);
    await hub.stop("SIGKILL");
    const killed = performance.now();
    let longest = 0;
    // The outage: ten seconds of refused dials, each one's next dial noted when it is scheduled,
    // until the site says (a line every 10 s) that it is still down and when it dials next.
    let said: string | undefined;
    void siteR.waitForLine(/ still down since /, 30_000).then((line) => (said = line), () => {});
    await waitUntil(async () => {
      const uplink = (await siteR.status()).uplink;
      if (uplink.nextDial) longest = Math.max(longest, Date.parse(uplink.nextDial) - Date.now());
      return performance.now() - killed >= 10_000 && said !== undefined;
    }, "ten seconds of refused dials, and a line saying so", 30_000);
    expect(longest).toBeLessThanOrEqual(3_000);
    const downSince = Date.parse(/still down since (\S+) /.exec(said!)![1]!);
    // since the outage began, not since the last failed dial
    expect(performance.now() - killed - (Date.now() - downSince)).toBeLessThan(5_000);
    expect(said).toMatch(/^uplink: ws:\/\/127\.0\.0\.1:\d+\/tunnel still down since \S+ \(\d+ dials so far; last: .+\); next dial at \d{4}-\d\d-\d\dT\S+Z$/);
    hub = await spawnRelay(hubArgs);
    const back = performance.now();
    await uplinkUp(siteR, 2);
    expect(performance.now() - back).toBeLessThan(5_000);
    expect((await siteR.status()).uplink.nextDial).toBeUndefined();
  });

  test("a hub that stops answering is closed and redialled (keepalive)", async () => {
    await using hub = await scenario().hub(TOKEN).spawn();
    await using siteR = await site(hub, scenario().listen().with("--keepalive", "0.1"));
    await uplinkUp(siteR);
    hub.proc.kill("SIGSTOP");
    try {
      await siteR.waitForLine(/uplink: .* stopped answering keepalive pings; retrying with backoff/);
    } finally {
      hub.proc.kill("SIGCONT");
    }
    await uplinkUp(siteR, 2);
  });
});

describe("tunnel takeover", () => {
  test("a hub paused past the sites' keepalive forwards between them within 2 s of continuing", async () => {
    await using hub = await scenario().hub(TOKEN).spawn();
    // A handshake deadline longer than the pause: the redial waits in the hub's accept queue.
    const siteArgs = () => scenario().listen().with("--keepalive", "0.2", "--handshake-timeout", "60");
    await using siteA = await site(hub, siteArgs());
    await using siteB = await site(hub, siteArgs());
    await Promise.all([uplinkUp(siteA), uplinkUp(siteB)]);
    await using vmA = await attachVm(siteA);
    await using vmB = await attachVm(siteB);
    await forwarding(vmA, vmB, "02:00:00:00:1a:01");
    hub.proc.kill("SIGSTOP");
    let continued = false;
    try {
      // Both sites gave up on their tunnel and dialled again while the hub still holds the old ones.
      await waitUntil(async () => {
        const [a, b] = [(await siteA.status()).uplink, (await siteB.status()).uplink];
        return a.attempts >= 2 && b.attempts >= 2 && a.state === "connecting" && b.state === "connecting";
      }, "both sites redialling");
    } finally {
      hub.proc.kill("SIGCONT");
      continued = true;
    }
    expect(continued).toBe(true);
    const [ab, ba] = [await forwarding(vmA, vmB, "02:00:00:00:1a:02"), await forwarding(vmB, vmA, "02:00:00:00:1a:03")];
    expect(ab + ba).toBeLessThan(2_000);
    const status = await hub.status();
    expect(status.loopRefusals).toBe(0);
    expect(status.networks[0].ports.filter((p: any) => p.kind === "tunnel")).toHaveLength(2);
  });

  test("a site whose path silently died, three times in a row, reconnects and forwards each time while the hub still holds the dead tunnel", async () => {
    await using hub = await scenario().hub(TOKEN).spawn();
    await using proxy = new ChaosProxy(() => Number(new URL(hub.base).port));
    await using siteA = await scenario().listen().with("--keepalive", "0.2", "--name", "site-a").uplink(`ws://127.0.0.1:${proxy.port}`, TOKEN).spawn();
    await using siteB = await site(hub, scenario().listen());
    await Promise.all([uplinkUp(siteA), uplinkUp(siteB)]);
    await using vmA = await attachVm(siteA);
    await using vmB = await attachVm(siteB);
    await forwarding(vmA, vmB, "02:00:00:00:1b:01");
    // A flapping path (Wi-Fi, NAT rebinding): each stall is noticed by the site alone, well within 30 s of the last.
    for (const round of [1, 2, 3]) {
      expect(proxy.stall()).toBe(1);
      await uplinkUp(siteA, round + 1);
      await forwarding(vmA, vmB, `02:00:00:00:1b:${round}2`, 5_000);
      await forwarding(vmB, vmA, `02:00:00:00:1b:${round}3`, 5_000);
      const uplink = (await siteA.status()).uplink;
      expect({ networks: uplink.networks, refused: uplink.refused }).toEqual({ networks: ["default"], refused: [] });
    }
    const replaced = () => hub.stdout().match(/^tunnel: site-a \(127\.0\.0\.1:\d+\) replaced by a newer tunnel from the same relay \(site-a \(127\.0\.0\.1:\d+\)\)$/gm) ?? [];
    await waitUntil(() => replaced().length >= 3, "three takeovers logged");
    expect(replaced()).toHaveLength(3);
    const status = await hub.status();
    expect(status.loopRefusals).toBe(0);
    expect(status.networks[0].ports.filter((p: any) => p.kind === "tunnel")).toHaveLength(2);
  });
});

describe("tunnel auth", () => {
  test("a wrong or missing token gets 401 before any upgrade, is counted, and is logged without the token", async () => {
    await using hub = await scenario().hub(TOKEN).spawn();
    const wrong = "not-the-token-77";
    for (const headers of [{ Authorization: `Bearer ${wrong}` }, {}] as Record<string, string>[]) {
      const res = await fetch(`${hub.base}/tunnel`, {
        headers: { ...headers, Connection: "Upgrade", Upgrade: "websocket", "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Protocol": TUNNEL_PROTOCOL },
      });
      expect(res.status).toBe(401);
    }
    await using badSite = await scenario().listen().uplink(wsUrl(hub), wrong).spawn();
    await waitUntil(async () => (await hub.status()).authFailures >= 3, "three auth failures counted");
    await badSite.waitForLine(/^uplink: ws:\/\/127\.0\.0\.1:\d+\/tunnel: the hub refused the token \(401\); retrying with backoff$/);
    const st = await waitUntil(async () => {
      const s = await badSite.status();
      return s.uplink.nextDial && s;
    }, "the redial scheduled");
    expect(st.uplink.state).toBe("down");
    expect(st.uplink.lastError).toBe("the hub refused the token (401)");
    // A wrong token will not become right: the next dial waits the longest backoff at once.
    expect(Date.parse(st.uplink.nextDial) - Date.now()).toBeGreaterThan(10_000);
    expect(st.uplink.attempts).toBe(1);
    const metrics = await (await fetch(`${hub.base}/metrics`)).text();
    expect(Number(/^edge_relay_auth_failures_total (\d+)$/m.exec(metrics)?.[1])).toBeGreaterThanOrEqual(3);
    expect(hub.stderr()).toContain("tunnel: refused 127.0.0.1:");
    expect(hub.stderr()).toContain("wrong token");
    expect(hub.stderr()).toContain("no token");
    for (const out of [hub.stdout(), hub.stderr(), badSite.stdout(), badSite.stderr(), JSON.stringify(st)]) {
      expect(out).not.toContain(wrong);
      expect(out).not.toContain(TOKEN);
    }
  });

  test("a dial to a relay without tokens says there is no tunnel endpoint there", async () => {
    await using plain = await scenario().spawn();
    await using site = await scenario().uplink(wsUrl(plain), TOKEN).spawn();
    const uplink = await uplinkFailed(site, "a refused dial");
    expect(uplink.lastError).toBe("no tunnel endpoint there (404): is the target started with --token?");
  });

  test("a token limited to network x cannot reach network y", async () => {
    await using dir = await tempDir();
    const config = `${dir.path}/hub.json`;
    await Bun.write(config, JSON.stringify({ http: "127.0.0.1:0", tokens: [{ token: "only-x-token-0001", networks: ["x"] }, TOKEN] }));
    await using hub = await spawnRelay(["--config", config]);
    const limited = await scenario().listen("x").listen("y").uplink(wsUrl(hub), "only-x-token-0001").spawn();
    await using _limited = limited;
    await using full = await site(hub, scenario().listen("x").listen("y"));
    await Promise.all([uplinkUp(limited), uplinkUp(full)]);
    expect((await limited.status()).uplink).toMatchObject({ networks: ["x"], refused: [{ network: "y", reason: "not allowed for this token" }] });
    expect(limited.stdout()).toContain("refused by the hub: y");
    const hubNets = Object.fromEntries((await hub.status()).networks.map((n: any) => [n.name, n.ports.length]));
    expect(hubNets).toEqual({ x: 2, y: 1 });

    await using ly = await attachVm(limited, "y");
    await using lx = await attachVm(limited, "x");
    await using fy = await attachVm(full, "y");
    await using fx = await attachVm(full, "x");
    // Counters, not silence over some time, tell that nothing crossed: once both y frames are
    // counted in and the x frame has gone all the way, a leaked y frame would be counted out too.
    const rxOf = async (relay: RelayProcess, net: string, peer: string) =>
      (await relay.status()).networks.find((n: any) => n.name === net).ports.find((p: any) => p.peer === peer);
    ly.send(makeFrame(BROADCAST, "02:00:00:00:0f:01", "y from limited"));
    fy.send(makeFrame(BROADCAST, "02:00:00:00:0f:02", "y from full"));
    await waitUntil(async () => (await rxOf(limited, "y", ly.local)).rx.frames === 1 && (await rxOf(full, "y", fy.local)).rx.frames === 1, "both y frames received");
    const xf = makeFrame(BROADCAST, "02:00:00:00:0f:03", "x from limited");
    lx.send(xf);
    expect(await fx.frames.next()).toEqual(xf);
    expect((await rxOf(limited, "y", ly.local)).tx.frames).toBe(0);
    expect((await rxOf(full, "y", fy.local)).tx.frames).toBe(0);
    expect([ly.frames.frames.length, fy.frames.frames.length]).toEqual([0, 0]);
    await limited.stop();
    await full.stop();
    await waitUntil(async () => (await hub.status()).networks.length === 0, "the hub forgets networks no tunnel uses");
  });
});

describe("bad input on QEMU ports", () => {
  test("an oversize length closes only that connection, counted and logged once; others keep forwarding", async () => {
    await using relay = await scenario().listen().spawn();
    await using bad = await attachVm(relay);
    await using vm1 = await attachVm(relay);
    await using vm2 = await attachVm(relay);
    bad.write(Uint8Array.of(0, 1, 0x11, 0x70, 1, 2, 3)); // length 70,000
    await bad.closed;
    const line = await relay.waitForLine(/exceeds the maximum/);
    expect(line).toMatch(/^default\/qemu-listen-1 127\.0\.0\.1:\d+: Cannot decode frame: length 70000 exceeds the maximum of 69632 bytes; closing the connection$/);
    expect(relay.stderr().match(/exceeds the maximum/g)?.length).toBe(1);
    const f = makeFrame(BROADCAST, "02:00:00:00:10:01", "after the bad one");
    vm1.send(f);
    expect(await vm2.frames.next()).toEqual(f);
    const net = (await relay.status()).networks[0];
    expect(net.ports.length).toBe(2);
    expect(net.closedPorts).toEqual([expect.objectContaining({ id: "default/qemu-listen-1", peer: bad.local, state: "closed", errors: 1, reason: "oversize frame" })]);
    await relay.waitForLine(new RegExp(`^default/qemu-listen-1 down: qemu-listen ${RegExp.escape(bad.local)}: oversize frame$`));
    expect((await relay.status()).protocolErrors).toBe(1);
    expect(await (await fetch(`${relay.base}/metrics`)).text()).toContain("edge_relay_protocol_errors_total 1");
  });

  test("0-length and runt frames are dropped and counted, never forwarded", async () => {
    await using relay = await scenario().listen().spawn();
    await using vm1 = await attachVm(relay);
    await using vm2 = await attachVm(relay);
    vm1.send(new Uint8Array(0), new Uint8Array(13));
    const real = makeFrame(BROADCAST, "02:00:00:00:11:01", "real");
    vm1.send(real);
    expect(await vm2.frames.next()).toEqual(real);
    expect(vm2.frames.frames.length).toBe(1);
    const p = (await relay.status()).networks[0].ports.find((x: any) => x.rx.drops > 0);
    expect(p.rx).toMatchObject({ frames: 1, drops: 2 });
  });

  test("a VM that stops reading gets drops, while the others keep forwarding", async () => {
    await using relay = await scenario().listen().with("--queue-bytes", "100000").spawn();
    await using slow = await attachVm(relay);
    await using sender = await attachVm(relay);
    await using other = await attachVm(relay);
    const SLOW = "02:00:00:00:12:01";
    slow.send(makeFrame(BROADCAST, SLOW, "learn me"));
    await sender.frames.next();
    slow.pause();
    const burst = Array.from({ length: 400 }, () => makeFrame(SLOW, "02:00:00:00:12:02", 60_000));
    await sender.writeAll(encodeFrames(burst));
    const ping = makeFrame("02:00:00:00:12:02", "02:00:00:00:12:03", "ping"); // to the sender only
    other.send(ping);
    expect(await sender.frames.next((f) => sameBytes(f, ping))).toEqual(ping);
    // writeAll returns once the kernel has the bytes; the relay may still be reading them.
    const slowPort = await waitUntil(async () => {
      const ports = (await relay.status()).networks[0].ports;
      return ports.find((p: any) => p.tx.drops > 0 && p.tx.frames + p.tx.drops >= 400);
    }, "all 400 frames sent or dropped on the slow port");
    expect(slowPort.tx.frames + slowPort.tx.drops).toBe(400);
    expect(slowPort.tx.frames).toBeLessThan(400);
  });
});
