/**
 * Who gets in (issue 19): a right credential is always served and only wrong ones are throttled,
 * per client address; the status page's login starts a server-side session; load balancers' health
 * checks (HTTP/1.0, no Host) are answered; behind a proxy of ours (--trusted-proxy) the client's
 * address comes from X-Forwarded-For or Forwarded, and from no one else's.
 */
import { describe, expect, test } from "bun:test";
import { BlockList } from "node:net";
import { ADMIN_COOKIE, AdminSessions, AuthThrottle, clientAddress, formatClient, parseConfig, trustedProxyList, parseCidr } from "../relay.ts";
import { freePort, runCli, spawnDaemon, tempDir, waitUntil, type RelayProcess, scenario } from "./helpers.ts";

const TOKEN = "auth-test-token-4c2a9e";
const ADMIN = "auth-admin-token-77b1d0";

const get = (relay: RelayProcess, path: string, headers: Record<string, string> = {}) => fetch(`${relay.base}${path}`, { headers, redirect: "manual" });
const login = (relay: RelayProcess, token: string, headers: Record<string, string> = {}) =>
  fetch(`${relay.base}/login`, { method: "POST", body: new URLSearchParams({ token }), headers, redirect: "manual" });
/** The session id a login's Set-Cookie gives. */
const sessionOf = (res: Response) => new RegExp(`^${ADMIN_COOKIE}=([^;]*);`).exec(res.headers.getSetCookie()[0] ?? "")?.[1];

/** Writes `request` as is and resolves with everything the server sent before it closed. */
async function rawHttp(port: number, request: string): Promise<string> {
  const { promise, resolve, reject } = Promise.withResolvers<string>();
  let text = "";
  await Bun.connect({
    hostname: "127.0.0.1",
    port,
    socket: {
      open: (socket) => void socket.write(request),
      data: (_socket, data) => void (text += data.toString()),
      close: () => resolve(text),
      error: (_socket, error) => reject(error),
    },
  });
  return promise;
}

describe("authentication throttle", () => {
  test("the login page and /status without a header are no failures: after twenty of each a wrong token is still 401", async () => {
    await using relay = await scenario().with("--admin-token", ADMIN).listen().spawn();
    for (let i = 0; i < 20; i++) {
      const page = await get(relay, "/");
      expect([page.status, (await page.text()).includes('action="login"')]).toEqual([401, true]);
      expect((await get(relay, "/status")).status).toBe(401);
    }
    expect((await get(relay, "/status", { Authorization: "Bearer wrong-admin-token-000" })).status).toBe(401);
    const status = await (await get(relay, "/status", { Authorization: `Bearer ${ADMIN}` })).json();
    // The bare /status polls were refused (counted), the login page was not; none was throttled.
    expect({ failures: status.authFailures, throttled: status.authThrottled }).toEqual({ failures: 21, throttled: 0 });
  });

  test("an address past its failures: further wrong tokens 429, the right admin token and the login form still served", async () => {
    await using relay = await scenario().with("--admin-token", ADMIN).listen().spawn();
    for (let i = 0; i < 10; i++) expect((await get(relay, "/metrics", { Authorization: `Bearer wrong-${i}-00000000000` })).status).toBe(401);
    const blocked = await get(relay, "/status", { Authorization: "Bearer wrong-again-0000000000" });
    expect([blocked.status, Number(blocked.headers.get("retry-after")) > 0]).toEqual([429, true]);
    expect((await login(relay, "wrong-login-0000000000")).status).toBe(429);
    expect((await get(relay, "/status", { Authorization: `Bearer ${ADMIN}` })).status).toBe(200);
    expect((await get(relay, "/", { Authorization: `Bearer ${ADMIN}` })).status).toBe(200);
    const session = await login(relay, ADMIN);
    expect(session.status).toBe(303);
    expect((await get(relay, "/status", { Cookie: `${ADMIN_COOKIE}=${sessionOf(session)}` })).status).toBe(200);
    const status = await (await get(relay, "/status", { Authorization: `Bearer ${ADMIN}` })).json();
    expect({ failures: status.authFailures, throttled: status.authThrottled }).toEqual({ failures: 10, throttled: 2 });
  });

  test("a login sent in chunks (no Content-Length) is refused under its client's address and throttled with that address's other failures", async () => {
    await using relay = await scenario().with("--admin-token", ADMIN).listen().spawn();
    const chunked = (token: string) =>
      fetch(`${relay.base}/login`, {
        method: "POST",
        body: new ReadableStream<Uint8Array>({
          pull(controller) {
            controller.enqueue(new TextEncoder().encode(`token=${token}`));
            controller.close();
          },
        }),
        redirect: "manual",
      });
    expect((await chunked("wrong-chunked-0000000000")).status).toBe(401);
    for (let i = 0; i < 9; i++) expect((await get(relay, "/metrics", { Authorization: `Bearer wrong-${i}-00000000000` })).status).toBe(401);
    expect((await chunked("wrong-chunked-1111111111")).status).toBe(429);
    expect((await chunked(ADMIN)).status).toBe(303);
    expect(await relay.waitForLine(/^login: refused /)).toMatch(/^login: refused 127\.0\.0\.1:\d+: wrong token$/);
  });

  test("the table of failing addresses is bounded", () => {
    const throttle = new AuthThrottle();
    for (let i = 0; i < 10_000; i++) throttle.failed(`10.${i >> 16}.${(i >> 8) & 255}.${i & 255}`, 1000);
    expect(throttle.size).toBe(4096);
    // The newest addresses are the ones kept.
    for (let i = 0; i < 9; i++) throttle.failed("10.0.39.15", 1000);
    expect(throttle.retryAfter("10.0.39.15", 1000)).toBe(60);
  });
});

