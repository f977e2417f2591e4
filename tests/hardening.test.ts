/**
 * The hub on the internet (issue 8): every byte from a socket is hostile, networks are flaky.
 * Real CLI processes and real sockets on loopback.
 */
import { describe, expect, test } from "bun:test";
import { BUDGET_ALPHA, MemoryBudget, TUNNEL_PROTOCOL, encodeControl, encodeFrames, rateLimitedLog } from "../relay.ts";
import { ChaosProxy } from "./chaos/proxy.ts";
import { BROADCAST, attachVm, connectStream, freePort, fromMac, makeFrame, runCli, spawnRelay, tempDir, uplinkUp, waitUntil, type RelayProcess, scenario } from "./helpers.ts";

const TOKEN = "hardening-secret-7d1e";
const wsUrl = (relay: RelayProcess) => relay.base.replace(/^http/, "ws");

/** A raw tunnel client: open, then say hello (or not). */
async function tunnelClient(hub: RelayProcess, token = TOKEN) {
  const ws = new WebSocket(`${wsUrl(hub)}/tunnel`, { headers: { Authorization: `Bearer ${token}` }, protocols: [TUNNEL_PROTOCOL] });
  ws.binaryType = "arraybuffer";
  const closed = new Promise<number>((r) => (ws.onclose = (e) => r(e.code)));
  const messages: any[] = [];
  ws.onmessage = (e) => {
    const bytes = new Uint8Array(e.data as ArrayBuffer);
    if (bytes[0] === 0) messages.push(JSON.parse(new TextDecoder().decode(bytes.subarray(1))));
  };
  await new Promise((r, j) => ((ws.onopen = r), (ws.onerror = j)));
  const control = (type: string) => waitUntil(() => messages.find((m) => m.type === type), `a ${type}`);
  return { ws, closed, messages, control };
}

/** A hub that upgrades every request to the tunnel protocol and answers each message with `reply` (nothing when it returns undefined). */
function fakeHub(reply: (message: string | Buffer) => string | Uint8Array | undefined) {
  return Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    fetch: (req, server) => (server.upgrade(req, { headers: { "Sec-WebSocket-Protocol": TUNNEL_PROTOCOL } }) ? undefined : new Response("no", { status: 400 })),
    websocket: {
      message(ws, message) {
        const answer = reply(message);
        if (answer !== undefined) ws.send(answer);
      },
    },
  });
}

describe("uplink deadlines", () => {
  test("a hub that accepts TCP and never answers the handshake is dropped and redialled", async () => {
    const silent = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
    try {
      await using site = await scenario().listen().with("--keepalive", "60", "--handshake-timeout", "0.3").uplink(`ws://127.0.0.1:${silent.port}`, TOKEN).spawn();
      const uplink = await waitUntil(async () => {
        const u = (await site.status()).uplink;
        return u.attempts >= 3 && u;
      }, "three dials");
      expect(uplink.state).not.toBe("up");
      expect(uplink.lastError).toBe("no answer to the WebSocket handshake within 0.3 s");
      expect(site.stderr().match(/no answer to the WebSocket handshake/g)).toHaveLength(1);
    } finally {
      silent.stop(true);
    }
  });

  test("a hub that upgrades but sends no welcome is dropped and redialled", async () => {
    const mute = fakeHub(() => undefined);
    try {
      await using site = await scenario().with("--keepalive", "60", "--handshake-timeout", "0.3").uplink(`ws://127.0.0.1:${mute.port}`, TOKEN).spawn();
      const uplink = await waitUntil(async () => {
        const u = (await site.status()).uplink;
        return u.attempts >= 3 && u;
      }, "three dials");
      expect(uplink.lastError).toBe("no welcome within 0.3 s");
    } finally {
      mute.stop(true);
    }
  });

  test("a welcome with a forged name is a protocol error, never a forged log line", async () => {
    const forger = fakeHub(() => encodeControl({ type: "welcome", version: 1, accepted: ["default"], refused: [], name: "hub\nFAKE: admin logged in \u001b[31m" } as any));
    try {
      await using site = await scenario().uplink(`ws://127.0.0.1:${forger.port}`, TOKEN).spawn();
      await site.waitForLine(/name: expected a relay name; closing/);
      expect(site.stdout() + site.stderr()).not.toMatch(/^FAKE/m);
      expect(site.stdout() + site.stderr()).not.toContain("\u001b");
      expect((await site.status()).protocolErrors).toBeGreaterThanOrEqual(1);
    } finally {
      forger.stop(true);
    }
  });

  test("a hub that answers with a text message is a protocol error: the site closes the tunnel and counts it", async () => {
    const texter = fakeHub(() => '{"type":"welcome"}');
    try {
      await using site = await scenario().uplink(`ws://127.0.0.1:${texter.port}`, TOKEN).spawn();
      await site.waitForLine(/text messages are not part of the protocol; closing/);
      expect((await site.status()).protocolErrors).toBeGreaterThanOrEqual(1);
    } finally {
      texter.stop(true);
    }
  });
});

