/**
 * Hubs that share networks through NATS (--backplane): real nats-server and HAProxy processes from
 * the distribution, real relays, fake VMs on loopback.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { Socket } from "bun";
import { headers as natsHeaders, connect as natsConnect, nkeys } from "@nats-io/transport-node";
import { NatsDecoder, TUNNEL_PROTOCOL, backplaneSubject, encodeControl, encodeFrames, hpubRoom, natsHeaderBlock, writeHpub } from "../relay.ts";
import {
  BROADCAST,
  type Daemon,
  type RelayProcess,
  type StreamPeer,
  attachVm,
  freePort,
  fromMac,
  makeFrame,
  runCli,
  sameBytes,
  spawnDaemon,
  spawnRelay,
  startNats,
  tempDir,
  testCertificate,
  uplinkUp,
  waitUntil,
  ROOT,
  readme,
  scenario,
} from "./helpers.ts";

const TOKEN = "backplane-test-token-7d2e";

/** A hub on the backplane: tunnels in, no QEMU ports of its own; loop probes only where a test wants them. */
const hubArgs = (nats: string, probe = "0") => ["--http", "127.0.0.1:0", "--token", TOKEN, "--backplane", nats, "--loop-probe", probe];

/** A site with a QEMU port per network, uplinked to `url`. */
/** `url`: the hub's ws:// or wss:// address (an http:// base is dialled as ws://). */
const spawnSite = (url: string, networks: string[], extra: string[] = []) =>
  scenario().with(...networks.flatMap((n) => ["--qemu-listen", `${n}=127.0.0.1:0`])).uplink(url, TOKEN).noProbe().with(...extra).spawn();

/** Resolves once the hub's backplane is up and the server has its subscription to each network. */
const subscribed = (hub: RelayProcess, ...networks: string[]) =>
  waitUntil(async () => {
    const bp = (await hub.status()).backplane;
    return bp?.state === "up" && networks.every((n) => bp.networks.includes(n));
  }, `${hub.base} subscribed to ${networks.join(", ")} on the backplane`);

/**
 * Once each hub hears lab on the backplane: a VM on lab at each site, with the MACs they send from
 * (`tag` is their fifth byte). Disposing it disconnects both.
 */
async function labVms(hubs: RelayProcess[], siteA: RelayProcess, siteB: RelayProcess, tag: string) {
  await Promise.all(hubs.map((hub) => subscribed(hub, "lab")));
  const [vmA, vmB] = await Promise.all([attachVm(siteA, "lab"), attachVm(siteB, "lab")]);
  return {
    vmA,
    vmB,
    A: `02:00:00:00:${tag}:0a`,
    B: `02:00:00:00:${tag}:0b`,
    [Symbol.asyncDispose]: () => Promise.all([vmA[Symbol.asyncDispose](), vmB[Symbol.asyncDispose]()]).then(() => {}),
  };
}

/**
 * `count` frames from `from` (source `src`) to `dst` reach `to` byte-exact, in order and once each:
 * a marker sent after them must be the next frame from `src` that `to` sees.
 */
async function deliveredOnce(from: StreamPeer, to: StreamPeer, src: string, dst: string, count: number, tag: string) {
  const sent = Array.from({ length: count }, (_, i) => makeFrame(dst, src, `${tag} ${i} ${"-".repeat((i * 97) % 1400)}`));
  from.send(...sent);
  const text = (f: Uint8Array) => new TextDecoder().decode(f.subarray(14)).replace(/-+$/, "");
  for (const frame of sent) expect(text(await to.frames.next(fromMac(src)))).toBe(text(frame));
  const marker = makeFrame(dst, src, `${tag} marker`);
  from.send(marker);
  expect(sameBytes(await to.frames.next(fromMac(src)), marker)).toBe(true);
}

/** Sends a broadcast from `from` every 100 ms until `to` receives one; the time it took. */
async function untilFramesFlow(from: StreamPeer, to: StreamPeer, src: string, limitMs: number): Promise<number> {
  const started = performance.now();
  for (let i = 0; performance.now() - started < limitMs; i++) {
    from.send(makeFrame(BROADCAST, src, `retry ${i}`));
    const got = await to.frames.next(fromMac(src), 100).catch(() => undefined);
    if (got) return performance.now() - started;
  }
  throw new Error(`no frame from ${src} within ${limitMs} ms`);
}

describe("backplaneSubject", () => {
  test("maps a network to edge-relay.CLUSTER.NETWORK, one subject token each, one-to-one", () => {
    expect(backplaneSubject("default", "lab")).toBe("edge-relay.default.lab");
    expect(backplaneSubject("eu.1", "lab.a")).toBe("edge-relay.eu~1.lab~a");
    expect(backplaneSubject("default", "lab.a")).not.toBe(backplaneSubject("default.lab", "a"));
  });
});

const ascii = (bytes: Uint8Array) => new TextDecoder("latin1").decode(bytes);

