/**
 * The status page at `/`, in a real browser: Debian's Chromium, headless, driven by puppeteer-core.
 * Without Chromium the suite is skipped with a message, except in CI (CI=true), where `.ci/run`
 * installs it and a missing browser fails the tests.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { copyFileSync, existsSync, mkdirSync } from "node:fs";
import puppeteer, { type Browser, type Page } from "puppeteer-core";
import { ADMIN_COOKIE, PAGE_HTML, PAGE_HTML_WITH_LOGOUT } from "../relay.ts";
import { lease } from "./dhcp-packets.ts";
import { attachVm, freePort, makeFrame, spawnRelay, tempDir, uplinkFailed, uplinkUp, waitUntil, scenario } from "./helpers.ts";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const present = existsSync(CHROMIUM);
if (!present && !process.env.CI) {
  console.warn(`tests/page.test.ts: SKIPPED: no Chromium at ${CHROMIUM} (apt-get install chromium, or set CHROMIUM=/path)`);
}
const suite = present || process.env.CI ? describe : describe.skip;

/** Set EDGE_RELAY_SCREENSHOTS=DIR to keep a copy of each screenshot (the temp dir goes with the test). */
async function screenshot(page: Page, dir: string, name: string, fullPage = false): Promise<string> {
  const path = `${dir}/${name}.png`;
  await page.screenshot({ path, fullPage });
  const keep = process.env.EDGE_RELAY_SCREENSHOTS;
  if (keep) {
    mkdirSync(keep, { recursive: true });
    copyFileSync(path, `${keep}/${name}.png`);
  }
  expect(Bun.file(path).size).toBeGreaterThan(1000);
  return path;
}

/** Console errors, uncaught exceptions and CSP violations of a page: a working page has none. */
function problems(page: Page): string[] {
  const seen: string[] = [];
  page.on("console", (m) => {
    if (m.type() === "error") seen.push(`console: ${m.text()}`);
  });
  page.on("pageerror", (e) => seen.push(`pageerror: ${e instanceof Error ? e.message : String(e)}`));
  return seen;
}

const number = (text: string | null | undefined) => Number((text ?? "").replace(/[^\d]/g, ""));

/** The page and a /status of the test's making, without the relay (or its CSP). */
function servePage(snapshot: () => unknown) {
  return Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    fetch(request) {
      const path = new URL(request.url).pathname;
      if (path === "/") return new Response(PAGE_HTML, { headers: { "Content-Type": "text/html; charset=utf-8" } });
      if (path === "/status") return Response.json(snapshot());
      return new Response("not found", { status: 404 });
    },
  });
}

const MAC_A = "02:00:00:00:0a:01";
const MAC_B = "02:00:00:00:0b:02";

