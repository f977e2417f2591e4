/**
 * The deployment pieces: the systemd unit (checked by systemd-analyze, and the compiled binary run
 * the way the unit runs it), the container image (built and run with Podman), HAProxy terminating TLS in front of a hub (deploy/haproxy.cfg, the
 * README's recipe), and the README's recipe for a hub and a site on one host.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { chownSync, existsSync, mkdirSync, readFileSync, readlinkSync, statSync } from "node:fs";
import { type Socket, connect, createServer } from "node:net";
import { openUnixDgram } from "../relay.ts";
import {
  BROADCAST,
  FrameQueue,
  RELAY,
  type RelayProcess,
  attachVm,
  connectStream,
  descendants,
  freePort,
  fromMac,
  makeFrame,
  spawnDaemon,
  spawnRelay,
  tempDir,
  testCertificate,
  uplinkUp,
  waitUntil,
  ROOT,
  readme,
  recipe,
  scenario,
} from "./helpers.ts";

const UNIT = `${ROOT}deploy/edge-relay.service`;
const TOKEN = "deploy-test-token-93ac";
const ADMIN = "deploy-admin-token-51f0";

/** A frame each way between a VM at `a` and a VM at `b`. */
async function framesCross(a: RelayProcess, b: RelayProcess, tag: string) {
  await using vmA = await attachVm(a);
  await using vmB = await attachVm(b);
  const A = `02:00:00:00:${tag}:01`;
  const B = `02:00:00:00:${tag}:02`;
  const hello = makeFrame(BROADCAST, A, `hello ${tag}`);
  vmA.send(hello);
  expect(await vmB.frames.next(fromMac(A))).toEqual(hello);
  const reply = makeFrame(A, B, 1400);
  vmB.send(reply);
  expect(await vmA.frames.next(fromMac(B))).toEqual(reply);
}

/** `Key=value` settings of a unit file, in order (a key may repeat). */
function unitSettings(text: string): [string, string][] {
  return text
    .split("\n")
    .filter((l) => /^[A-Za-z]+=/.test(l))
    .map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]);
}

