import { describe, expect, test } from "bun:test";
import { existsSync, symlinkSync } from "node:fs";
import { OPTIONS, flagOf, helpText, loadConfig, startRelay, parseConfig } from "../relay.ts";
import { RELAY, attachVm, connectStream, descendants, freePort, runCli, makeFrame, BROADCAST, spawnRelay, tempDir, testCertificate, udpPeer, waitUntil, ROOT, readme, scenario } from "./helpers.ts";

describe("CLI", () => {
  test("--help, run as the README's set-up leaves it (npx bun relay.ts), documents every option, names that invocation and exits 0", async () => {
    const { stdout, stderr, code } = await runCli(["--help"], {}, 20_000, { command: ["npx", "bun", "relay.ts"], cwd: ROOT });
    expect({ stderr, code }).toEqual({ stderr: "", code: 0 });
    expect(stdout).toBe(helpText("npx bun relay.ts"));
    const options = Object.keys(OPTIONS).map(flagOf);
    expect(options.length).toBeGreaterThan(25);
    for (const option of options) expect(stdout).toMatch(new RegExp(`^  (-[a-zA-Z], )?${option}\\b`, "m"));
  });

  test("--help puts each default in parentheses after the option's words, as a value, not as the end of a sentence", async () => {
    const { stdout } = await runCli(["--help"]);
    const lines = stdout.split("\n");
    const at = lines.findIndex((l) => l.startsWith("  --backplane-cluster NAME"));
    expect(lines.slice(at, at + 2)).toEqual([
      "  --backplane-cluster NAME        hubs with the same NAME share networks, on subjects",
      "                                  edge-relay.NAME.NETWORK (default)",
    ]);
    expect(stdout).not.toMatch(/ (is|are|of|to|the) \([^)]*\)$/m);
  });

  test("the README's CLI reference lists every option of the option table, and no other", async () => {
    const text = await readme();
    const section = text.slice(text.indexOf("\n## CLI reference\n"), text.indexOf("\n## ", text.indexOf("\n## CLI reference\n") + 1));
    // The first cell of each row: `--tls-cert FILE`, `--tls-key FILE` names two options, `-h`, `--help`, … four.
    const rows = section.split("\n").filter((l) => l.startsWith("| `-"));
    const documented = rows.flatMap((row) => [...row.split(" | ")[0]!.matchAll(/`(--?[a-zA-Z][\w-]*)/g)].map((m) => m[1]!));
    const table = Object.entries(OPTIONS as Record<string, { short?: string }>).flatMap(([key, spec]) => [flagOf(key), ...(spec.short ? [`-${spec.short}`] : [])]);
    expect(documented.length).toBeGreaterThan(25);
    expect(documented.toSorted()).toEqual(table.toSorted());
  });

  test("--help says plain `bun relay.ts` when the shell's own bun runs it (a global Bun)", async () => {
    await using dir = await tempDir();
    // A global Bun: a `bun` on the PATH that is this same executable, typed as `bun relay.ts`.
    symlinkSync(process.execPath, `${dir.path}/bun`);
    const global = await runCli(["--help"], { PATH: `${dir.path}:${process.env.PATH}` }, 10_000, { command: [`${dir.path}/bun`, "relay.ts"], cwd: ROOT });
    expect(global).toEqual({ stdout: helpText("bun relay.ts"), stderr: "", code: 0 });
  });

  test("compiles to one binary that runs on its own and calls itself by its file name", async () => {
    await using dir = await tempDir();
    // Not "edge-relay": the help must say the name the binary was given, not a built-in one.
    const binary = `${dir.path}/my-relay`;
    await Bun.$`${process.execPath} build --compile ${RELAY} --outfile ${binary}`.quiet();
    expect(await runCli(["--version"], {}, 10_000, { command: [binary], cwd: dir.path })).toEqual({
      stdout: `edge-relay 0.1.0 (bun ${Bun.version})\n`,
      stderr: "",
      code: 0,
    });
    expect(await runCli(["-h"], {}, 10_000, { command: [binary], cwd: dir.path })).toEqual({ stdout: helpText("my-relay"), stderr: "", code: 0 });
  });

  test("--version prints the version", async () => {
    const { stdout, stderr, code } = await runCli(["--version"]);
    expect({ stdout, stderr, code }).toEqual({ stdout: `edge-relay 0.1.0 (bun ${Bun.version})\n`, stderr: "", code: 0 });
  });

  const bad: [string[], RegExp][] = [
    [["--bogus"], /^edge-relay: unknown option "--bogus" \(see --help\)$/],
    [["-x"], /^edge-relay: unknown option "-x" \(see --help\)$/],
    [["stray"], /^edge-relay: unexpected argument "stray" \(see --help\)$/],
    [["--http"], /^edge-relay: --http: missing value HOST:PORT$/],
    [["--http", "--qemu-listen", "127.0.0.1:0"], /^edge-relay: --http: missing value HOST:PORT \(before --qemu-listen\)$/],
    // The next option is named without its value, and text that is no option is not quoted: either may be a secret.
    [["--uplink-token", "--admin-token=TOPSECRET-admin-0001"], /^edge-relay: --uplink-token: missing value SECRET \(before --admin-token\)$/],
    [["--http", "--token=TOPSECRET-token-0001", "--uplink-token", "x"], /^edge-relay: --http: missing value HOST:PORT \(before --token\)$/],
    [["--uplink-token", "--TOPSECRET-token-0001"], /^edge-relay: --uplink-token: missing value SECRET$/],
    [["--insecure=yes"], /^edge-relay: --insecure: takes no value$/],
    [["--http", "127.0.0.1:1", "--http", "127.0.0.1:2"], /^edge-relay: --http: given twice$/],
    [["--mac-ageing", "-5"], /^edge-relay: --mac-ageing: must be positive$/],
    [["--qemu-listen", "999.1.1.1:10000"], /^edge-relay: --qemu-listen \(qemuListen\[0\]\): 999\.1\.1\.1 is not an IPv4 address$/],
    [["--qemu-listen", "lab=lab2=127.0.0.1:10000"], /^edge-relay: --qemu-listen \(qemuListen\[0\]\): "lab2=127\.0\.0\.1" is not a host name or address$/],
    [["--qemu-listen", ":99999"], /^edge-relay: --qemu-listen \(qemuListen\[0\]\): port 99999 is out of range 0–65535$/],
    [["--http", "nope"], /^edge-relay: --http: expected HOST:PORT, got "nope"$/],
    [["--http", "127.0.0.1:99999"], /^edge-relay: --http: port 99999 is out of range 0–65535$/],
    [["--qemu-listen", "1.2.3.4"], /^edge-relay: --qemu-listen \(qemuListen\[0\]\): expected \[NET=\]HOST:PORT or \[NET=\]unix:PATH, got "1.2.3.4"$/],
    [["--qemu-listen", "bad net=127.0.0.1:1"], /^edge-relay: --qemu-listen \(qemuListen\[0\]\): network name "bad net" must be letters, digits, '\.', '_' or '-'$/],
    [["--qemu-listen", "-lab=127.0.0.1:1"], /^edge-relay: --qemu-listen \(qemuListen\[0\]\): network name "-lab" must start with a letter or digit, not "-"$/],
    [["--qemu-udp", "=127.0.0.1:1"], /^edge-relay: --qemu-udp \(qemuUdp\[0\]\): network name "" is empty$/],
    [["--qemu-listen", `${"n".repeat(65)}=127.0.0.1:1`], /^edge-relay: --qemu-listen \(qemuListen\[0\]\): network name "n{65}" is longer than 64 characters$/],
    [["--qemu-udp", "127.0.0.1:1,nope"], /^edge-relay: --qemu-udp \(qemuUdp\[0\]\): expected \[NET=\]HOST:PORT\[,REMOTE_IP:REMOTE_PORT\]/],
    [["--qemu-udp", "127.0.0.1:0,localhost:10003"], /^edge-relay: --qemu-udp \(qemuUdp\[0\]\): expected .* the remote an IP literal of the same family/],
    [["--qemu-udp", "127.0.0.1:0,127.0.0.1:0"], /^edge-relay: --qemu-udp \(qemuUdp\[0\]\): expected/],
    [["--qemu-udp", "127.0.0.1:0,[::1]:9"], /^edge-relay: --qemu-udp \(qemuUdp\[0\]\): expected/],
    [["--qemu-udp", "unix:/tmp/x,127.0.0.1:9"], /^edge-relay: --qemu-udp \(qemuUdp\[0\]\): expected/],
    [["--qemu-mcast", "239.1.2.3:5000", "--qemu-mcast", "lab=239.1.2.3:5000"], /^edge-relay: --qemu-mcast: a multicast group may be bridged once/],
    [["--qemu-mcast", "239.1.1.1:5000,999.1.1.1"], /^edge-relay: --qemu-mcast \(qemuMcast\[0\]\): LOCALADDR "999\.1\.1\.1" is not an IPv4 address$/],
    [["--qemu-mcast", "239.1.1.1:5000,lo"], /^edge-relay: --qemu-mcast \(qemuMcast\[0\]\): LOCALADDR "lo" is not an IPv4 address$/],
    [["--uplink", "wss://127.0.0.1:1", "--uplink-token", "uplink-token-0123", "--insecure", "--uplink-fingerprint", "ab".repeat(32)], /^edge-relay: --uplink-fingerprint: cannot be combined with --insecure/],
    [["--qemu-connect", "x"], /^edge-relay: --qemu-connect \(qemuConnect\[0\]\): expected/],
    [["--uplink", "http://x:1", "--uplink-token", "uplink-token-0123"], /^edge-relay: --uplink: expected a ws:\/\/ or wss:\/\/ URL$/],
    [["--uplink", "ws://127.0.0.1:1"], /^edge-relay: --uplink-token: required with --uplink/],
    [["--http", "0.0.0.0:0"], /^edge-relay: --admin-token: required when --http is not a loopback address$/],
    [["--mac-ageing", "soon"], /^edge-relay: --mac-ageing: expected a number of seconds$/],
    [["--keepalive=-1"], /^edge-relay: --keepalive: must be positive$/],
    [["--keepalive", "-1"], /^edge-relay: --keepalive: must be positive$/],
    [["--queue-bytes", "10"], /^edge-relay: --queue-bytes: must be at least 69636$/],
    [["--token", "two words secret"], /^edge-relay: --token \(tokens\[0\]\.token\): must be non-empty and contain no white space$/],
    [["--token", "short-secret"], /^edge-relay: --token \(tokens\[0\]\.token\): must be at least 16 characters long$/],
    [["--admin-token", "short-secret"], /^edge-relay: --admin-token: must be at least 16 characters long$/],
    [["--port-macs", "0"], /^edge-relay: --port-macs: must be at least 1$/],
    [["--queue-bytes", String(2 ** 30)], /^edge-relay: --queue-bytes: must be at most 67108864$/],
    [["--config", "/nonexistent/relay.json"], /^edge-relay: --config: cannot read \/nonexistent\/relay.json: no such file or directory \(ENOENT\)$/],
    [["--token-file", "/nonexistent/tokens"], /^edge-relay: --token-file: cannot read/],
  ];
  test.each(bad)("bad config %p exits 2 with one line naming the option", async (args, message) => {
    const { stdout, stderr, code } = await runCli(args);
    expect(stdout).toBe("");
    expect(stderr.trimEnd()).toMatch(message);
    expect(stderr.trimEnd().split("\n").length).toBe(1);
    expect(stderr).not.toContain("two words secret");
    expect(stderr).not.toContain("TOPSECRET");
    expect(code).toBe(2);
  });

  test("a CA, certificate or key file that holds none exits 2 naming the option, never quoting the file", async () => {
    await using dir = await tempDir();
    const { ca } = await testCertificate(dir.path);
    const notKey = `${dir.path}/not-a.key`;
    await Bun.write(notKey, "-----BEGIN PRIVATE KEY-----\nsecret-key-material-0001\n-----END PRIVATE KEY-----\n");
    const cert = "expected a PEM file with a certificate (-----BEGIN CERTIFICATE-----)";
    const cases: [string[], string][] = [
      [["--uplink", "ws://127.0.0.1:1", "--uplink-token", "uplink-token-0123", "--uplink-ca", `${ROOT}package.json`], `--uplink-ca: ${cert}`],
      [["--backplane", "nats://127.0.0.1:1", "--backplane-ca", `${ROOT}package.json`], `--backplane-ca: ${cert}`],
      [["--tls-cert", `${ROOT}package.json`, "--tls-key", `${dir.path}/hub.key`], `--tls-cert: ${cert}`],
      [["--tls-cert", `${dir.path}/hub.crt`, "--tls-key", notKey], "--tls-key: expected a PEM file with a private key (-----BEGIN PRIVATE KEY-----)"],
    ];
    for (const [args, message] of cases) {
      expect(await runCli(scenario().with(...args).args)).toEqual({ stdout: "", stderr: `edge-relay: ${message}\n`, code: 2 });
    }
    // The right files pass the same checks: the relay starts.
    await using relay = await scenario().with("--tls-cert", `${dir.path}/hub.crt`, "--tls-key", `${dir.path}/hub.key`, "--backplane", "nats://127.0.0.1:1", "--backplane-ca", ca).spawn();
    expect(relay.base).toStartWith("https://");
  });

  test("a config file with an unknown key or a bad value exits 2 naming it", async () => {
    await using dir = await tempDir();
    await Bun.write(`${dir.path}/unknown.json`, JSON.stringify({ qemuListn: ["127.0.0.1:0"] }));
    await Bun.write(`${dir.path}/tokens.json`, JSON.stringify({ tokens: [{ token: "secret-in-file-0001", networks: ["ok", "not ok"] }] }));
    await Bun.write(`${dir.path}/broken.json`, '{"adminToken": s3cretTOKEN}');
    expect(await runCli(["--config", `${dir.path}/unknown.json`])).toEqual({ stdout: "", stderr: 'edge-relay: config: unknown option "qemuListn"\n', code: 2 });
    expect(await runCli(["--config", `${dir.path}/tokens.json`])).toEqual({
      stdout: "",
      stderr: "edge-relay: --token (tokens[0].networks[1]): expected a network name\n",
      code: 2,
    });
    const broken = await runCli(["--config", `${dir.path}/broken.json`]);
    expect(broken.stderr).toBe(`edge-relay: --config: ${dir.path}/broken.json is not valid JSON\n`);
    expect(broken.code).toBe(2);
  });

  test("a malformed URL option, on the command line or in a config file, gets one line naming it and exits 2", async () => {
    await using dir = await tempDir();
    const cases: [string, string, string, string][] = [
      ["--uplink", "uplink", "127.0.0.1:8080", "expected a ws:// or wss:// URL"],
      ["--uplink", "uplink", "[::1]:8080", "expected a ws:// or wss:// URL"],
      ["--uplink", "uplink", "", "expected a ws:// or wss:// URL"],
      ["--uplink", "uplink", "ws//host", "expected a ws:// or wss:// URL"],
      ["--uplink", "uplink", "ws://", "expected a ws:// or wss:// URL"],
      ["--uplink-proxy", "uplinkProxy", "", "expected http://[USER:PASSWORD@]HOST:PORT"],
      ["--uplink-proxy", "uplinkProxy", "http//proxy:3128", "expected http://[USER:PASSWORD@]HOST:PORT"],
      ["--uplink-proxy", "uplinkProxy", "[::1", "expected http://[USER:PASSWORD@]HOST:PORT"],
      ["--backplane", "backplane", "", "expected nats://HOST:PORT, got an empty value"],
      ["--backplane", "backplane", "nats://127.0.0.1:4222,", "expected nats://HOST:PORT, got an empty value"],
      ["--backplane", "backplane", "[::1]:4222", "expected nats://HOST:PORT or tls://HOST:PORT; credentials go in --backplane-token or --backplane-creds, not the URL"],
    ];
    for (const [flag, key, value, message] of cases) {
      const uplink = key === "uplink" ? [] : ["--uplink", "ws://127.0.0.1:1"];
      const args = ["--http", "127.0.0.1:0", ...uplink, "--uplink-token", "uplink-token-0001"];
      expect(await runCli([...args, flag, value])).toEqual({ stdout: "", stderr: `edge-relay: ${flag}: ${message}\n`, code: 2 });
      await Bun.write(`${dir.path}/c.json`, JSON.stringify({ [key]: key === "backplane" ? [value] : value }));
      expect(await runCli([...args, "--config", `${dir.path}/c.json`])).toEqual({ stdout: "", stderr: `edge-relay: ${flag}: ${message}\n`, code: 2 });
    }
  });

  test("comma-listed options (--backplane, --trusted-proxy) take every item of every value, in order; a stray comma is refused", () => {
    expect(parseConfig({ backplane: ["nats://n1:4222, tls://n2:4222", "nats://n3:4222"] }).backplane).toEqual(["nats://n1:4222", "tls://n2:4222", "nats://n3:4222"]);
    expect(parseConfig({ trustedProxies: [" 10.0.0.0/8 ,::1"] }).trustedProxies.map((r) => `${r.address}/${r.prefix}`)).toEqual(["10.0.0.0/8", "::1/128"]);
    expect(() => parseConfig({ trustedProxies: ["10.0.0.0/8,,::1"] })).toThrow("--trusted-proxy: expected an address or a CIDR range like 10.0.0.0/8 or fd00::/8, got an empty value");
    expect(() => parseConfig({ backplane: [",nats://n1:4222"] })).toThrow("--backplane: expected nats://HOST:PORT, got an empty value");
  });

  test("config-file values of the wrong type get one line in the relay's words, and a secret is never quoted", async () => {
    await using dir = await tempDir();
    const secret = "s3cret-value-never-shown";
    const cases: [object, string][] = [
      [{ tokens: secret }, "--token: expected an array of tokens"],
      [{ tokens: [secret.slice(0, 10)] }, "--token (tokens[0].token): must be at least 16 characters long"],
      [{ tokens: [{ token: secret, extra: 1 }] }, 'config: unknown option "extra"'],
      [{ adminToken: [secret] }, "--admin-token: expected a string"],
      [{ adminToken: `${secret} x` }, "--admin-token: must be non-empty and contain no white space"],
      [{ uplinkToken: { secret } }, "--uplink-token: expected a string"],
      // A proxy URL may hold a password: wrong in type or in shape, it is not quoted either.
      [{ uplinkProxy: [`http://u:${secret}@proxy.example:3128`] }, "--uplink-proxy: expected an http:// proxy URL"],
      [{ uplinkProxy: `https://u:${secret}@proxy.example:3128` }, "--uplink-proxy: expected http://[USER:PASSWORD@]HOST:PORT"],
      [{ qemuListen: "127.0.0.1:1" }, "--qemu-listen: expected an array of [NET=]HOST:PORT or [NET=]unix:PATH"],
      [{ http: 8080 }, "--http: expected HOST:PORT"],
      [{ qemuListen: [5] }, "--qemu-listen (qemuListen[0]): expected [NET=]HOST:PORT or [NET=]unix:PATH"],
      [{ tlsCert: true }, "--tls-cert: expected a file name"],
      [{ macAgeing: "5" }, "--mac-ageing: expected a number of seconds"],
      [{ insecure: "yes" }, "--insecure: expected true or false"],
      [{ portMacs: 2.5 }, "--port-macs: expected a whole number"],
    ];
    for (const [config, message] of cases) {
      await Bun.write(`${dir.path}/c.json`, JSON.stringify(config));
      expect(await runCli(["--config", `${dir.path}/c.json`])).toEqual({ stdout: "", stderr: `edge-relay: ${message}\n`, code: 2 });
    }
    await Bun.write(`${dir.path}/tokens`, `${secret}\nshort-${secret.slice(0, 4)}\n`);
    const file = await runCli(["--token-file", `${dir.path}/tokens`]);
    expect(file).toEqual({ stdout: "", stderr: "edge-relay: --token (tokens[1].token): must be at least 16 characters long\n", code: 2 });
  });

  test("the options marked secret (a proxy URL too) are never quoted, whatever is wrong with them", () => {
    const secret = Object.entries(OPTIONS as Record<string, { secret?: boolean }>).flatMap(([key, spec]) => (spec.secret ? [key] : []));
    expect(secret.sort()).toEqual(["adminToken", "backplaneToken", "join", "tokens", "uplinkProxy", "uplinkToken"]);
    for (const key of secret) {
      for (const value of ["TOPSECRET x", ["TOPSECRET x"], [{ token: "TOPSECRET x" }], { TOPSECRET: 1 }, 7]) {
        const message = (() => {
          try {
            return JSON.stringify(parseConfig({ [key]: value }));
          } catch (error) {
            return (error as Error).message;
          }
        })();
        expect(message).toStartWith(flagOf(key));
        expect(message).not.toContain("TOPSECRET");
      }
    }
  });

  test("a port already in use exits 1 naming the option, with the errno spelled out", async () => {
    await using first = await scenario().listen().udp().spawn();
    const taken = first.port("qemu-listen");
    const { stdout, stderr, code } = await runCli(scenario().with("--qemu-listen", `127.0.0.1:${taken}`).args);
    expect({ stdout, stderr, code }).toEqual({
      stdout: "",
      stderr: `edge-relay: --qemu-listen: Cannot listen on 127.0.0.1:${taken}: address already in use (EADDRINUSE)\n`,
      code: 1,
    });
    const udp = first.port("qemu-udp");
    expect(await runCli(scenario().with("--qemu-udp", `127.0.0.1:${udp}`).args)).toEqual({
      stdout: "",
      stderr: `edge-relay: --qemu-udp: Cannot listen on udp 127.0.0.1:${udp}: address already in use (EADDRINUSE)\n`,
      code: 1,
    });
  });

  test("an address given to two listeners of one command is a config error naming both, before anything binds", async () => {
    const port = await freePort();
    const cases: [string[], string][] = [
      [["--qemu-listen", `127.0.0.1:${port}`, "--qemu-listen", `lab=127.0.0.1:${port}`], `--qemu-listen (qemuListen[1]): 127.0.0.1:${port} is given twice, here and to --qemu-listen (qemuListen[0])`],
      [["--http", `127.0.0.1:${port}`, "--qemu-listen", `127.0.0.1:${port}`], `--qemu-listen (qemuListen[0]): 127.0.0.1:${port} is given twice, here and to --http`],
      [["--qemu-listen", `0.0.0.0:${port}`, "--allow-remote-qemu", "--qemu-listen", `127.0.0.1:${port}`], `--qemu-listen (qemuListen[1]): 127.0.0.1:${port} overlaps 0.0.0.0:${port}, given to --qemu-listen (qemuListen[0])`],
      [["--qemu-udp", `127.0.0.1:${port}`, "--qemu-udp", `127.0.0.1:${port},127.0.0.1:9`], `--qemu-udp (qemuUdp[1]): 127.0.0.1:${port} is given twice, here and to --qemu-udp (qemuUdp[0])`],
      [["--qemu-listen", "unix:/run/edge-relay-test.sock", "--qemu-udp", "unix:/run/edge-relay-test.sock"], "--qemu-udp (qemuUdp[0]): unix:/run/edge-relay-test.sock is given twice, here and to --qemu-listen (qemuListen[0])"],
    ];
    for (const [args, line] of cases) expect(await runCli(args)).toEqual({ stdout: "", stderr: `edge-relay: ${line}\n`, code: 2 });
    // TCP and UDP ports are apart, and port 0 is a new port each time.
    await using relay = await scenario().with("--qemu-listen", `127.0.0.1:${port}`, "--qemu-udp", `127.0.0.1:${port}`).listen("lab").listen().spawn();
    expect(relay.bound.filter((b) => b.what === "qemu-listen")).toHaveLength(3);
  });

  test("an --http address in use exits 1 naming the option, in the same words as any listener", async () => {
    await using first = await scenario().listen().spawn();
    const taken = first.port("http");
    expect(await runCli(["--http", `127.0.0.1:${taken}`, "--qemu-listen", "127.0.0.1:0"])).toEqual({
      stdout: "",
      stderr: `edge-relay: --http: Cannot listen on 127.0.0.1:${taken}: address already in use (EADDRINUSE)\n`,
      code: 1,
    });
  });

  test("SIGTERM and SIGINT close every port and exit 0", async () => {
    await using dir = await tempDir();
    for (const signal of ["SIGTERM", "SIGINT"] as const) {
      const socket = `${dir.path}/${signal}.sock`;
      await using relay = await scenario().listen().with("--qemu-listen", `unix:${socket}`).spawn();
      await using vm = await connectStream(relay.port("qemu-listen"));
      expect(existsSync(socket)).toBe(true);
      await relay.waitForLine(new RegExp(`up: qemu-listen ${vm.local}$`));
      expect(await relay.stop(signal)).toBe(0);
      await vm.closed;
      // A clean stop removes the unix socket file; a plain exit would leave it behind.
      expect(existsSync(socket)).toBe(false);
      expect(relay.stdout()).toMatch(new RegExp(`\nready\ndefault/qemu-listen-\\d+ up: qemu-listen ${vm.local}\n${signal}: stopping\ndefault/qemu-listen-\\d+ down: qemu-listen ${vm.local}: relay stopping\n$`));
      expect(relay.stderr()).toBe("");
    }
  });

  test("logs every bound address and, per QEMU port, ready-to-paste QEMU lines with a MAC each", async () => {
    const vmPort = await freePort("udp");
    await using relay = await scenario().listen("lab").with("--qemu-udp", `127.0.0.1:0,127.0.0.1:${vmPort}`, "--qemu-connect", "dev=127.0.0.1:1").spawn();
    const lines = relay.stdout().split("\n");
    const listening = lines.filter((l) => l.includes(": listening on "));
    expect(listening[0]).toMatch(/^http: listening on http:\/\/127\.0\.0\.1:\d+$/);
    expect(listening[1]).toMatch(/^qemu-listen lab: listening on 127\.0\.0\.1:\d+$/);
    expect(listening[2]).toMatch(/^qemu-udp default: listening on 127\.0\.0\.1:\d+$/);
    expect(lines).toContain(`default/qemu-udp-1 up: qemu-udp 127.0.0.1:${vmPort}`);
    const [listen, udp] = [relay.port("qemu-listen"), relay.port("qemu-udp")];
    const hints = lines.filter((l) => l.startsWith("attach a VM"));
    const mac = /,mac=(52:54:00:[0-9a-f]{2}:[0-9a-f]{2}:[0-9a-f]{2})$/;
    expect(hints.map((l) => l.replace(mac, ""))).toEqual([
      `attach a VM to lab (QEMU ≥ 7.2; change mac= for each further VM): qemu-system-x86_64 … -netdev stream,id=n0,server=off,addr.type=inet,addr.host=127.0.0.1,addr.port=${listen} -device virtio-net-pci,netdev=n0`,
      `attach a VM to lab (older QEMU; change mac= for each further VM): qemu-system-x86_64 … -netdev socket,id=n0,connect=127.0.0.1:${listen} -device virtio-net-pci,netdev=n0`,
      "attach a VM to dev (QEMU ≥ 7.2, the VM listens; change mac= for each further VM): qemu-system-x86_64 … -netdev stream,id=n0,server=on,addr.type=inet,addr.host=127.0.0.1,addr.port=1 -device virtio-net-pci,netdev=n0",
      "attach a VM to dev (older QEMU, the VM listens; change mac= for each further VM): qemu-system-x86_64 … -netdev socket,id=n0,listen=127.0.0.1:1 -device virtio-net-pci,netdev=n0",
      `attach a VM to default (QEMU ≥ 7.2; change mac= for each further VM): qemu-system-x86_64 … -netdev dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port=${vmPort},remote.type=inet,remote.host=127.0.0.1,remote.port=${udp} -device virtio-net-pci,netdev=n0`,
      `attach a VM to default (older QEMU; change mac= for each further VM): qemu-system-x86_64 … -netdev socket,id=n0,udp=127.0.0.1:${udp},localaddr=127.0.0.1:${vmPort} -device virtio-net-pci,netdev=n0`,
    ]);
    const macs = hints.map((l) => mac.exec(l)?.[1]);
    expect(new Set(macs).size).toBe(hints.length);
  });

  test("SIGTERM logs every UDP and multicast port going down, as it does stream ports, and exits 0", async () => {
    using learned = await udpPeer();
    const [fixed, group] = [await freePort("udp"), `239.255.42.2:${await freePort("udp")}`];
    await using relay = await scenario().with("--qemu-udp", `127.0.0.1:0,127.0.0.1:${fixed}`).udp("lab").with("--qemu-mcast", `lab=${group},127.0.0.1`).spawn();
    learned.send(makeFrame(BROADCAST, "02:00:00:00:16:01", "learn me"), relay.port("qemu-udp", "lab"));
    await relay.waitForLine(new RegExp(`^lab/qemu-udp-1 up: qemu-udp 127\\.0\\.0\\.1:${learned.port}$`));
    expect(await relay.stop("SIGTERM")).toBe(0);
    const [, after] = relay.stdout().split("\nSIGTERM: stopping\n");
    expect(after!.trimEnd().split("\n").toSorted()).toEqual([
      `default/qemu-udp-1 down: qemu-udp 127.0.0.1:${fixed}: relay stopping`,
      `lab/qemu-mcast-1 down: qemu-mcast ${group}: relay stopping`,
      `lab/qemu-udp-1 down: qemu-udp 127.0.0.1:${learned.port}: relay stopping`,
    ]);
    expect(relay.stderr()).toBe("");
  });

  test("QEMU lines for unix, abstract unix, unix datagram and multicast ports: the QEMU ≥ 7.2 form, and the older one where it exists", async () => {
    await using dir = await tempDir();
    const abstract = `edge-relay-test-${process.pid}-hints`;
    const group = `239.255.42.3:${await freePort("udp")}`;
    await using relay = await scenario().with("--qemu-listen", `unix:${dir.path}/listen.sock`, "--qemu-listen", `lab=unix:@${abstract}`, "--qemu-connect", `unix:${dir.path}/vm.sock`, "--qemu-udp", `unix:${dir.path}/dgram.sock`, "--qemu-mcast", `lab=${group},127.0.0.1`).spawn();
    const [host, port] = group.split(":");
    const hints = relay.stdout().split("\n").filter((l) => l.startsWith("attach a VM"));
    const mac = /,mac=(52:54:00:[0-9a-f]{2}:[0-9a-f]{2}:[0-9a-f]{2})$/;
    // QEMU's older `-netdev socket` has no unix sockets: those get the QEMU ≥ 7.2 line only.
    expect(hints.map((l) => l.replace(mac, ""))).toEqual([
      `attach a VM to default (QEMU ≥ 7.2; change mac= for each further VM): qemu-system-x86_64 … -netdev stream,id=n0,server=off,addr.type=unix,addr.path=${dir.path}/listen.sock -device virtio-net-pci,netdev=n0`,
      `attach a VM to lab (QEMU ≥ 7.2; change mac= for each further VM): qemu-system-x86_64 … -netdev stream,id=n0,server=off,addr.type=unix,addr.path=${abstract},addr.abstract=on -device virtio-net-pci,netdev=n0`,
      `attach a VM to default (QEMU ≥ 7.2, the VM listens; change mac= for each further VM): qemu-system-x86_64 … -netdev stream,id=n0,server=on,addr.type=unix,addr.path=${dir.path}/vm.sock -device virtio-net-pci,netdev=n0`,
      `attach a VM to default (QEMU ≥ 7.2; change mac= for each further VM): qemu-system-x86_64 … -netdev dgram,id=n0,local.type=unix,local.path=${dir.path}/dgram.sock.vm,remote.type=unix,remote.path=${dir.path}/dgram.sock -device virtio-net-pci,netdev=n0`,
      `attach a VM to lab (QEMU ≥ 7.2; change mac= for each further VM): qemu-system-x86_64 … -netdev dgram,id=n0,remote.type=inet,remote.host=${host},remote.port=${port},local.type=inet,local.host=127.0.0.1,local.port=0 -device virtio-net-pci,netdev=n0`,
      `attach a VM to lab (older QEMU; change mac= for each further VM): qemu-system-x86_64 … -netdev socket,id=n0,mcast=${group},localaddr=127.0.0.1 -device virtio-net-pci,netdev=n0`,
    ]);
    const macs = hints.map((l) => mac.exec(l)?.[1]);
    expect(macs.every(Boolean)).toBe(true);
    expect(new Set(macs).size).toBe(hints.length);
  });

  test("the README's set-up shows the lines the relay prints for its default listener, each with a MAC of its own", async () => {
    await using relay = await scenario().listen().spawn();
    const port = relay.port("qemu-listen");
    const mac = /mac=52:54:00(:[0-9a-f]{2}){3}$/;
    const hints = (text: string) => text.split("\n").filter((l) => l.startsWith("attach a VM"));
    const printed = hints(relay.stdout());
    const shown = hints(await readme());
    expect(shown).toHaveLength(2);
    expect(new Set(shown.map((l) => mac.exec(l)?.[0])).size).toBe(2);
    const withoutMac = (l: string) => l.replace(mac, "mac=");
    expect(shown.map((l) => withoutMac(l).replace("addr.port=10000", `addr.port=${port}`).replace(":10000 ", `:${port} `))).toEqual(printed.map(withoutMac));
  });

  test("SIGTERM to `npm start` reaches the relay: both ports are freed and no bun process is left", async () => {
    const npm = Bun.spawn(["npm", "start", "--", "--http", "127.0.0.1:0", "--qemu-listen", "127.0.0.1:0"], { cwd: ROOT, stdout: "pipe", stderr: "pipe", stdin: "ignore" });
    let out = "";
    const reader = (async () => {
      for await (const chunk of npm.stdout) out += new TextDecoder().decode(chunk);
    })();
    await waitUntil(() => /^ready$/m.test(out), "the relay ready under npm start");
    const children = descendants(npm.pid);
    expect(children.length).toBeGreaterThan(0);
    const ports = [...out.matchAll(/listening on (?:http:\/\/)?127\.0\.0\.1:(\d+)$/gm)].map((m) => Number(m[1]));
    expect(ports).toHaveLength(2);
    npm.kill("SIGTERM");
    await npm.exited;
    await reader;
    await waitUntil(() => children.every((pid) => !existsSync(`/proc/${pid}`)), "every process under npm gone");
    for (const port of ports) await expect(connectStream(port)).rejects.toThrow();
  });

  test("a MAC seen on two ports in turn is warned about once (rate-limited) and counted", async () => {
    await using relay = await scenario().listen().spawn();
    await using vm1 = await attachVm(relay);
    await using vm2 = await attachVm(relay);
    await using vm3 = await attachVm(relay);
    const same = "52:54:00:12:34:56";
    for (let i = 0; i < 6; i++) {
      const vm = i % 2 ? vm2 : vm1;
      vm.send(makeFrame(BROADCAST, same, `turn ${i}`));
      await vm3.frames.next();
    }
    await relay.waitForLine(/^network default: MAC 52:54:00:12:34:56 moves between default\/qemu-listen-\d+ 127\.0\.0\.1:\d+ and default\/qemu-listen-\d+ 127\.0\.0\.1:\d+: two VMs with the same MAC, or a loop$/);
    expect(relay.stderr().match(/moves between/g)).toHaveLength(1);
    expect((await relay.status()).networks[0].macFlaps).toBe(4);
  });
});

describe("loadConfig", () => {
  test("no options is the built-in default: a local switch on 127.0.0.1:10000, http on 127.0.0.1:8080", () => {
    const config = loadConfig([], {});
    expect(config).toMatchObject({
      http: { host: "127.0.0.1", port: 8080 },
      qemuListen: [{ network: "default", address: { host: "127.0.0.1", port: 10000 } }],
      tokens: [],
      macAgeing: 300,
    });
  });

  test("tokens come from --token, RELAY_TOKENS and --token-file; a hub gets no default QEMU port", async () => {
    await using dir = await tempDir();
    const file = `${dir.path}/tokens`;
    await Bun.write(file, "# hub tokens\nfile-token-0000001\n\nfile-token-0000002 # site b\n");
    const config = loadConfig(["--token", "flag-token-000001", "--token-file", file], { RELAY_TOKENS: "env-token-0000001, env-token-0000002" });
    if (typeof config === "string") throw new Error(config);
    expect(config.tokens.map((t) => t.token)).toEqual(["flag-token-000001", "env-token-0000001", "env-token-0000002", "file-token-0000001", "file-token-0000002"]);
    expect(config.qemuListen).toEqual([]);
  });

  test("only an option that gives the relay ports (a QEMU port, --uplink, a token) replaces the default QEMU port", () => {
    const qemuListen = (argv: string[]) => {
      const config = loadConfig(argv, { RELAY_UPLINK_TOKEN: "uplink-token-0001" });
      if (typeof config === "string") throw new Error(config);
      return config.qemuListen.map((p) => p.address);
    };
    const none: string[][] = [["--qemu-connect", "127.0.0.1:9"], ["--qemu-udp", "127.0.0.1:0"], ["--qemu-mcast", "239.1.1.1:5000,127.0.0.1"], ["--uplink", "ws://127.0.0.1:9"], ["--token", "hub-token-0000001"]];
    for (const argv of none) expect(qemuListen(argv)).toEqual([]);
    expect(qemuListen(["--qemu-listen", "127.0.0.1:5"])).toEqual([{ host: "127.0.0.1", port: 5 }]);
    for (const argv of [["--mac-ageing", "5"], ["--backplane", "nats://127.0.0.1:4222"], ["--name", "hub"]]) expect(qemuListen(argv)).toEqual([{ host: "127.0.0.1", port: 10000 }]);
  });

  test("flags override the config file; env supplies the uplink and admin tokens", async () => {
    await using dir = await tempDir();
    const file = `${dir.path}/relay.json`;
    await Bun.write(file, JSON.stringify({ http: "127.0.0.1:1", qemuListen: ["a=127.0.0.1:2"], macAgeing: 10, uplink: "ws://127.0.0.1:3" }));
    const config = loadConfig(["--config", file, "--qemu-listen", "b=127.0.0.1:4"], { RELAY_UPLINK_TOKEN: "up", RELAY_ADMIN_TOKEN: "admin-token-00001" });
    expect(config).toMatchObject({
      http: { port: 1 },
      qemuListen: [{ network: "b", address: { port: 4 } }],
      macAgeing: 10,
      uplinkToken: "up",
      adminToken: "admin-token-00001",
    });
  });
});

describe("HTTP", () => {
  test("/healthz, /status and /metrics report ports, counters and MACs", async () => {
    await using relay = await scenario().listen("lab").spawn();
    await using vm1 = await attachVm(relay);
    await using vm2 = await attachVm(relay);
    const f = makeFrame(BROADCAST, "02:00:00:00:20:01", 100);
    vm1.send(f);
    await vm2.frames.next();
    expect(await (await fetch(`${relay.base}/healthz`)).text()).toBe("ok\n");
    const status = await relay.status();
    expect(status).toMatchObject({ version: "0.1.0", uplink: null, authFailures: 0 });
    const lab = status.networks.find((n: any) => n.name === "lab");
    const [p1, p2] = lab.ports;
    expect(p1).toMatchObject({ kind: "qemu-listen", state: "up", rx: { frames: 1, bytes: f.length, drops: 0 }, tx: { frames: 0, bytes: 0, drops: 0 }, errors: 0 });
    expect(p1.peer).toMatch(/^127\.0\.0\.1:\d+$/);
    expect(p2).toMatchObject({ rx: { frames: 0 }, tx: { frames: 1, bytes: f.length } });
    expect(lab.macs).toEqual([{ mac: "02:00:00:00:20:01", port: p1.id, age: expect.any(Number) }]);
    const res = await fetch(`${relay.base}/metrics`);
    expect(res.headers.get("content-type")).toStartWith("text/plain; version=0.0.4");
    const metrics = await res.text();
    expect(metrics).toContain(`edge_relay_port_rx_frames_total{network="lab",port="${p1.id}",kind="qemu-listen"} 1`);
    expect(metrics).toContain(`edge_relay_port_tx_bytes_total{network="lab",port="${p2.id}",kind="qemu-listen"} ${f.length}`);
    expect(metrics).toContain('edge_relay_network_macs{network="lab"} 1');
    expect(metrics).toContain("# TYPE edge_relay_port_tx_drops_total counter");
    expect(metrics).toMatch(/^edge_relay_uptime_seconds \d/m);
    expect(metrics).toContain('\nedge_relay_kind_rx_frames_total{kind="qemu-listen"} 1\n');
    // ?ports=N: per-port series for the first N ports only (the per-kind totals still count all).
    const one = await (await fetch(`${relay.base}/metrics?ports=1`)).text();
    expect(one.match(/^edge_relay_port_rx_frames_total\{/gm)).toHaveLength(1);
    expect(one).toContain("\nedge_relay_metrics_ports_omitted 1\n");
  });

  test("/status pages the networks (?networks=N&offset=K) and cuts ports (?ports=N), with the totals", async () => {
    await using relay = await scenario().listen("a").listen("b").listen("c").spawn();
    await using _vm1 = await attachVm(relay, "b");
    await using _vm2 = await attachVm(relay, "b");
    const get = async (query: string) => (await fetch(`${relay.base}/status${query}`)).json() as Promise<any>;
    const all = await get("");
    expect(all.networks.map((n: any) => n.name)).toEqual(["a", "b", "c"]);
    expect(all.networksPage).toEqual({ offset: 0, limit: 256, total: 3 });
    const page = await get("?networks=1&offset=1&ports=1");
    expect(page.networks.map((n: any) => [n.name, n.ports.length, n.portCount])).toEqual([["b", 1, 2]]);
    expect(page.networksPage).toEqual({ offset: 1, limit: 1, total: 3 });
    expect((await get("?networks=all&ports=all")).networksPage).toEqual({ offset: 0, limit: null, total: 3 });
    expect((await get("?networks=0")).networks).toEqual([]);
  });

  test("a non-loopback --http needs the admin token on every route but /healthz", async () => {
    await using relay = await spawnRelay(["--http", "0.0.0.0:0", "--admin-token", "admin-secret-000001"]);
    const base = `http://127.0.0.1:${relay.port("http")}`;
    // A load balancer's check carries no secret, and learns only whether the hub is up.
    expect(await (await fetch(`${base}/healthz`)).text()).toBe("ok\n");
    for (const path of ["/", "/status", "/metrics", "/capture?network=default&seconds=1", "/impair"]) {
      expect((await fetch(`${base}${path}`)).status).toBe(401);
      expect((await fetch(`${base}${path}`, { headers: { Authorization: "Bearer wrong" } })).status).toBe(401);
      expect((await fetch(`${base}${path}`, { headers: { Authorization: "Bearer admin-secret-000001" } })).status).toBe(200);
    }
    expect(relay.stdout() + relay.stderr()).not.toContain("admin-secret-000001");
  });

  test("the tunnel endpoint is off without a token", async () => {
    await using relay = await scenario().spawn();
    const res = await fetch(`${relay.base}/tunnel`);
    expect([res.status, await res.text()]).toEqual([404, "tunnel endpoint disabled: no token configured\n"]);
  });
});

describe("startRelay", () => {
  test("returns the bound ports, a snapshot and stop(), and disposes", async () => {
    const lines: string[] = [];
    const log = { info: (l: string) => lines.push(l), warn: (l: string) => lines.push(l) };
    let port: number;
    {
      await using relay = await startRelay(parseConfig({ http: "127.0.0.1:0", qemuListen: ["127.0.0.1:0"] }), log);
      expect(relay.http).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
      port = Number(relay.bound[1]!.address.split(":")[1]);
      await using vm = await connectStream(port);
      await waitUntil(() => relay.snapshot().networks[0]!.ports.length === 1, "port attached");
      expect(relay.snapshot().networks[0]!.ports[0]!.peer).toBe(vm.local);
    }
    await expect(connectStream(port)).rejects.toThrow();
  });
});
