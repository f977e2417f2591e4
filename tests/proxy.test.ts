/**
 * The uplink through an outbound HTTP proxy: Debian's tinyproxy, started by each test on loopback,
 * with --uplink-proxy and with HTTPS_PROXY / HTTP_PROXY / NO_PROXY from the environment.
 */
import { describe, expect, test } from "bun:test";
import { ConfigError, noProxyMatches, parseConfig, startRelay, uplinkProxy, withoutUserinfo } from "../relay.ts";
import { BROADCAST, type RelayProcess, attachVm, freePort, fromMac, makeFrame, runCli, spawnRelay, tempDir, uplinkUp, waitUntil, scenario } from "./helpers.ts";

const TOKEN = "proxy-test-token-5f1e";
/** Each site's proxy settings are the test's own, whatever the environment running the tests has. */
const CLEAN = { HTTPS_PROXY: "", https_proxy: "", HTTP_PROXY: "", http_proxy: "", NO_PROXY: "", no_proxy: "" };
const PASSWORD = "pr0xy-pa55word-7d3a";

interface Tinyproxy extends AsyncDisposable {
  port: number;
  pid: number;
  /** tinyproxy's log (it logs to stdout in the foreground). */
  log(): string;
}

/** tinyproxy on 127.0.0.1 allowing CONNECT to `connectPorts` only, optionally with Basic auth. */
async function tinyproxy(dir: string, connectPorts: number[], auth?: { user: string; password: string }): Promise<Tinyproxy> {
  if (!Bun.which("tinyproxy")) throw new Error("tinyproxy is not installed: apt-get install tinyproxy (.ci/run does)");
  const port = await freePort();
  const conf = `${dir}/tinyproxy-${port}.conf`;
  await Bun.write(
    conf,
    [
      `Port ${port}`,
      "Listen 127.0.0.1",
      "Timeout 600",
      "Allow 127.0.0.1",
      ...connectPorts.map((p) => `ConnectPort ${p}`),
      "LogLevel Connect",
      "MaxClients 50",
      ...(auth ? [`BasicAuth ${auth.user} ${auth.password}`] : []),
      "",
    ].join("\n"),
  );
  const proc = Bun.spawn(["tinyproxy", "-d", "-c", conf], { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  let out = "";
  const pumped = (async () => {
    const decoder = new TextDecoder();
    for await (const chunk of proc.stdout) out += decoder.decode(chunk, { stream: true });
  })();
  const handle: Tinyproxy = {
    port,
    pid: proc.pid,
    log: () => out,
    async [Symbol.asyncDispose]() {
      proc.kill("SIGKILL");
      await proc.exited;
      await pumped;
    },
  };
  try {
    await waitUntil(async () => {
      if (proc.exitCode !== null) throw new Error(`tinyproxy exited (${proc.exitCode}): ${out}${await new Response(proc.stderr).text()}`);
      const socket = await Bun.connect({ hostname: "127.0.0.1", port, socket: { data() {} } });
      socket.end();
      return true;
    }, `tinyproxy listening on ${port}`);
  } catch (error) {
    await handle[Symbol.asyncDispose]();
    throw error;
  }
  return handle;
}

/** The source port of the hub's one tunnel, as the hub saw it. */
async function tunnelSourcePort(hub: Pick<RelayProcess, "status">): Promise<number> {
  const ports = await waitUntil(async () => {
    const tunnels = (await hub.status()).networks.flatMap((n: any) => n.ports).filter((p: any) => p.kind === "tunnel");
    return tunnels.length === 1 && tunnels;
  }, "exactly one tunnel on the hub");
  return Number(/:(\d+)\)$/.exec(ports[0].peer)![1]);
}

/**
 * The pid of the process that owns the loopback TCP connection from this port to the hub: tinyproxy,
 * or the site itself. (The site's connection to the proxy may have the same local port.)
 */
async function ownerOf(port: number, hubPort: number): Promise<number | string> {
  const line = (await Bun.$`ss -Htnp state established src 127.0.0.1:${port} dst 127.0.0.1:${hubPort}`.text()).trim();
  const pid = /users:\(\("[^"]+",pid=(\d+)/.exec(line)?.[1];
  return pid ? Number(pid) : `no process owns port ${port}: ${line}`;
}

/** A frame each way between a VM at `a` and a VM at `b`, through the hub. */
async function framesCross(a: RelayProcess, b: RelayProcess, tag: number) {
  await using vmA = await attachVm(a);
  await using vmB = await attachVm(b);
  const A = `02:00:00:00:5${tag}:01`;
  const B = `02:00:00:00:5${tag}:02`;
  const hello = makeFrame(BROADCAST, A, `through the proxy ${tag}`);
  vmA.send(hello);
  expect(await vmB.frames.next(fromMac(A))).toEqual(hello);
  const reply = makeFrame(A, B, 1400);
  vmB.send(reply);
  expect(await vmA.frames.next(fromMac(B))).toEqual(reply);
}

describe("uplink through an HTTP proxy (tinyproxy)", () => {
  test("--uplink-proxy with credentials: the tunnel is tinyproxy's CONNECT, frames cross, the password is in no log or status", async () => {
    await using dir = await tempDir();
    await using hub = await scenario().hub(TOKEN).listen().spawn();
    const hubPort = Number(new URL(hub.base).port);
    await using proxy = await tinyproxy(dir.path, [hubPort], { user: "alice", password: PASSWORD });
    // In the config file, as a deployment would have it (not in ps).
    const config = `${dir.path}/site.json`;
    await Bun.write(config, JSON.stringify({ uplinkProxy: `http://alice:${PASSWORD}@127.0.0.1:${proxy.port}` }));
    await using site = await spawnRelay(
      ["--config", config, "--http", "127.0.0.1:0", "--qemu-listen", "127.0.0.1:0", "--uplink", `ws://127.0.0.1:${hubPort}`],
      { env: { ...CLEAN, RELAY_UPLINK_TOKEN: TOKEN } },
    );
    await uplinkUp(site);
    expect(await ownerOf(await tunnelSourcePort(hub), hubPort)).toBe(proxy.pid);
    expect(proxy.log()).toContain(`Request (file descriptor`);
    expect(proxy.log()).toContain(`CONNECT 127.0.0.1:${hubPort} HTTP/1.1`);
    await framesCross(site, hub, 1);

    const status = await site.status();
    expect(status.uplink.proxy).toBe(`http://127.0.0.1:${proxy.port}`);
    expect(site.stdout()).toContain(`uplink: dialing ws://127.0.0.1:${hubPort}/tunnel through the proxy http://127.0.0.1:${proxy.port} (--uplink-proxy)`);
    const metrics = await fetch(`${site.base}/metrics`).then((r) => r.text());
    for (const text of [JSON.stringify(status), metrics, site.stdout(), site.stderr()]) expect(text).not.toContain(PASSWORD);
  });

  test("a proxy that refuses (wrong password, a port it does not allow) or never answers shows in lastError, without the password", async () => {
    await using dir = await tempDir();
    await using hub = await scenario().hub(TOKEN).spawn();
    const hubPort = Number(new URL(hub.base).port);
    await using proxy = await tinyproxy(dir.path, [hubPort], { user: "alice", password: PASSWORD });
    const site = (proxyUrl: string, target = hub.base, ...extra: string[]) =>
      scenario().listen().uplink(target, TOKEN).with("--uplink-proxy", proxyUrl, ...extra).spawn({ env: CLEAN });
    const failed = async (s: RelayProcess) => {
      const uplink = await waitUntil(async () => {
        const u = (await s.status()).uplink;
        return u.attempts >= 1 && u.lastError !== undefined && u;
      }, "a refused dial");
      expect(uplink.state).not.toBe("up");
      expect(uplink.connects).toBe(0);
      expect(`${JSON.stringify(uplink)}${s.stdout()}${s.stderr()}`).not.toContain("wrong-pa55word");
      return uplink.lastError as string;
    };
    {
      await using wrong = await site(`http://alice:wrong-pa55word@127.0.0.1:${proxy.port}`);
      expect(await failed(wrong)).toMatch(new RegExp(`Proxy .*40[17] .*\\(through the proxy http://127\\.0\\.0\\.1:${proxy.port}\\)$`));
    }
    {
      const other = await freePort();
      await using elsewhere = await site(`http://alice:${PASSWORD}@127.0.0.1:${proxy.port}`, `http://127.0.0.1:${other}`);
      expect(await failed(elsewhere)).toMatch(/Proxy connection failed: 403/);
      expect(proxy.log()).toContain(`CONNECT 127.0.0.1:${other} HTTP/1.1`);
    }
    {
      // A proxy that accepts and never answers the CONNECT: the handshake deadline still ends the dial.
      const silent = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
      await using _silent = { [Symbol.asyncDispose]: async () => silent.stop(true) };
      await using stuck = await site(`http://127.0.0.1:${silent.port}`, hub.base, "--handshake-timeout", "0.5");
      expect(await failed(stuck)).toBe(`no answer to the WebSocket handshake within 0.5 s`);
    }
    expect((await hub.status()).authFailures).toBe(0);
  });

  test("HTTPS_PROXY carries a wss:// uplink; NO_PROXY naming the hub means direct, even with --uplink-proxy; the flag beats the environment", async () => {
    await using dir = await tempDir();
    const cert = `${dir.path}/cert.pem`;
    const key = `${dir.path}/key.pem`;
    await Bun.$`openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ${key} -out ${cert} -days 1 -subj /CN=edge-relay-test -addext subjectAltName=IP:127.0.0.1`.quiet();
    await using hub = await scenario().hub(TOKEN).with("--tls-cert", cert, "--tls-key", key).spawn();
    const hubPort = Number(new URL(hub.base).port);
    const ca = await Bun.file(cert).text();
    const hubStatus = { status: () => fetch(`${hub.base}/status`, { tls: { ca } }).then((r) => r.json()) };
    await using proxy = await tinyproxy(dir.path, [hubPort]);
    const dead = `http://127.0.0.1:${await freePort()}`;
    const site = (env: Record<string, string>, ...extra: string[]) =>
      scenario().listen().uplink(`wss://127.0.0.1:${hubPort}`, TOKEN).with("--uplink-ca", cert, ...extra).spawn({ env: { ...CLEAN, ...env } });
    const via = `http://127.0.0.1:${proxy.port}`;

    // wss:// takes HTTPS_PROXY (a bare HOST:PORT, as people write it); HTTP_PROXY, dead, is not used.
    await using a = await site({ https_proxy: `127.0.0.1:${proxy.port}`, HTTP_PROXY: dead, NO_PROXY: "example.com,.internal" });
    await uplinkUp(a);
    expect(await ownerOf(await tunnelSourcePort(hubStatus), hubPort)).toBe(proxy.pid);
    expect((await a.status()).uplink.proxy).toBe(via);
    expect(a.stdout()).toContain(`through the proxy ${via} (https_proxy)`);

    // NO_PROXY names the hub (among others, space and comma separated): direct, and the proxy sees
    // nothing; Bun's WebSocket applies NO_PROXY to an explicit proxy too, and so does the relay.
    const connects = proxy.log().split("CONNECT 127.0.0.1").length;
    await using b = await site({ NO_PROXY: "example.com, 127.0.0.1" }, "--uplink-proxy", via);
    await uplinkUp(b);
    expect((await b.status()).uplink.proxy).toBeUndefined();
    expect(b.stdout()).not.toContain("through the proxy");
    const ports = (await hubStatus.status()).networks[0].ports.map((p: any) => Number(/:(\d+)\)$/.exec(p.peer)![1]));
    const owners = await Promise.all(ports.map((p: number) => ownerOf(p, hubPort)));
    expect(owners.sort()).toEqual([proxy.pid, b.proc.pid].sort());
    expect(proxy.log().split("CONNECT 127.0.0.1").length).toBe(connects);
    await framesCross(a, b, 2);
    await a.stop();
    await b.stop();

    // The flag wins over a (dead) HTTPS_PROXY.
    await using c = await site({ HTTPS_PROXY: dead, no_proxy: "example.com" }, "--uplink-proxy", via);
    await uplinkUp(c);
    expect(await ownerOf(await tunnelSourcePort(hubStatus), hubPort)).toBe(proxy.pid);
    expect(c.stdout()).toContain(`through the proxy ${via} (--uplink-proxy)`);
  });

  test("a joined site behind a proxy takes its first look at the hub's certificate through the proxy too, with the proxy's credentials", async () => {
    await using dir = await tempDir();
    const port = await freePort();
    await using hub = await spawnRelay(["--public-url", `wss://localhost:${port}`, "--state-dir", `${dir.path}/hub`, "--http", `127.0.0.1:${port}`]);
    const join = (await Bun.file(`${dir.path}/hub/site-join`).text()).trim();
    await using proxy = await tinyproxy(dir.path, [port], { user: "alice", password: PASSWORD });
    const connects = () => proxy.log().split(`CONNECT localhost:${port} HTTP/1.1`).length - 1;
    await using site = await spawnRelay(
      ["--join", join, "--uplink-proxy", `http://alice:${PASSWORD}@127.0.0.1:${proxy.port}`, "--http", "127.0.0.1:0", "--qemu-listen", "127.0.0.1:0"],
      { env: CLEAN },
    );
    await uplinkUp(site);
    // One CONNECT for the look at the certificate, one for the tunnel: nothing went to the hub directly.
    await waitUntil(async () => connects() >= 2, "tinyproxy logged both CONNECTs");
    expect(connects()).toBe(2);
    const [ca, admin] = await Promise.all([Bun.file(`${dir.path}/hub/hub-cert.pem`).text(), Bun.file(`${dir.path}/hub/admin-token`).text()]);
    const status = () => fetch(`https://localhost:${port}/status`, { headers: { Authorization: `Bearer ${admin.trim()}` }, tls: { ca } } as RequestInit).then((r) => r.json());
    expect(await ownerOf(await tunnelSourcePort({ status }), port)).toBe(proxy.pid);
    expect(hub.stdout()).toMatch(/tunnel: .* attached/);
    for (const text of [site.stdout(), site.stderr(), JSON.stringify(await site.status())]) expect(text).not.toContain(PASSWORD);

    // A proxy that refuses the look refuses the dial too, which says so in its words.
    await using refused = await spawnRelay(["--join", join, "--uplink-proxy", `http://alice:wrong-pa55word@127.0.0.1:${proxy.port}`, "--http", "127.0.0.1:0"], { env: CLEAN });
    const uplink = await waitUntil(async () => {
      const u = (await refused.status()).uplink;
      return u.attempts >= 1 && u.lastError !== undefined && u;
    }, "a refused dial");
    expect({ state: uplink.state, connects: uplink.connects }).toEqual({ state: "down", connects: 0 });
    expect(uplink.lastError).toMatch(new RegExp(`Proxy .*40[17] .*\\(through the proxy http://127\\.0\\.0\\.1:${proxy.port}\\)$`));
    expect(`${JSON.stringify(uplink)}${refused.stdout()}${refused.stderr()}`).not.toContain("wrong-pa55word");
  });

  test("a joined site's look at the certificate sends its CONNECT the credentials Bun's tunnel dial sends: a bare % (no escape), a password with no user", async () => {
    // tinyproxy takes neither: this proxy notes each CONNECT's credentials and refuses it.
    const heard: string[] = [];
    const noting = Bun.listen({
      hostname: "127.0.0.1",
      port: 0,
      socket: {
        data(s, chunk) {
          heard.push(/^Proxy-Authorization: (.*)\r$/im.exec(chunk.toString("latin1"))?.[1] ?? "none");
          s.end("HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n");
        },
      },
    });
    await using _noting = { [Symbol.asyncDispose]: async () => noting.stop(true) };
    const join = `ER1${"ab".repeat(32)}::some-token@127.0.0.1:${await freePort()}`;
    // Percent-decoded byte by byte, as Bun does: %41 is "A", a % that starts no escape stays itself.
    for (const [userinfo, sent] of [
      ["alice:50%off-%41", "alice:50%off-A"],
      [":pr0xy-t0ken", ":pr0xy-t0ken"],
    ]) {
      heard.length = 0;
      await using site = await spawnRelay(["--join", join, "--uplink-proxy", `http://${userinfo}@127.0.0.1:${noting.port}`, "--http", "127.0.0.1:0"], { env: CLEAN });
      await waitUntil(async () => (await site.status()).uplink.lastError !== undefined, "the dial refused by the proxy");
      expect(heard.slice(0, 2)).toEqual(Array(2).fill(`Basic ${btoa(sent)}`));
      expect(`${site.stdout()}${site.stderr()}`).not.toContain(sent.slice(1));
    }
  });

  test("a joined site's look at the certificate ends when the proxy closes without answering: the dial follows and says why", async () => {
    // A proxy that hangs up at once (restarting, or a balancer with no backend): no answer, no error, only FIN.
    const hangsUp = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { open: (s) => void s.end(), data() {} } });
    await using _hangsUp = { [Symbol.asyncDispose]: async () => hangsUp.stop(true) };
    const join = `ER1${"ab".repeat(32)}::some-token@127.0.0.1:${await freePort()}`;
    await using site = await spawnRelay(["--join", join, "--uplink-proxy", `http://127.0.0.1:${hangsUp.port}`, "--http", "127.0.0.1:0"], { env: CLEAN });
    const uplink = await waitUntil(async () => {
      const u = (await site.status()).uplink;
      return u.attempts >= 1 && u.lastError !== undefined && u;
    }, "a dial after the look");
    expect({ state: uplink.state, connects: uplink.connects }).toEqual({ state: "down", connects: 0 });
    expect(uplink.lastError).toEndWith(`(through the proxy http://127.0.0.1:${hangsUp.port})`);
  });

  test("a bad proxy setting, given or from the environment, is a config error: exit 2 naming the setting, never its value", async () => {
    const secret = "leaky-pa55word-0bb1";
    const base = ["--http", "127.0.0.1:0", "--qemu-listen", "127.0.0.1:0", "--uplink", "ws://127.0.0.1:9", "--uplink-token", TOKEN];
    const wss = ["--http", "127.0.0.1:0", "--uplink", "wss://127.0.0.1:9", "--uplink-token", TOKEN];
    const cases: [string[], Record<string, string>, string][] = [
      [[...base, "--uplink-proxy", `https://u:${secret}@proxy.example:3128`], CLEAN, "--uplink-proxy"],
      [base, { ...CLEAN, HTTP_PROXY: `socks5://u:${secret}@proxy.example:1080` }, "HTTP_PROXY"],
      [wss, { ...CLEAN, HTTPS_PROXY: `http://u:${secret}@proxy.example:3128/path` }, "HTTPS_PROXY"],
      [wss, { ...CLEAN, https_proxy: `http://u:${secret}@proxy example:3128` }, "https_proxy"],
    ];
    for (const [args, env, setting] of cases) {
      // systemd's unit does not restart on 2: a loop of restarts would not mend the setting.
      expect(await runCli(args, env)).toEqual({ stdout: "", stderr: `edge-relay: ${setting}: expected http://[USER:PASSWORD@]HOST:PORT\n`, code: 2 });
    }
  });
});