describe("admin sessions", () => {
  test("login sets a random session id (HttpOnly, SameSite=Strict, never the token); logout ends it; the token as a cookie is no login", async () => {
    await using relay = await scenario().with("--admin-token", ADMIN).listen().spawn();
    const first = await login(relay, ADMIN);
    expect([first.status, first.headers.get("location")]).toEqual([303, "./"]);
    const cookies = first.headers.getSetCookie();
    expect(cookies).toHaveLength(1);
    expect(cookies[0]).toMatch(new RegExp(`^${ADMIN_COOKIE}=[A-Za-z0-9_-]{43}; Max-Age=43200; Path=/; HttpOnly; SameSite=Strict$`));
    expect(cookies[0]).not.toContain(ADMIN);
    const id = sessionOf(first)!;
    const second = sessionOf(await login(relay, ADMIN));
    expect(second).not.toBe(id);
    expect((await get(relay, "/status", { Cookie: `other=1; ${ADMIN_COOKIE}=${id}` })).status).toBe(200);
    expect((await get(relay, "/", { Cookie: `${ADMIN_COOKIE}=${id}` })).status).toBe(200);
    // The admin token itself in a cookie (what relays before sessions stored) opens nothing.
    expect((await get(relay, "/status", { Cookie: `${ADMIN_COOKIE}=${ADMIN}` })).status).toBe(401);
    expect((await get(relay, "/status", { Cookie: `edge_relay_admin=${ADMIN}` })).status).toBe(401);

    const out = await fetch(`${relay.base}/logout`, { method: "POST", headers: { Cookie: `${ADMIN_COOKIE}=${id}; edge_relay_admin=${ADMIN}` }, redirect: "manual" });
    expect([out.status, out.headers.get("location")]).toEqual([303, "./"]);
    // The session's cookie goes, and so does an old token cookie the browser still had.
    expect(out.headers.getSetCookie()).toEqual([
      `${ADMIN_COOKIE}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict`,
      "edge_relay_admin=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict",
    ]);
    // An ended session is refused, and its polls are no guesses: they never lead to 429.
    for (let i = 0; i < 15; i++) expect((await get(relay, "/status", { Cookie: `${ADMIN_COOKIE}=${id}` })).status).toBe(401);
    expect((await get(relay, "/status", { Cookie: `${ADMIN_COOKIE}=${second}` })).status).toBe(200);
    await relay.stop();
    expect(relay.stdout() + relay.stderr()).not.toContain(ADMIN);
    expect(relay.stdout() + relay.stderr()).not.toContain(id);
  });

  test("the page served with an admin token has a log-out button that ends the session", async () => {
    await using relay = await scenario().with("--admin-token", ADMIN).listen().spawn();
    const page = await (await get(relay, "/", { Authorization: `Bearer ${ADMIN}` })).text();
    expect(page).toContain('<form id="logout" method="post" action="logout"><button type="submit">Log out</button></form>');
    await using open = await scenario().listen().spawn();
    expect(await (await get(open, "/")).text()).not.toContain('id="logout"');
    expect((await fetch(`${open.base}/logout`, { method: "POST" })).status).toBe(404);
  });

  test("sessions expire, end at logout, and the table is bounded (the oldest goes)", () => {
    const sessions = new AdminSessions(3, 1000);
    const a = sessions.start(0);
    expect(sessions.valid(a, 999)).toBe(true);
    expect(sessions.valid(a, 1000)).toBe(false);
    expect(sessions.size).toBe(0);
    const [b, c, d] = [sessions.start(0), sessions.start(0), sessions.start(0)];
    sessions.end(c);
    expect([sessions.valid(b, 1), sessions.valid(c, 1), sessions.valid(d, 1)]).toEqual([true, false, true]);
    const [e, f] = [sessions.start(1), sessions.start(1)];
    expect(sessions.size).toBe(3);
    expect([b, d, e, f].map((id) => sessions.valid(id, 2))).toEqual([false, true, true, true]);
    expect(sessions.valid(undefined)).toBe(false);
  });
});