suite("status page in Chromium", () => {
  let browser: Browser;
  beforeAll(async () => {
    browser = await puppeteer.launch({
      executablePath: CHROMIUM,
      headless: true,
      // We run as root (no sandbox then); /dev/shm may be small in containers.
      args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
    });
  });
  afterAll(async () => {
    await browser?.close();
  });

  test("shows the network, both ports and rising counters while two VMs exchange frames", async () => {
    await using dir = await tempDir();
    await using relay = await scenario().listen("lab").with("--name", "site-a").spawn();
    await using a = await attachVm(relay, "lab");
    await using b = await attachVm(relay, "lab");
    const lab = (await relay.status()).networks.find((n: any) => n.name === "lab");
    const portA = lab.ports.find((p: any) => p.peer === a.local).id as string;
    const portB = lab.ports.find((p: any) => p.peer === b.local).id as string;
    // Traffic both ways for as long as the test runs (not a synchronisation: the test waits for what the page shows).
    let bSends = true;
    const traffic = setInterval(() => {
      a.send(makeFrame(MAC_B, MAC_A, 100));
      if (bSends) b.send(makeFrame(MAC_A, MAC_B, 60));
    }, 10);
    using _traffic = { [Symbol.dispose]: () => clearInterval(traffic) };

    await using context = await browser.createBrowserContext();
    const page = await context.newPage();
    const seen = problems(page);
    await page.setViewport({ width: 1280, height: 800 });
    const response = await page.goto(`${relay.base}/`);
    expect(response?.status()).toBe(200);
    const headers = response!.headers();
    expect(headers["content-type"]).toBe("text/html; charset=UTF-8");
    expect(headers["content-security-policy"]).toMatch(/^default-src 'none'; script-src 'sha256-[A-Za-z0-9+/=]+'; style-src 'sha256-[A-Za-z0-9+/=]+'; connect-src 'self'/);
    expect(headers["x-content-type-options"]).toBe("nosniff");
    expect(headers["cache-control"]).toBe("no-store");
    await page.evaluate(() => ((window as any).sameDocument = true));

    const row = (port: string) => `section[data-network="lab"] table.ports tr[data-port="${port}"]`;
    // One round trip each: the page replaces its rows at every poll, so a handle could be stale by the next call.
    const text = (selector: string) => page.evaluate((s: string) => document.querySelector(s)?.textContent, selector);
    const field = (port: string, name: string) => text(`${row(port)} td[data-field="${name}"]`);
    await page.waitForSelector(row(portA), { timeout: 5_000 });
    await page.waitForSelector(row(portB), { timeout: 5_000 });
    expect(await page.$eval("#name", (e) => e.textContent)).toBe("site-a");
    expect(await field(portA, "peer")).toBe(a.local);
    expect(await field(portB, "peer")).toBe(b.local);
    expect(await field(portA, "id")).toBe(`${portA} (qemu-listen)`);
    expect(await field(portA, "state")).toStartWith("● up since ");

    // The counters rise on the page, and it is the same document: it refreshed itself. A cell that
    // did not change is the same element (a selection in it survives the refresh); a counter is new.
    const mark = (name: string) =>
      page.evaluate((s: string) => ((document.querySelector(s) as any).marked = true), `${row(portA)} td[data-field="${name}"]`);
    const marked = (name: string) =>
      page.evaluate((s: string) => (document.querySelector(s) as any).marked === true, `${row(portA)} td[data-field="${name}"]`);
    await mark("peer");
    await mark("rx-frames");
    const before = { a: number(await field(portA, "rx-frames")), b: number(await field(portB, "tx-frames")) };
    await page.waitForFunction(
      (selA: string, selB: string, a: number, b: number) => {
        const n = (sel: string) => Number((document.querySelector(sel)?.textContent ?? "").replace(/[^\d]/g, ""));
        return n(selA) > a && n(selB) > b;
      },
      { timeout: 5_000, polling: 50 },
      `${row(portA)} td[data-field="rx-frames"]`,
      `${row(portB)} td[data-field="tx-frames"]`,
      before.a,
      before.b,
    );
    expect(await page.evaluate(() => (window as any).sameDocument)).toBe(true);
    expect([await marked("peer"), await marked("rx-frames")]).toEqual([true, false]);
    const shown = number(await field(portA, "rx-frames"));
    const actual = (await relay.status()).networks.find((n: any) => n.name === "lab").ports.find((p: any) => p.id === portA).rx.frames;
    expect(shown).toBeGreaterThan(before.a);
    expect(shown).toBeLessThanOrEqual(actual);
    expect(number(await field(portA, "tx-frames"))).toBeGreaterThan(0);

    // A sparkline with a non-zero rate, from the differences between polls.
    await page.waitForSelector(`${row(portA)} td[data-field="rate"] svg polyline.in`, { timeout: 5_000 });
    expect(await text(`${row(portA)} td[data-field="rate"] .v > span`)).toMatch(/^in [1-9][\d,.]*\/s · out [1-9][\d,.]*\/s$/);
    // Learned MACs with their ports, and the topology names the network and both VMs.
    await page.waitForSelector(`section[data-network="lab"] tr[data-mac="${MAC_B}"]`, { timeout: 5_000 });
    expect(await text(`section[data-network="lab"] tr[data-mac="${MAC_A}"]`)).toStartWith(`${MAC_A}${portA} ${a.local}`);
    const topology = await page.$eval("#topology svg", (e) => e.textContent);
    for (const text of ["this relay: site-a", "network lab", `VM ${a.local}`, `VM ${b.local}`]) expect(topology).toContain(text);
    expect(await page.$eval("#facts", (e) => e.textContent)).toContain("Uplinknone: this relay dials no hub");

    await screenshot(page, dir.path, "page-1280x800");
    await screenshot(page, dir.path, "page-1280-full", true);

    // Without colour (as a greyscale screen or a colour-blind reader sees it) every state is still
    // said in words next to its symbol, and the live indicator too.
    await page.emulateVisionDeficiency("achromatopsia");
    const states = await page.$$eval(`section[data-network="lab"] table.ports td[data-field="state"]`, (cells) => cells.map((c) => c.textContent));
    expect(states.length).toBe(2);
    for (const state of states) expect(state).toMatch(/^\S (up|down|connecting|closed|blocked \(loop\)) /);
    expect(await text("#live")).toMatch(/^● Live, updated /);
    await screenshot(page, dir.path, "page-1280-greyscale");
    await page.emulateVisionDeficiency("none");

    // Phone width: nothing sticks out sideways; ports become cards.
    await page.setViewport({ width: 390, height: 844 });
    expect(await page.evaluate(() => document.documentElement.scrollWidth)).toBeLessThanOrEqual(390);
    expect(await page.evaluate((s: string) => getComputedStyle(document.querySelector(s)!).display, `${row(portA)} td[data-field="rx-frames"]`)).toBe("flex");
    await screenshot(page, dir.path, "page-390x844");
    await screenshot(page, dir.path, "page-390-full", true);

    // A VM goes: its port moves to the recently closed ones.
    bSends = false;
    b.close();
    await page.waitForSelector(`section[data-network="lab"] table.closed tr[data-port="${portB}"]`, { timeout: 5_000 });
    expect(await text(`section[data-network="lab"] table.closed tr[data-port="${portB}"] td[data-field="peer"]`)).toBe(b.local);
    expect(await page.$(row(portB))).toBeNull();
    expect(seen).toEqual([]);
  }, 20_000);

  test("a --dhcp network shows each lease's address and name beside its MAC and its port, and the pool in the summary", async () => {
    await using dir = await tempDir();
    await using relay = await scenario().listen("lab").with("--dhcp", "lab=10.9.0.0/24", "--name", "site-a").spawn();
    await using vm = await attachVm(relay, "lab");
    const client = "52:54:00:00:00:81";
    const ack = await lease(vm, client, { hostname: "vm2" });
    const port = (await relay.status()).networks[0].ports.find((p: any) => p.peer === vm.local).id as string;
    await using context = await browser.createBrowserContext();
    const page = await context.newPage();
    const seen = problems(page);
    await page.setViewport({ width: 1280, height: 800 });
    await page.goto(`${relay.base}/`);
    const text = (selector: string) => page.evaluate((s: string) => document.querySelector(s)?.textContent, selector);
    await page.waitForSelector(`section[data-network="lab"] tr[data-mac="${client}"] [data-field="lease"]`, { timeout: 5_000 });
    expect(await text(`section[data-network="lab"] tr[data-mac="${client}"] td.mac`)).toBe(`${client}${ack.yiaddr} vm2`);
    expect(await text(`section[data-network="lab"] table.ports tr[data-port="${port}"] [data-field="leases"]`)).toBe(`${ack.yiaddr} vm2`);
    expect(await text(`section[data-network="lab"] table.ports tr[data-port="lab/host-1"] td[data-field="id"]`)).toBe("lab/host-1 (host)");
    expect(await text(`section[data-network="lab"] > p.muted`)).toContain("DHCP 10.9.0.0/24, gateway 10.9.0.1, pool 10.9.0.10-10.9.0.254: 1 lease, 244 free");
    await screenshot(page, dir.path, "page-dhcp");
    expect(seen).toEqual([]);
  });

  test("with an admin token: 401 and a login form, then a session cookie the page's polls carry, and a log-out button", async () => {
    await using dir = await tempDir();
    const token = "page-admin-token-0001";
    await using relay = await scenario().with("--admin-token", token).listen().with("--name", "locked-relay").spawn();
    const base = relay.base;

    const anonymous = await fetch(`${base}/`);
    expect(anonymous.status).toBe(401);
    expect(anonymous.headers.get("www-authenticate")).toBe('Bearer realm="edge-relay admin"');
    expect(anonymous.headers.get("content-security-policy")).toStartWith("default-src 'none'; script-src 'none'; style-src 'sha256-");
    expect(anonymous.headers.get("cache-control")).toBe("no-store");
    const form = await anonymous.text();
    expect(form).toContain('<form method="post" action="login">');
    expect(form).not.toContain("locked-relay");
    const bearer = await fetch(`${base}/`, { headers: { Authorization: `Bearer ${token}` } });
    expect([bearer.status, await bearer.text()]).toEqual([200, PAGE_HTML_WITH_LOGOUT]);
    expect((await fetch(`${base}/status`)).status).toBe(401);
    expect((await fetch(`${base}/status`, { headers: { Cookie: `${ADMIN_COOKIE}=not-a-session-00000001` } })).status).toBe(401);
    // The token is no session: only what /login hands out is.
    expect((await fetch(`${base}/status`, { headers: { Cookie: `other=1; ${ADMIN_COOKIE}=${encodeURIComponent(token)}` } })).status).toBe(401);
    const tooBig = await fetch(`${base}/login`, { method: "POST", headers: { "Content-Type": "application/x-www-form-urlencoded" }, body: `token=${"x".repeat(5000)}` });
    expect(tooBig.status).toBe(413);
    // Sent in chunks with no Content-Length, a body is still cut off at the limit.
    const streamed = new ReadableStream<Uint8Array>({
      pull(controller) {
        controller.enqueue(new TextEncoder().encode(`token=${"x".repeat(3000)}`));
        controller.enqueue(new TextEncoder().encode("x".repeat(3000)));
        controller.close();
      },
    });
    const chunked = await fetch(`${base}/login`, { method: "POST", body: streamed });
    expect([chunked.status, chunked.headers.get("set-cookie"), await chunked.text()]).toEqual([413, null, "request body too large\n"]);

    await using context = await browser.createBrowserContext();
    const page = await context.newPage();
    const seen = problems(page);
    await page.setViewport({ width: 1280, height: 800 });
    expect((await page.goto(`${base}/`))?.status()).toBe(401);
    await page.type('input[name="token"]', "not-the-admin-token-01");
    const [wrong] = await Promise.all([page.waitForNavigation(), page.click('button[type="submit"]')]);
    expect(wrong?.status()).toBe(401);
    expect(await page.$eval('[role="alert"]', (e) => e.textContent)).toBe("⚠ That is not this relay's admin token.");
    await screenshot(page, dir.path, "login-wrong-token");
    await page.type('input[name="token"]', token);
    const [right] = await Promise.all([page.waitForNavigation(), page.click('button[type="submit"]')]);
    expect(right?.status()).toBe(200);
    expect(right?.request().redirectChain().map((r) => r.response()?.status())).toEqual([303]);
    expect(page.url()).toBe(`${base}/`);

    const cookie = (await context.cookies()).find((c) => c.name === ADMIN_COOKIE);
    expect(cookie).toMatchObject({ httpOnly: true, sameSite: "Strict", path: "/", secure: false });
    expect(cookie!.value).not.toContain(token);
    expect(await page.evaluate(() => document.cookie)).toBe("");
    // The page's own fetches of /status carry the cookie.
    await page.waitForFunction(() => document.querySelector("#name")?.textContent === "locked-relay", { timeout: 5_000 });
    await page.waitForFunction(() => /^● Live/.test(document.querySelector("#live")?.textContent ?? ""), { timeout: 5_000 });

    await screenshot(page, dir.path, "logged-in");

    // Log out: the session ends on the relay, so its id is worth nothing even to whoever kept it.
    const [out] = await Promise.all([page.waitForNavigation(), page.click('#logout button[type="submit"]')]);
    expect(out?.status()).toBe(401);
    expect(await page.$('input[name="token"]')).not.toBeNull();
    expect((await context.cookies()).find((c) => c.name === ADMIN_COOKIE)).toBeUndefined();
    expect((await fetch(`${base}/status`, { headers: { Cookie: `${ADMIN_COOKIE}=${cookie!.value}` } })).status).toBe(401);

    // Logged in again, the cookie goes (or the relay restarts): the page says so and links to the login form.
    await page.type('input[name="token"]', token);
    await Promise.all([page.waitForNavigation(), page.click('button[type="submit"]')]);
    await page.waitForFunction(() => /^● Live/.test(document.querySelector("#live")?.textContent ?? ""), { timeout: 5_000 });
    await context.deleteCookie((await context.cookies()).find((c) => c.name === ADMIN_COOKIE)!);
    await page.waitForFunction(() => /^⚠ Not authorised/.test(document.querySelector("#live")?.textContent ?? ""), { timeout: 5_000 });
    expect(await page.$eval("#live a", (e) => e.getAttribute("href"))).toBe("./");

    const status = await (await fetch(`${base}/status`, { headers: { Authorization: `Bearer ${token}` } })).json();
    // Refused: fetch's /status, the two cookies that are no sessions, the old session; the browser's wrong
    // token and its polls without a cookie (one or more). The login form shown is no failure, nor throttled.
    expect(status.authFailures).toBeGreaterThanOrEqual(6);
    expect(status.authThrottled).toBe(0);
    expect(relay.stdout() + relay.stderr()).toMatch(/login: refused 127\.0\.0\.1:\d+: wrong token/);
    expect(relay.stdout() + relay.stderr()).not.toContain(token);
    expect(relay.stdout() + relay.stderr()).not.toContain("not-the-admin-token-01");
    expect(seen.filter((s) => !s.includes("401"))).toEqual([]);
  }, 20_000);

  test("writes every time in one form: 24-hour, with the date (year first) when it is not today", async () => {
    const today = new Date().toISOString();
    const port = (id: string, state: string, since: string) => ({
      id, kind: "tunnel", peer: id, state, since, errors: 0, macs: 0, reason: "gone",
      rx: { frames: 0, bytes: 0, drops: 0, runts: 0, storm: 0, macLimit: 0, loop: 0 },
      tx: { frames: 0, bytes: 0, drops: 0 },
    });
    const snapshot = {
      version: "0.1.0", id: "0123456789abcdef", name: "hub", uptime: 86_400 * 400, startedAt: "2025-11-02T15:04:05.000Z",
      networks: [{ name: "lab", ports: [port("tunnel-1", "up", today)], closedPorts: [port("tunnel-0", "closed", "2026-01-02T03:04:06.000Z")], macCount: 0, macs: [] }],
      uplink: { url: "ws://hub:1", state: "up", since: "2026-01-02T23:59:59.000Z", connects: 1, attempts: 1, networks: ["lab"], refused: [] },
      dials: [],
      limits: { networks: 1, maxNetworks: 1024, tunnels: 1, maxTunnels: 4096, maxTunnelsPerAddress: 64, memoryUsed: 0, memoryBudget: 1 << 28, memoryDrops: 0 },
      authFailures: 0, authThrottled: 0, protocolErrors: 0, tunnelsRefused: 0, loopRefusals: 0, loopsDetected: 0,
    };
    await using server = servePage(() => snapshot);
    await using context = await browser.createBrowserContext();
    const page = await context.newPage();
    const seen = problems(page);
    await page.emulateTimezone("UTC");
    await page.goto(`http://127.0.0.1:${server.port}/`);
    await page.waitForSelector("table.closed tr[data-port='tunnel-0']", { timeout: 5_000 });
    const fact = (name: string) => page.evaluate((n) => [...document.querySelectorAll("dt")].find((dt) => dt.textContent === n)?.nextElementSibling?.textContent, name);
    expect(await fact("Uptime")).toBe("400 d 0 h (since 2025-11-02 15:04:05)");
    expect(await page.$eval("[data-field='uplink-state']", (e) => e.textContent)).toBe("● up since 2026-01-02 23:59:59");
    expect(await page.$eval("table.closed td[data-field='since']", (e) => e.textContent)).toStartWith("2026-01-02 03:04:06 (");
    const hms = new Date(today).toISOString().slice(11, 19);
    expect(await page.$eval("tr[data-port='tunnel-1'] td[data-field='state']", (e) => e.textContent)).toEndWith(` since ${hms}`);
    await page.waitForFunction(() => /^● Live, updated \d\d:\d\d:\d\d$/.test(document.querySelector("#live")?.textContent ?? ""), { timeout: 5_000 });
    expect(seen).toEqual([]);
  }, 20_000);

  test("an uplink that is up again shows its last error as past, not in red", async () => {
    const token = "page-uplink-token-01";
    const hubPort = await freePort();
    await using site = await scenario().uplink(`ws://127.0.0.1:${hubPort}`, token).spawn();
    await using context = await browser.createBrowserContext();
    const page = await context.newPage();
    const seen = problems(page);
    const failed = await uplinkFailed(site);
    await page.goto(`${site.base}/`);
    await page.waitForFunction((e) => document.querySelector("[data-field='uplink-error']")?.textContent === e, { timeout: 5_000 }, `⚠ ${failed.lastError}`);
    expect(await page.$eval("[data-field='uplink-error'] span", (e) => e.className)).toBe("error");
    await using _hub = await spawnRelay(["--http", `127.0.0.1:${hubPort}`, "--token", token]);
    await uplinkUp(site);
    const past = new RegExp(`^last error before it reconnected \\d+ s ago: ${failed.lastError.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}$`);
    await page.waitForFunction((re) => new RegExp(re).test(document.querySelector("[data-field='uplink-error']")?.textContent ?? ""), { timeout: 10_000 }, past.source);
    expect(await page.$eval("[data-field='uplink-error'] span", (e) => e.className)).toBe("muted");
    expect(await page.$eval("[data-field='uplink-state']", (e) => e.textContent)).toStartWith("● up since ");
    expect(seen).toEqual([]);
  }, 30_000);

  test("renders hostile names as text, and closed ports' reasons and the uplink's last error", async () => {
    await using dir = await tempDir();
    const evil = (n: number) => `<img src=x onerror="window.pwned=${n}">`;
    const port = (id: string, kind: string, peer: string, frames: number) => ({
      id,
      kind,
      peer,
      state: "up",
      since: new Date().toISOString(),
      rx: { frames, bytes: frames * 100, drops: 0, runts: 0, storm: 0, macLimit: 0, loop: 0 },
      tx: { frames, bytes: frames * 100, drops: 0 },
      errors: 0,
      macs: 1,
    });
    let polls = 0;
    const snapshot = () => ({
      version: "0.1.0",
      id: "0123456789abcdef",
      name: `hub${evil(1)}`,
      uptime: ++polls,
      startedAt: new Date().toISOString(),
      networks: [
        {
          name: `net<b>${evil(2)}</b>`,
          ports: [port("tunnel-1", "tunnel", `site${evil(3)} (127.0.0.1:1)`, polls * 10), port("uplink-2", "uplink", "ws://hub:1", polls * 20)],
          closedPorts: [{ ...port("tunnel-0", "tunnel", `gone${evil(4)}`, 5), state: "closed", reason: `the hub said <script>window.pwned=5</script>` }],
          macCount: 1,
          macs: [{ mac: `02:00:00:00:00:01${evil(6)}`, port: "tunnel-1", age: 1.5 }],
        },
      ],
      uplink: {
        url: "ws://hub:1",
        state: "down",
        since: new Date().toISOString(),
        connects: 1,
        attempts: 3,
        lastError: `refused: ${evil(7)}`,
        hub: `big${evil(8)}`,
        networks: [],
        refused: [{ network: "x", reason: evil(9) }],
      },
      dials: [],
      limits: { networks: 1, maxNetworks: 1024, tunnels: 1, maxTunnels: 4096, maxTunnelsPerAddress: 64, memoryUsed: 0, memoryBudget: 1 << 28, memoryDrops: 0 },
      authFailures: 0,
      authThrottled: 0,
      protocolErrors: 0,
      tunnelsRefused: 0,
      loopRefusals: 0,
      loopsDetected: 0,
    });
    // Served without the CSP on purpose: only the page's own escaping stands between this data and the DOM.
    await using server = servePage(snapshot);
    await using context = await browser.createBrowserContext();
    const page = await context.newPage();
    const seen = problems(page);
    await page.setViewport({ width: 1280, height: 800 });
    await page.goto(`http://127.0.0.1:${server.port}/`);
    const net = `net<b>${evil(2)}</b>`;
    await page.waitForSelector("section.network table.closed tr[data-port='tunnel-0']", { timeout: 5_000 });
    expect(await page.$eval("#name", (e) => e.textContent)).toBe(`hub${evil(1)}`);
    expect(await page.$eval("section.network", (e) => e.getAttribute("data-network"))).toBe(net);
    expect(await page.$eval("section.network h2", (e) => e.textContent)).toBe(`Network ${net}`);
    expect(await page.$eval("tr[data-port='tunnel-1'] td[data-field='peer']", (e) => e.textContent)).toBe(`site${evil(3)} (127.0.0.1:1)`);
    expect(await page.$eval("table.closed td[data-field='reason']", (e) => e.textContent)).toBe("the hub said <script>window.pwned=5</script>");
    expect(await page.$eval("[data-field='uplink-error']", (e) => e.textContent)).toBe(`⚠ refused: ${evil(7)}`);
    expect(await page.$eval("[data-field='uplink-state']", (e) => e.textContent)).toStartWith("○ down since ");
    expect(await page.$eval("#topology svg", (e) => e.textContent)).toContain(`uplink to hub big<img`);
    // Nothing from the data became an element, and no handler ran.
    expect(await page.evaluate(() => [document.querySelectorAll("img, b, main script").length, typeof (window as any).pwned])).toEqual([0, "undefined"]);
    // Rising counters give a rate even here (the fake's uptime advances one second a poll).
    await page.waitForFunction(() => /^in 10\/s · out 10\/s$/.test(document.querySelector("tr[data-port='tunnel-1'] td[data-field='rate'] .v > span")?.textContent ?? ""), { timeout: 5_000 });
    await screenshot(page, dir.path, "page-hostile");
    expect(seen).toEqual([]);
  }, 20_000);
});