describe("systemd unit and the compiled binary", () => {
  let dir: AsyncDisposable & { path: string };
  let binary: string;

  beforeAll(async () => {
    dir = await tempDir();
    binary = `${dir.path}/edge-relay`;
    // As the unit's comment and the README say: one self-contained executable.
    await Bun.$`${process.execPath} build --compile --minify ${RELAY} --outfile ${binary}`.cwd(dir.path).quiet();
  }, 60_000);
  afterAll(async () => {
    await dir?.[Symbol.asyncDispose]();
  });

  test("the unit has the hardening the deployment relies on", async () => {
    const settings = unitSettings(await Bun.file(UNIT).text());
    const get = (key: string) => settings.filter(([k]) => k === key).map(([, v]) => v);
    expect(get("Type")).toEqual(["exec"]);
    expect(get("ExecStart")).toEqual(["/usr/local/bin/edge-relay --config /etc/edge-relay/relay.json"]);
    expect(get("EnvironmentFile")).toEqual(["/etc/edge-relay/env"]);
    expect(get("Restart")).toEqual(["on-failure"]);
    expect(get("RestartPreventExitStatus")).toEqual(["2"]);
    expect(get("DynamicUser")).toEqual(["yes"]);
    expect(get("StateDirectory")).toEqual(["edge-relay"]);
    expect(get("RuntimeDirectory")).toEqual(["edge-relay"]);
    expect(get("NoNewPrivileges")).toEqual(["yes"]);
    expect(get("ProtectSystem")).toEqual(["strict"]);
    expect(get("RestrictAddressFamilies")).toEqual(["AF_UNIX AF_INET AF_INET6"]);
    expect(get("CapabilityBoundingSet")).toEqual([""]);
    // Bun's JIT needs writable and executable memory.
    expect(get("MemoryDenyWriteExecute")).toEqual(["no"]);
  });

  test("systemd-analyze verify finds nothing to say about the unit", async () => {
    if (!Bun.which("systemd-analyze")) {
      // In CI (.ci/run installs it) a missing tool is a failure, not a skip.
      if (process.env.CI) throw new Error("systemd-analyze is not installed: apt-get install systemd (.ci/run does)");
      console.warn("skipped: systemd-analyze is not installed (Debian's systemd package has it)");
      return;
    }
    // verify checks that ExecStart's program exists: point a copy at the compiled binary.
    const unit = `${dir.path}/edge-relay.service`;
    const text = (await Bun.file(UNIT).text()).replace(/^ExecStart=\/usr\/local\/bin\/edge-relay /m, `ExecStart=${binary} `);
    expect(text).toContain(`ExecStart=${binary} --config`);
    await Bun.write(unit, text);
    const verify = async (path: string) => {
      const r = await Bun.$`systemd-analyze verify ${path}`.nothrow().quiet();
      return { code: r.exitCode, output: `${r.stdout}${r.stderr}` };
    };
    expect(await verify(unit)).toEqual({ code: 0, output: "" });
    // The check is not blind: a misspelt setting is reported.
    const broken = `${dir.path}/broken.service`;
    await Bun.write(broken, text.replace("ProtectSystem=strict", "ProtectSistem=strict"));
    expect((await verify(broken)).output).toContain("Unknown key 'ProtectSistem' in section [Service]");

    // systemd 250 and later rate the sandbox offline; 1.4 when written ("OK"), lower is better.
    const security = await Bun.$`systemd-analyze security --offline=true ${unit}`.nothrow().quiet();
    if (security.exitCode === 0 || /exposure level/.test(`${security.stdout}`)) {
      const level = Number(/Overall exposure level for \S+: ([\d.]+)/.exec(`${security.stdout}`)?.[1]);
      expect(level).toBeLessThanOrEqual(2);
    }
  });

  test("the compiled binary runs as the unit runs it: --config, secrets from the environment file, unix sockets, SIGTERM exits 0", async () => {
    const runtime = `${dir.path}/run`;
    mkdirSync(runtime, { mode: 0o750 });
    const config = `${dir.path}/relay.json`;
    await Bun.write(
      config,
      JSON.stringify({ http: "127.0.0.1:0", qemuListen: [`unix:${runtime}/default.sock`], qemuUdp: [`unix:${runtime}/default.dgram`] }),
    );
    const envFile = `${dir.path}/env`;
    await Bun.write(envFile, `# /etc/edge-relay/env\nRELAY_TOKENS=${TOKEN}\nRELAY_ADMIN_TOKEN=${ADMIN}\n`);
    const env = Object.fromEntries(
      (await Bun.file(envFile).text()).split("\n").filter((l) => /^[A-Z_]+=/.test(l)).map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]),
    );
    const hub = await spawnRelay(["--config", config], { env, command: [binary] });
    await using _hub = hub;
    expect(readlinkSync(`/proc/${hub.proc.pid}/exe`)).toBe(binary);
    const status = async () => (await fetch(`${hub.base}/status`, { headers: { Authorization: `Bearer ${ADMIN}` } })).json();
    expect((await fetch(`${hub.base}/status`)).status).toBe(401);

    await using site = await scenario().listen().uplink(hub.base, TOKEN).spawn();
    await uplinkUp(site);
    await using vm = await attachVm(site);
    const frames = new FrameQueue();
    const dgramVm = await openUnixDgram(`${dir.path}/vm.dgram`, (data) => frames.push(data));
    try {
      const hello = makeFrame(BROADCAST, "02:00:00:00:61:01", "to the unix datagram VM");
      dgramVm.send(makeFrame(BROADCAST, "02:00:00:00:61:02", "announce"), { path: `${runtime}/default.dgram` });
      expect(await vm.frames.next(fromMac("02:00:00:00:61:02"))).toBeDefined();
      vm.send(hello);
      expect(await frames.next(fromMac("02:00:00:00:61:01"))).toEqual(hello);
    } finally {
      await dgramVm.close();
    }
    expect((await status()).networks[0].ports.map((p: any) => p.kind).sort()).toEqual(["qemu-udp", "tunnel"]);
    expect(await hub.stop("SIGTERM")).toBe(0);
    expect(await Bun.file(`${runtime}/default.sock`).exists()).toBe(false);
  });
});

