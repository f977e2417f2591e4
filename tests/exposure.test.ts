/**
 * QEMU ports facing hostile peers: who may become a port, how many, and what a flood costs.
 */
import { describe, expect, test } from "bun:test";
import { existsSync, readFileSync } from "node:fs";
import type { udp } from "bun";
import { UNIX_DGRAM_BACKLOG, UNIX_DGRAM_MESSAGE_COST, openUnixDgram } from "../relay.ts";
import { BROADCAST, FrameQueue, type RelayProcess, attachVm, connectStream, fromMac, makeFrame, runCli, sameBytes, tempDir, udpPeer, waitUntil, scenario } from "./helpers.ts";

/** The status of the relay's --qemu-udp socket bound to `port`. */
async function datagramStatus(relay: RelayProcess, port = relay.port("qemu-udp")) {
  return (await relay.status()).datagrams.find((d: any) => d.address.endsWith(`:${port}`));
}

describe("QEMU ports on non-loopback addresses", () => {
  const refused: [string[], string][] = [
    [["--qemu-listen", "0.0.0.0:0"], "--qemu-listen (qemuListen[0]): 0.0.0.0 is not a loopback address: anyone who can reach it gets a port on the segment"],
    [["--qemu-listen", "127.0.0.1:0", "--qemu-listen", "lab=[::]:0"], "--qemu-listen (qemuListen[1]): :: is not a loopback address: anyone who can reach it gets a port on the segment"],
    [["--qemu-udp", "0.0.0.0:0,127.0.0.1:9"], "--qemu-udp (qemuUdp[0]): 0.0.0.0 is not a loopback address: anyone who can reach it gets a port on the segment"],
    [["--qemu-mcast", "239.1.2.3:5000"], "--qemu-mcast (qemuMcast[0]): without a loopback LOCALADDR the group is joined on every interface: anyone on the network is on the segment"],
    [["--qemu-mcast", "239.1.2.3:5000,192.0.2.1"], "--qemu-mcast (qemuMcast[0]): 192.0.2.1 is not a loopback address: anyone on that network is on the segment"],
  ];
  for (const [args, message] of refused) {
    test(`${args.join(" ")} exits 2 without --allow-remote-qemu`, async () => {
      expect(await runCli(scenario().with(...args).args)).toEqual({ stdout: "", stderr: `edge-relay: ${message}; add --allow-remote-qemu\n`, code: 2 });
    });
  }

  test("--allow-remote-qemu opens them; --qemu-connect to another host needs no flag", async () => {
    await using relay = await scenario().with("--qemu-listen", "0.0.0.0:0", "--allow-remote-qemu").spawn();
    expect(relay.bound.find((b) => b.what === "qemu-listen")!.address).toMatch(/^0\.0\.0\.0:\d+$/);
    await using dialer = await scenario().with("--qemu-connect", "192.0.2.1:9").spawn();
    expect(dialer.stdout()).toContain("ready\n");
  });
});

describe("--qemu-udp with a fixed REMOTE", () => {
  test("datagrams from any other source are dropped and counted, never a port", async () => {
    using vm = await udpPeer();
    using stranger = await udpPeer();
    await using relay = await scenario().with("--qemu-udp", `127.0.0.1:0,127.0.0.1:${vm.port}`).listen().spawn();
    await using tcp = await attachVm(relay);
    const udpPort = relay.port("qemu-udp");
    const [V, S] = ["02:00:00:00:40:01", "02:00:00:00:40:02"];
    for (let i = 0; i < 3; i++) stranger.send(makeFrame(BROADCAST, S, `injected ${i}`), udpPort);
    // One socket serves both senders in arrival order: once the VM's frame is through, so are the stranger's.
    const fromVm = makeFrame(BROADCAST, V, "the fixed remote");
    vm.send(fromVm, udpPort);
    expect(await tcp.frames.next()).toEqual(fromVm);
    const status = await datagramStatus(relay);
    expect(status).toMatchObject({ remote: `127.0.0.1:${vm.port}`, peers: 1, drops: { foreign: 3, runts: 0, throttled: 0 } });
    const ports = (await relay.status()).networks[0].ports.map((p: any) => p.peer);
    expect(ports.toSorted()).toEqual([`127.0.0.1:${vm.port}`, tcp.local].toSorted());
    expect(tcp.frames.frames.some(fromMac(S))).toBe(false);
    const logged = relay.stderr().match(/qemu-udp default 127\.0\.0\.1:(\d+): dropped a datagram from 127\.0\.0\.1:(\d+), not the fixed remote/g);
    expect(logged).toEqual([`qemu-udp default 127.0.0.1:${udpPort}: dropped a datagram from 127.0.0.1:${stranger.port}, not the fixed remote`]);
    const metrics = await fetch(`${relay.base}/metrics`).then((r) => r.text());
    expect(metrics).toContain(`edge_relay_datagram_drops_total{network="default",socket="127.0.0.1:${udpPort}",reason="foreign"} 3`);
  });
});