describe("status page login", () => {
  test("over HTTPS the session cookie is Secure too; a wrong token sets none", async () => {
    await using dir = await tempDir();
    const [cert, key] = [`${dir.path}/cert.pem`, `${dir.path}/key.pem`];
    await Bun.$`openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ${key} -out ${cert} -days 1 -subj /CN=edge-relay-test -addext subjectAltName=IP:127.0.0.1`.quiet();
    const token = "page-admin-token-tls1";
    await using relay = await scenario().with("--admin-token", token, "--tls-cert", cert, "--tls-key", key).spawn();
    expect(relay.base).toStartWith("https://");
    const tls = { ca: await Bun.file(cert).text() };
    const login = (value: string) =>
      fetch(`${relay.base}/login`, {
        method: "POST",
        body: new URLSearchParams({ token: value }),
        redirect: "manual",
        tls,
      } as RequestInit);
    const wrong = await login("not-the-admin-token-01");
    expect([wrong.status, wrong.headers.get("set-cookie")]).toEqual([401, null]);
    const right = await login(token);
    expect([right.status, right.headers.get("location")]).toEqual([303, "./"]);
    const cookie = right.headers.get("set-cookie") ?? "";
    expect(cookie).toMatch(new RegExp(`^${ADMIN_COOKIE}=[A-Za-z0-9_-]{43}; Max-Age=43200; Path=/; HttpOnly; Secure; SameSite=Strict$`));
    const page = await fetch(`${relay.base}/`, { headers: { Cookie: cookie.split(";")[0]! }, tls } as RequestInit);
    expect([page.status, await page.text()]).toEqual([200, PAGE_HTML_WITH_LOGOUT]);
    const out = await fetch(`${relay.base}/logout`, { method: "POST", headers: { Cookie: cookie.split(";")[0]! }, redirect: "manual", tls } as RequestInit);
    expect(out.headers.get("set-cookie")).toBe(`${ADMIN_COOKIE}=; Max-Age=0; Path=/; HttpOnly; Secure; SameSite=Strict`);
  });
});