/** What a decoder given `chunks` hands over, one line per operation or message. */
function decoded(chunks: Uint8Array[], maxMessage = 4096): string[] {
  const seen: string[] = [];
  const decoder = new NatsDecoder(
    {
      message: (sid, headers, payload) => void seen.push(`message ${sid} ${JSON.stringify(ascii(headers))} ${JSON.stringify(ascii(payload))}`),
      oversize: (sid, bytes) => void seen.push(`oversize ${sid} ${bytes}`),
      op: (op, rest) => void seen.push(`${op} ${rest}`),
    },
    maxMessage,
  );
  for (const chunk of chunks) decoder.push(chunk);
  return seen;
}

describe("NatsDecoder", () => {
  const headers = "NATS/1.0\r\nEdge-Relay-Hub: 0123456789abcdef\r\n\r\n";
  const payload = "frames\r\nwith CRLF\r\n";
  const stream = new TextEncoder().encode(
    'INFO {"server_id":"x","headers":true,"max_payload":1048576}\r\n' +
      "PING\r\n" +
      `MSG edge-relay.default.lab 1 ${payload.length}\r\n${payload}\r\n` +
      "msg a.b 22 reply.to 0\r\n\r\n" +
      `HMSG edge-relay.default.dev 3 ${headers.length} ${headers.length + payload.length}\r\n${headers}${payload}\r\n` +
      "+OK\r\n" +
      "-ERR 'Permissions Violation for Publish to \"x\"'\r\n" +
      "PONG\r\n",
  );
  const expected = [
    'INFO {"server_id":"x","headers":true,"max_payload":1048576}',
    "PING ",
    `message 1 "" ${JSON.stringify(payload)}`,
    'message 22 "" ""',
    `message 3 ${JSON.stringify(headers)} ${JSON.stringify(payload)}`,
    "+OK ",
    "-ERR 'Permissions Violation for Publish to \"x\"'",
    "PONG ",
  ];

  test("push() hands over the same operations and messages wherever the stream is split", () => {
    expect(decoded([stream])).toEqual(expected);
    for (let at = 0; at <= stream.length; at++) expect(decoded([stream.subarray(0, at), stream.subarray(at)])).toEqual(expected);
    expect(decoded(Array.from(stream, (byte) => Uint8Array.of(byte)))).toEqual(expected);
  });

  test.each([
    ["an unknown operation", "BOGUS stuff\r\n", "Cannot decode NATS protocol: unknown operation"],
    ["MSG without a size", "MSG a 1\r\n", "Cannot decode NATS protocol: MSG with 2 arguments"],
    ["HMSG with too many arguments", "HMSG a 1 r x 2 3\r\n", "Cannot decode NATS protocol: HMSG with 6 arguments"],
    ["a size that is not a number", "MSG a 1 x\r\n", "Cannot decode NATS protocol: a size is not a number"],
    ["a sid that is not a number", "MSG a -1 2\r\n", "Cannot decode NATS protocol: a size is not a number"],
    ["a header bigger than its message", "HMSG a 1 10 5\r\n", "Cannot decode NATS message: a header of 10 bytes in a message of 5"],
    ["a message without its CRLF", "MSG a 1 2\r\nabcd", "Cannot decode NATS message: no CRLF after the message"],
    ["a line without end", "x".repeat(70_000), "Cannot decode NATS protocol: a line longer than 65536 bytes"],
  ])("push() throws on %s", (_what, text, message) => {
    expect(() => decoded([new TextEncoder().encode(text)])).toThrow(message);
  });

  test("push() skips a message over the maximum unread, wherever it is split, and goes on after it", () => {
    const big = new TextEncoder().encode(`MSG a 7 5000\r\n${"x".repeat(5000)}\r\nPING\r\n`);
    const expected = ["oversize 7 5000", "PING "];
    for (let at = 0; at <= big.length; at += 97) expect(decoded([big.subarray(0, at), big.subarray(at)])).toEqual(expected);
    expect(decoded([big])).toEqual(expected);
  });

  test("a line without end is refused even when it comes a byte at a time, before it grows past the bound", () => {
    const decoder = new NatsDecoder({ message: () => {}, oversize: () => {}, op: () => {} });
    let pushed = 0;
    expect(() => {
      for (; pushed < 70_000; pushed++) decoder.push(Uint8Array.of(120));
    }).toThrow("a line longer than 65536 bytes");
    expect(pushed).toBe(65_536);
  });
});

describe("writeHpub", () => {
  test("writes the HPUB line and header block to end where the payload already is", () => {
    const subject = "edge-relay.default.lab";
    const block = natsHeaderBlock("0123456789abcdef");
    const room = hpubRoom(subject, block, 32 * 1024);
    const bytes = new Uint8Array(room + 3);
    bytes.set([1, 2, 3], room);
    const start = writeHpub(bytes, room, subject, block, 3);
    expect(ascii(bytes.subarray(start))).toBe(`HPUB ${subject} ${block.length} ${block.length + 3}\r\nNATS/1.0\r\nEdge-Relay-Hub: 0123456789abcdef\r\n\r\n\x01\x02\x03`);
    // The room is sized for the largest message, so every smaller one fits too.
    expect(writeHpub(new Uint8Array(room), room, subject, block, 32 * 1024)).toBe(0);
    expect(() => writeHpub(new Uint8Array(room), room, subject, block, 1_000_000)).toThrow(RangeError);
  });
});

