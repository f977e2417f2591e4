/**
 * One command per machine: a hub that makes its own certificate and tokens (--public-url,
 * --state-dir), sites that join with the one line it prints, invites per network and revocation.
 * Everything runs as separate processes on loopback; sites are started as the hub's line says.
 */
import { describe, expect, test } from "bun:test";
import { readFileSync, statSync } from "node:fs";
import { X509Certificate } from "node:crypto";
import { helpText } from "../relay.ts";
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

/** The site command a hub printed (`npx bun relay.ts --join …`), split as a shell would. */
function printedSiteLine(hub: RelayProcess): string[] {
  const line = hub.stdout().split("\n").find((l) => l.startsWith("hub: on each site, run: "));
  if (line === undefined) throw new Error(`the hub printed no site line:\n${hub.stdout()}`);
  return line.slice("hub: on each site, run: ".length).split(" ");
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
    expect(hub.bound.find((b) => b.what === "http")?.address).toBe(`https://0.0.0.0:${port}`);
    expect(hub.stdout()).toContain(`hub: certificate SHA-256 ${hub.fingerprint}; the admin token (for /status, /metrics, /invites) is in ${state}/admin-token`);
    // Secrets 0600 (the certificate is public); the directory is the hub's alone.
    expect({ dir: modeOf(state), key: modeOf(`${state}/hub-key.pem`), tokens: modeOf(`${state}/tokens.json`), admin: modeOf(`${state}/admin-token`), cert: modeOf(`${state}/hub-cert.pem`) })
      .toEqual({ dir: "700", key: "600", tokens: "600", admin: "600", cert: "644" });
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

    // The secrets: only in the one site line the first start prints; nowhere in /status, logs or help.
    const admin = hub.admin;
    for (const [where, text] of [
      ["hub /status", hubStatus],
      ["site /status", JSON.stringify(await siteA.status())],
      ["site logs", siteA.stdout() + siteA.stderr()],
      ["hub stderr", hub.stderr()],
      ["hub stdout but the site line", hub.stdout().split("\n").filter((l) => !l.startsWith("hub: on each site")).join("\n")],
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

  test("an invite limited to lab attaches lab only; revoking it closes that site's tunnel and no other; the API makes, lists and revokes invites; SIGHUP reloads", async () => {
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

    const listed = await runCli(["--state-dir", state, "--invites"]);
    expect(listed.stdout).toMatch(new RegExp(`^site\\t\\(every network\\)\\t\\S+\\n${id}\\tlab\\t\\S+\\n$`));
    expect(await runCli(["--state-dir", state, "--revoke", id])).toEqual({ stdout: `revoked ${id}: a running hub closes its tunnels now\n`, stderr: "", code: 0 });
    await waitUntil(async () => (await labOnly.status()).uplink.state === "down", "the invited site's tunnel closed");
    await hub.waitForLine(/tunnel: .* closed: its token was revoked/);
    await waitUntil(async () => /the hub refused the token \(401\)/.test((await labOnly.status()).uplink.lastError ?? ""), "the invited site refused at its redial");
    const kept = (await everything.status()).uplink;
    expect({ state: kept.state, connects: kept.connects }).toEqual({ state: "up", connects: 1 });
    expect(await runCli(["--state-dir", state, "--revoke", id])).toEqual({ stdout: "", stderr: `edge-relay: --revoke: no token "${id}" in ${state} (see --invites)\n`, code: 2 });

    // The same through the API, behind the admin token.
    expect((await fetch(`https://localhost:${port}/invites`, { method: "POST", body: '{"networks":["dev"]}', tls: { ca: hub.cert } } as RequestInit)).status).toBe(401);
    expect((await hub.api("/invites", { method: "POST", body: '{"networks":"dev"}' })).status).toBe(400);
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

  test("a hub named by an IP address (v4 or v6) gets a certificate for that address, and sites join it; another name on the same state is refused", async () => {
    await using dir = await tempDir();
    for (const [host, bracketed] of [["127.0.0.1", "127.0.0.1"], ["::1", "[::1]"]]) {
      const state = `${dir.path}/${host.replace(/:/g, "_")}`;
      const port = await freePort();
      await using hub = await spawnRelay(["--public-url", `wss://${bracketed}:${port}`, "--state-dir", state, "--http", `${bracketed}:${port}`]);
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

/** `KEY=value` lines of an environment file, as systemd reads them. */
const envFile = (text: string) => Object.fromEntries(text.split("\n").filter((l) => /^[A-Z_]+=/.test(l)).map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]));

/** What an installed unit runs: ExecStart's words, its program moved below `root`. */
async function unitCommand(root: string): Promise<string[]> {
  const unit = await Bun.file(`${root}/etc/systemd/system/edge-relay.service`).text();
  const words = /^ExecStart=(.*)$/m.exec(unit)![1]!.split(" ");
  return [`${root}${words[0]}`, ...words.slice(1)];
}

describe("--install-service", () => {
  test("installs a hub, then a site from the hub's printed line, below a temporary root: binary, hardened unit without secrets, 0600 environment file; systemd-analyze verify passes; each started as its unit starts it, the site joins and no secret is in ps", async () => {
    await using dir = await tempDir();
    const [hubRoot, siteRoot] = [`${dir.path}/hub`, `${dir.path}/site`];
    const port = await freePort();
    const hubInstall = await runCli(["--public-url", `wss://localhost:${port}`, "--state-dir", "/var/lib/edge-relay", "--http", `127.0.0.1:${port}`, "--install-service", "--install-root", hubRoot], {}, 120_000);
    expect({ stderr: hubInstall.stderr, code: hubInstall.code }).toEqual({ stderr: "", code: 0 });
    expect(hubInstall.stdout).toContain(`installed ${hubRoot}/etc/systemd/system/edge-relay.service: ExecStart=/usr/local/bin/edge-relay --public-url wss://localhost:${port} --http 127.0.0.1:${port}\n`);
    expect(hubInstall.stdout).toContain(`not started (installed below ${hubRoot}); where systemd runs: systemctl daemon-reload && systemctl enable --now edge-relay\n`);
    const template = await Bun.file(`${ROOT}deploy/edge-relay.service`).text();
    const unit = await Bun.file(`${hubRoot}/etc/systemd/system/edge-relay.service`).text();
    // The template's hardening and StateDirectory, all of it; only ExecStart differs.
    const settings = (text: string) => text.split("\n").filter((l) => /^[A-Za-z]+=/.test(l) && !l.startsWith("ExecStart="));
    expect(settings(unit)).toEqual(settings(template));
    expect(settings(unit)).toContain("StateDirectory=edge-relay");

    // The hub as systemd starts it: the unit's command line, its environment file, STATE_DIRECTORY.
    const state = `${dir.path}/var-lib-edge-relay`;
    const hubEnv = { ...envFile(await Bun.file(`${hubRoot}/etc/edge-relay/env`).text()), STATE_DIRECTORY: state };
    const [hubBinary, ...hubArgs] = await unitCommand(hubRoot);
    await using hub = await spawnRelay(hubArgs, { command: [hubBinary!], env: hubEnv });
    const line = printedSiteLine(hub);
    expect(line.slice(0, 2)).toEqual(["edge-relay", "--join"]);
    const token = line[2]!.split("::")[1]!.split("@")[0]!;

    // The site: the printed line, with its QEMU port and --install-service.
    const siteInstall = await runCli([...line.slice(1), "--qemu-listen", "lab=127.0.0.1:0", "--http", "127.0.0.1:0", "--install-service", "--install-root", siteRoot], {}, 120_000, { command: [hubBinary!] });
    expect({ stderr: siteInstall.stderr, code: siteInstall.code }).toEqual({ stderr: "", code: 0 });
    expect(siteInstall.stdout).toContain(`installed ${siteRoot}/etc/edge-relay/env (0600): RELAY_JOIN\n`);
    expect(siteInstall.stdout).not.toContain(token);
    const siteUnit = await Bun.file(`${siteRoot}/etc/systemd/system/edge-relay.service`).text();
    expect(/^ExecStart=(.*)$/m.exec(siteUnit)![1]).toBe("/usr/local/bin/edge-relay --qemu-listen lab=127.0.0.1:0 --http 127.0.0.1:0");
    expect(modeOf(`${siteRoot}/etc/edge-relay/env`)).toBe("600");
    expect(modeOf(`${siteRoot}/usr/local/bin/edge-relay`)).toBe("755");
    expect(await Bun.file(`${siteRoot}/etc/edge-relay/env`).text()).toBe(`RELAY_JOIN=${line[2]}\n`);

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