/** `count` UDP sockets on loopback: that many distinct source addresses, closed on dispose. */
async function sources(count: number) {
  const sockets = await Promise.all(Array.from({ length: count }, () => Bun.udpSocket({ hostname: "127.0.0.1" })));
  return Object.assign(sockets, { [Symbol.dispose]: () => sockets.forEach((s) => s.close()) });
}

/**
 * Sends one datagram from each source, 100 at a time (what the kernel's receive buffer holds whole),
 * waiting after each batch until the relay has accounted for all of them: none is lost uncounted.
 */
async function flood(relay: RelayProcess, from: udp.Socket<"buffer">[], datagram: (i: number) => Uint8Array, accounted: (d: any) => number) {
  for (let i = 0; i < from.length; i += 100) {
    from.slice(i, i + 100).forEach((s, j) => s.send(datagram(i + j), relay.port("qemu-udp"), "127.0.0.1"));
    const sent = Math.min(i + 100, from.length);
    await waitUntil(async () => accounted(await datagramStatus(relay)) === sent, `${sent} datagrams accounted for`);
  }
}

const floodMac = (i: number) => `02:00:00:01:${((i >> 8) & 0xff).toString(16).padStart(2, "0")}:${(i & 0xff).toString(16).padStart(2, "0")}`;

describe("runt datagrams", () => {
  test("0, 1 and 13 bytes from a known peer count on its port (rx.runts, rx.drops), on UDP and unix sockets, learned or fixed; from a stranger, on the socket", async () => {
    await using dir = await tempDir();
    using udpVm = await udpPeer();
    const unixFrames = new FrameQueue();
    const unixVm = await openUnixDgram(`${dir.path}/vm.dgram`, (data) => unixFrames.push(data));
    await using _unixVm = { [Symbol.asyncDispose]: () => unixVm.close() };
    await using relay = await scenario().listen().udp().with("--qemu-udp", `udpfixed=127.0.0.1:0,127.0.0.1:${udpVm.port}`, "--qemu-udp", `unix:${dir.path}/learn.dgram`, "--qemu-udp", `unixfixed=unix:${dir.path}/fixed.dgram,unix:${dir.path}/vm.dgram`).spawn();
    await using tcp = await attachVm(relay);
    const runts = [0, 1, 13].map((n) => new Uint8Array(n));
    const senders: [string, string, (d: Uint8Array) => void][] = [
      ["default", `127.0.0.1:${udpVm.port}`, (d) => udpVm.send(d, relay.port("qemu-udp", "default"))],
      ["udpfixed", `127.0.0.1:${udpVm.port}`, (d) => udpVm.send(d, relay.port("qemu-udp", "udpfixed"))],
      ["default", `unix:${dir.path}/vm.dgram`, (d) => void unixVm.send(d, { path: `${dir.path}/learn.dgram` })],
      ["unixfixed", `unix:${dir.path}/vm.dgram`, (d) => void unixVm.send(d, { path: `${dir.path}/fixed.dgram` })],
    ];
    for (const [network, peer, send] of senders) {
      // A whole frame first (a learning socket makes a peer only of one), then the runts, then a frame again.
      send(makeFrame(BROADCAST, "02:00:00:00:58:01", "first"));
      for (const runt of runts) send(runt);
      send(makeFrame(BROADCAST, "02:00:00:00:58:01", "last"));
      const port = await waitUntil(async () => {
        const ports = (await relay.status()).networks.find((n: any) => n.name === network).ports;
        return ports.find((p: any) => p.peer === peer && p.rx.frames === 2);
      }, `${network} ${peer}: both frames`);
      expect(port.rx).toMatchObject({ frames: 2, runts: 3, drops: 3 });
    }
    // Datagram sockets never make a port of a runt: a stranger's are counted on the socket.
    using stranger = await udpPeer();
    for (const runt of runts) stranger.send(runt, relay.port("qemu-udp", "default"));
    await waitUntil(async () => (await datagramStatus(relay, relay.port("qemu-udp", "default"))).drops.runts === 3, "the stranger's runts counted");
    expect(tcp.frames.frames.filter((f) => f.length < 14)).toEqual([]);
    const metrics = await fetch(`${relay.base}/metrics`).then((r) => r.text());
    expect(metrics).toContain(`edge_relay_port_rx_drops_total{network="udpfixed",port="udpfixed/qemu-udp-`);
  });
});