describe("--backplane options", () => {
  test.each([
    "nats://hub:TOPSECRET@127.0.0.1:4222",
    "nats://TOPSECRET@127.0.0.1:4222",
    "alice:TOPSECRET@nats.example:4222",
    "nats://127.0.0.1:4222/?token=TOPSECRET",
    "nats://127.0.0.1:4222#TOPSECRET",
    "nats://127.0.0.1:4222,http://TOPSECRET.example:4223",
  ])("a refused URL (%p) exits 2 saying what is expected, never quoting it (credentials hide anywhere)", async (url) => {
    expect(await runCli(["--backplane", url])).toEqual({
      stdout: "",
      stderr: "edge-relay: --backplane: expected nats://HOST:PORT or tls://HOST:PORT; credentials go in --backplane-token or --backplane-creds, not the URL\n",
      code: 2,
    });
  });

  test("--backplane-creds that holds no key, or a seed that cannot sign, exits 2 naming the option and not the seed", async () => {
    await using dir = await tempDir();
    const seed = new TextDecoder().decode(nkeys.createUser().getSeed());
    // One character changed: the seed's checksum no longer holds.
    const damaged = seed.slice(0, 10) + (seed[10] === "A" ? "B" : "A") + seed.slice(11);
    await Bun.write(`${dir.path}/damaged.nk`, `${damaged}\n`);
    await Bun.write(`${dir.path}/none.nk`, "not a key\n");
    for (const [file, why] of [
      ["damaged.nk", "holds a NATS key that cannot sign (a damaged seed?)"],
      ["none.nk", "is neither a NATS credentials file nor an NKey seed (SU…)"],
    ]) {
      expect(await runCli(["--backplane", "nats://127.0.0.1:4222", "--backplane-creds", `${dir.path}/${file}`])).toEqual({
        stdout: "",
        stderr: `edge-relay: --backplane-creds: ${dir.path}/${file} ${why}\n`,
        code: 2,
      });
    }
  });

  test("--backplane-token without --backplane exits 2 and does not show the token", async () => {
    const { stdout, stderr, code } = await runCli([], { RELAY_BACKPLANE_TOKEN: "nats-token-value-123" });
    expect({ stdout, code }).toEqual({ stdout: "", code: 2 });
    expect(stderr).toBe("edge-relay: --backplane-token: only means something with --backplane\n");
  });
});

