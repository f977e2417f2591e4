import { describe, expect, test } from "bun:test";
// existsSync, not Bun.file().exists(): the latter says false for a socket file.
import { existsSync } from "node:fs";
import { openUnixDgram } from "../relay.ts";
import {
  BROADCAST,
  FrameQueue,
  type RelayProcess,
  attachVm,
  connectStream,
  freePort,
  fromMac,
  listenStream,
  makeFrame,
  spawnRelay,
  runCli,
  tempDir,
  udpPeer,
  uplinkUp,
  waitUntil,
  uplinkFailed,
  scenario,
} from "./helpers.ts";

const TOKEN = "transport-secret-81c2";
/** Resolves once the relay has `count` ports whose peer is `peer` (unix connections have no address). */
function portsWithPeer(relay: RelayProcess, peer: string, count: number) {
  return waitUntil(async () => {
    const nets = (await relay.status()).networks;
    return nets.flatMap((n: any) => n.ports).filter((p: any) => p.peer === peer).length === count;
  }, `${count} ports from ${peer}`);
}

/** A hub and two sites; the sites get `a` and `b` as extra options. */
async function topology(a: string[], b: string[], hubHost = "127.0.0.1") {
  const hub = await spawnRelay(["--http", `${hubHost.includes(":") ? `[${hubHost}]` : hubHost}:0`, "--token", TOKEN]);
  const hubUrl = hub.base.replace(/^http/, "ws");
  const site = (args: string[]) => scenario().with(...args).uplink(hubUrl, TOKEN).spawn();
  // A site that fails to start must not leave the hub or the other site running.
  const started = await Promise.allSettled([site(a), site(b)]);
  const [siteA, siteB] = started.map((r) => (r.status === "fulfilled" ? r.value : undefined));
  if (!siteA || !siteB) {
    await Promise.all([hub.stop(), siteA?.stop(), siteB?.stop()]);
    throw (started.find((r) => r.status === "rejected") as PromiseRejectedResult).reason;
  }
  await Promise.all([uplinkUp(siteA), uplinkUp(siteB)]);
  return {
    hub,
    siteA,
    siteB,
    async [Symbol.asyncDispose]() {
      await Promise.all([hub.stop(), siteA.stop(), siteB.stop()]);
    },
  };
}

describe("unix stream sockets", () => {
  test("--qemu-listen unix:PATH and unix:@abstract carry frames through a hub to TCP VMs", async () => {
    await using dir = await tempDir();
    const path = `${dir.path}/a.sock`;
    const abstract = `@edge-relay-test-${process.pid}`;
    await using t = await topology(
      ["--qemu-listen", `unix:${path}`, "--qemu-listen", `lab=unix:${abstract}`],
      ["--qemu-listen", "127.0.0.1:0", "--qemu-listen", "lab=127.0.0.1:0"],
    );
    expect(t.siteA.bound.map((b) => `${b.what} ${b.network} ${b.address}`)).toContain(`qemu-listen default unix:${path}`);
    for (const [target, network, A, B] of [
      [path, "default", "02:00:00:00:30:01", "02:00:00:00:30:02"],
      [abstract, "lab", "02:00:00:00:30:03", "02:00:00:00:30:04"],
    ] as const) {
      await using vmA = await connectStream(target);
      await portsWithPeer(t.siteA, `unix:${target}`, 1);
      await using vmB = await attachVm(t.siteB, network);
      const hello = makeFrame(BROADCAST, A, `over unix ${target}`);
      vmA.send(hello);
      expect(await vmB.frames.next(fromMac(A))).toEqual(hello);
      const reply = makeFrame(A, B, 9000);
      vmB.send(reply);
      expect(await vmA.frames.next(fromMac(B))).toEqual(reply);
    }
    expect(existsSync(path)).toBe(true);
    await t.siteA.stop();
    expect(existsSync(path)).toBe(false);
  });

  test("--qemu-connect unix:PATH dials a VM's unix listener", async () => {
    await using dir = await tempDir();
    const path = `${dir.path}/vm.sock`;
    await using vm = listenStream(path);
    await using relay = await scenario().with("--qemu-connect", `unix:${path}`).listen().spawn();
    const conn = await vm.accepted();
    await portsWithPeer(relay, `unix:${path}`, 1);
    await using other = await attachVm(relay);
    const f = makeFrame(BROADCAST, "02:00:00:00:31:01", "to the unix VM");
    other.send(f);
    expect(await conn.frames.next()).toEqual(f);
    expect(relay.stdout()).toContain(`qemu-connect default: connected to unix:${path}`);
  });

  test("a stale socket file from a killed relay does not stop a restart; a live one or a plain file fails clearly", async () => {
    await using dir = await tempDir();
    const path = `${dir.path}/qemu.sock`;
    await using first = await scenario().with("--qemu-listen", `unix:${path}`).spawn();
    expect(await runCli(scenario().with("--qemu-listen", `unix:${path}`).args)).toEqual({
      stdout: "",
      stderr: `edge-relay: --qemu-listen: Cannot listen on unix:${path}: address already in use (EADDRINUSE)\n`,
      code: 1,
    });
    await first.stop("SIGKILL");
    expect(await Bun.$`test -S ${path}`.nothrow().then((r) => r.exitCode)).toBe(0);
    await using second = await scenario().with("--qemu-listen", `unix:${path}`).spawn();
    await using vm = await connectStream(path);
    await portsWithPeer(second, `unix:${path}`, 1);
    const plain = `${dir.path}/not-a-socket`;
    await Bun.write(plain, "keep me");
    expect(await runCli(scenario().with("--qemu-listen", `unix:${plain}`).args)).toEqual({
      stdout: "",
      stderr: `edge-relay: --qemu-listen: Cannot listen on unix:${plain}: the path exists and is not a socket\n`,
      code: 1,
    });
    expect(await Bun.file(plain).text()).toBe("keep me");
  });
});