describe("--help on the admin token", () => {
  test("names every route the admin token guards, / and /capture among them, and the one it does not", async () => {
    const { code, stdout } = await runCli(["--help"]);
    expect(code).toBe(0);
    const help = stdout.slice(stdout.indexOf("--admin-token"), stdout.indexOf("--trusted-proxy")).replace(/\s+/g, " ");
    expect(help).toContain("Bearer token for /, /status, /metrics, /capture, /impair, /invites (or the session the login form at / starts; /healthz needs none)");
  });
});

describe("health checks as load balancers send them", () => {
  test("HTTP/1.0 without Host: GET and HEAD /healthz, OPTIONS /, and any route by its path; /healthz needs no admin token", async () => {
    await using relay = await scenario().with("--admin-token", ADMIN).listen().spawn();
    const port = relay.port("http");
    const get = await rawHttp(port, "GET /healthz HTTP/1.0\r\n\r\n");
    expect(get).toStartWith("HTTP/1.1 200 ");
    expect(get).toEndWith("\r\n\r\nok\n");
    const head = await rawHttp(port, "HEAD /healthz HTTP/1.0\r\n\r\n");
    expect(head).toStartWith("HTTP/1.1 200 ");
    expect(head).toEndWith("\r\n\r\n");
    const options = await rawHttp(port, "OPTIONS / HTTP/1.0\r\n\r\n");
    expect(options).toStartWith("HTTP/1.1 204 ");
    expect(options).toMatch(/\r\nallow: GET, HEAD, POST, PUT, DELETE, OPTIONS\r\n/i);
    expect(await rawHttp(port, `GET /status?networks=0 HTTP/1.0\r\nAuthorization: Bearer ${ADMIN}\r\n\r\n`)).toMatch(/^HTTP\/1\.1 200 [\s\S]*"networksPage":\{"offset":0,"limit":0/);
    expect(await rawHttp(port, "GET /status HTTP/1.0\r\n\r\n")).toStartWith("HTTP/1.1 401 ");
    expect(await rawHttp(port, "GET /capture?network=x HTTP/1.0\r\n\r\n")).toStartWith("HTTP/1.1 401 ");
    expect(await rawHttp(port, `GET /capture?network=nowhere HTTP/1.0\r\nAuthorization: Bearer ${ADMIN}\r\n\r\n`)).toStartWith("HTTP/1.1 404 ");
  });

  test("HAProxy's default option httpchk (OPTIONS /, and GET /healthz) marks the hub up", async () => {
    await using dir = await tempDir();
    await using hub = await scenario().with("--admin-token", ADMIN).listen().spawn();
    const stats = await freePort();
    const server = `127.0.0.1:${hub.port("http")}`;
    await Bun.write(
      `${dir.path}/haproxy.cfg`,
      [
        "defaults",
        "    mode http",
        "    timeout connect 2s",
        "    timeout client 10s",
        "    timeout server 10s",
        "listen stats",
        `    bind 127.0.0.1:${stats}`,
        "    stats enable",
        "    stats uri /stats",
        "backend plain",
        "    option httpchk",
        `    server hub ${server} check inter 100ms`,
        "backend healthz",
        "    option httpchk GET /healthz",
        `    server hub ${server} check inter 100ms`,
        "",
      ].join("\n"),
    );
    await using haproxy = spawnDaemon(["haproxy", "-f", `${dir.path}/haproxy.cfg`, "-db"]);
    const checks = async () => {
      if (haproxy.proc.exitCode !== null) throw new Error(`HAProxy exited (${haproxy.proc.exitCode}):\n${haproxy.log()}`);
      const csv = (await (await fetch(`http://127.0.0.1:${stats}/stats;csv`)).text()).split("\n");
      const columns = csv[0]!.replace(/^# /, "").split(",");
      const rows = csv.slice(1).map((line) => Object.fromEntries(line.split(",").map((v, i) => [columns[i], v])));
      return Object.fromEntries(rows.filter((r) => r.svname === "hub").map((r) => [r.pxname, `${r.status} ${r.check_status} ${r.check_code}`]));
    };
    let last: unknown;
    await waitUntil(async () => {
      last = await checks();
      return JSON.stringify(last) === JSON.stringify({ plain: "UP L7OK 204", healthz: "UP L7OK 200" });
    }, "both checks L7OK").catch((error) => {
      throw new Error(`${error.message}\nlast: ${JSON.stringify(last)}\n${haproxy.log()}`);
    });
  });
});

describe("the client's address behind a proxy (--trusted-proxy)", () => {
  const trusted = trustedProxyList(["10.0.0.0/8", "127.0.0.1", "fd00::/8"].map((t) => parseCidr(t)!))!;
  const from = (address: string, headers: Record<string, string>, list: BlockList | null = trusted) =>
    formatClient(clientAddress({ address, port: 40122 }, new Headers(headers), list ?? undefined));

  test("X-Forwarded-For: the rightmost hop that is not a trusted proxy", () => {
    expect(from("127.0.0.1", { "X-Forwarded-For": "203.0.113.7" })).toBe("203.0.113.7 via 127.0.0.1:40122");
    expect(from("10.1.2.3", { "X-Forwarded-For": "198.51.100.1, 203.0.113.7, 10.9.9.9" })).toBe("203.0.113.7 via 10.1.2.3:40122");
    expect(from("10.1.2.3", { "X-Forwarded-For": "203.0.113.7:5555" })).toBe("203.0.113.7:5555 via 10.1.2.3:40122");
    expect(from("10.1.2.3", { "X-Forwarded-For": "2001:DB8:0::1" })).toBe("2001:db8::1 via 10.1.2.3:40122");
    expect(from("10.1.2.3", { "X-Forwarded-For": "[2001:db8::1]:443" })).toBe("[2001:db8::1]:443 via 10.1.2.3:40122");
    // Every hop trusted: the first one is the client.
    expect(from("10.1.2.3", { "X-Forwarded-For": "10.0.0.9, 10.0.0.8" })).toBe("10.0.0.9 via 10.1.2.3:40122");
  });

  test("Forwarded (RFC 7239): for= in any spelling; unknown and obfuscated nodes name no one", () => {
    expect(from("127.0.0.1", { Forwarded: "for=203.0.113.7;proto=https" })).toBe("203.0.113.7 via 127.0.0.1:40122");
    expect(from("127.0.0.1", { Forwarded: 'proto=https;For="[2001:db8:cafe::17]:4711"' })).toBe("[2001:db8:cafe::17]:4711 via 127.0.0.1:40122");
    expect(from("127.0.0.1", { Forwarded: "for=192.0.2.43, for=198.51.100.17;by=10.0.0.1" })).toBe("198.51.100.17 via 127.0.0.1:40122");
    expect(from("127.0.0.1", { Forwarded: "for=192.0.2.43, for=_hidden" })).toBe("127.0.0.1:40122");
    expect(from("127.0.0.1", { Forwarded: "for=unknown" })).toBe("127.0.0.1:40122");
    expect(from("10.1.2.3", { Forwarded: "for=192.0.2.43, for=unknown, for=10.0.0.5" })).toBe("10.0.0.5 via 10.1.2.3:40122");
  });

  test("anyone else's header changes nothing; nor does a header naming no address, or both headers at once", () => {
    expect(from("192.0.2.99", { "X-Forwarded-For": "203.0.113.7" })).toBe("192.0.2.99:40122");
    expect(from("192.0.2.99", { Forwarded: "for=203.0.113.7" })).toBe("192.0.2.99:40122");
    expect(from("127.0.0.1", { "X-Forwarded-For": "203.0.113.7" }, null)).toBe("127.0.0.1:40122");
    expect(from("127.0.0.1", { "X-Forwarded-For": "not-an-address" })).toBe("127.0.0.1:40122");
    expect(from("127.0.0.1", { "X-Forwarded-For": "" })).toBe("127.0.0.1:40122");
    expect(from("127.0.0.1", { "X-Forwarded-For": "203.0.113.7", Forwarded: "for=198.51.100.1" })).toBe("127.0.0.1:40122");
    expect(from("::ffff:127.0.0.1", { "X-Forwarded-For": "203.0.113.7" })).toBe("203.0.113.7 via 127.0.0.1:40122");
  });

  test("--trusted-proxy takes CIDR ranges and addresses, repeated or comma-separated; a bad one exits 2 naming the option", async () => {
    expect(parseConfig({ trustedProxies: ["10.0.0.0/8,::1", "127.0.0.1"] }).trustedProxies).toEqual([
      { address: "10.0.0.0", prefix: 8, family: "ipv4" },
      { address: "::1", prefix: 128, family: "ipv6" },
      { address: "127.0.0.1", prefix: 32, family: "ipv4" },
    ]);
    for (const bad of ["10.0.0.0/33", "haproxy.local", "10.0.0.0/8,", "::1/129"]) {
      const { code, stdout, stderr } = await runCli(["--trusted-proxy", bad]);
      expect([code, stdout]).toEqual([2, ""]);
      expect(stderr).toStartWith("edge-relay: --trusted-proxy: expected an address or a CIDR range like 10.0.0.0/8 or fd00::/8, got ");
    }
  });

  test("through a trusted proxy each client is throttled and limited by its own address, and logged so; others' headers are ignored", async () => {
    await using hub = await scenario().hub(TOKEN).with("--trusted-proxy", "127.0.0.1/32").spawn();
    const tunnel = (client: string) => get(hub, "/tunnel", { Authorization: "Bearer wrong-token-00000000", "X-Forwarded-For": client });
    for (let i = 0; i < 10; i++) expect((await tunnel("192.0.2.1")).status).toBe(401);
    expect((await tunnel("192.0.2.1")).status).toBe(429);
    expect((await tunnel("192.0.2.2")).status).toBe(401);
    await hub.waitForLine(/^tunnel: refused 192\.0\.2\.1 via 127\.0\.0\.1:\d+: wrong token$/);

    // Not trusted: the same header from 127.0.0.1 is the caller's own word, and changes nothing.
    await using plain = await scenario().hub(TOKEN).with("--trusted-proxy", "10.0.0.0/8").spawn();
    for (let i = 0; i < 10; i++) expect((await get(plain, "/tunnel", { Authorization: "Bearer wrong-token-00000000", "X-Forwarded-For": `192.0.2.${i}` })).status).toBe(401);
    expect((await get(plain, "/tunnel", { Authorization: "Bearer wrong-token-00000000", "X-Forwarded-For": "192.0.2.77" })).status).toBe(429);
    await plain.waitForLine(/^tunnel: refused 127\.0\.0\.1:\d+: wrong token$/);
  });
});