describe("two hubs on one nats-server", () => {
  let nats: Daemon & { url: string; port: number };
  let hub1: RelayProcess;
  let hub2: RelayProcess;
  let siteA: RelayProcess;
  let siteB: RelayProcess;
  let vmA: StreamPeer;
  let vmB: StreamPeer;
  let vmDev: StreamPeer;
  const A = "02:00:00:00:b1:0a";
  const B = "02:00:00:00:b1:0b";
  const DEV = "02:00:00:00:b1:0d";

  beforeAll(async () => {
    nats = await startNats();
    [hub1, hub2] = await Promise.all([spawnRelay(hubArgs(nats.url)), spawnRelay(hubArgs(nats.url))]);
    // Site A carries lab; site B carries lab and dev.
    [siteA, siteB] = await Promise.all([spawnSite(`${hub1.base}`, ["lab"]), spawnSite(`${hub2.base}`, ["lab", "dev"])]);
    await Promise.all([uplinkUp(siteA), uplinkUp(siteB)]);
    await Promise.all([subscribed(hub1, "lab"), subscribed(hub2, "lab", "dev")]);
    [vmA, vmB, vmDev] = await Promise.all([attachVm(siteA, "lab"), attachVm(siteB, "lab"), attachVm(siteB, "dev")]);
  });

  afterAll(async () => {
    await Promise.all([vmA, vmB, vmDev].map((vm) => vm?.[Symbol.asyncDispose]()));
    await Promise.all([siteA, siteB, hub1, hub2].map((r) => r?.stop()));
    await nats?.stop();
  });

  test("broadcast and unicast cross both ways byte-exact, each frame once, never back to its sender; lab never reaches dev", async () => {
    await deliveredOnce(vmA, vmB, A, BROADCAST, 50, "a-broadcast");
    await deliveredOnce(vmB, vmA, B, A, 50, "b-unicast");
    await deliveredOnce(vmA, vmB, A, B, 50, "a-unicast");
    await deliveredOnce(vmB, vmA, B, BROADCAST, 50, "b-broadcast");
    // dev's own traffic stays in dev; a frame from lab reaches no dev port.
    vmDev.send(makeFrame(BROADCAST, DEV, "dev only"));
    await deliveredOnce(vmB, vmA, B, A, 1, "after dev");
    expect(vmA.frames.frames.some(fromMac(DEV))).toBe(false);
    expect(vmDev.frames.frames.some((f) => fromMac(A)(f) || fromMac(B)(f))).toBe(false);
    // B's last marker came after anything that could have echoed: no VM heard its own frames.
    expect(vmA.frames.frames.some(fromMac(A))).toBe(false);
    expect(vmB.frames.frames.some(fromMac(B))).toBe(false);
  });

  test("status and /metrics show the backplane port, its counters and its subscriptions; /healthz is ok", async () => {
    const s1 = await hub1.status();
    expect(s1.backplane).toMatchObject({ state: "up", cluster: "default", servers: [nats.url], networks: ["lab"], errors: 0 });
    expect(s1.backplane.messagesOut).toBeGreaterThan(0);
    expect(s1.backplane.messagesIn).toBeGreaterThan(0);
    // A hub with no port in dev neither subscribes nor has the network.
    expect(s1.networks.map((n: any) => n.name)).toEqual(["lab"]);
    const port = s1.networks[0].ports.find((p: any) => p.kind === "backplane");
    expect(port).toMatchObject({ id: "lab/backplane-1", peer: nats.url, state: "up" });
    expect(port.rx.frames).toBeGreaterThanOrEqual(100);
    expect(port.tx.frames).toBeGreaterThanOrEqual(100);
    expect((await hub2.status()).backplane.networks.toSorted()).toEqual(["dev", "lab"]);
    const metrics = await (await fetch(`${hub1.base}/metrics`)).text();
    expect(metrics).toContain("\nedge_relay_backplane_up 1\n");
    expect(metrics).toContain('\nedge_relay_backplane_subscribed{network="lab"} 1\n');
    expect(metrics).toMatch(/\nedge_relay_backplane_messages_total\{direction="out"\} [1-9]/);
    const health = await fetch(`${hub1.base}/healthz`);
    expect([health.status, await health.text()]).toEqual([200, "ok\n"]);
  });

  test("each message is one event-loop turn's frames in the tunnel's data framing, headed with the hub's id (read by NATS's own client)", async () => {
    const nc = await natsConnect({ servers: nats.url });
    try {
      const messages: { data: Uint8Array; hub: string | undefined }[] = [];
      nc.subscribe(backplaneSubject("default", "lab"), { callback: (_error, msg) => void messages.push({ data: msg.data, hub: msg.headers?.get("Edge-Relay-Hub") }) });
      await nc.flush();
      const frames = Array.from({ length: 5 }, (_, i) => makeFrame(B, A, `batched ${i}`));
      vmA.send(...frames);
      // Sent in one write, they cross in one message.
      for (const frame of frames) expect(sameBytes(await vmB.frames.next(fromMac(A)), frame)).toBe(true);
      await waitUntil(() => messages.length > 0, "hub 1's message on lab's subject");
      expect(messages.length).toBe(1);
      expect(messages[0]!.hub).toBe((await hub1.status()).id);
      expect(sameBytes(messages[0]!.data, Uint8Array.of(1, 0, 0, ...encodeFrames(frames)))).toBe(true);
    } finally {
      await nc.close();
    }
  });

  test("a malformed message on a network's subject is dropped, counted and logged once; frames keep flowing", async () => {
    const nc = await natsConnect({ servers: nats.url });
    const subject = backplaneSubject("default", "lab");
    // Not data; a frame whose length overruns the message; a control message; a runt frame (counted by the switch).
    const from = natsHeaders();
    from.set("Edge-Relay-Hub", "00112233445566ff");
    nc.publish(subject, new TextEncoder().encode("not a frame"), { headers: from });
    const overrun = Uint8Array.of(1, 0, 0, 0, 0, 0x10, 0, 1, 2, 3);
    nc.publish(subject, overrun);
    nc.publish(subject, Uint8Array.of(0, ...new TextEncoder().encode('{"type":"ping"}')));
    nc.publish(subject, Uint8Array.of(1, 0, 0, ...encodeFrames([Uint8Array.of(1, 2, 3)])));
    await nc.flush();
    await nc.close();
    await waitUntil(async () => (await hub1.status()).backplane.errors === 3, "three messages counted as errors on hub 1");
    await waitUntil(() => /backplane lab: Cannot decode backplane message: unexpected ping; dropped/.test(hub1.stderr()), "the log line");
    // The sending hub is named when its header holds a hub id.
    expect(hub1.stderr()).toContain("backplane lab: Cannot decode tunnel message: unknown type 110 from hub 00112233445566ff; dropped");
    expect(hub1.stderr()).not.toContain("not a frame");
    const s1 = await hub1.status();
    expect(s1.protocolErrors).toBe(3);
    expect(s1.networks[0].ports.find((p: any) => p.kind === "backplane")).toMatchObject({ state: "up", errors: 3, rx: { runts: 1 } });
    await deliveredOnce(vmB, vmA, B, A, 5, "after junk");
    await deliveredOnce(vmA, vmB, A, B, 5, "after junk, back");
  });

  // Last: it restarts nats-server.
  test("NATS killed and restarted: local switching goes on, /healthz is 503 meanwhile, cross-hub frames resume within 10 s", async () => {
    await using vmA2 = await attachVm(siteA, "lab");
    const A2 = "02:00:00:00:b1:a2";
    await nats.stop();
    await waitUntil(async () => (await fetch(`${hub1.base}/healthz`)).status === 503, "hub 1 unhealthy without NATS");
    const down = await fetch(`${hub2.base}/healthz`);
    expect([down.status, await down.text()]).toEqual([503, "backplane down\n"]);
    expect((await hub1.status()).backplane).toMatchObject({ state: "down", networks: [] });
    // Site A's own switch, and hub 1 between A's VMs, carry on.
    await deliveredOnce(vmA, vmA2, A, A2, 20, "while NATS is down");
    await deliveredOnce(vmA2, vmA, A2, A, 20, "while NATS is down, back");
    vmA.send(makeFrame(B, A, "to B while NATS is down"));
    await waitUntil(async () => (await hub1.status()).backplane.drops > 0, "a counted drop on hub 1's backplane");

    nats = await startNats(nats.port);
    const took = await untilFramesFlow(vmA, vmB, A, 10_000);
    console.log(`[backplane] NATS restarted: frames cross hubs again after ${(took / 1000).toFixed(1)} s`);
    await waitUntil(async () => (await fetch(`${hub1.base}/healthz`)).status === 200, "hub 1 healthy again");
    await subscribed(hub2, "lab");
    await deliveredOnce(vmB, vmA, B, A, 20, "after the restart");
    await deliveredOnce(vmA, vmB, A, B, 20, "after the restart, back");
  });
});