describe("unix datagram sockets", () => {
  test("--qemu-udp unix:PATH,unix:VM exchanges frames with a VM's dgram socket only; unix:PATH alone learns peers", async () => {
    await using dir = await tempDir();
    const relayPath = `${dir.path}/relay.dgram`;
    const learningPath = `${dir.path}/learning.dgram`;
    const vmPath = `${dir.path}/vm.dgram`;
    const fixedFrames = new FrameQueue();
    const learnedFrames = new FrameQueue();
    const vm = await openUnixDgram(vmPath, (data) => fixedFrames.push(data));
    const learned = await openUnixDgram(`@edge-relay-dgram-${process.pid}`, (data) => learnedFrames.push(data));
    try {
      await using relay = await scenario().with("--qemu-udp", `unix:${relayPath},unix:${vmPath}`, "--qemu-udp", `unix:${learningPath}`).listen().spawn();
      await using tcp = await attachVm(relay);
      const [V, L, T] = ["02:00:00:00:32:01", "02:00:00:00:32:02", "02:00:00:00:32:03"];
      const toVm = makeFrame(BROADCAST, T, "before the VM sent anything");
      tcp.send(toVm);
      expect(await fixedFrames.next()).toEqual(toVm);
      const fromVm = makeFrame(T, V, 60_000);
      expect(vm.send(fromVm, { path: relayPath })).toBe(true);
      expect(await tcp.frames.next(fromMac(V))).toEqual(fromVm);
      const fromLearned = makeFrame(V, L, "hello from an abstract socket");
      learned.send(makeFrame(BROADCAST, L, "not the fixed remote"), { path: relayPath });
      learned.send(fromLearned, { path: learningPath });
      expect(await fixedFrames.next(fromMac(L))).toEqual(fromLearned);
      await waitUntil(async () => (await relay.status()).datagrams.find((d: any) => d.address === `unix:${relayPath}`).drops.foreign === 1, "the stranger's datagram counted");
      const back = makeFrame(L, V, 1500);
      vm.send(back, { path: relayPath });
      expect(await learnedFrames.next(fromMac(V))).toEqual(back);
      const peers = (await relay.status()).networks[0].ports.map((p: any) => p.peer);
      expect(peers).toEqual(expect.arrayContaining([`unix:${vmPath}`, `unix:@edge-relay-dgram-${process.pid}`]));
      expect(existsSync(relayPath)).toBe(true);
      await relay.stop();
      expect(existsSync(relayPath)).toBe(false);
    } finally {
      await vm.close();
      await learned.close();
    }
  });
});