describe("loops", () => {
  test("a relay refuses a tunnel from itself", async () => {
    const port = await freePort();
    await using relay = await spawnRelay([
      "--http", `127.0.0.1:${port}`, "--token", TOKEN, "--qemu-listen", "127.0.0.1:0", "--uplink", `ws://127.0.0.1:${port}`, "--uplink-token", TOKEN,
    ]);
    await uplinkUp(relay);
    const status = await relay.status();
    expect(status.uplink.refused).toEqual([{ network: "default", reason: "that is this relay itself: a tunnel to itself would loop" }]);
    // Offered again every 1–60 s (a refusal may pass), refused each time.
    expect(status.loopRefusals).toBeGreaterThanOrEqual(1);
    expect(status.networks.find((n: any) => n.name === "default").ports.map((p: any) => p.kind)).toEqual([]);
  });

  test("a newer tunnel with the same relay id and token replaces the old one, five times in 30 s; one with another token, or a sixth takeover within 30 s, is refused as a loop", async () => {
    const other = "hardening-other-token-2";
    await using hub = await scenario().hub(TOKEN).hub(other).spawn();
    const hello = (name: string) => encodeControl({ type: "hello", version: 1, networks: ["default"], id: "00000000000000aa", name });
    let holder = await tunnelClient(hub);
    holder.ws.send(hello("twin"));
    expect((await holder.control("welcome")).accepted).toEqual(["default"]);
    // Another token's holder cannot push the site off with its id.
    const stranger = await tunnelClient(hub, other);
    stranger.ws.send(hello("twin"));
    expect((await stranger.control("welcome")).refused).toEqual([{ network: "default", reason: "loop: relay twin is attached to default already" }]);
    // A flapping path: each redial replaces the tunnel before it.
    for (let takeover = 1; takeover <= 5; takeover++) {
      const reason = new Promise<string>((r) => holder.ws.addEventListener("close", (e) => r(`${e.code} ${e.reason}`)));
      const newer = await tunnelClient(hub);
      newer.ws.send(hello("twin"));
      expect((await newer.control("welcome")).accepted).toEqual(["default"]);
      expect(await reason).toBe("4000 replaced by a newer tunnel from the same relay");
      holder = newer;
    }
    // Only a sustained ping-pong (an id used twice) is refused: the tunnel that holds stays.
    const sixth = await tunnelClient(hub);
    sixth.ws.send(hello("twin"));
    expect((await sixth.control("welcome")).refused).toEqual([{ network: "default", reason: "loop: relay twin replaced its tunnel 5 times in 30 s; is its id used twice?" }]);
    expect(holder.ws.readyState).toBe(WebSocket.OPEN);
    const status = await hub.status();
    expect(status.loopRefusals).toBe(2);
    expect(status.networks[0].ports.map((p: any) => p.peer)).toEqual([expect.stringMatching(/^twin \(127\.0\.0\.1:\d+\)$/)]);
    expect(hub.stdout().match(/^tunnel: twin \(127\.0\.0\.1:\d+\) replaced by a newer tunnel from the same relay \(twin \(127\.0\.0\.1:\d+\)\)$/gm)).toHaveLength(5);
    for (const c of [holder, sixth, stranger]) c.ws.close();
  });

  test("a site whose network the hub refused as a loop offers it again on the same tunnel and attaches once the loop is gone", async () => {
    const other = "hardening-other-token-3";
    await using hub = await scenario().hub(TOKEN).hub(other).spawn();
    await using proxy = new ChaosProxy(() => Number(new URL(hub.base).port));
    await using site = await scenario().listen().with("--name", "site-a").uplink(`ws://127.0.0.1:${proxy.port}`, TOKEN).spawn();
    await uplinkUp(site);
    const id = (await site.status()).id;
    const tunnels = async () => (await hub.status()).networks.find((n: any) => n.name === "default")?.ports.length ?? 0;
    // The site's tunnel goes and it cannot redial while another token's holder attaches with its id.
    proxy.refuseFor(60_000);
    proxy.cut();
    await waitUntil(async () => (await tunnels()) === 0, "the site's tunnel gone from the hub");
    const stranger = await tunnelClient(hub, other);
    stranger.ws.send(encodeControl({ type: "hello", version: 1, networks: ["default"], id, name: "site-a" }));
    expect((await stranger.control("welcome")).accepted).toEqual(["default"]);
    proxy.behave();
    await uplinkUp(site, 2);
    const refused = await waitUntil(async () => {
      const uplink = (await site.status()).uplink;
      return uplink.refused.length > 0 && uplink;
    }, "the site's network refused");
    expect({ networks: refused.networks, refused: refused.refused }).toEqual({ networks: [], refused: [{ network: "default", reason: "loop: relay site-a is attached to default already" }] });
    stranger.ws.close();
    const back = await waitUntil(async () => {
      const uplink = (await site.status()).uplink;
      return uplink.networks.length > 0 && uplink;
    }, "the network offered again and attached");
    expect({ state: back.state, connects: back.connects, networks: back.networks, refused: back.refused }).toEqual({ state: "up", connects: 2, networks: ["default"], refused: [] });
    await waitUntil(async () => (await tunnels()) === 1, "the site's tunnel attached on the hub");
    expect(site.stdout()).toContain("uplink: hub added networks: default\n");
  });

  test("two hubs uplinked to each other carry each frame once, not for ever", async () => {
    const [portA, portB] = [await freePort(), await freePort()];
    const hub = (port: number, other: number, name: string) =>
      spawnRelay([
        "--http", `127.0.0.1:${port}`, "--token", TOKEN, "--name", name, "--qemu-listen", "127.0.0.1:0", "--loop-probe", "0.2",
        "--uplink", `ws://127.0.0.1:${other}`, "--uplink-token", TOKEN,
      ]);
    await using a = await hub(portA, portB, "hub-a");
    await using b = await hub(portB, portA, "hub-b");
    await Promise.all([uplinkUp(a), uplinkUp(b)]);
    // Either one hub refused the second tunnel by id, or (had the hellos crossed) a probe blocked one link.
    await waitUntil(async () => {
      const [sa, sb] = [await a.status(), await b.status()];
      const blocked = [sa, sb].some((s) => s.networks[0].ports.some((p: any) => p.state === "blocked-loop"));
      return sa.loopRefusals + sb.loopRefusals > 0 || blocked;
    }, "the loop refused or blocked");
    await using vmA = await attachVm(a);
    await using vmB = await attachVm(b);
    const X = "02:00:00:00:51:01";
    vmA.send(makeFrame(BROADCAST, X, "once"));
    await vmB.frames.next(fromMac(X));
    const barrier = makeFrame(BROADCAST, X, "barrier");
    vmA.send(barrier);
    await vmB.frames.next((f) => f.length === barrier.length && fromMac(X)(f) && f[14] === barrier[14]);
    expect(vmB.frames.frames.filter(fromMac(X))).toHaveLength(2);
    expect(vmA.frames.frames.filter(fromMac(X))).toHaveLength(0);
    const refusedBy = [a, b].find((r) => r.stdout().includes("refused by the hub: default (loop: relay hub-"));
    if (refusedBy) expect((await refusedBy.status()).uplink.refused[0].reason).toMatch(/^loop: relay hub-[ab] is attached to default already$/);
  });

  test("two VM ports bridged outside the relay: the probe comes back, one port is blocked, the storm stops", async () => {
    await using relay = await scenario().listen().with("--loop-probe", "0.2").spawn();
    await using left = await attachVm(relay);
    await using right = await attachVm(relay);
    await using witness = await attachVm(relay);
    // The test is the bridge: every frame one side receives, probes included, it sends out of the other.
    const raw: Uint8Array[][] = [[], []];
    const pump = setInterval(() => {
      for (const [from, to, i] of [[left, right, 0], [right, left, 1]] as const) {
        while (raw[i]!.length) to.send(raw[i]!.shift()!);
        void from;
      }
    }, 1);
    const tap = (peer: typeof left, i: number) => {
      const push = peer.frames.push.bind(peer.frames);
      peer.frames.push = (f: Uint8Array) => (raw[i]!.push(new Uint8Array(f)), push(f));
    };
    tap(left, 0);
    tap(right, 1);
    // The helper hides probes from tests; the bridge must see them, so tap below that filter.
    try {
      const blocked = await waitUntil(async () => {
        const ports = (await relay.status()).networks[0].ports;
        return ports.find((p: any) => p.state === "blocked-loop");
      }, "a port blocked for the loop");
      expect([left.local, right.local]).toContain(blocked.peer);
      await relay.waitForLine(/^network default: loop detected \(a probe sent out of default\/qemu-listen-\d+ came back on default\/qemu-listen-\d+\); blocking default\/qemu-listen-\d+ 127\.0\.0\.1:\d+ for 60 s$/);
      expect((await relay.status()).loopsDetected).toBe(1);
      const open = blocked.peer === left.local ? right : left;
      const Y = "02:00:00:00:52:01";
      witness.send(makeFrame(BROADCAST, Y, "once only"));
      const marker = makeFrame(BROADCAST, "02:00:00:00:52:02", "marker");
      witness.send(marker);
      await open.frames.next(fromMac("02:00:00:00:52:02"));
      // The open side's copy went round the bridge into the blocked port, and stopped there.
      const counted = await waitUntil(async () => {
        const p = (await relay.status()).networks[0].ports.find((x: any) => x.id === blocked.id);
        return p.rx.loop >= 2 && p;
      }, "the bridged copies dropped at the blocked port");
      expect(counted.rx.frames).toBe(blocked.rx.frames);
      expect(witness.frames.frames.filter(fromMac(Y))).toHaveLength(0);
      expect(open.frames.frames.filter(fromMac(Y))).toHaveLength(1);
    } finally {
      clearInterval(pump);
    }
  });
});