describe("a NATS user limited to edge-relay.> (deploy/nats-server.conf)", () => {
  test("hubs with its NKey seed share networks; a hub without credentials stays down, unhealthy, and says why", async () => {
    await using dir = await tempDir();
    const user = nkeys.createUser();
    const seed = new TextDecoder().decode(user.getSeed());
    await Bun.write(`${dir.path}/hub.nk`, `${seed}\n`);
    const recipe = await Bun.file(`${ROOT}deploy/nats-server.conf`).text();
    const conf = recipe.replace("UHUBSPUBLICNKEYGOESHERE", user.getPublicKey()).replace(/^listen: .*\n/m, "");
    expect(conf).toContain(`{ nkey: "${user.getPublicKey()}", permissions: { publish: "edge-relay.>", subscribe: "edge-relay.>" } }`);
    await Bun.write(`${dir.path}/nats.conf`, conf);
    await using nats = await startNats(undefined, `${dir.path}/nats.conf`);
    const creds = ["--backplane-creds", `${dir.path}/hub.nk`];
    await using hub1 = await spawnRelay([...hubArgs(nats.url), ...creds]);
    await using hub2 = await spawnRelay([...hubArgs(nats.url), ...creds]);
    await using stranger = await spawnRelay(hubArgs(nats.url));
    await using siteA = await spawnSite(hub1.base, ["lab"]);
    await using siteB = await spawnSite(hub2.base, ["lab"]);
    await Promise.all([uplinkUp(siteA), uplinkUp(siteB)]);
    await using lab = await labVms([hub1, hub2], siteA, siteB, "b4");
    await deliveredOnce(lab.vmA, lab.vmB, lab.A, BROADCAST, 10, "with an nkey");
    await deliveredOnce(lab.vmB, lab.vmA, lab.B, lab.A, 10, "with an nkey, back");
    const refused = await waitUntil(async () => (await stranger.status()).backplane.lastError, "the stranger's backplane error");
    expect(refused).toMatch(/authorization/i);
    expect((await stranger.status()).backplane.state).not.toBe("up");
    expect((await fetch(`${stranger.base}/healthz`)).status).toBe(503);
    for (const relay of [hub1, hub2, stranger]) expect(relay.stdout() + relay.stderr()).not.toContain(seed);
  });
});