describe("unix datagram sockets, hostile peers", () => {
  // python3 builds the peer: it can bind an abstract name that is not UTF-8, which Bun cannot.
  const PEER = `
import socket, sys
relay = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(b"\\0" + b"\\xff" * 40)
s.settimeout(10)
frame = bytes.fromhex("ffffffffffff" "020000003501" "88b5") + b"not utf-8 here"
s.sendto(frame, relay)
s.sendto(b"\\x00" * 70000, relay)
reply, _ = s.recvfrom(70000)
print(reply[6:12].hex())
`;

  test("a peer with a non-UTF-8 name gets its replies; an oversize datagram is dropped whole", async () => {
    await using dir = await tempDir();
    const relayPath = `${dir.path}/relay.dgram`;
    await using relay = await scenario().with("--qemu-udp", `unix:${relayPath}`).listen().spawn();
    await using vm = await attachVm(relay);
    const peer = Bun.spawn(["python3", "-c", PEER, relayPath], { stdout: "pipe", stderr: "pipe" });
    await using _peer = { [Symbol.asyncDispose]: async () => void peer.kill() };
    const announce = await vm.frames.next(fromMac("02:00:00:00:35:01"));
    expect(new TextDecoder().decode(announce.subarray(14))).toBe("not utf-8 here");
    await relay.waitForLine(/dropped a 70000-byte datagram \(frames are at most 69632 bytes\); further ones are only counted/);
    expect((await relay.status()).protocolErrors).toBe(1);
    vm.send(makeFrame("02:00:00:00:35:01", "02:00:00:00:35:02", "reply"));
    expect(await new Response(peer.stdout).text()).toBe("020000003502\n");
    expect(await peer.exited).toBe(0);
    expect(relay.proc.exitCode).toBeNull();
  });

  test("a path a live process uses is not taken over, whichever kind of socket it is", async () => {
    await using dir = await tempDir();
    const path = `${dir.path}/busy.sock`;
    await using other = listenStream(path);
    expect(await runCli(scenario().with("--qemu-udp", `unix:${path}`).args)).toEqual({
      stdout: "",
      stderr: `edge-relay: --qemu-udp: Cannot listen on unix:${path}: address already in use (EADDRINUSE)\n`,
      code: 1,
    });
    const dgramPath = `${dir.path}/busy.dgram`;
    const dgram = await openUnixDgram(dgramPath, () => {});
    try {
      expect((await runCli(scenario().with("--qemu-listen", `unix:${dgramPath}`).args)).stderr).toBe(
        `edge-relay: --qemu-listen: Cannot listen on unix:${dgramPath}: address already in use (EADDRINUSE)\n`,
      );
    } finally {
      await dgram.close();
    }
    await using vm = await connectStream(path);
    expect(vm.local).toBeString();
  });
});

describe("IPv6", () => {
  test("hub, uplinks, QEMU TCP and UDP ports all on [::1]", async () => {
    await using peerB = await udpPeer("::1").then((p) => Object.assign(p, { [Symbol.asyncDispose]: async () => p[Symbol.dispose]() }));
    await using t = await topology(
      ["--qemu-listen", "[::1]:0", "--qemu-udp", "[::1]:0"],
      ["--qemu-listen", "[::1]:0", "--qemu-udp", `[::1]:0,[::1]:${peerB.port}`],
      "::1",
    );
    expect(t.hub.base).toMatch(/^http:\/\/\[::1\]:\d+$/);
    expect(t.siteA.bound.find((b) => b.what === "qemu-listen")!.address).toMatch(/^\[::1\]:\d+$/);
    await using vmA = await attachVm(t.siteA);
    expect(vmA.local).toMatch(/^\[::1\]:\d+$/);
    await using vmB = await attachVm(t.siteB);
    const hello = makeFrame(BROADCAST, "02:00:00:00:33:01", "v6");
    vmA.send(hello);
    expect(await vmB.frames.next(fromMac("02:00:00:00:33:01"))).toEqual(hello);
    expect(await peerB.frames.next(fromMac("02:00:00:00:33:01"))).toEqual(hello);
    const reply = makeFrame("02:00:00:00:33:01", "02:00:00:00:33:02", 1400);
    peerB.send(reply, t.siteB.port("qemu-udp"), "::1");
    expect(await vmA.frames.next(fromMac("02:00:00:00:33:02"))).toEqual(reply);
  });
});