describe("Container image (deploy/Containerfile)", () => {
  test("the README's build makes an image of the binary that runs as uid 65532; without an admin token it exits 2; as a hub with its env file it serves a site's tunnel; the one-command hub works in it", async () => {
    if (!Bun.which("podman")) throw new Error("podman is not installed: apt-get install podman runc (.ci/run does)");
    await using dir = await tempDir();
    const d = dir.path;
    // Podman with storage of its own in the test's directory: the test sees no other image and
    // leaves none. The rest suits the containers CI runs in: no overlay on overlay (vfs), cgroups
    // v1 (runc, cgroupfs), and limits that may only be lowered (no CAP_SYS_RESOURCE).
    const podman = ["podman", "--root", `${d}/storage`, "--runroot", `${d}/run`, "--tmpdir", `${d}/tmp`, "--storage-driver", "vfs", "--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "none"];
    await using _containers = { [Symbol.asyncDispose]: () => Bun.$`${podman} rm --force --all`.nothrow().quiet().then(() => {}) };

    // The README's two lines, building in the test's directory instead of the checkout's dist/.
    const block = (await recipe("container")) ?? "";
    const [compile, build] = block.split("\n").map((l) => l.replace(/#.*/, "").trim());
    expect(compile).toBe("npx bun build --compile --minify relay.ts --outfile dist/edge-relay");
    expect(build).toBe("podman build -f deploy/Containerfile -t edge-relay dist");
    const inTest = (w: string) => w.replace(/^dist\b/, `${d}/dist`);
    await Bun.$`${process.execPath} ${compile!.split(" ").slice(2).map(inTest)}`.cwd(ROOT).quiet();

    // The base: the host's glibc (the files `ldd` says the binary loads) and a passwd with uid 65532, as distroless has.
    const binary = `${d}/dist/edge-relay`;
    const libs = [...(await Bun.$`ldd ${binary}`.text()).matchAll(/(\/\S+) \(0x/g)].map((m) => m[1]!);
    expect(libs.some((l) => l.endsWith("/libc.so.6"))).toBe(true);
    await Bun.$`mkdir -p ${d}/base/etc ${d}/base/tmp && chmod 1777 ${d}/base/tmp && cp -L --parents ${libs} ${d}/base/`.quiet();
    await Bun.write(`${d}/base/etc/passwd`, "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n");
    await Bun.write(`${d}/base/etc/group`, "root:x:0:\nnonroot:x:65532:\n");
    await Bun.$`tar -C ${d}/base -cf ${d}/base.tar . && ${podman} import ${d}/base.tar localhost/glibc-base`.quiet();
    const [, ...buildArgs] = build!.split(" ").map(inTest);
    await Bun.$`${podman} ${buildArgs[0]} --pull=never --build-arg BASE=localhost/glibc-base ${buildArgs.slice(1)}`.cwd(ROOT).quiet();

    const [image] = JSON.parse(await Bun.$`${podman} image inspect edge-relay`.text());
    expect(image.Config.User).toBe("65532:65532");
    expect(image.Config.Entrypoint).toEqual(["/usr/local/bin/edge-relay"]);
    expect(image.Config.Cmd).toEqual(["--http", "0.0.0.0:8080"]);
    // Nothing in it but the binary and the C library.
    expect(image.Size).toBeLessThan(Bun.file(binary).size + 16 * 2 ** 20);

    const run = [...podman, "run", "--rm", "--network", "host", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"];
    const refused = await Bun.$`${run} edge-relay`.nothrow().quiet();
    expect({ code: refused.exitCode, stdout: `${refused.stdout}`, stderr: `${refused.stderr}` }).toEqual({
      code: 2,
      stdout: "",
      stderr: "edge-relay: --admin-token: required when --http is not a loopback address\n",
    });

    // A hub as the README runs it (its secrets in an --env-file), on the host's loopback and free ports.
    await Bun.write(`${d}/env`, `RELAY_TOKENS=${TOKEN}\n`);
    const hub = await scenario().listen().spawn({
      command: [...run, "--name", "hub", "--env-file", `${d}/env`, "edge-relay"],
    });
    await using _hub = hub;
    const pid = (await Bun.$`${podman} container inspect hub --format {{.State.Pid}}`.text()).trim();
    expect((await Bun.file(`/proc/${pid}/status`).text()).match(/^Uid:\s+(\d+)/m)?.[1]).toBe("65532");
    await using site = await scenario().listen().uplink(hub.base, TOKEN).spawn();
    await uplinkUp(site);
    await framesCross(site, hub, "64");
    // Podman hands SIGTERM to the relay, which stops cleanly.
    expect(await hub.stop("SIGTERM")).toBe(0);

    // The one-command hub (no openssl in the image): its state on a volume the image's user owns; a site joins with the printed line.
    mkdirSync(`${d}/state`, { mode: 0o700 });
    chownSync(`${d}/state`, 65532, 65532);
    const port = await freePort();
    const joinHub = await spawnRelay(["--public-url", `wss://localhost:${port}`, "--state-dir", "/state", "--http", `127.0.0.1:${port}`], {
      command: [...run, "--name", "join-hub", "--volume", `${d}/state:/state`, "edge-relay"],
    });
    await using _joinHub = joinHub;
    // podman logs are logs: the line names the file with the join string (/state is ${d}/state here), and holds no token.
    expect(joinHub.stdout()).toMatch(/^hub: on each site, run: edge-relay --join JOIN, JOIN being the contents of \/state\/site-join \(not logged: it holds the site token\)$/m);
    expect(statSync(`${d}/state/hub-key.pem`).uid).toBe(65532);
    const join = readFileSync(`${d}/state/site-join`, "utf8").trim();
    expect(joinHub.stdout()).not.toContain(join.split("::")[1]!.split("@")[0]!);
    await using joined = await scenario().listen().with("--join", join).spawn();
    await uplinkUp(joined);
    await joinHub.waitForLine(/^tunnel: .* attached \(networks: default\)$/);
    expect(await joinHub.stop("SIGTERM")).toBe(0);
  }, 120_000);
});

/** HAProxy from deploy/haproxy.cfg on a free port of 127.0.0.1, in front of `hub`, once it has found the hub up. */
async function haproxyFront(d: string, hub: RelayProcess) {
  const hubAddress = new URL(hub.base).host;
  const port = await freePort();
  const recipe = await Bun.file(`${ROOT}deploy/haproxy.cfg`).text();
  const cfg = recipe
    .replace("bind :443 ssl crt /etc/haproxy/certs/relay.example.net.pem", `bind 127.0.0.1:${port} ssl crt ${d}/hub.pem`)
    .replace("server hub 127.0.0.1:8080 check", `server hub ${hubAddress} check inter 500ms`);
  expect(cfg).toContain(`bind 127.0.0.1:${port} ssl`);
  expect(cfg).toContain(`server hub ${hubAddress} check`);
  await Bun.write(`${d}/haproxy.cfg`, cfg);
  expect((await Bun.$`haproxy -c -f ${d}/haproxy.cfg`.nothrow().quiet()).exitCode).toBe(0);
  const haproxy = spawnDaemon(["haproxy", "-f", `${d}/haproxy.cfg`, "-db"]);
  const ca = await Bun.file(`${d}/ca.pem`).text();
  const front = `https://127.0.0.1:${port}`;
  // Ready when the health check has found the hub: /healthz is not forwarded, so probe /tunnel (401 from the hub).
  await waitUntil(async () => {
    if (haproxy.proc.exitCode !== null) throw new Error(`HAProxy exited (${haproxy.proc.exitCode}):\n${haproxy.log()}`);
    return (await fetch(`${front}/tunnel`, { tls: { ca } })).status === 401;
  }, `HAProxy on ${port} with the hub up`).catch(async (error) => {
    await haproxy.stop();
    throw error;
  });
  return Object.assign(haproxy, { port, front, ca });
}

/**
 * A TCP forwarder on 127.0.0.1 that dials 127.0.0.1:`port` from `localAddress` (another loopback
 * address): what HAProxy then sees as a client of that address, as if a site on its own host.
 */
async function forwarderFrom(localAddress: string, port: number) {
  const sockets = new Set<Socket>();
  const server = createServer((client) => {
    const upstream = connect({ host: "127.0.0.1", port, localAddress });
    for (const [a, b] of [[client, upstream], [upstream, client]] as const) {
      sockets.add(a);
      a.pipe(b);
      a.on("error", () => b.destroy());
      a.on("close", () => (sockets.delete(a), b.destroy()));
    }
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: (server.address() as { port: number }).port,
    [Symbol.asyncDispose]: () => new Promise<void>((resolve) => {
      for (const s of sockets) s.destroy();
      server.close(() => resolve());
    }),
  };
}

describe("HAProxy in front of a hub (deploy/haproxy.cfg)", () => {
  test("a site's wss:// uplink reaches a plain-HTTP hub through HAProxy's TLS; frames cross; only /tunnel is exposed", async () => {
    await using dir = await tempDir();
    const d = dir.path;
    // A test CA and a certificate it signs for 127.0.0.1; the site trusts the CA.
    await testCertificate(d);

    await using hub = await scenario().hub(TOKEN).listen().with("--trusted-proxy", "127.0.0.1").spawn();
    await using haproxy = await haproxyFront(d, hub);
    const { port, front, ca } = haproxy;

    await using site = await scenario().listen().uplink(`wss://127.0.0.1:${port}`, TOKEN).with("--uplink-ca", `${d}/ca.pem`).spawn();
    await uplinkUp(site).catch(async (error) => {
      throw new Error(`${error.message}\nsite: ${JSON.stringify((await site.status()).uplink)}\nHAProxy:\n${haproxy.log()}`);
    });
    await framesCross(site, hub, "62");
    // The tunnel comes through HAProxy, which names the site's address (here its own, loopback).
    const tunnel = (await hub.status()).networks[0].ports.find((p: any) => p.kind === "tunnel");
    expect(tunnel.peer).toMatch(/\(127\.0\.0\.1 via 127\.0\.0\.1:\d+\)$/);
    // Status and metrics are not published through the proxy, whatever the hub's own setting.
    for (const path of ["/status", "/metrics", "/healthz"]) expect((await fetch(`${front}${path}`, { tls: { ca } })).status).toBe(403);
    // The hub speaks no TLS itself: the site could only have come through HAProxy, which logs the
    // upgraded request (over TLS: "edge_relay~") when the tunnel ends.
    expect(hub.base).toStartWith("http://");
    await site.stop();
    await waitUntil(() => /edge_relay~ edge_relay_hub\/hub \S+ 101 .*"GET \/tunnel\?networks=default HTTP\/1\.1"/.test(haproxy.log()), "HAProxy's log line of the tunnel").catch((error) => {
      throw new Error(`${error.message}\nHAProxy:\n${haproxy.log()}`);
    });
  });
});

describe("HAProxy in front of a hub, sites on several addresses", () => {
  test("with --trusted-proxy each site is its own address: one site's wrong token throttles only it; --max-tunnels-per-address counts sites", async () => {
    await using dir = await tempDir();
    const d = dir.path;
    await testCertificate(d);
    await using hub = await scenario().hub(TOKEN).listen().with("--trusted-proxy", "127.0.0.1", "--max-tunnels-per-address", "1").spawn();
    await using haproxy = await haproxyFront(d, hub);
    // Sites on 127.0.0.2, .3 and .4, as HAProxy sees them.
    await using from2 = await forwarderFrom("127.0.0.2", haproxy.port);
    await using from3 = await forwarderFrom("127.0.0.3", haproxy.port);
    await using from4 = await forwarderFrom("127.0.0.4", haproxy.port);
    const tunnel = (via: { port: number }, token: string) => fetch(`https://127.0.0.1:${via.port}/tunnel`, { headers: { Authorization: `Bearer ${token}` }, tls: { ca: haproxy.ca } });
    const site = (via: { port: number }) =>
      scenario().listen().uplink(`wss://127.0.0.1:${via.port}`, TOKEN).with("--uplink-ca", `${d}/ca.pem`).spawn();

    // A misconfigured site on .4 keeps failing: past ten failures its own attempts get 429.
    for (let i = 0; i < 10; i++) expect((await tunnel(from4, "wrong-site-token-00000")).status).toBe(401);
    expect((await tunnel(from4, "wrong-site-token-00000")).status).toBe(429);
    // The others, all through the same HAProxy, are untouched; one each is within the limit of 1.
    await using siteA = await site(from2);
    await using siteB = await site(from3);
    await uplinkUp(siteA);
    await uplinkUp(siteB);
    expect((await tunnel(from3, "wrong-site-token-00000")).status).toBe(401);
    const peers = (await hub.status()).networks[0].ports.filter((p: any) => p.kind === "tunnel").map((p: any) => p.peer.replace(/:\d+\)$/, ")"));
    expect(peers.sort()).toEqual([expect.stringMatching(/\(127\.0\.0\.2 via 127\.0\.0\.1\)$/), expect.stringMatching(/\(127\.0\.0\.3 via 127\.0\.0\.1\)$/)]);
    // A second site on .2 is the one beyond the limit.
    await using siteA2 = await site(from2);
    await hub.waitForLine(/^tunnel: refused 127\.0\.0\.2: 127\.0\.0\.2 has the maximum of 1 tunnels$/);
    expect((await hub.status()).limits.tunnels).toBe(2);
    expect(hub.stderr()).toMatch(/^tunnel: refused 127\.0\.0\.4 via 127\.0\.0\.1:\d+: wrong token$/m);
  });
});

describe("README recipes", () => {

  test("the HAProxy recipe in the README is deploy/haproxy.cfg, the file this suite runs", async () => {
    const cfg = await Bun.file(`${ROOT}deploy/haproxy.cfg`).text();
    // (A boolean: a failing toContain would print the whole README.)
    expect((await readme()).includes("```haproxy\n" + cfg + "```\n")).toBe(true);
  });

  test("every example that runs Bun works after the README's set-up, which puts no bun on the PATH: through npx", async () => {
    // Fenced blocks of the docs, the comments of deploy/, and relay.ts's own examples (its header).
    const text = (path: string) => Bun.file(`${ROOT}${path}`).text();
    const fenced = (md: string) => [...md.matchAll(/```[a-z]*\n([\s\S]*?)```/g)].map((m) => m[1]!).join("\n");
    const header = await text("relay.ts");
    const sources: [string, string][] = [
      ["README.md", fenced(await readme())],
      ["bench/README.md", fenced(await text("bench/README.md"))],
      ["relay.ts", fenced(header.slice(0, header.indexOf("@module")))],
      ["deploy/edge-relay.service", await text("deploy/edge-relay.service")],
      ["deploy/Containerfile", await text("deploy/Containerfile")],
    ];
    let found = 0;
    const bare: string[] = [];
    for (const [name, source] of sources) {
      for (const line of source.split("\n")) {
        for (const m of line.matchAll(/(?<![\w/.-])bun (?=[\w./-])/g)) {
          found++;
          if (!line.slice(0, m.index).endsWith("npx ")) bare.push(`${name}: ${line.trim()}`);
        }
      }
    }
    expect(found).toBeGreaterThan(20);
    expect(bare).toEqual([]);
  });

  test("hub and site on one host, started by the README's commands through npx, share a segment; Ctrl-C stops them and frees their ports", async () => {
    const block = await recipe("one host");
    expect(block).toBeString();
    const commands = block!.split("\n").filter((l) => l.includes("bun relay.ts"));
    expect(commands.length).toBe(2);
    // The recipe's fixed ports, each replaced by a free one.
    const ports = new Map<string, string>();
    for (const p of new Set(block!.match(/(?<=:)\d{4,5}\b/g))) ports.set(p, String(await freePort()));
    const relays: RelayProcess[] = [];
    await using _relays = { [Symbol.asyncDispose]: () => Promise.all(relays.map((r) => r.stop("SIGKILL"))).then(() => {}) };
    for (const command of commands) {
      const words = command.replace(/#.*/, "").trim().replace(/:(\d{4,5})\b/g, (m, p) => `:${ports.get(p) ?? p}`).split(/\s+/);
      const env: Record<string, string> = {};
      while (/^[A-Z_]+=/.test(words[0]!)) {
        const w = words.shift()!;
        env[w.slice(0, w.indexOf("="))] = w.slice(w.indexOf("=") + 1);
      }
      expect(words.slice(0, 3)).toEqual(["npx", "bun", "relay.ts"]);
      // As typed in the checkout after `npm install`; npx passes no signal on, so a terminal's Ctrl-C (the whole group) stops it.
      relays.push(await spawnRelay(words.slice(3), { env, command: words.slice(0, 3), cwd: ROOT, group: true }));
    }
    const [hub, site] = relays as [RelayProcess, RelayProcess];
    expect(hub.base).not.toBe(site.base);
    // npx runs Bun on relay.ts in a process under it.
    const tree = relays.map((r) => descendants(r.proc.pid));
    const runsRelay = (pid: number) => /\/bun(\.exe)?$/.test(readlinkSync(`/proc/${pid}/exe`)) && readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").includes("relay.ts");
    for (const pids of tree) expect(pids.filter(runsRelay)).toHaveLength(1);
    await uplinkUp(site);
    await framesCross(site, hub, "63");

    const listening = relays.flatMap((r) => r.bound.map((b) => r.port(b.what, b.network)));
    expect(listening).toHaveLength(4);
    for (const relay of [site, hub]) {
      await relay.stop("SIGINT");
      expect(relay.stdout()).toContain("\nSIGINT: stopping\n");
    }
    await waitUntil(() => tree.flat().every((pid) => !existsSync(`/proc/${pid}`)), "every process under npx gone");
    for (const port of listening) await expect(connectStream(port)).rejects.toThrow();
  });
});