describe("NO_PROXY and the choice of proxy", () => {
  test.each([
    ["wss://hub.example.com", "example.com", true],
    ["wss://hub.example.com", ".example.com", true],
    ["wss://hub.example.com", "*.example.com", true],
    ["wss://example.com", ".example.com", true],
    ["wss://HUB.Example.COM.", "example.com", true],
    ["wss://badexample.com", "example.com", false],
    ["wss://example.com.evil.net", "example.com", false],
    ["wss://hub.example.com", "other.org, hub.example.com", true],
    ["wss://hub.example.com", "other.org hub.example.com", true],
    ["wss://hub.example.com", "", false],
    ["wss://hub.example.com", "*", true],
    ["wss://hub.example.com", "example.com:443", true],
    ["wss://hub.example.com:8443", "example.com:443", false],
    ["wss://hub.example.com:8443", "example.com:8443", true],
    ["ws://hub.example.com", "hub.example.com:80", true],
    ["ws://10.1.2.3:8080", "10.1.2.3", true],
    ["ws://10.1.2.3:8080", "10.0.0.0/8", true],
    ["ws://11.1.2.3:8080", "10.0.0.0/8", false],
    ["ws://10.1.2.3:8080", "1.2.3", false],
    ["ws://10.1.2.3:8080", "10.1.2.3:8080", true],
    ["ws://[fd00::5]:8080", "fd00::/8", true],
    ["ws://[fd00::5]:8080", "fd00::5", true],
    ["ws://[fd00::5]:8080", "[fd00::5]:8080", true],
    ["ws://[fd00::5]:8080", "[fd00::5]:80", false],
    ["ws://[fd00::5]:8080", "10.0.0.0/8", false],
    ["ws://127.0.0.1:8080", "localhost", false],
  ])("%s with NO_PROXY=%p → %p", (target, noProxy, bypass) => {
    expect(noProxyMatches(new URL(target), noProxy)).toBe(bypass);
  });

  test("wss:// takes HTTPS_PROXY, ws:// HTTP_PROXY (lower case first, as curl); the flag beats them; NO_PROXY (no_proxy first, as Bun) filters all", () => {
    const env = { HTTPS_PROXY: "http://s:3128", https_proxy: " ", HTTP_PROXY: "http://p:3128", http_proxy: "http://p-lower:3128" };
    expect(uplinkProxy("wss://hub.example.com", undefined, env)).toEqual({ url: "http://s:3128/", shown: "http://s:3128", source: "HTTPS_PROXY" });
    expect(uplinkProxy("ws://hub.example.com", undefined, env)).toEqual({ url: "http://p-lower:3128/", shown: "http://p-lower:3128", source: "http_proxy" });
    expect(uplinkProxy("wss://hub.example.com", undefined, { ...env, NO_PROXY: "example.com" })).toBeUndefined();
    expect(uplinkProxy("wss://hub.example.com", undefined, { ...env, NO_PROXY: "example.com", no_proxy: "other.org" })?.source).toBe("HTTPS_PROXY");
    expect(uplinkProxy("wss://hub.example.com", undefined, { ...env, NO_PROXY: "other.org", no_proxy: "example.com" })).toBeUndefined();
    expect(uplinkProxy("wss://hub.example.com", undefined, {})).toBeUndefined();
    expect(uplinkProxy("ws://hub.example.com", undefined, { HTTPS_PROXY: "http://s:3128" })).toBeUndefined();
    const flag = uplinkProxy("wss://hub.example.com", "http://u:p%40ss@corp:8080", env);
    expect(flag).toEqual({ url: "http://u:p%40ss@corp:8080/", shown: "http://corp:8080", source: "--uplink-proxy" });
    expect(uplinkProxy("wss://hub.example.com", "http://corp:8080", { NO_PROXY: ".example.com" })).toBeUndefined();
    expect(() => uplinkProxy("wss://hub.example.com", undefined, { HTTPS_PROXY: "http://u:pw@host/path" })).toThrow(/^HTTPS_PROXY: expected http:\/\/\[USER:PASSWORD@\]HOST:PORT$/);
  });
});