describe("hostile tunnel clients", () => {
  test("a hello with nested arrays or another version is closed with 1008 and counted, never welcomed", async () => {
    await using hub = await scenario().hub(TOKEN).spawn();
    for (const hello of [
      { type: "hello", version: 1, networks: ["lab", ["lab"], [["lab"]]] },
      { type: "hello", version: 99, networks: ["lab"] },
    ]) {
      const client = await tunnelClient(hub);
      client.ws.send(encodeControl(hello as any));
      expect(await client.closed).toBe(1008);
      expect(client.messages).toEqual([]);
    }
    const status = await hub.status();
    expect(status.protocolErrors).toBe(2);
    expect(status.networks).toEqual([]);
  });

  test("a message over 1 MiB (closed by Bun with 1009) is counted and logged", async () => {
    await using hub = await scenario().hub(TOKEN).spawn();
    const client = await tunnelClient(hub);
    client.ws.send(encodeControl({ type: "hello", version: 1, networks: ["lab"] }));
    await client.control("welcome");
    client.ws.send(new Uint8Array(1024 * 1024 + 16).fill(1));
    expect(await client.closed).toBe(1009);
    await hub.waitForLine(/^tunnel .*: closed for malformed WebSocket input: "Received too big message" \(close code 1006\)$/);
    expect((await hub.status()).protocolErrors).toBe(1);
  });

  test("networks, tunnels per relay and tunnels per address are limited, refused with a reason", async () => {
    await using hub = await scenario().hub(TOKEN).with("--max-networks", "2", "--max-tunnels-per-address", "2", "--max-tunnels", "3").spawn();
    const first = await tunnelClient(hub);
    first.ws.send(encodeControl({ type: "hello", version: 1, networks: ["a", "b", "c"] }));
    expect(await first.control("welcome")).toMatchObject({ accepted: ["a", "b"], refused: [{ network: "c", reason: "this relay has the maximum of 2 networks" }] });
    await tunnelClient(hub);
    const third = await fetch(`${hub.base}/tunnel`, { headers: { Authorization: `Bearer ${TOKEN}`, Upgrade: "websocket", Connection: "Upgrade", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13", "Sec-WebSocket-Protocol": TUNNEL_PROTOCOL } });
    expect([third.status, await third.text()]).toEqual([503, "127.0.0.1 has the maximum of 2 tunnels\n"]);
    const status = await hub.status();
    expect(status.limits).toMatchObject({ networks: 2, maxNetworks: 2, tunnels: 2, maxTunnels: 3, maxTunnelsPerAddress: 2 });
    expect(status.tunnelsRefused).toBe(1);
    first.ws.close();
    await first.closed;
    await waitUntil(async () => (await hub.status()).limits.networks === 0, "networks forgotten with their tunnel");
  });

  test("after repeated wrong tokens an address's further wrong ones get 429, counted; the right token still opens a tunnel", async () => {
    await using hub = await scenario().hub(TOKEN).spawn();
    for (let i = 0; i < 10; i++) expect((await fetch(`${hub.base}/tunnel`, { headers: { Authorization: `Bearer wrong-${i}-0000000000` } })).status).toBe(401);
    const blocked = await fetch(`${hub.base}/tunnel`, { headers: { Authorization: "Bearer wrong-again-0000000000" } });
    expect(blocked.status).toBe(429);
    expect(Number(blocked.headers.get("retry-after"))).toBeGreaterThan(0);
    // A site sharing the address (a NAT, a proxy) with the right token is served as ever.
    const site = await tunnelClient(hub);
    site.ws.send(encodeControl({ type: "hello", version: 1, networks: ["lab"] }));
    expect(await site.control("welcome")).toMatchObject({ accepted: ["lab"] });
    const status = await hub.status();
    expect({ authFailures: status.authFailures, authThrottled: status.authThrottled }).toEqual({ authFailures: 10, authThrottled: 1 });
    expect(await (await fetch(`${hub.base}/metrics`)).text()).toContain("edge_relay_auth_throttled_total 1");
    // The throttled attempt logged nothing: ten refusal lines, no more (all its output is in once it stopped).
    site.ws.close();
    await hub.stop();
    expect(hub.stderr().match(/tunnel: refused 127\.0\.0\.1:\d+: wrong token/g)?.length).toBe(10);
  });
});

describe("port security and budgets", () => {
  test("one VM port flooding random source MACs learns --port-macs of them; the rest are dropped and counted", async () => {
    await using relay = await scenario().listen().with("--port-macs", "256").spawn();
    await using attacker = await attachVm(relay);
    await using victim = await attachVm(relay);
    const frames = Array.from({ length: 300 }, (_, i) => makeFrame(BROADCAST, `02:aa:00:00:${(i >> 8).toString(16).padStart(2, "0")}:${(i & 0xff).toString(16).padStart(2, "0")}`));
    await attacker.writeAll(encodeFrames(frames));
    await victim.frames.count(256);
    const V = "02:00:00:00:53:01";
    victim.send(makeFrame(BROADCAST, V));
    await attacker.frames.next(fromMac(V));
    const status = await relay.status();
    const port = status.networks[0].ports.find((p: any) => p.peer === attacker.local);
    expect(port.macs).toBe(256);
    expect(port.rx.macLimit).toBe(44);
    expect(status.networks[0].macCount).toBe(257);
    expect(victim.frames.frames).toHaveLength(256);
  });

  test("the memory budget bounds what all ports together queue; beyond it frames are dropped and counted", async () => {
    await using relay = await scenario().listen().with("--memory-budget", String(1024 * 1024), "--queue-bytes", String(8 * 1024 * 1024)).spawn();
    await using slow1 = await attachVm(relay);
    await using slow2 = await attachVm(relay);
    await using sender = await attachVm(relay);
    slow1.pause();
    slow2.pause();
    await sender.writeAll(encodeFrames(Array.from({ length: 200 }, () => makeFrame(BROADCAST, "02:00:00:00:54:01", 60_000))));
    const status = await waitUntil(async () => {
      const s = await relay.status();
      return s.networks[0].ports.find((p: any) => p.peer === sender.local).rx.frames === 200 && s;
    }, "all frames received");
    expect(status.limits.memoryBudget).toBe(1024 * 1024);
    expect(status.limits.memoryDrops).toBeGreaterThan(0);
    expect(status.limits.memoryUsed).toBeLessThanOrEqual(1024 * 1024);
    const slow = status.networks[0].ports.filter((p: any) => p.peer !== sender.local);
    for (const p of slow) expect(p.tx.frames + p.tx.drops).toBe(200);
    // Each port's queue bound (8 MiB) is above the budget: every frame a slow port dropped is the budget's.
    expect(status.limits.memoryDrops).toBe(slow.reduce((sum: number, p: any) => sum + p.tx.drops, 0));
  });
});

/** Fills ports in turn, `bytes` at a time, until none of them can take more; returns what each holds. */
function fill(budget: InstanceType<typeof MemoryBudget>, ports: number, bytes: number): number[] {
  const held = Array<number>(ports).fill(0);
  for (let more = true; more; ) {
    more = false;
    for (let i = 0; i < ports; i++) {
      if (budget.take(bytes, held[i]!)) {
        held[i]! += bytes;
        more = true;
      }
    }
  }
  return held;
}

describe("the memory budget's dynamic threshold", () => {
  test("a lone port holds at most α/(1 + α) of the budget; N full ports leave 1/(1 + αN) of it free", () => {
    expect(BUDGET_ALPHA).toBe(1);
    const one = new MemoryBudget(1100);
    expect(fill(one, 1, 1)).toEqual([550]);
    expect(one.used).toBe(550);
    expect(one.drops).toBe(1);
    const ten = new MemoryBudget(1100);
    expect(fill(ten, 10, 1)).toEqual(Array(10).fill(100));
    expect(ten.limit - ten.used).toBe(100);
    // A port that holds nothing still gets its share of what is left: half of it.
    expect(fill(ten, 1, 1)).toEqual([50]);
  });

  test("N stuck ports leave about 1/(1 + αN) of the budget free, room for a healthy port's frame; released bytes come back", () => {
    const FRAME = 1504;
    for (const stuck of [1, 10, 100, 300]) {
      const budget = new MemoryBudget(1024 * 1024);
      const held = fill(budget, stuck, FRAME);
      expect(budget.used).toBeLessThanOrEqual(budget.limit);
      expect(budget.limit - budget.used).toBeGreaterThanOrEqual(budget.limit / (1 + BUDGET_ALPHA * stuck) - FRAME);
      expect(budget.take(FRAME, 0)).toBe(true);
      budget.release(FRAME);
      budget.release(held[0]!);
      expect(budget.used).toBe(held.slice(1).reduce((a, b) => a + b, 0));
    }
  });

  test("a frame is refused when it is more than is free, or would leave its port holding more than α × what is free; refusals are counted", () => {
    const budget = new MemoryBudget(1000);
    expect(budget.take(600, 0)).toBe(true);
    expect(budget.take(401, 0)).toBe(false);
    expect(budget.take(300, 200)).toBe(false);
    expect(budget.take(200, 200)).toBe(true);
    expect([budget.used, budget.drops]).toEqual([800, 2]);
  });

  test("admit refuses what passes the port's own bound without charging or counting a budget drop, then asks the budget", () => {
    const budget = new MemoryBudget(1000);
    expect(budget.admit(101, 0, 100)).toBe(false);
    expect(budget.admit(50, 60, 100)).toBe(false);
    expect([budget.used, budget.drops]).toEqual([0, 0]);
    expect(budget.admit(40, 60, 100)).toBe(true);
    expect(budget.used).toBe(40);
    const tight = new MemoryBudget(100);
    expect(tight.admit(60, 50, 1000)).toBe(false);
    expect([tight.used, tight.drops]).toEqual([0, 1]);
  });
});

/** Python: opens `count` connections to the unix socket `path`, says so, and never reads. */
const STUCK_CLIENTS = `
import os, socket, sys
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    held.append(s)
print("connected", len(held), flush=True)
os.close(1)
sys.stdin.read()
`;

describe("a fair shared buffer", () => {
  test("100 VM connections that stop reading leave room in --memory-budget: a healthy pair on another network loses nothing and never waits a second", async () => {
    const BUDGET = 4 * 1024 * 1024;
    await using dir = await tempDir();
    await using relay = await scenario().with("--qemu-listen", `stuck=unix:${dir.path}/stuck.sock`).listen("ok").with("--memory-budget", String(BUDGET), "--queue-bytes", String(1024 * 1024)).spawn();
    // 100 real clients in another process that never read. Unix stream sockets, because their
    // kernel buffers are fixed (net.core.wmem_default): a TCP sender's grows to tcp_wmem's maximum
    // (4 MiB here), so 100 stuck TCP peers would soak up 400 MiB in the kernel before the relay
    // queued a byte. The relay's queueing is the same for both.
    const stuck = Bun.spawn(["python3", "-c", STUCK_CLIENTS, `${dir.path}/stuck.sock`, "100"], { stdin: "pipe", stdout: "pipe", stderr: "inherit" });
    await using _stuck = { [Symbol.asyncDispose]: async () => void (stuck.kill(), await stuck.exited) };
    expect(await new Response(stuck.stdout).text()).toBe("connected 100\n");
    await using flooder = await connectStream(`${dir.path}/stuck.sock`);
    await waitUntil(async () => (await relay.status()).networks.find((n: any) => n.name === "stuck").portCount === 101, "101 ports on stuck");
    const flood = encodeFrames(Array.from({ length: 200 }, () => makeFrame(BROADCAST, "02:00:00:00:57:01", 1500)));
    // Until the stuck ports hold nearly all of the budget (their kernel buffers fill first).
    await waitUntil(async () => {
      await flooder.writeAll(flood);
      return (await relay.status()).limits.memoryUsed > BUDGET * 0.9;
    }, "the stuck ports to fill the budget", 60_000);

    await using a = await attachVm(relay, "ok");
    await using b = await attachVm(relay, "ok");
    const [A, B] = ["02:00:00:00:57:0a", "02:00:00:00:57:0b"];
    b.send(makeFrame(BROADCAST, B, "learn me"));
    await a.frames.next(fromMac(B));
    const COUNT = 100;
    // Arrival times as they happen; a lost frame ends the wait with what came.
    const receiving = (async () => {
      const arrivals: { seq: number; at: number }[] = [];
      try {
        for (let i = 0; i < COUNT; i++) {
          const f = await b.frames.next(fromMac(A), 5_000);
          arrivals.push({ seq: new DataView(f.buffer, f.byteOffset).getUint32(14), at: performance.now() });
        }
      } catch {
        // reported by the checks below
      }
      return arrivals;
    })();
    let worst = 0;
    const start = performance.now();
    for (let i = 0; i < COUNT; i++) {
      const frame = makeFrame(B, A, 1500);
      new DataView(frame.buffer).setUint32(14, i);
      a.send(frame);
      // The stuck network stays under pressure while the pair talks.
      if (i % 10 === 0) await flooder.writeAll(flood);
      worst = Math.max(worst, (await relay.status()).limits.memoryUsed);
      await Bun.sleep(20); // the pair's pace, not a synchronisation
    }
    const arrivals = await receiving;
    expect(arrivals.map((x) => x.seq)).toEqual(Array.from({ length: COUNT }, (_, i) => i));
    const gaps = arrivals.map((x, i) => x.at - (i === 0 ? start : arrivals[i - 1]!.at));
    expect(Math.max(...gaps)).toBeLessThan(1000);
    // The budget's figure never passes it (VM ports are charged before they queue); the stuck ports are stuck.
    expect(worst).toBeLessThanOrEqual(BUDGET);
    const s = await relay.status();
    expect(s.limits.memoryDrops).toBeGreaterThan(0);
    const okPorts = s.networks.find((n: any) => n.name === "ok").ports;
    expect(okPorts.map((p: any) => p.tx.drops)).toEqual([0, 0]);
  });
});

describe("networks that come and go on a live tunnel", () => {
  test("a hub that is itself a site attaches networks its sites create later, and detaches them when they go", async () => {
    await using top = await scenario().hub(TOKEN).with("--name", "top").listen("lab").spawn();
    await using middle = await scenario().hub(TOKEN).with("--name", "middle").uplink(wsUrl(top), TOKEN).spawn();
    await uplinkUp(middle);
    expect((await middle.status()).uplink.networks).toEqual(["default"]);
    const leaf = await scenario().with("--name", "leaf").listen("lab").uplink(wsUrl(middle), TOKEN).spawn();
    try {
      await uplinkUp(leaf);
      await waitUntil(async () => (await middle.status()).uplink.networks.includes("lab"), "lab attached on the live uplink");
      await using vmTop = await attachVm(top);
      await using vmLeaf = await attachVm(leaf);
      const f = makeFrame(BROADCAST, "02:00:00:00:55:01", "through two tunnels");
      vmLeaf.send(f);
      expect(await vmTop.frames.next(fromMac("02:00:00:00:55:01"))).toEqual(f);
      const topLab = (await top.status()).networks.find((n: any) => n.name === "lab");
      expect(topLab.ports.find((p: any) => p.kind === "tunnel").peer).toMatch(/^middle \(127\.0\.0\.1:\d+\)$/);
      expect(middle.stdout()).toMatch(/tunnel: leaf \(127\.0\.0\.1:\d+\) attached \(networks: lab\)/);
    } finally {
      await leaf.stop();
    }
    await waitUntil(async () => !(await middle.status()).uplink.networks.includes("lab"), "lab detached");
    await waitUntil(async () => (await top.status()).networks.find((n: any) => n.name === "lab").ports.every((p: any) => p.kind !== "tunnel"), "top saw the detach");
  });

  test("more than 64 networks with an uplink is a config error", async () => {
    const args = Array.from({ length: 65 }, (_, i) => ["--qemu-listen", `n${i}=127.0.0.1:0`]).flat();
    expect(await runCli([...args, "--uplink", "ws://127.0.0.1:1", "--uplink-token", TOKEN])).toEqual({
      stdout: "",
      stderr: "edge-relay: --uplink: a tunnel carries at most 64 networks; the QEMU ports name more\n",
      code: 2,
    });
  });
});

describe("log hygiene", () => {
  test("rateLimitedLog writes a burst, then one summary of what it held back when the window ends", async () => {
    const lines: string[] = [];
    const limited = rateLimitedLog((l) => lines.push(l), 3, 50);
    for (let i = 0; i < 10; i++) limited.log(`line ${i}`);
    expect(lines).toEqual(["line 0", "line 1", "line 2"]);
    await waitUntil(() => lines.length === 4, "the summary");
    expect(lines[3]).toBe("7 more like it not logged in the last 0.05 s");
  });

  test("a storm of connections with bad lengths writes a few lines, not one per connection", async () => {
    await using relay = await scenario().listen().spawn();
    const port = relay.port("qemu-listen");
    await Promise.all(
      Array.from({ length: 200 }, async () => {
        const { closed, write } = await (await import("./helpers.ts")).connectStream(port);
        write(Uint8Array.of(0xff, 0xff, 0xff, 0xff));
        await closed;
      }),
    );
    await waitUntil(async () => (await relay.status()).protocolErrors === 200, "200 errors counted");
    expect(relay.stderr().trim().split("\n").length).toBeLessThanOrEqual(10);
  });
});

describe("TunnelPort", () => {
  test("a message the WebSocket refuses (send() → 0) counts every frame of it as dropped, not sent", async () => {
    const { MemoryBudget, Network, TunnelLink } = await import("../relay.ts");
    const budget = new MemoryBudget(1024 * 1024);
    let refuse = true;
    const sent: Uint8Array[] = [];
    const socket = { send: (d: Uint8Array) => (refuse ? false : (sent.push(d.slice()), true)), buffered: () => 0, pause() {}, close() {} };
    const quiet = { info() {}, warn() {} };
    const link = new TunnelLink(socket, "tunnel", "test", 4 * 1024 * 1024, budget, quiet, {}, () => {});
    const net = new Network("lab", 300_000);
    const port = link.attach(0, net, "0123456789abcdef");
    for (let i = 0; i < 3; i++) port.send(makeFrame(BROADCAST, "02:00:00:00:56:01", 100));
    await new Promise((r) => setImmediate(r));
    expect(port.stats).toMatchObject({ txFrames: 0, txBytes: 0, txDrops: 3 });
    expect(budget.used).toBe(0);
    refuse = false;
    port.send(makeFrame(BROADCAST, "02:00:00:00:56:01", 100));
    await new Promise((r) => setImmediate(r));
    expect(port.stats).toMatchObject({ txFrames: 1, txBytes: 114, txDrops: 3 });
    expect(sent).toHaveLength(1);
  });
});

describe("TunnelLink cut-through", () => {
  /** A hub's network with two tunnel links (sockets that record what is sent), A learned behind the first, B behind the second. */
  async function hub(channels = [0, 5]) {
    const { MemoryBudget, Network, TunnelLink } = await import("../relay.ts");
    const budget = new MemoryBudget(16 * 1024 * 1024);
    const quiet = { info() {}, warn() {} };
    const net = new Network("lab", 300_000);
    const ends = channels.map((channel) => {
      const sent: Uint8Array[] = [];
      const closes: number[] = [];
      const socket = { send: (d: Uint8Array) => (sent.push(d.slice()), true), buffered: () => 0, pause() {}, close: (code: number) => void closes.push(code) };
      const link = new TunnelLink(socket, "tunnel", `site-${channel}`, 4 * 1024 * 1024, budget, quiet, {}, () => {});
      link.helloDone = true;
      link.claimChannels(channel + 1);
      return { link, port: link.attach(channel, net, "0123456789abcdef"), sent, closes };
    });
    const [a, b] = ends as [(typeof ends)[0], (typeof ends)[0]];
    net.forward(makeFrame(BROADCAST, "02:00:00:00:57:0a"), a.port);
    net.forward(makeFrame(BROADCAST, "02:00:00:00:57:0b"), b.port);
    await new Promise((r) => setImmediate(r));
    for (const end of ends) end.sent.length = 0;
    return { a, b, ends };
  }
  const data = (channel: number, body: Uint8Array) => {
    const out = new Uint8Array(3 + body.length);
    out.set([1, channel >> 8, channel & 0xff]);
    out.set(body, 3);
    return out;
  };
  const toB = (n: number) => Array.from({ length: n }, (_, i) => makeFrame("02:00:00:00:57:0b", "02:00:00:00:57:0a", 60 + i));

  test("a message of unicast frames to one tunnel goes out as the same message on that tunnel's channel, every frame counted", async () => {
    const { a, b } = await hub();
    const frames = toB(3);
    a.link.receive(data(0, encodeFrames(frames)));
    expect(b.sent).toEqual([data(5, encodeFrames(frames))]);
    const bytes = frames.reduce((n, f) => n + f.length, 0);
    expect([a.port.stats.rxFrames, a.port.stats.rxBytes, b.port.stats.txFrames, b.port.stats.txBytes]).toEqual([1 + 3, 60 + bytes, 1 + 3, 60 + bytes]);
  });

  test("a message of unicast frames then a broadcast: the unicast frames go to their tunnel as one run, the broadcast floods to every other tunnel, and the message out keeps the frames' order, every frame counted", async () => {
    const { a, b, ends } = await hub([0, 5, 9]);
    const c = ends[2]!;
    const runs: number[] = [];
    const enqueueRun = b.port.enqueueRun.bind(b.port);
    b.port.enqueueRun = (block, start, end, frames, message) => (runs.push(frames), enqueueRun(block, start, end, frames, message));
    const broadcast = makeFrame(BROADCAST, "02:00:00:00:57:0a", 80);
    const frames = [...toB(4), broadcast, ...toB(1)];
    a.link.receive(data(0, encodeFrames(frames)));
    await new Promise((r) => setImmediate(r));
    expect(runs).toEqual([4]);
    expect(b.sent).toEqual([data(5, encodeFrames(frames))]);
    expect(c.sent).toEqual([data(9, encodeFrames([broadcast]))]);
    expect([a.port.stats.rxFrames, b.port.stats.txFrames, c.port.stats.txFrames]).toEqual([1 + 6, 1 + 6, 2 + 1]);
  });

  test("a message whose tail overruns it: the whole frames before go on, then the tunnel closes as malformed, counted", async () => {
    const { a, b } = await hub();
    const frames = toB(2);
    const body = encodeFrames(frames);
    const bad = new Uint8Array(body.length + 6);
    bad.set(body);
    bad.set([0, 0, 0, 99, 1, 2], body.length);
    a.link.receive(data(0, bad));
    expect(a.closes).toEqual([1008]);
    expect(a.link.closed).toBe(true);
    expect(a.port.stats.errors).toBe(1);
    await new Promise((r) => setImmediate(r));
    expect(b.sent).toEqual([data(5, body)]);
  });

  test("a frame longer than the maximum closes the tunnel as malformed and reaches no one, as without cut-through", async () => {
    const { MAX_FRAME } = await import("../relay.ts");
    const { a, b } = await hub();
    a.link.receive(data(0, encodeFrames([makeFrame("02:00:00:00:57:0b", "02:00:00:00:57:0a", MAX_FRAME + 1 - 14)])));
    expect(a.closes).toEqual([1008]);
    await new Promise((r) => setImmediate(r));
    expect(b.sent).toEqual([]);
    expect(b.port.stats.txFrames).toBe(1); // A's broadcast only
  });
});