describe("TLS, a token and a small max_payload on the NATS server", () => {
  test("hubs that trust its CA and know the token share networks, in messages that fit; the others stay down and say why", async () => {
    await using dir = await tempDir();
    const { ca } = await testCertificate(dir.path);
    const natsToken = "nats-token-value-5f1c";
    await Bun.write(
      `${dir.path}/nats.conf`,
      `tls { cert_file: "${dir.path}/hub.crt", key_file: "${dir.path}/hub.key" }\nauthorization { token: "${natsToken}" }\nmax_payload: 4096\n`,
    );
    await using nats = await startNats(undefined, `${dir.path}/nats.conf`);
    const tls = (args: string[]) => [...hubArgs(`tls://127.0.0.1:${nats.port}`), ...args];
    await using hub1 = await spawnRelay(tls(["--backplane-ca", ca, "--backplane-token", natsToken]));
    // Hub 2 has its backplane from a config file: the same keys as the options.
    await Bun.write(`${dir.path}/hub2.json`, JSON.stringify({ backplane: [`tls://127.0.0.1:${nats.port}`], backplaneCa: ca, backplaneToken: natsToken }));
    await using hub2 = await scenario().hub(TOKEN).noProbe().with("--config", `${dir.path}/hub2.json`).spawn();
    await using wrongToken = await spawnRelay(tls(["--backplane-ca", ca, "--backplane-token", "not-the-token"]));
    // nats:// to a server that requires TLS: upgraded all the same, and checked against the system's CAs.
    await using untrusted = await spawnRelay([...hubArgs(nats.url), "--backplane-token", natsToken]);
    await using siteA = await spawnSite(`${hub1.base}`, ["lab"]);
    await using siteB = await spawnSite(`${hub2.base}`, ["lab"]);
    await Promise.all([uplinkUp(siteA), uplinkUp(siteB)]);
    await using lab = await labVms([hub1, hub2], siteA, siteB, "b5");
    // 20 frames of up to 1.4 KB at once: more than one 4 KiB message.
    await deliveredOnce(lab.vmA, lab.vmB, lab.A, BROADCAST, 20, "over TLS");
    await deliveredOnce(lab.vmB, lab.vmA, lab.B, lab.A, 20, "over TLS, back");
    const hub1Backplane = (await hub1.status()).backplane;
    expect(hub1Backplane.messagesOut).toBeGreaterThan(2);
    expect(hub1Backplane).toMatchObject({ state: "up", server: `tls://127.0.0.1:${nats.port}`, drops: 0 });
    // A frame bigger than the server takes is dropped, counted and said.
    lab.vmA.send(makeFrame(lab.B, lab.A, 5000));
    await waitUntil(async () => (await hub1.status()).backplane.drops === 1, "the big frame counted as a drop");
    await hub1.waitForLine(/backplane: a frame of 5014 bytes is more than the NATS server takes \(max_payload 4096\); dropped/);
    await deliveredOnce(lab.vmA, lab.vmB, lab.A, lab.B, 5, "after the big frame");

    expect(await waitUntil(async () => (await wrongToken.status()).backplane.lastError, "the wrong token's error")).toMatch(/authorization violation/i);
    expect(await waitUntil(async () => (await untrusted.status()).backplane.lastError, "the untrusted server's error")).toMatch(/^cannot connect to nats:\/\/127\.0\.0\.1:\d+: TLS: unable to verify/);
    for (const hub of [wrongToken, untrusted]) {
      expect((await hub.status()).backplane.state).toBe("down");
      expect((await fetch(`${hub.base}/healthz`)).status).toBe(503);
    }
    for (const relay of [hub1, hub2, wrongToken, untrusted]) expect(relay.stdout() + relay.stderr() + JSON.stringify(await relay.status())).not.toContain(natsToken);
  });
});

/** A NATS server of the test's own on loopback: INFO on connect, then `answer` for what the client sends. */
function fakeNats(info: object, answer: (socket: Socket<undefined>, text: string) => void) {
  const server = Bun.listen<undefined>({
    hostname: "127.0.0.1",
    port: 0,
    socket: {
      open: (socket) => {
        connections++;
        socket.write(`INFO ${JSON.stringify(info)}\r\n`);
      },
      data: (socket, data) => answer(socket, new TextDecoder().decode(data)),
    },
  });
  let connections = 0;
  return {
    url: `nats://127.0.0.1:${server.port}`,
    get connections() {
      return connections;
    },
    [Symbol.dispose]: () => server.stop(true),
  };
}

describe("a NATS server that sends what it should not (a fake one on loopback)", () => {
  test("bytes that do not decode drop the connection: counted, logged without them, and the hub dials again", async () => {
    using nats = fakeNats({ server_id: "fake", headers: true }, (socket, text) => {
      if (text.includes("PING")) socket.write("PONG\r\nBOGUS hostile-bytes-3e9a\r\n");
    });
    await using hub = await spawnRelay(hubArgs(nats.url));
    await waitUntil(() => nats.connections >= 2, "a second connection after the first was dropped");
    const line = await hub.waitForLine(/Cannot decode NATS protocol/);
    expect(line).toMatch(/backplane nats:\/\/127\.0\.0\.1:\d+: Cannot decode NATS protocol: unknown operation; connection dropped$/);
    const status = await hub.status();
    expect(status.backplane.errors).toBeGreaterThanOrEqual(1);
    expect(status.protocolErrors).toBe(status.backplane.errors);
    expect(hub.stdout() + hub.stderr()).not.toContain("hostile-bytes");
  });

  test("a message over a hub's maximum is skipped unread, counted and logged; the connection stays", async () => {
    let answered = false;
    using nats = fakeNats({ server_id: "fake", headers: true, max_payload: 8 << 20 }, (socket, text) => {
      if (text.includes("CONNECT")) socket.write(`PONG\r\nMSG edge-relay.default.lab 1 2000000\r\n${"x".repeat(2_000_000)}\r\nPING\r\n`);
      else if (text.includes("PONG")) answered = true;
    });
    await using hub = await spawnRelay(hubArgs(nats.url));
    await waitUntil(() => answered, "the hub's PONG to the PING after the big message");
    await hub.waitForLine(/a message of 2000000 bytes is more than a hub takes \(1048576\); dropped$/);
    const status = await hub.status();
    expect(status.backplane).toMatchObject({ state: "up", errors: 1, connects: 1 });
    expect(nats.connections).toBe(1);
  });

  test("a server that takes no message headers is refused, and status says why", async () => {
    using nats = fakeNats({ server_id: "old", headers: false }, () => {});
    await using hub = await spawnRelay(hubArgs(nats.url));
    const error = await waitUntil(async () => (await hub.status()).backplane.lastError, "the backplane's error");
    expect(error).toBe(`cannot connect to ${nats.url}: the server does not take message headers (NATS 2.2 or later is needed)`);
    expect((await hub.status()).backplane.state).toBe("down");
  });
});