describe("the proxy's password in messages and the environment it comes from", () => {
  test("withoutUserinfo takes the user and password out of every URL, however Bun spells it", () => {
    const cases: [string, string][] = [
      [`Proxy connection to 'http://alice:${PASSWORD}@127.0.0.1:3128/' failed`, "Proxy connection to 'http://127.0.0.1:3128/' failed"],
      [`http://alice:${PASSWORD}@proxy.example:3128 and HTTP://bob:x%40y@[::1]:8080/path`, "http://proxy.example:3128 and HTTP://[::1]:8080/path"],
      [`via //alice:p@ss:${PASSWORD}@proxy:1`, "via //proxy:1"],
      [`proxy http://${PASSWORD}@proxy:1?x=1#y`, "proxy http://proxy:1?x=1#y"],
      ["WebSocket connection to 'ws://127.0.0.1:9/tunnel' failed: Failed to connect", "WebSocket connection to 'ws://127.0.0.1:9/tunnel' failed: Failed to connect"],
      ["mail alice@example.org about http://hub.example/a@b", "mail alice@example.org about http://hub.example/a@b"],
    ];
    for (const [message, shown] of cases) expect(withoutUserinfo(message)).toBe(shown);
  });

  test("startRelay takes the proxy from the environment it is given (main's), not the process's", async () => {
    const quiet = { info() {}, warn() {} };
    const config = parseConfig({ http: "127.0.0.1:0", qemuListen: ["127.0.0.1:0"], uplink: "ws://127.0.0.1:9", uplinkToken: TOKEN });
    const refused = await startRelay(config, quiet, { ...CLEAN, HTTP_PROXY: `socks5://u:${PASSWORD}@proxy.example:1080` }).then(
      async (relay) => (await relay.stop(), "started"),
      (error: Error) => [error instanceof ConfigError, error.message],
    );
    expect(refused).toEqual([true, "HTTP_PROXY: expected http://[USER:PASSWORD@]HOST:PORT"]);
    await using relay = await startRelay(config, quiet, { ...CLEAN, http_proxy: "127.0.0.1:9" });
    expect(relay.snapshot().uplink?.proxy).toBe("http://127.0.0.1:9");
  });
});