describe("--qemu-udp peer table under a flood of sources", () => {
  test("runts from 1,000 sources make no port: only a whole frame makes a peer", async () => {
    await using relay = await scenario().udp().listen().spawn();
    await using tcp = await attachVm(relay);
    using spoofed = await sources(1000);
    await flood(relay, spoofed, (i) => new Uint8Array(i % 2), (d) => d.drops.runts);
    expect(await datagramStatus(relay)).toMatchObject({ peers: 0, evicted: 0, drops: { foreign: 0, runts: 1000, throttled: 0 } });
    expect((await relay.status()).networks[0].ports.map((p: any) => p.peer)).toEqual([tcp.local]);
    expect(relay.stderr().match(/not a frame, from a source that is not a peer/g)).toHaveLength(1);
  });

  test("1,000 sources of whole frames keep the table at --udp-peers; a VM arriving later is learned; a broadcast goes out at most that many times", async () => {
    const cap = 8;
    await using relay = await scenario().udp().listen().with("--udp-peers", String(cap)).spawn();
    await using tcp = await attachVm(relay);
    const udpPort = relay.port("qemu-udp");
    using spoofed = await sources(1000);
    await flood(relay, spoofed, (i) => makeFrame(BROADCAST, floodMac(i), "flood"), (d) => d.peers + d.evicted + d.drops.throttled);
    const after = await datagramStatus(relay);
    expect(after.peers).toBe(cap);
    expect(after.evicted).toBeGreaterThan(0);
    expect(after.drops.throttled).toBeGreaterThan(0);

    using vm = await udpPeer();
    const [R, T] = ["02:00:00:00:41:01", "02:00:00:00:41:02"];
    // A new source may be throttled for up to a second after the flood: it is heard when it sends again.
    await waitUntil(() => (vm.send(makeFrame(BROADCAST, R, "a real VM"), udpPort), tcp.frames.frames.some(fromMac(R))), "the VM learned after the flood");
    const toVm = makeFrame(R, T, "to the real VM");
    tcp.send(toVm);
    expect(await vm.frames.next(fromMac(T))).toEqual(toVm);
    // Its answer comes after all its hellos on one socket: once it is through, no hello is still on the way.
    vm.send(makeFrame(T, R, "answer"), udpPort);
    await tcp.frames.next((f) => fromMac(R)(f) && new TextDecoder().decode(f.subarray(14)) === "answer");

    const udpTx = async () => {
      const ports = (await relay.status()).networks[0].ports.filter((p: any) => p.kind === "qemu-udp");
      return { count: ports.length, frames: ports.reduce((n: number, p: any) => n + p.tx.frames, 0) };
    };
    const before = await udpTx();
    expect(before.count).toBe(cap);
    const broadcast = makeFrame(BROADCAST, T, "to everyone");
    tcp.send(broadcast);
    expect(await vm.frames.next((f) => sameBytes(f, broadcast))).toEqual(broadcast);
    expect((await udpTx()).frames - before.frames).toBe(cap);
  });
});

/** A connection the relay should close at once: its connect is reset, or it is closed right after. */
async function closedAtOnce(port: number): Promise<void> {
  try {
    const peer = await connectStream(port);
    await peer.closed;
  } catch (error) {
    expect((error as { code?: string }).code).toBe("ECONNRESET");
  }
}