describe("messages from other hubs to a tunnel (a fake NATS server on loopback)", () => {
  test("the unicast frames of several messages that arrive together go down a tunnel in one message, in order, not one message each", async () => {
    const subject = backplaneSubject("default", "lab");
    let sid: string | undefined;
    let published = "";
    let server: Socket<undefined> | undefined;
    using nats = fakeNats({ server_id: "fake", headers: true }, (socket, text) => {
      server = socket;
      if (text.includes("CONNECT")) socket.write("PONG\r\n");
      else if (text.includes("PING")) socket.write("PONG\r\n");
      sid ??= new RegExp(`SUB ${subject.replaceAll(".", "\\.")} (\\d+)`).exec(text)?.[1];
      published += text;
    });
    await using hub = await spawnRelay(hubArgs(nats.url));
    const ws = new WebSocket(`${hub.base.replace(/^http/, "ws")}/tunnel`, { headers: { Authorization: `Bearer ${TOKEN}` }, protocols: [TUNNEL_PROTOCOL] });
    ws.binaryType = "arraybuffer";
    const data: Uint8Array[] = [];
    let welcome = false;
    ws.onmessage = (e) => {
      const bytes = new Uint8Array(e.data as ArrayBuffer);
      if (bytes[0] === 0) welcome ||= JSON.parse(new TextDecoder().decode(bytes.subarray(1))).type === "welcome";
      else data.push(bytes);
    };
    await new Promise((r, j) => ((ws.onopen = r), (ws.onerror = j)));
    ws.send(encodeControl({ type: "hello", version: 1, networks: ["lab"], id: "00000000000000c1", name: "site-c" }));
    await waitUntil(() => welcome && sid !== undefined, "the welcome, and the hub's subscription to lab");
    const X = "02:00:00:00:58:0a"; // behind the tunnel
    const Y = "02:00:00:00:58:0b"; // behind another hub
    const msg = (frames: Uint8Array[]) => {
      const payload = Uint8Array.of(1, 0, 0, ...encodeFrames(frames));
      return Buffer.concat([Buffer.from(`MSG ${subject} ${sid} ${payload.length}\r\n`), payload, Buffer.from("\r\n")]);
    };
    // Each side's MAC learned: Y's broadcast comes from NATS, X's goes out to it.
    server!.write(msg([makeFrame(BROADCAST, Y, "from y")]));
    await waitUntil(() => data.length === 1, "Y's broadcast down the tunnel");
    ws.send(Uint8Array.of(1, 0, 0, ...encodeFrames([makeFrame(BROADCAST, X, "from x")])));
    await waitUntil(() => published.includes("from x"), "X's broadcast published");
    const frames = Array.from({ length: 6 }, (_, i) => makeFrame(X, Y, `unicast ${i}`));
    server!.write(Buffer.concat([msg(frames.slice(0, 2)), msg(frames.slice(2, 4)), msg(frames.slice(4))]));
    await waitUntil(async () => (await hub.status()).networks.find((n: any) => n.name === "lab")?.ports.find((p: any) => p.kind === "tunnel")?.tx.frames === 7, "the six frames sent down the tunnel");
    await waitUntil(() => data.length > 1, "the data message");
    expect(data.slice(1).map((m) => [...m])).toEqual([[1, 0, 0, ...encodeFrames(frames)]]);
    ws.close();
  });
});

describe("a tunnel between two hubs that share the backplane", () => {
  test("is a loop: the tunnel (not the backplane) is blocked, and frames then arrive once", async () => {
    await using nats = await startNats();
    await using hub1 = await spawnRelay(hubArgs(nats.url, "0.2"));
    await using siteA = await spawnSite(`${hub1.base}`, ["lab"]);
    await uplinkUp(siteA);
    // Hub 2 has lab from its site and carries it up to hub 1 as well as over the backplane.
    await using hub2 = await spawnRelay([...hubArgs(nats.url, "0.2"), "--uplink", hub1.base.replace(/^http/, "ws"), "--uplink-token", TOKEN]);
    await using siteB = await spawnSite(`${hub2.base}`, ["lab"]);
    await uplinkUp(siteB);
    // (Hub 2 also carries "default", a network of its own from before site B came: a loop of its own.)
    const blocked = async (hub: RelayProcess) =>
      (await hub.status()).networks.filter((n: any) => n.name === "lab").flatMap((n: any) => n.ports).filter((p: any) => p.state === "blocked-loop");
    await waitUntil(async () => (await blocked(hub1)).length + (await blocked(hub2)).length > 0, "a port of lab blocked for the loop");
    const all = [...(await blocked(hub1)), ...(await blocked(hub2))];
    expect(all.map((p: any) => p.kind).every((k: string) => k === "tunnel" || k === "uplink")).toBe(true);
    await using lab = await labVms([hub1, hub2], siteA, siteB, "b3");
    const { vmA, vmB, A, B } = lab;
    await deliveredOnce(vmA, vmB, A, BROADCAST, 20, "looped");
    await deliveredOnce(vmB, vmA, B, BROADCAST, 20, "looped, back");
    expect(vmA.frames.frames.some(fromMac(A))).toBe(false);
  });
});

