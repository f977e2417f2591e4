/**
 * Live capture (GET /capture, pcapng) and capture files, read back by tshark from Debian: frames,
 * lengths, directions and ports must match what the fake VMs sent, exactly.
 */
import { describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import { encodeFrames } from "../relay.ts";
import { BROADCAST, attachVm, fromMac, introduce, makeFrame, recipe, tempDir, uplinkUp, waitUntil, type RelayProcess, scenario } from "./helpers.ts";

const TSHARK = Bun.which("tshark");
const needTshark = TSHARK || process.env.CI ? test : test.skip;
if (!TSHARK && !process.env.CI) console.warn("SKIPPED: capture tests need tshark (apt-get install tshark)");

/** tshark's reading of a pcapng file: one row per packet, tab-separated fields. */
async function tshark(file: string, ...fields: string[]): Promise<string[][]> {
  const args = fields.flatMap((f) => ["-e", f]);
  const out = await Bun.$`tshark -r ${file} -T fields ${args}`.quiet().nothrow();
  if (out.exitCode !== 0) throw new Error(`tshark failed on ${file}: ${out.stderr.toString().replace(/^Running as user.*\n/, "")}`);
  return out.stdout.toString().trim().split("\n").filter(Boolean).map((l) => l.split("\t"));
}

/** Streams /capture into a file until the relay ends the stream. */
async function capture(relay: RelayProcess, query: string, file: string): Promise<{ done: Promise<void>; status: number }> {
  const res = await fetch(`${relay.base}/capture?${query}`);
  if (!res.ok) return { done: Promise.resolve(), status: res.status };
  expect(res.headers.get("content-type")).toBe("application/x-pcapng");
  const writer = Bun.file(file).writer();
  const done = (async () => {
    for await (const chunk of res.body!) writer.write(chunk);
    await writer.end();
  })();
  await waitUntil(async () => (await relay.status()).captures.length > 0, "the capture registered");
  return { done, status: res.status };
}

describe("GET /capture", () => {
  needTshark("streams pcapng: an interface per port, every frame in and out with its direction, exactly", async () => {
    await using dir = await tempDir();
    await using relay = await scenario().listen("lab").noProbe().spawn();
    await using vm1 = await attachVm(relay);
    await using vm2 = await attachVm(relay);
    const [A, B] = ["02:00:00:00:61:01", "02:00:00:00:61:02"];
    const { done } = await capture(relay, "network=lab&count=6", `${dir.path}/all.pcapng`);
    const frames = [makeFrame(BROADCAST, A, 100), makeFrame(A, B, 200), makeFrame(B, A, 1400)];
    vm1.send(frames[0]!);
    await vm2.frames.next(fromMac(A));
    vm2.send(frames[1]!);
    await vm1.frames.next(fromMac(B));
    vm1.send(frames[2]!);
    await vm2.frames.next(fromMac(A));
    await done;
    const ports = (await relay.status()).networks[0].ports.map((p: any) => p.id);
    const rows = await tshark(`${dir.path}/all.pcapng`, "frame.interface_name", "frame.len", "frame.packet_flags_direction", "eth.src", "eth.dst");
    const [p1, p2] = [ports.find((id: string) => id.endsWith("-1")), ports.find((id: string) => id.endsWith("-2"))];
    expect(rows).toEqual([
      [p1, "114", "0x00000001", A, BROADCAST],
      [p2, "114", "0x00000002", A, BROADCAST],
      [p2, "214", "0x00000001", B, A],
      [p1, "214", "0x00000002", B, A],
      [p1, "1414", "0x00000001", A, B],
      [p2, "1414", "0x00000002", A, B],
    ]);
    const described = await Bun.$`tshark -r ${dir.path}/all.pcapng -T fields -e frame.interface_description -c 1`.quiet().text();
    expect(described.trim()).toMatch(/^qemu-listen 127\.0\.0\.1:\d+$/);
    expect((await relay.status()).captures).toEqual([]);
  });

  needTshark("a capture on a hub sees every frame of unicast between two sites, in and out, which the hub otherwise forwards as whole messages", async () => {
    await using dir = await tempDir();
    const token = "capture-cut-through-token";
    await using hub = await scenario().hub(token).noProbe().spawn();
    const site = () => scenario().listen().noProbe().uplink(hub.base, token).spawn();
    await using siteA = await site();
    await using siteB = await site();
    await Promise.all([uplinkUp(siteA), uplinkUp(siteB)]);
    await using vmA = await attachVm(siteA);
    await using vmB = await attachVm(siteB);
    const [A, B] = ["02:00:00:00:63:01", "02:00:00:00:63:02"];
    await introduce(vmA, A, vmB, B);
    const frames = Array.from({ length: 50 }, (_, i) => makeFrame(B, A, 60 + i));
    const { done } = await capture(hub, `network=default&count=${2 * frames.length}`, `${dir.path}/hub.pcapng`);
    vmA.send(...frames);
    for (const f of frames) expect(await vmB.frames.next(fromMac(A))).toEqual(f);
    await done;
    const rows = await tshark(`${dir.path}/hub.pcapng`, "frame.len", "frame.packet_flags_direction", "eth.src");
    expect(rows).toEqual(frames.flatMap((f) => [[String(f.length), "0x00000001", A], [String(f.length), "0x00000002", A]]));
  });

  needTshark("filters by port, MAC and EtherType (VLAN-tagged frames by their inner type) and truncates to snaplen", async () => {
    await using dir = await tempDir();
    await using relay = await scenario().listen("lab").noProbe().spawn();
    await using vm1 = await attachVm(relay);
    await using vm2 = await attachVm(relay);
    const [A, B, C] = ["02:00:00:00:62:01", "02:00:00:00:62:02", "02:00:00:00:62:03"];
    const arp = makeFrame(BROADCAST, A, 46);
    arp[12] = 0x08;
    arp[13] = 0x06;
    const tagged = makeFrame(BROADCAST, C, 50);
    tagged.set([0x81, 0x00, 0x00, 0x05, 0x08, 0x06], 12);
    const ports = async () => (await relay.status()).networks[0].ports.map((p: any) => p.id) as string[];
    const vm1Port = (await ports()).find((id) => id.endsWith("-1"))!;
    const byType = await capture(relay, "network=lab&ethertype=0x0806&count=4", `${dir.path}/arp.pcapng`);
    const byMac = await capture(relay, `network=lab&mac=${B}&count=2&snaplen=20`, `${dir.path}/mac.pcapng`);
    const byPort = await capture(relay, `network=lab&port=${encodeURIComponent(vm1Port)}&count=2`, `${dir.path}/port.pcapng`);
    vm1.send(makeFrame(BROADCAST, A, 60), arp, tagged);
    await vm2.frames.count(3);
    vm2.send(makeFrame(A, B, 300));
    await vm1.frames.next(fromMac(B));
    await Promise.all([byType.done, byMac.done, byPort.done]);
    expect(await tshark(`${dir.path}/arp.pcapng`, "eth.src", "frame.packet_flags_direction")).toEqual([
      [A, "0x00000001"], [A, "0x00000002"], [C, "0x00000001"], [C, "0x00000002"],
    ]);
    expect(await tshark(`${dir.path}/mac.pcapng`, "frame.len", "frame.cap_len")).toEqual([["314", "20"], ["314", "20"]]);
    expect(await tshark(`${dir.path}/port.pcapng`, "frame.interface_name", "frame.len")).toEqual([[vm1Port, "74"], [vm1Port, "60"]]);
  });

  needTshark("the README's tshark recipe reads the frames; a refused request shows curl's error, not tshark's", async () => {
    const line = (await recipe("capture"))?.split("\n").find((l) => l.endsWith("| tshark -r -"));
    expect(line).toBe("curl -fsSN 'http://127.0.0.1:8080/capture?network=lab&ethertype=0x0806&count=100&port=lab/qemu-listen-1' | tshark -r -");
    await using relay = await scenario().listen("lab").spawn();
    await using vm = await attachVm(relay);
    const run = async (command: string) => {
      const proc = Bun.spawn(["bash", "-c", command.replace("http://127.0.0.1:8080", relay.base)], { stdout: "pipe", stderr: "pipe" });
      const [stdout, stderr, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
      return { stdout, stderr: stderr.replace(/^Running as user.*\n/gm, ""), code };
    };
    const refused = await run(line!.replace("network=lab", "network=nope"));
    expect(refused.stderr).toBe("curl: (22) The requested URL returned error: 404\n");
    const reading = run(line!.replace("count=100", "count=1"));
    await waitUntil(async () => (await relay.status()).captures.length === 1, "the recipe's capture running");
    const arp = makeFrame(BROADCAST, "02:00:00:00:64:01", 46);
    arp.set([0x08, 0x06], 12);
    vm.send(arp);
    const read = await reading;
    expect({ code: read.code, stderr: read.stderr }).toEqual({ code: 0, stderr: "" });
    expect(read.stdout).toContain("ARP");
  });

  test("bad requests are refused in one line; beyond --max-captures the answer is 429", async () => {
    await using relay = await scenario().listen("lab").with("--max-captures", "1").spawn();
    const get = async (q: string) => {
      const res = await fetch(`${relay.base}/capture?${q}`);
      return [res.status, res.status === 200 ? "" : await res.text()];
    };
    expect(await get("")).toEqual([400, "capture: network=NAME is required\n"]);
    expect(await get("network=my%20lab")).toEqual([400, `capture: network name "my lab" must be letters, digits, '.', '_' or '-'\n`]);
    expect(await get("network=-lab")).toEqual([400, `capture: network name "-lab" must start with a letter or digit, not "-"\n`]);
    expect(await get("network=")).toEqual([400, `capture: network name "" is empty\n`]);
    expect(await get("network=nope")).toEqual([404, "no network nope on this relay\n"]);
    expect(await get("network=lab&snaplen=5")).toEqual([400, "capture: snaplen must be a whole number from 14 to 262144\n"]);
    expect(await get("network=lab&mac=zz")).toEqual([400, "capture: mac must look like 52:54:00:12:34:56\n"]);
    const held = new AbortController();
    const first = await fetch(`${relay.base}/capture?network=lab`, { signal: held.signal });
    expect(first.status).toBe(200);
    expect(await get("network=lab")).toEqual([429, "at most 1 captures at once (--max-captures)\n"]);
    held.abort();
    await waitUntil(async () => (await relay.status()).captures.length === 0, "the aborted capture gone");
  });

  test("a capture whose reader stalls loses frames, counted, and never slows a 100,000-frame transfer", async () => {
    // Ports may queue the whole transfer (21 MB), so however slowly the machine lets the receiving
    // VM read, the only frames that may be lost are the stalled capture's.
    await using relay = await scenario().listen("lab").noProbe().with("--queue-bytes", String(64 * 1024 * 1024)).spawn();
    const [A, B] = ["02:00:00:00:63:01", "02:00:00:00:63:02"];
    const fixture = (name: string) => new URL(`./fixtures/${name}`, import.meta.url).pathname;
    const qemuPort = String(relay.port("qemu-listen"));
    // Every party in a process of its own: the stalled reader (bash holding a socket it never reads),
    // the sending VM and the receiving VM, so nothing in this test process paces the transfer.
    const port = Number(new URL(relay.base).port);
    const stalled = Bun.spawn(["bash", "-c", `exec 3<>/dev/tcp/127.0.0.1/${port}; printf 'GET /capture?network=lab HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' >&3; exec sleep 120`], { stdout: "ignore", stderr: "ignore" });
    await waitUntil(async () => (await relay.status()).captures.length === 1, "the stalled capture registered");
    const N = 100_000;
    const sink = Bun.spawn([process.execPath, fixture("frame-sink.ts"), qemuPort, String(N), A], { stdout: "pipe", stderr: "inherit" });
    const sinkOut = new Response(sink.stdout).text();
    await waitUntil(async () => (await relay.status()).networks[0].ports.length === 1, "the receiving VM attached");
    const sender = Bun.spawn([process.execPath, fixture("frame-sender.ts"), qemuPort, String(N), "200", A, B], { stdout: "ignore", stderr: "inherit" });
    try {
      expect(await sink.exited).toBe(0);
      expect((await sinkOut).trim().split("\n").at(-1)).toBe(`got ${N} in order`);
      const status = await relay.status();
      expect(status.captures[0].drops).toBeGreaterThan(0);
      expect(status.networks[0].ports.every((p: any) => p.tx.drops === 0)).toBe(true);
    } finally {
      sender.kill();
      sink.kill();
      stalled.kill();
    }
    await stalled.exited;
  });
});

describe("--capture-file", () => {
  needTshark("writes pcapng files, rotating past --capture-rotate and keeping --capture-keep of them", async () => {
    await using dir = await tempDir();
    const path = `${dir.path}/lab.pcapng`;
    const relay = await scenario().listen("lab").noProbe().with("--capture-file", `lab=${path}`, "--capture-rotate", "8KB", "--capture-keep", "3").spawn();
    try {
      await using vm1 = await attachVm(relay);
      await using vm2 = await attachVm(relay);
      for (let i = 0; i < 40; i++) vm1.send(makeFrame(BROADCAST, "02:00:00:00:64:01", 1000));
      await vm2.frames.count(40);
    } finally {
      expect(await relay.stop()).toBe(0);
    }
    expect([existsSync(path), existsSync(`${path}.1`), existsSync(`${path}.2`), existsSync(`${path}.3`)]).toEqual([true, true, true, false]);
    for (const f of [path, `${path}.1`, `${path}.2`]) {
      const rows = await tshark(f, "frame.len");
      expect(rows.length).toBeGreaterThan(0);
      expect(rows.every(([len]) => len === "1014")).toBe(true);
    }
  });
});