describe("--max-connections", () => {
  test("beyond the cap a VM is closed at once and counted; the others keep forwarding, a freed place is taken again, /healthz answers", async () => {
    await using relay = await scenario().listen().listen("lab").with("--max-connections", "3").spawn();
    // The cap counts connections across listeners.
    await using a = await attachVm(relay);
    const b = await attachVm(relay);
    await using c = await attachVm(relay, "lab");
    for (const port of [relay.port("qemu-listen"), relay.port("qemu-listen", "lab"), relay.port("qemu-listen")]) await closedAtOnce(port);
    const status = await relay.status();
    expect(status.connectionsRefused).toBe(3);
    expect(status.networks.flatMap((n: any) => n.ports).length).toBe(3);
    expect(relay.stderr().match(/qemu-listen: closed a connection from 127\.0\.0\.1:\d+: --max-connections 3 reached; further ones are counted in \/status/g)).toHaveLength(1);
    expect(await fetch(`${relay.base}/metrics`).then((r) => r.text())).toContain("edge_relay_connections_refused_total 3");
    expect(await fetch(`${relay.base}/healthz`).then((r) => r.text())).toBe("ok\n");

    const hello = makeFrame(BROADCAST, "02:00:00:00:42:01", "still switching");
    a.send(hello);
    expect(await b.frames.next(fromMac("02:00:00:00:42:01"))).toEqual(hello);
    b.close();
    await waitUntil(async () => (await relay.status()).networks[0].ports.length === 1, "the closed VM's port gone");
    await using d = await attachVm(relay);
    d.send(hello);
    expect(await a.frames.next(fromMac("02:00:00:00:42:01"))).toEqual(hello);
    expect((await relay.status()).connectionsRefused).toBe(3);
  });

  test("the soft open-file limit is raised to the hard one, and a cap above three quarters of it is lowered at start", async () => {
    await using relay = await scenario().listen().spawn({ prefix: ["prlimit", "--nofile=64:200", "--"] });
    // Bun 1.4 raises the soft limit itself at start; the relay keeps that so on a runtime that does not.
    const limits = await Bun.file(`/proc/${relay.proc.pid}/limits`).text();
    expect(limits).toMatch(/^Max open files +200 +200 +files/m);
    expect(relay.stderr()).toBe("--max-connections 4096 lowered to 150: the open-file limit is 200\n");
    const port = relay.port("qemu-listen");
    const vms = await Promise.all(Array.from({ length: 150 }, () => connectStream(port)));
    await using _vms = { [Symbol.asyncDispose]: async () => void vms.forEach((vm) => vm.close()) };
    await waitUntil(async () => (await relay.status()).networks[0].ports.length === 150, "150 ports");
    await closedAtOnce(port);
    expect((await relay.status()).connectionsRefused).toBe(1);
    expect(await fetch(`${relay.base}/healthz`).then((r) => r.text())).toBe("ok\n");
  });
});

describe("unix datagram receiver", () => {
  // python3 sends with blocking sendto: nothing is lost on the way, whatever the receiver does.
  const SENDER = `
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[2])
frame = bytes.fromhex("ffffffffffff" "020000004301" "88b5") + bytes(int(sys.argv[4]) - 14)
for i in range(int(sys.argv[3])):
    s.sendto(frame, sys.argv[1])
`;

  test("a burst while the main thread is busy stays within the backlog: the rest is dropped and counted", async () => {
    await using dir = await tempDir();
    const path = `${dir.path}/relay.dgram`;
    let delivered = 0;
    const reported: number[] = [];
    const socket = await openUnixDgram(path, () => void delivered++, { overrun: (total) => reported.push(total) });
    await using _socket = { [Symbol.asyncDispose]: async () => socket.close() };
    const [count, size] = [10_000, 1000];
    const backlog = Math.floor(UNIX_DGRAM_BACKLOG / (size + UNIX_DGRAM_MESSAGE_COST));
    const sender = Bun.spawn(["python3", "-c", SENDER, path, `${dir.path}/sender.dgram`, String(count), String(size)], { stderr: "pipe" });
    // Busy: no event-loop turn, so nothing the receiver posts is taken until it has dealt with every datagram.
    const deadline = performance.now() + 15_000;
    while (socket.overruns() < count - backlog && performance.now() < deadline);
    expect(socket.overruns()).toBe(count - backlog);
    expect(delivered).toBe(0);
    expect(await sender.exited).toBe(0);
    await waitUntil(() => delivered === backlog, `${backlog} datagrams delivered (have ${delivered})`);
    expect(delivered + socket.overruns()).toBe(count);
    // Reported to the main thread once it had a turn again, for the log.
    expect(reported).toEqual([count - backlog]);
  });

  /** A relay whose unix receiver thread runs `script` instead: a preload in its working directory swaps it. */
  async function relayWithReceiver(dir: string, script: string) {
    await Bun.write(`${dir}/bunfig.toml`, 'preload = ["./receiver.ts"]\n');
    await Bun.write(
      `${dir}/receiver.ts`,
      `const Real = globalThis.Worker;
globalThis.Worker = class extends Real {
  constructor(_url, options) {
    super(URL.createObjectURL(new Blob([${JSON.stringify(script)}], { type: "application/javascript" })), options);
  }
};
`,
    );
    return scenario().with("--qemu-udp", `unix:${dir}/relay.dgram`).spawn({ cwd: dir });
  }

  test("a receiver thread that dies is logged once, and SIGTERM still stops the relay cleanly", async () => {
    await using dir = await tempDir();
    await using relay = await relayWithReceiver(dir.path, 'self.onmessage = () => { throw new Error("injected failure") }');
    await relay.waitForLine(/receiving stopped/);
    const path = `${dir.path}/relay.dgram`;
    expect(relay.stderr()).toBe(`qemu-udp default unix:${path}: receiving stopped: the receiver thread failed: injected failure\n`);
    expect(existsSync(path)).toBe(true);
    expect(await relay.stop()).toBe(0);
    expect(relay.stdout()).toEndWith("ready\nSIGTERM: stopping\n");
    // The socket's close ran to its end (rather than the process exiting with nothing left to run).
    expect(existsSync(path)).toBe(false);
  });

  test("a receiver thread that never notices the stop does not keep SIGTERM from exiting", async () => {
    await using dir = await tempDir();
    await using relay = await relayWithReceiver(dir.path, "self.onmessage = () => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0)");
    expect(await relay.stop()).toBe(0);
    expect(relay.stderr()).toBe("");
    expect(existsSync(`${dir.path}/relay.dgram`)).toBe(false);
  });
});

