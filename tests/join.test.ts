/**
 * One command per machine: a hub that makes its own certificate and tokens (--public-url,
 * --state-dir), sites that join with the one line it prints, invites per network and revocation.
 * Everything runs as separate processes on loopback; sites are started as the hub's line says.
 */
import { describe, expect, test } from "bun:test";
import { chmodSync, existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { X509Certificate } from "node:crypto";
import { addInvite, environmentFileValue, helpText, hubStartLines, listInvites, openHubState, selfSignedCertificate, withHubLock } from "../relay.ts";
import { BROADCAST, ROOT, attachVm, freePort, fromMac, makeFrame, runCli, spawnRelay, tempDir, testCertificate, uplinkFailed, uplinkUp, waitUntil, type RelayProcess } from "./helpers.ts";

/** A hub as the README starts it: one command, its state in `dir`, listening on all addresses at `port`. */
async function startHub(dir: string, port: number, extra: string[] = []) {
  const hub = await spawnRelay(["--public-url", `wss://localhost:${port}`, "--state-dir", dir, ...extra]);
  const cert = await Bun.file(`${dir}/hub-cert.pem`).text();
  const admin = (await Bun.file(`${dir}/admin-token`).text()).trim();
  /** The hub's own HTTP API, trusting its certificate, with the admin token. */
  const api = (path: string, init: RequestInit = {}) =>
    fetch(`https://localhost:${port}${path}`, { ...init, headers: { Authorization: `Bearer ${admin}`, ...init.headers }, tls: { ca: cert } } as RequestInit);
  return Object.assign(hub, { cert, admin, api, fingerprint: new X509Certificate(cert).fingerprint256 });
}

/** What a hub logs at its first start when stdout is not a terminal: the site line, naming the file with the join string. */
const SITE_LINE = /^hub: on each site, run: (.+) --join JOIN, JOIN being the contents of (\S+) \(not logged: it holds the site token\)$/m;

/** The site command a hub printed (`npx bun relay.ts --join …`), the join string read from the file it names, as a user would. */
function printedSiteLine(hub: RelayProcess): string[] {
  const m = SITE_LINE.exec(hub.stdout());
  if (m === null) throw new Error(`the hub printed no site line:\n${hub.stdout()}`);
  return [...m[1]!.split(" "), "--join", readFileSync(m[2]!, "utf8").trim()];
}

/** Runs a site line as printed (through npx, in the checkout), with a status port and QEMU ports of its own. */
function startSite(line: string[], networks: string[] = ["lab"]) {
  const [program, join] = [line.slice(0, line.indexOf("--join")), line.slice(line.indexOf("--join"))];
  const ports = networks.flatMap((n) => ["--qemu-listen", `${n}=127.0.0.1:0`]);
  return spawnRelay([...join, "--http", "127.0.0.1:0", ...ports], { command: program, cwd: ROOT, group: true });
}

/** Frames from a VM at one site reach a VM at the other, both ways. */
async function exchangeFrames(siteA: RelayProcess, siteB: RelayProcess, network: string, tag: string) {
  await using vmA = await attachVm(siteA, network);
  await using vmB = await attachVm(siteB, network);
  const [A, B] = ["02:00:00:00:22:01", "02:00:00:00:22:02"];
  const hello = makeFrame(BROADCAST, A, `hello ${tag}`);
  vmA.send(hello);
  expect(await vmB.frames.next(fromMac(A))).toEqual(hello);
  const reply = makeFrame(A, B, `reply ${tag}`);
  vmB.send(reply);
  expect(await vmA.frames.next(fromMac(B))).toEqual(reply);
}

const modeOf = (path: string) => (statSync(path).mode & 0o777).toString(8);

describe("one-command hub and join lines", () => {
  test("one hub command makes its certificate and tokens; its printed site line, run through npx, joins over wss:// with the pin; two sites' VMs exchange frames; a restarted hub keeps all and the sites come back unchanged", async () => {
    await using dir = await tempDir();
    const state = `${dir.path}/state`;
    const port = await freePort();
    let hub = await startHub(state, port);
    expect(hub.bound.find((b) => b.what === "http")?.address).toBe(`https://[::]:${port}`);
    expect(SITE_LINE.exec(hub.stdout())?.[2]).toBe(`${state}/site-join`);
    expect(hub.stdout()).toContain(`hub: certificate SHA-256 ${hub.fingerprint}; the admin token (for /status, /metrics, /invites) is in ${state}/admin-token`);
    // Secrets 0600 (the certificate is public); the directory is the hub's alone.
    expect({ dir: modeOf(state), key: modeOf(`${state}/hub-key.pem`), tokens: modeOf(`${state}/tokens.json`), admin: modeOf(`${state}/admin-token`), site: modeOf(`${state}/site-join`), cert: modeOf(`${state}/hub-cert.pem`) })
      .toEqual({ dir: "700", key: "600", tokens: "600", admin: "600", site: "600", cert: "644" });
    const x509 = new X509Certificate(hub.cert);
    expect({ name: x509.subjectAltName, key: x509.publicKey.asymmetricKeyDetails?.namedCurve, selfSigned: x509.verify(x509.publicKey) }).toEqual({ name: "DNS:localhost", key: "prime256v1", selfSigned: true });

    const line = printedSiteLine(hub);
    expect(line.slice(0, 4)).toEqual(["npx", "bun", "relay.ts", "--join"]);
    const siteToken = JSON.parse(await Bun.file(`${state}/tokens.json`).text()).tokens[0].token as string;
    expect(line[4]).toBe(`ER1${hub.fingerprint.replace(/:/g, "").toLowerCase()}::${siteToken}@localhost:${port}`);

    await using siteA = await startSite(line);
    await using siteB = await startSite(line);
    await Promise.all([uplinkUp(siteA), uplinkUp(siteB)]);
    expect((await siteA.status()).uplink.url).toBe(`wss://localhost:${port}/tunnel`);
    await exchangeFrames(siteA, siteB, "lab", "first start");
    const hubStatus = await (await hub.api("/status")).text();
    expect(JSON.parse(hubStatus).networks.map((n: any) => n.name)).toEqual(["lab"]);

    // The secrets: only in the state directory; nowhere in /status, logs (stdout is a pipe here, as under systemd or podman) or help.
    const admin = hub.admin;
    for (const [where, text] of [
      ["hub /status", hubStatus],
      ["site /status", JSON.stringify(await siteA.status())],
      ["site logs", siteA.stdout() + siteA.stderr()],
      ["hub stderr", hub.stderr()],
      ["hub stdout", hub.stdout()],
      ["--help", helpText()],
    ] as const) {
      expect({ where, site: text.includes(siteToken), admin: text.includes(admin) }).toEqual({ where, site: false, admin: false });
    }

    expect(await hub.stop()).toBe(0);
    hub = await startHub(state, port);
    expect(hub.stdout()).not.toContain(siteToken);
    expect(hub.stdout()).toMatch(new RegExp(`^hub: sites keep their join lines; for another: (npx )?bun relay.ts --state-dir ${state} --invite NET\\[,NET…\\]$`, "m"));
    expect(JSON.parse(await Bun.file(`${state}/tokens.json`).text()).tokens[0].token).toBe(siteToken);
    expect(hub.admin).toBe(admin);
    expect(new X509Certificate(hub.cert).fingerprint256).toBe(x509.fingerprint256);
    await Promise.all([uplinkUp(siteA, 2), uplinkUp(siteB, 2)]);
    await exchangeFrames(siteA, siteB, "lab", "after the restart");
    await hub.stop();
  });

  test("a hub with another self-signed certificate for the same name is refused by a joined site, in the pin's words", async () => {
    await using dir = await tempDir();
    const port = await freePort();
    const real = await startHub(`${dir.path}/real`, port, ["--http", `127.0.0.1:${port}`]);
    const line = printedSiteLine(real);
    await real.stop();
    // The impostor: its own state, so its own certificate for localhost, on the address the line names.
    await using impostor = await startHub(`${dir.path}/impostor`, port, ["--http", `127.0.0.1:${port}`]);
    expect(impostor.fingerprint).not.toBe(real.fingerprint);
    await using site = await startSite(line);
    const uplink = await uplinkFailed(site);
    expect(uplink.lastError).toBe(`TLS: the hub's certificate does not match --uplink-fingerprint (it is ${impostor.fingerprint})`);
    expect(impostor.stdout()).not.toMatch(/tunnel: .* attached/);
  });

  test("an invite limited to lab attaches lab only; revoking it closes that site's tunnel and a browser VM's v86 port opened with it, and no other; the API makes, lists and revokes invites; SIGHUP reloads", async () => {
    await using dir = await tempDir();
    const state = `${dir.path}/state`;
    const port = await freePort();
    await using hub = await startHub(state, port, ["--http", `127.0.0.1:${port}`]);
    const invite = await runCli(["--state-dir", state, "--invite", "lab"]);
    expect(invite.stderr).toBe("");
    expect(invite.code).toBe(0);
    const m = /^invite ([0-9a-f]{8}) \(networks: lab\); on that site, run: (?:npx )?bun relay.ts --join (ER1\S+)\n$/.exec(invite.stdout);
    expect(m).not.toBeNull();
    const [id, join] = [m![1]!, m![2]!];

    await using everything = await startSite(printedSiteLine(hub), ["lab", "dev"]);
    await using labOnly = await startSite(["bun", "relay.ts", "--join", join], ["lab", "dev"]);
    await Promise.all([uplinkUp(everything), uplinkUp(labOnly)]);
    const limited = (await labOnly.status()).uplink;
    expect({ networks: limited.networks, refused: limited.refused }).toEqual({ networks: ["lab"], refused: [{ network: "dev", reason: "not allowed for this token" }] });
    expect((await everything.status()).uplink.networks.toSorted()).toEqual(["dev", "lab"]);
    await exchangeFrames(everything, labOnly, "lab", "invited");

    // Browser VMs' v86 ports on lab, one opened with the invite's token and one with the site token.
    const v86 = async (joinString: string) => {
      const token = joinString.split("::")[1]!.split("@")[0]!;
      const ws = new WebSocket(`wss://localhost:${port}/v86/lab?token=${encodeURIComponent(token)}`, { tls: { ca: hub.cert } } as any);
      const closed = new Promise<{ code: number; reason: string }>((done) => ws.addEventListener("close", (e) => done({ code: e.code, reason: e.reason })));
      await new Promise((opened, failed) => {
        ws.addEventListener("open", opened);
        ws.addEventListener("error", failed);
      });
      return { ws, closed };
    };
    const invitedVm = await v86(join);
    const siteVm = await v86(printedSiteLine(hub).at(-1)!);

    const listed = await runCli(["--state-dir", state, "--invites"]);
    expect(listed.stdout).toMatch(new RegExp(`^site\\t\\(every network\\)\\t\\S+\\n${id}\\tlab\\t\\S+\\n$`));
    expect(await runCli(["--state-dir", state, "--revoke", id])).toEqual({ stdout: `revoked ${id}: a running hub closes its tunnels and v86 ports now\n`, stderr: "", code: 0 });
    await waitUntil(async () => (await labOnly.status()).uplink.state === "down", "the invited site's tunnel closed");
    await hub.waitForLine(/tunnel: .* closed: its token was revoked/);
    expect(await invitedVm.closed).toEqual({ code: 4401, reason: "its token was revoked" });
    await hub.waitForLine(/^v86 \/v86\/lab 127\.0\.0\.1:\d+ closed: its token was revoked$/m);
    expect(siteVm.ws.readyState).toBe(WebSocket.OPEN);
    siteVm.ws.close();
    await waitUntil(async () => /the hub refused the token \(401\)/.test((await labOnly.status()).uplink.lastError ?? ""), "the invited site refused at its redial");
    const kept = (await everything.status()).uplink;
    expect({ state: kept.state, connects: kept.connects }).toEqual({ state: "up", connects: 1 });
    expect(await runCli(["--state-dir", state, "--revoke", id])).toEqual({ stdout: "", stderr: `edge-relay: --revoke: no token "${id}" in ${state} (see --invites)\n`, code: 2 });

    // The same through the API, behind the admin token.
    expect((await fetch(`https://localhost:${port}/invites`, { method: "POST", body: '{"networks":["dev"]}', tls: { ca: hub.cert } } as RequestInit)).status).toBe(401);
    expect((await hub.api("/invites", { method: "POST", body: '{"networks":"dev"}' })).status).toBe(400);
    const tooLarge = await hub.api("/invites", { method: "POST", body: JSON.stringify({ networks: ["dev"], padding: "x".repeat(5000) }) });
    expect([tooLarge.status, await tooLarge.text()]).toEqual([413, "request body too large\n"]);
    const made = await hub.api("/invites", { method: "POST", body: '{"networks":["dev"]}' });
    expect(made.status).toBe(201);
    const apiInvite = await made.json();
    expect(apiInvite.join).toMatch(new RegExp(`^ER1${hub.fingerprint.replace(/:/g, "").toLowerCase()}::\\S+@localhost:${port}$`));
    const shown = await (await hub.api("/invites")).text();
    expect(JSON.parse(shown).map((t: any) => t.id)).toEqual(["site", apiInvite.id]);
    expect(shown).not.toContain(apiInvite.join.split("::")[1].split("@")[0]);
    await using devSite = await startSite(["bun", "relay.ts", "--join", apiInvite.join], ["dev"]);
    await uplinkUp(devSite);
    expect((await hub.api(`/invites/${apiInvite.id}`, { method: "DELETE" })).status).toBe(204);
    await waitUntil(async () => (await devSite.status()).uplink.state === "down", "the API-revoked site's tunnel closed");

    // SIGHUP reads the tokens again (and does not stop the hub); the other site is still up on its first tunnel.
    const reloads = () => hub.stdout().split("\n").filter((l) => l === `hub: 1 token in ${state}/tokens.json`).length;
    await waitUntil(async () => reloads() > 0, "the hub read the tokens after the API's revocation");
    const before = reloads();
    hub.proc.kill("SIGHUP");
    await waitUntil(async () => reloads() === before + 1, "the hub read the tokens at SIGHUP");
    expect((await hub.api("/healthz")).status).toBe(200);
    expect((await everything.status()).uplink.connects).toBe(1);
  });

  const bad: [string, string[], Record<string, string>, RegExp][] = [
    ["a join string of the wrong form", ["--join", "K10abc::server:SECRET-not-shown"], {}, /^edge-relay: --join: expected a join string ER1<SHA-256 hex>::TOKEN@HOST:PORT as a hub prints it\n$/],
    ["a join string with --uplink", ["--join", `ER1${"a".repeat(64)}::SECRET-not-shown-01@localhost:1`, "--uplink", "wss://x:1"], {}, /^edge-relay: --join: cannot be combined with --uplink: the join string carries/],
    ["RELAY_JOIN of the wrong form", [], { RELAY_JOIN: "SECRET-not-shown" }, /^edge-relay: --join: expected a join string/],
    ["--public-url without a state directory", ["--public-url", "wss://localhost:8443"], {}, /^edge-relay: --state-dir: required with --public-url \(or set STATE_DIRECTORY\)\n$/],
    ["--public-url without a port", ["--public-url", "wss://localhost", "--state-dir", "/nonexistent"], {}, /^edge-relay: --public-url: expected wss:\/\/NAME:PORT\n$/],
  ];
  for (const [what, args, env, expected] of bad) {
    test(`${what} exits 2 with one line that quotes no secret`, async () => {
      const { stdout, stderr, code } = await runCli(args, env);
      expect({ stdout, code }).toEqual({ stdout: "", code: 2 });
      expect(stderr).toMatch(expected);
      expect(stderr).not.toContain("SECRET");
    });
  }

  test("--invite without a hub in the state directory says how to make one", async () => {
    await using dir = await tempDir();
    expect(await runCli(["--state-dir", dir.path, "--invite", "lab"])).toEqual({
      stdout: "",
      stderr: `edge-relay: --invite: no hub in ${dir.path}: start one there first with --public-url wss://NAME:PORT --state-dir ${dir.path}\n`,
      code: 1,
    });
  });

  test("a hub named by an IP address (v4 or v6) gets a certificate for that address and listens by default on [::], which takes both; sites join it on that address; another name on the same state is refused", async () => {
    await using dir = await tempDir();
    for (const [host, bracketed] of [["127.0.0.1", "127.0.0.1"], ["::1", "[::1]"]]) {
      const state = `${dir.path}/${host.replace(/:/g, "_")}`;
      const port = await freePort();
      await using hub = await spawnRelay(["--public-url", `wss://${bracketed}:${port}`, "--state-dir", state]);
      expect(hub.bound.find((b) => b.what === "http")?.address).toBe(`https://[::]:${port}`);
      const x509 = new X509Certificate(await Bun.file(`${state}/hub-cert.pem`).text());
      expect(x509.subjectAltName).toBe(`IP Address:${host === "::1" ? "0:0:0:0:0:0:0:1" : host}`);
      const line = printedSiteLine(hub);
      expect(line.at(-1)).toEndWith(`@${bracketed}:${port}`);
      await using site = await spawnRelay([...line.slice(line.indexOf("--join")), "--http", "127.0.0.1:0"]);
      await uplinkUp(site);
      await hub.stop();
      const renamed = await runCli(["--public-url", `wss://localhost:${port}`, "--state-dir", state]);
      expect(renamed).toEqual({
        stdout: "",
        stderr: `edge-relay: --public-url: the certificate in ${state}/hub-cert.pem is not for localhost; sites pin it, so it is not replaced: use its name, or another --state-dir\n`,
        code: 1,
      });
    }
  });

  test("--join-file reads the join string from a file", async () => {
    await using dir = await tempDir();
    const port = await freePort();
    await using hub = await startHub(`${dir.path}/state`, port, ["--http", `127.0.0.1:${port}`]);
    await Bun.write(`${dir.path}/join`, `${printedSiteLine(hub)[4]}\n`);
    await using site = await spawnRelay(["--join-file", `${dir.path}/join`, "--http", "127.0.0.1:0"]);
    await uplinkUp(site);
  });
});

/**
 * An environment file read by systemd's rules: a port of parse_env_file_internal (src/basic/env-file.c,
 * systemd 252): comments, quotes (single: all literal; double: a backslash quotes `"`, `\\`, `` ` ``, `$` and
 * is kept before anything else), backslash escapes and continuations outside quotes, blanks trimmed.
 */
function envFile(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  let state = "preKey";
  let [key, value, trailing] = ["", "", 0];
  const push = () => {
    if (key !== "") out[key] = value.slice(0, value.length - trailing);
    [key, value, trailing] = ["", "", 0];
    state = "preKey";
  };
  for (const c of `${text}\n`) {
    const blank = c === " " || c === "\t";
    if (state === "preKey") {
      if (c === "#" || c === ";") state = "comment";
      else if (c !== "\n" && !blank) [state, key] = ["key", c];
    } else if (state === "key") {
      if (c === "\n") [state, key] = ["preKey", ""];
      else if (c === "=") [state, key] = ["preValue", key.trimEnd()];
      else key += c;
    } else if (state === "preValue") {
      if (c === "\n") push();
      else if (c === "'") state = "single";
      else if (c === '"') state = "double";
      else if (c === "\\") state = "valueEscape";
      else if (!blank) [state, value, trailing] = ["value", value + c, 0];
    } else if (state === "value") {
      if (c === "\n") push();
      else if (c === "\\") [state, trailing] = ["valueEscape", 0];
      else [value, trailing] = [value + c, blank ? trailing + 1 : 0];
    } else if (state === "valueEscape") {
      state = "value";
      if (c !== "\n") value += c;
    } else if (state === "single") {
      if (c === "'") state = "preValue";
      else value += c;
    } else if (state === "double") {
      if (c === '"') state = "preValue";
      else if (c === "\\") state = "doubleEscape";
      else value += c;
    } else if (state === "doubleEscape") {
      state = "double";
      if ('"\\`$'.includes(c)) value += c;
      else if (c !== "\n") value += `\\${c}`;
    } else if (state === "comment") {
      if (c === "\\") state = "commentEscape";
      else if (c === "\n") state = "preKey";
    } else state = "comment";
  }
  return out;
}

/** What an installed unit runs: ExecStart's words, its program moved below `root`. */
async function unitCommand(root: string): Promise<string[]> {
  const unit = await Bun.file(`${root}/etc/systemd/system/edge-relay.service`).text();
  const words = /^ExecStart=(.*)$/m.exec(unit)![1]!.split(" ");
  return [`${root}${words[0]}`, ...words.slice(1)];
}

describe("selfSignedCertificate", () => {
  test("every certificate parses: its random serial is a positive DER INTEGER in its fewest bytes (one in 256 was not)", () => {
    const serials = new Set<string>();
    for (let i = 0; i < 1_000; i++) {
      const made = selfSignedCertificate(i % 2 === 0 ? "hub.example.net" : "192.0.2.1");
      const x509 = new X509Certificate(made.cert);
      expect(x509.serialNumber).toMatch(/^(0[1-9A-F]|[1-7][0-9A-F])[0-9A-F]{30}$/);
      serials.add(x509.serialNumber);
    }
    expect(serials.size).toBe(1_000);
  });
});

describe("--install-service", () => {
  test("installs a hub made by hand, its state copied, then a site from the hub's join string, below a temporary root: binary, hardened unit without secrets, 0600 environment file; systemd-analyze verify passes; each started as its unit starts it, the hub keeps its certificate, the site joins and no secret is in ps", async () => {
    await using dir = await tempDir();
    const [hubRoot, siteRoot] = [`${dir.path}/hub`, `${dir.path}/site`];
    const port = await freePort();
    // A hub someone started by hand first; its site line is already out there.
    const byHand = `${dir.path}/hub-state`;
    const first = await startHub(byHand, port, ["--http", `127.0.0.1:${port}`]);
    const join = printedSiteLine(first).at(-1)!;
    await first.stop();
    const hubInstall = await runCli(["--public-url", `wss://localhost:${port}`, "--state-dir", byHand, "--http", `127.0.0.1:${port}`, "--install-service", "--install-root", hubRoot], {}, 120_000);
    expect({ stderr: hubInstall.stderr, code: hubInstall.code }).toEqual({ stderr: "", code: 0 });
    const state = `${hubRoot}/var/lib/edge-relay`;
    expect(hubInstall.stdout).toContain(`copied ${byHand} to ${state} (5 files, modes kept): the service's StateDirectory, so its certificate and tokens stay\n`);
    expect(hubInstall.stdout).toContain("the hub keeps its state in /var/lib/edge-relay; the site's join string (not logged) is there once it has started: sudo cat /var/lib/edge-relay/site-join\n");
    for (const file of ["admin-token", "hub-cert.pem", "hub-key.pem", "site-join", "tokens.json"]) {
      expect({ file, mode: modeOf(`${state}/${file}`), same: readFileSync(`${state}/${file}`).equals(readFileSync(`${byHand}/${file}`)) }).toEqual({ file, mode: modeOf(`${byHand}/${file}`), same: true });
    }
    expect(modeOf(state)).toBe("700");
    expect(hubInstall.stdout).toContain(`installed ${hubRoot}/etc/systemd/system/edge-relay.service: ExecStart=/usr/local/bin/edge-relay --public-url wss://localhost:${port} --http 127.0.0.1:${port}\n`);
    expect(hubInstall.stdout).toContain(`not started (installed below ${hubRoot}); where systemd runs: systemctl daemon-reload && systemctl enable --now edge-relay\n`);
    const template = await Bun.file(`${ROOT}deploy/edge-relay.service`).text();
    const unit = await Bun.file(`${hubRoot}/etc/systemd/system/edge-relay.service`).text();
    // The template's hardening and StateDirectory, all of it; only ExecStart differs.
    const settings = (text: string) => text.split("\n").filter((l) => /^[A-Za-z]+=/.test(l) && !l.startsWith("ExecStart="));
    expect(settings(unit)).toEqual(settings(template));
    expect(settings(unit)).toContain("StateDirectory=edge-relay");

    // The hub as systemd starts it: the unit's command line, its environment file, STATE_DIRECTORY; the same certificate and tokens.
    const hubEnv = { ...envFile(await Bun.file(`${hubRoot}/etc/edge-relay/env`).text()), STATE_DIRECTORY: state };
    const [hubBinary, ...hubArgs] = await unitCommand(hubRoot);
    await using hub = await spawnRelay(hubArgs, { command: [hubBinary!], env: hubEnv });
    expect(hub.stdout()).toContain(`hub: certificate SHA-256 ${first.fingerprint};`);
    expect(hub.stdout()).toContain("hub: sites keep their join lines;");
    // As the install said: the join string from the state directory.
    expect(readFileSync(`${state}/site-join`, "utf8").trim()).toBe(join);
    const token = join.split("::")[1]!.split("@")[0]!;

    // The site: the hub's line, with its QEMU port and --install-service.
    const siteInstall = await runCli(["--join", join, "--qemu-listen", "lab=127.0.0.1:0", "--http", "127.0.0.1:0", "--install-service", "--install-root", siteRoot], {}, 120_000, { command: [hubBinary!] });
    expect({ stderr: siteInstall.stderr, code: siteInstall.code }).toEqual({ stderr: "", code: 0 });
    expect(siteInstall.stdout).toContain(`installed ${siteRoot}/etc/edge-relay/env (0600): RELAY_JOIN\n`);
    expect(siteInstall.stdout).not.toContain(token);
    const siteUnit = await Bun.file(`${siteRoot}/etc/systemd/system/edge-relay.service`).text();
    expect(/^ExecStart=(.*)$/m.exec(siteUnit)![1]).toBe("/usr/local/bin/edge-relay --qemu-listen lab=127.0.0.1:0 --http 127.0.0.1:0");
    expect(modeOf(`${siteRoot}/etc/edge-relay/env`)).toBe("600");
    expect(modeOf(`${siteRoot}/usr/local/bin/edge-relay`)).toBe("755");
    expect(await Bun.file(`${siteRoot}/etc/edge-relay/env`).text()).toBe(`RELAY_JOIN="${join}"\n`);

    if (Bun.which("systemd-analyze")) {
      // verify checks that ExecStart's program exists: point a copy at the installed binary.
      const copy = `${dir.path}/edge-relay.service`;
      await Bun.write(copy, siteUnit.replace(/^ExecStart=\/usr\/local\/bin\/edge-relay/m, `ExecStart=${siteRoot}/usr/local/bin/edge-relay`));
      const verify = await Bun.$`systemd-analyze verify ${copy}`.nothrow().quiet();
      expect({ code: verify.exitCode, output: `${verify.stdout}${verify.stderr}` }).toEqual({ code: 0, output: "" });
    } else if (process.env.CI) throw new Error("systemd-analyze is not installed: apt-get install systemd (.ci/run does)");

    const [siteBinary, ...siteArgs] = await unitCommand(siteRoot);
    await using site = await spawnRelay(siteArgs, { command: [siteBinary!], env: envFile(await Bun.file(`${siteRoot}/etc/edge-relay/env`).text()) });
    await uplinkUp(site);
    expect((await site.status()).uplink.networks).toEqual(["lab"]);
    for (const pid of [hub.proc.pid, site.proc.pid]) expect(readFileSync(`/proc/${pid}/cmdline`, "utf8")).not.toContain(token);
  }, 240_000);
});

describe("--public-url with a certificate of one's own", () => {
  test("--tls-cert wins over the hub's own: no certificate is made, the join line pins the given one; a site joins with it, trusting the CA with --uplink-ca", async () => {
    await using dir = await tempDir();
    const { pem } = await testCertificate(dir.path);
    const port = await freePort();
    const state = `${dir.path}/state`;
    await using hub = await spawnRelay(["--public-url", `wss://localhost:${port}`, "--state-dir", state, "--http", `127.0.0.1:${port}`, "--tls-cert", `${dir.path}/hub.crt`, "--tls-key", `${dir.path}/hub.key`]);
    expect(await Bun.file(`${state}/hub-cert.pem`).exists()).toBe(false);
    const given = new X509Certificate(await Bun.file(pem).text()).fingerprint256;
    const line = printedSiteLine(hub);
    expect(line.at(-1)).toStartWith(`ER1${given.replace(/:/g, "").toLowerCase()}::`);
    // A certificate a CA signed is no trust anchor of its own: without the CA the site refuses it, with it the site joins.
    await using untrusting = await spawnRelay([...line.slice(line.indexOf("--join")), "--http", "127.0.0.1:0"]);
    expect((await uplinkFailed(untrusting)).lastError).toMatch(/^TLS: certificate not trusted \(use --uplink-ca for a private CA or a self-signed hub\)/);
    await using site = await spawnRelay([...line.slice(line.indexOf("--join")), "--uplink-ca", `${dir.path}/ca.pem`, "--http", "127.0.0.1:0"]);
    await uplinkUp(site);
  });
});

describe("--install-service's state and environment file", () => {
  test("a --state-dir whose files differ from those already in the service's state directory exits 2 with one line, and nothing is copied or installed", async () => {
    await using dir = await tempDir();
    const root = `${dir.path}/root`;
    openHubState(`${root}/var/lib/edge-relay`, "wss://localhost:8443");
    openHubState(`${dir.path}/other`, "wss://localhost:8443");
    const before = readFileSync(`${root}/var/lib/edge-relay/hub-key.pem`);
    const run = await runCli(["--public-url", "wss://localhost:8443", "--state-dir", `${dir.path}/other`, "--install-service", "--install-root", root]);
    expect(run).toEqual({
      stdout: "",
      stderr: `edge-relay: --install-service: --state-dir ${dir.path}/other: ${root}/var/lib/edge-relay/admin-token differs from ${dir.path}/other/admin-token (another hub's state?); move one of them aside\n`,
      code: 2,
    });
    expect(readFileSync(`${root}/var/lib/edge-relay/hub-key.pem`).equals(before)).toBe(true);
    expect(existsSync(`${root}/etc/systemd/system/edge-relay.service`)).toBe(false);
  });

  test("a value with a backslash, quotes, spaces, $, ` and % survives systemd's EnvironmentFile rules (and a shell's, which agree inside double quotes)", async () => {
    await using dir = await tempDir();
    const values = ['a\\b', 'say "hi"', "it's", "two  spaces ", " lead", "$HOME ${X} `id`", "%i,%%", "#not a comment;", "trailing\\", "plain,list"];
    const file = values.map((value, i) => `V${i}=${environmentFileValue(value)}\n`).join("");
    expect(envFile(file)).toEqual(Object.fromEntries(values.map((value, i) => [`V${i}`, value])));
    writeFileSync(`${dir.path}/env`, file);
    const shell = await Bun.$`env -i bash -c ${`set -a; . ${dir.path}/env; for i in ${values.map((_, i) => i).join(" ")}; do eval 'printf "%s\\0" "$V'$i'"'; done`}`.quiet();
    expect(shell.stdout.toString().split("\0").slice(0, -1)).toEqual(values);
  });
});

describe("tokens.json writers", () => {
  test("concurrent --invite processes each keep their token", async () => {
    await using dir = await tempDir();
    openHubState(dir.path, "wss://localhost:8443");
    const runs = await Promise.all(Array.from({ length: 8 }, () => runCli(["--state-dir", dir.path, "--invite", "lab"], {}, 20_000)));
    const ids = runs.map((r) => /^invite ([0-9a-f]{8}) /.exec(r.stdout)?.[1]);
    expect(runs.map((r) => r.code)).toEqual(Array(8).fill(0));
    expect(listInvites(dir.path).map((t) => t.id).toSorted()).toEqual(["site", ...ids].toSorted() as string[]);
    expect(existsSync(`${dir.path}/tokens.json.lock`)).toBe(false);
  });

  test("a writer waits for a lock a live process holds and then gives up with one line; a lock whose process is gone is taken over", async () => {
    await using dir = await tempDir();
    openHubState(dir.path, "wss://localhost:8443");
    const lock = `${dir.path}/tokens.json.lock`;
    writeFileSync(lock, `${process.pid}\n`);
    expect(await runCli(["--state-dir", dir.path, "--invite", "lab"], {}, 20_000)).toEqual({
      stdout: "",
      stderr: `edge-relay: --invite: Cannot lock ${dir.path}/tokens.json: ${lock} is held by process ${process.pid}\n`,
      code: 1,
    });
    expect(listInvites(dir.path).map((t) => t.id)).toEqual(["site"]);
    const gone = Bun.spawnSync(["true"]).pid;
    writeFileSync(lock, `${gone}\n`);
    const invite = addInvite(dir.path, ["lab"]);
    expect(listInvites(dir.path).map((t) => t.id)).toEqual(["site", invite.id]);
    expect(existsSync(lock)).toBe(false);
    // The lock is released when the change throws.
    expect(() => withHubLock(dir.path, () => { throw new RangeError("inside"); })).toThrow("inside");
    expect(existsSync(lock)).toBe(false);
  });

  test("revoking site removes its join string file; a restarted hub does not bring it back", async () => {
    await using dir = await tempDir();
    openHubState(dir.path, "wss://localhost:8443");
    expect(existsSync(`${dir.path}/site-join`)).toBe(true);
    expect(await runCli(["--state-dir", dir.path, "--revoke", "site"])).toEqual({ stdout: "revoked site: a running hub closes its tunnels and v86 ports now\n", stderr: "", code: 0 });
    expect(existsSync(`${dir.path}/site-join`)).toBe(false);
    const again = openHubState(dir.path, "wss://localhost:8443");
    expect({ join: again.join, file: existsSync(`${dir.path}/site-join`) }).toEqual({ join: "", file: false });
    expect(hubStartLines(again, "edge-relay", true)).toEqual([`hub: sites keep their join lines; for another: edge-relay --state-dir ${dir.path} --invite NET[,NET…]`]);
  });
});

describe("the site line on a terminal", () => {
  test("a hub whose stdout is a terminal prints the site line with its join string at the first start only", async () => {
    await using dir = await tempDir();
    const state = `${dir.path}/state`;
    const port = await freePort();
    /**
     * The hub under script(1), which gives it a terminal; its output until it is ready. The shell
     * prints its pid, then execs the hub: the hub leads its own session on the terminal, out of reach
     * of a signal to script's group, so it is stopped by that pid, and script (-e) exits after it.
     */
    const onTerminal = async () => {
      const proc = Bun.spawn(["script", "-qefc", `echo pid=$$; exec ${process.execPath} ${ROOT}relay.ts --public-url wss://localhost:${port} --state-dir ${state} --http 127.0.0.1:${port}`, "/dev/null"], { stdin: "pipe", stdout: "pipe", stderr: "pipe" });
      let out = "";
      let stopped = false;
      const decoder = new TextDecoder();
      // Read to the end: script writes the hub's last lines after the stop, into this pipe.
      for await (const chunk of proc.stdout) {
        out += decoder.decode(chunk, { stream: true });
        if (!stopped && /^ready\r?$/m.test(out)) {
          stopped = true;
          process.kill(Number(/^pid=(\d+)\r?$/m.exec(out)?.[1]), "SIGTERM");
        }
      }
      expect({ stopped, code: await proc.exited }).toEqual({ stopped: true, code: 0 });
      return out.replace(/\r/g, "");
    };
    const first = await onTerminal();
    const join = readFileSync(`${state}/site-join`, "utf8").trim();
    expect(first).toMatch(new RegExp(`^hub: on each site, run: (npx )?bun relay.ts --join ${join.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}$`, "m"));
    expect(first).toContain(`hub: (the join string is also in ${state}/site-join; for another: `);
    const second = await onTerminal();
    expect(second).toContain("hub: sites keep their join lines;");
    expect(second).not.toContain(join.split("::")[1]!.split("@")[0]!);
  });
});