describe("HAProxy in front of two hubs (deploy/haproxy-hubs.cfg)", () => {
  test("kill -9 the hub a site is on: it redials through HAProxy to the other hub; frames flow again within 10 s, none twice", async () => {
    await using dir = await tempDir();
    const { ca, pem } = await testCertificate(dir.path);
    await using nats = await startNats();
    const hubs = await Promise.all([spawnRelay(hubArgs(nats.url)), spawnRelay(hubArgs(nats.url))]);
    await using _hubs = { [Symbol.asyncDispose]: () => Promise.all(hubs.map((h) => h.stop("SIGKILL"))).then(() => {}) };
    const port = await freePort();
    const recipe = await Bun.file(`${ROOT}deploy/haproxy-hubs.cfg`).text();
    const cfg = recipe
      .replace("bind :443 ssl crt /etc/haproxy/certs/relay.example.net.pem", `bind 127.0.0.1:${port} ssl crt ${pem}`)
      .replace("server hub1 10.0.0.11:8080", `server hub1 ${new URL(hubs[0]!.base).host}`)
      .replace("server hub2 10.0.0.12:8080", `server hub2 ${new URL(hubs[1]!.base).host}`);
    expect(cfg).not.toContain("10.0.0.1");
    expect(cfg).toContain(`bind 127.0.0.1:${port} ssl`);
    await Bun.write(`${dir.path}/haproxy.cfg`, cfg);
    await using haproxy = spawnDaemon(["haproxy", "-f", `${dir.path}/haproxy.cfg`, "-db"]);
    const front = `https://127.0.0.1:${port}`;
    const caText = await Bun.file(ca).text();
    await waitUntil(async () => {
      if (haproxy.proc.exitCode !== null) throw new Error(`HAProxy exited (${haproxy.proc.exitCode}):\n${haproxy.log()}`);
      return (await fetch(`${front}/tunnel`, { tls: { ca: caText } })).status === 401;
    }, "HAProxy with a hub behind it");

    await using siteA = await spawnSite(`wss://127.0.0.1:${port}`, ["lab"], ["--uplink-ca", ca]);
    await uplinkUp(siteA);
    // Which hub HAProxy chose; site B goes straight to the other, so A's frames cross NATS.
    const onFirst = (await hubs[0]!.status()).limits.tunnels === 1;
    const [chosen, other] = onFirst ? [hubs[0]!, hubs[1]!] : [hubs[1]!, hubs[0]!];
    expect((await other.status()).limits.tunnels).toBe(0);
    await using siteB = await spawnSite(other.base, ["lab"]);
    await uplinkUp(siteB);
    await using lab = await labVms([chosen, other], siteA, siteB, "b2");
    const { vmA, vmB, A, B } = lab;
    await deliveredOnce(vmA, vmB, A, BROADCAST, 20, "before");
    await deliveredOnce(vmB, vmA, B, A, 20, "before, back");

    await chosen.stop("SIGKILL");
    const took = await untilFramesFlow(vmA, vmB, A, 10_000);
    console.log(`[backplane] hub killed: site A's frames reach site B again after ${(took / 1000).toFixed(1)} s`);
    await uplinkUp(siteA, 2);
    expect((await other.status()).limits.tunnels).toBe(2);
    await deliveredOnce(vmA, vmB, A, B, 20, "after");
    await deliveredOnce(vmB, vmA, B, A, 20, "after, back");
    expect(vmA.frames.frames.some(fromMac(A))).toBe(false);
    // The uplink names its networks in the URL, which HAProxy hashes on (its log has the tunnel that ended).
    expect(haproxy.log()).toMatch(/"GET \/tunnel\?networks=lab HTTP\/1\.1"/);
  });
});

describe("the README's backplane deployment", () => {
  test("shows deploy/haproxy-hubs.cfg and deploy/nats-server.conf as they are, the files this suite runs", async () => {
    const text = await readme();
    const cfg = await Bun.file(`${ROOT}deploy/haproxy-hubs.cfg`).text();
    const conf = await Bun.file(`${ROOT}deploy/nats-server.conf`).text();
    // (Booleans: a failing toContain would print the whole README.)
    expect(text.includes("```haproxy\n" + cfg + "```\n")).toBe(true);
    expect(text.includes("```\n" + conf + "```\n")).toBe(true);
  });
});