describe("--qemu-udp under load", () => {
  const fixture = (name: string) => new URL(`./fixtures/${name}`, import.meta.url).pathname;

  test("datagrams the kernel drops while the relay cannot read are counted in /status; with those taken, none is missing", async () => {
    await using relay = await scenario().udp().spawn();
    const rmemMax = Number(readFileSync("/proc/sys/net/core/rmem_max", "utf8"));
    const before = await datagramStatus(relay);
    // The relay asks for 4 MiB; the kernel caps it at rmem_max and doubles it.
    expect(before.receiveBuffer).toBe(2 * Math.min(4 * 1024 * 1024, rmemMax));
    expect(before.drops.kernel).toBe(0);
    // More 1,500-byte frames than the granted buffer holds, sent while the relay is stopped.
    const count = Math.ceil(before.receiveBuffer / 1500) + 5000;
    relay.proc.kill("SIGSTOP");
    const sender = Bun.spawn([process.execPath, fixture("udp-sender.ts"), "0", String(relay.port("qemu-udp")), String(count), "1486", "02:00:00:00:41:01", "02:00:00:00:41:02"], {
      stdout: "pipe",
      stderr: "inherit",
    });
    try {
      const reader = sender.stdout.getReader();
      expect(new TextDecoder().decode((await reader.read()).value)).toBe(`sent ${count}\n`);
    } finally {
      relay.proc.kill("SIGCONT");
      sender.kill();
    }
    const rx = async () => (await relay.status()).networks[0].ports.reduce((n: number, p: any) => n + p.rx.frames + p.rx.drops, 0);
    const status = await waitUntil(async () => {
      const s = await datagramStatus(relay);
      return (await rx()) + s.drops.kernel === count && s;
    }, `${count} datagrams received or counted as kernel drops`);
    // Each datagram costs the buffer at least its 1,500 bytes: the 5,000 beyond what it holds are dropped.
    expect(status.drops.kernel).toBeGreaterThanOrEqual(count - Math.ceil(before.receiveBuffer / 1500));
    const metrics = await fetch(`${relay.base}/metrics`).then((r) => r.text());
    expect(metrics).toContain(`edge_relay_datagram_drops_total{network="default",socket="127.0.0.1:${relay.port("qemu-udp")}",reason="kernel"} ${status.drops.kernel}`);
  });

  test("frames to a fixed remote nobody listens on: what the kernel refuses is a tx drop, not a tx frame", async () => {
    using gone = await udpPeer();
    const port = gone.port;
    gone[Symbol.dispose]();
    await using relay = await scenario().with("--qemu-udp", `127.0.0.1:0,127.0.0.1:${port}`).listen().spawn();
    await using vm = await attachVm(relay);
    // One write: the relay forwards them in one turn, so they leave in one batch.
    const frames = Array.from({ length: 20 }, (_, i) => makeFrame(BROADCAST, "02:00:00:00:42:01", `frame ${String(i).padStart(2, "0")}`));
    vm.send(...frames);
    const udpPort = async () => (await relay.status()).networks[0].ports.find((p: any) => p.kind === "qemu-udp");
    const tx = await waitUntil(async () => {
      const p = await udpPort();
      return p.tx.frames + p.tx.drops === frames.length && p.tx;
    }, "20 frames sent or dropped");
    expect(tx.drops).toBeGreaterThan(0);
    expect(tx.bytes).toBe(tx.frames * frames[0]!.length);
  });
});