describe("address reuse", () => {
  test("a relay restarted right away rebinds its TCP listener although connections sit in TIME_WAIT", async () => {
    const port = await freePort();
    await using first = await scenario().with("--qemu-listen", `127.0.0.1:${port}`).spawn();
    await using vm = await connectStream(port);
    await portsWithPeer(first, vm.local, 1);
    await first.stop("SIGKILL");
    await vm.closed;
    await waitUntil(async () => (await Bun.$`ss -Htan state time-wait sport = :${port}`.text()).trim() !== "", "a TIME_WAIT entry on the port");
    await using second = await scenario().with("--qemu-listen", `127.0.0.1:${port}`).spawn();
    expect(second.port("qemu-listen")).toBe(port);
  });
});

describe("TLS", () => {
  async function certificate(dir: string) {
    const cert = `${dir}/cert.pem`;
    const key = `${dir}/key.pem`;
    await Bun.$`openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ${key} -out ${cert} -days 1 -subj /CN=edge-relay-test -addext subjectAltName=IP:127.0.0.1,DNS:localhost`.quiet();
    const fingerprint = (await Bun.$`openssl x509 -in ${cert} -noout -fingerprint -sha256`.text()).trim().split("=")[1]!;
    return { cert, key, fingerprint };
  }

  test("a self-signed wss:// hub is refused without --uplink-ca, with another CA, or with a wrong pin, each said in its own words; with the CA (and the right pin) frames flow", async () => {
    await using dir = await tempDir();
    const { cert, key, fingerprint } = await certificate(dir.path);
    await using other = await tempDir();
    const { cert: otherCa } = await certificate(other.path);
    await using hub = await scenario().hub(TOKEN).with("--tls-cert", cert, "--tls-key", key).spawn();
    expect(hub.base).toMatch(/^https:\/\/127\.0\.0\.1:\d+$/);
    const wss = hub.base.replace(/^https/, "wss");
    const site = (...extra: string[]) =>
      scenario().listen().uplink(wss, TOKEN).with(...extra).spawn();
    const refused = async (...extra: string[]) => {
      await using s = await site(...extra);
      const status = await waitUntil(async () => {
        const u = (await s.status()).uplink;
        return u.attempts >= 2 && u.state !== "up" && u.lastError && u;
      }, "two refused dials");
      expect(status.connects).toBe(0);
      // The log says the same as /status, on one line.
      expect(s.stderr()).toContain(`uplink: ${wss}/tunnel: ${status.lastError}; retrying with backoff\n`);
      return status.lastError as string;
    };
    // The relay's words, not Bun's (which a loose match on "certificate" would also accept).
    expect(await refused()).toMatch(/^TLS: certificate not trusted \(use --uplink-ca for a private CA or a self-signed hub\): self.signed certificate$/);
    expect(await refused("--uplink-ca", otherCa)).toMatch(new RegExp(`^TLS: certificate not trusted by the CA in --uplink-ca ${otherCa}: self.signed certificate$`));
    const wrongPin = fingerprint.replace(/^../, fingerprint.startsWith("00") ? "11" : "00");
    // Bun itself calls a refused pin a host-name mismatch.
    expect(await refused("--uplink-ca", cert, "--uplink-fingerprint", wrongPin)).toBe(`TLS: the hub's certificate does not match --uplink-fingerprint (it is ${fingerprint})`);

    await using siteA = await site("--uplink-ca", cert);
    await using siteB = await site("--uplink-ca", cert, "--uplink-fingerprint", fingerprint.replaceAll(":", "").toLowerCase());
    await Promise.all([uplinkUp(siteA), uplinkUp(siteB)]);
    await using vmA = await attachVm(siteA);
    await using vmB = await attachVm(siteB);
    const f = makeFrame(BROADCAST, "02:00:00:00:34:01", "through TLS");
    vmA.send(f);
    expect(await vmB.frames.next(fromMac("02:00:00:00:34:01"))).toEqual(f);
    const hubStatus: any = await fetch(`${hub.base}/status`, { tls: { ca: await Bun.file(cert).text() } }).then((r) => r.json());
    expect(hubStatus.networks[0].ports.length).toBe(2);
  });

  test("a hub whose certificate is for other names, or has expired, is told apart from an untrusted one", async () => {
    await using dir = await tempDir();
    const d = dir.path;
    const { cert, key } = await certificate(d);
    // A certificate that ended yesterday (req -x509 takes no negative -days; x509 -req does).
    await Bun.write(`${d}/ext`, "subjectAltName=IP:127.0.0.1\n");
    await Bun.$`openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ${d}/old.key -out ${d}/old.csr -subj /CN=old`.quiet();
    await Bun.$`openssl x509 -req -in ${d}/old.csr -signkey ${d}/old.key -out ${d}/old.pem -days -1 -extfile ${d}/ext`.quiet();
    const failed = async (hubHttp: string, hubCert: string, hubKey: string) => {
      await using hub = await spawnRelay(["--http", hubHttp, "--token", TOKEN, "--tls-cert", hubCert, "--tls-key", hubKey]);
      await using site = await scenario().uplink(hub.base.replace(/^https/, "wss"), TOKEN).with("--uplink-ca", hubCert).spawn();
      return (await uplinkFailed(site)).lastError;
    };
    // 127.0.0.2 is loopback too, but the certificate names 127.0.0.1 and localhost only.
    expect(await failed("127.0.0.2:0", cert, key)).toBe("TLS: the hub's certificate is not for the host name in --uplink");
    expect(await failed("127.0.0.1:0", `${d}/old.pem`, `${d}/old.key`)).toBe("TLS: certificate has expired (check the hub certificate's dates and this host's clock)");
  });

  test("a wss:// uplink to a hub without TLS says so, not that a certificate is untrusted", async () => {
    await using hub = await scenario().hub(TOKEN).spawn();
    await using site = await scenario().uplink(hub.base.replace(/^http/, "wss"), TOKEN).spawn();
    const uplink = await uplinkFailed(site);
    expect(uplink.lastError).toBe("TLS: the hub does not speak TLS on that port (is it ws://?)");
  });

  test("a ws:// uplink to a hub that speaks TLS says the hub may want wss://", async () => {
    await using dir = await tempDir();
    const { cert, key } = await certificate(dir.path);
    await using hub = await scenario().hub(TOKEN).with("--tls-cert", cert, "--tls-key", key).spawn();
    await using site = await scenario().uplink(hub.base.replace(/^https/, "ws"), TOKEN).spawn();
    const uplink = await uplinkFailed(site);
    expect(uplink.lastError).toBe("the hub closed the connection without answering the upgrade: it may speak TLS (is it wss://?)");
  });

  test("--insecure connects to an unverified hub and says so in the log on every connect", async () => {
    await using dir = await tempDir();
    const { cert, key } = await certificate(dir.path);
    const hubPort = await freePort();
    const hubArgs = ["--http", `127.0.0.1:${hubPort}`, "--token", TOKEN, "--tls-cert", cert, "--tls-key", key];
    let hub = await spawnRelay(hubArgs);
    await using _hubs = { [Symbol.asyncDispose]: () => hub.stop("SIGKILL").then(() => {}) };
    await using siteR = await scenario().listen().uplink(`wss://127.0.0.1:${hubPort}`, TOKEN).with("--insecure").spawn();
    await uplinkUp(siteR);
    await hub.stop("SIGKILL");
    hub = await spawnRelay(hubArgs);
    await waitUntil(async () => (await siteR.status()).uplink.connects === 2, "second connect");
    expect(siteR.stderr().match(/--insecure: the certificate of wss:\/\/127\.0\.0\.1:\d+\/tunnel was NOT verified/g)?.length).toBe(2);
  });

  test("bad TLS options exit 2 naming the option", async () => {
    expect(await runCli(["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"])).toEqual({
      stdout: "",
      stderr: "edge-relay: --tls-cert: cannot read /nonexistent/cert.pem: no such file or directory (ENOENT)\n",
      code: 2,
    });
    await using dir = await tempDir();
    const { cert } = await certificate(dir.path);
    expect(await runCli(["--tls-cert", cert])).toEqual({ stdout: "", stderr: "edge-relay: --tls-key: --tls-cert and --tls-key go together\n", code: 2 });
    const pin = await runCli(["--uplink", "wss://127.0.0.1:1", "--uplink-token", "uplink-token-0123", "--uplink-fingerprint", "abc"]);
    expect(pin).toEqual({ stdout: "", stderr: "edge-relay: --uplink-fingerprint: expected a SHA-256 fingerprint: 64 hex digits, colons optional\n", code: 2 });
    const mcast = await runCli(["--qemu-mcast", "10.0.0.1:5000"]);
    expect(mcast.stderr).toStartWith("edge-relay: --qemu-mcast (qemuMcast[0]): expected [NET=]GROUP:PORT[,LOCALADDR]");
    expect(mcast.code).toBe(2);
  });
});
