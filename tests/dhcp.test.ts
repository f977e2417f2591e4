/**
 * --dhcp (issue 21): the relay's own host on a network answers DHCP, DNS, ARP and ping. Fake VMs on
 * real --qemu-listen ports send packets this file builds itself (its own encoders, not relay.ts's)
 * and read the answers; lease expiry, with a fake clock, is checked on the host class in-process.
 */
import { describe, expect, test } from "bun:test";
import { mkdirSync, readFileSync, readdirSync } from "node:fs";
import { GatewayHost, Network, loadConfig, parseConfig, resolveDhcpNetwork, type Config, type DhcpNetworkSpec } from "../relay.ts";
import { CapturePort, GATEWAY, TYPE, arpFrame, ask, dhcpFrame, dhcpMessage, dnsQuery, gatewayMacOf, ip, ipFrame, ipText, isAnnouncement, isArp, lease, optIp, optText, optU32, readDhcp, reply, senderMac, sum16, udpFrame } from "./dhcp-packets.ts";
import { RELAY, attachVm, freePort, mac, recipe, spawnRelay, tempDir, uplinkUp, waitUntil, type RelayProcess, scenario } from "./helpers.ts";

const TOKEN = "dhcp-test-token-0123456789";

const dhcpOf = async (relay: RelayProcess, network = "lab") => (await relay.status()).networks.find((n: any) => n.name === network)?.dhcp;

async function relayWithDhcp(extra: string[] = [], dhcp = "lab=10.9.0.0/24", options: Parameters<typeof spawnRelay>[1] = {}): Promise<RelayProcess> {
  return scenario().listen("lab").with("--name", "site-a", "--dhcp", dhcp, ...extra).spawn(options);
}

// ───────────── tests ─────────────

describe("DHCP server on a --dhcp network", () => {
  test("DISCOVER, OFFER after an ARP check, REQUEST, ACK with every option; the lease shows in /status, /metrics and the log", async () => {
    await using relay = await relayWithDhcp();
    await using vm = await attachVm(relay, "lab");
    const client = "52:54:00:00:00:01";
    vm.send(dhcpFrame(client, TYPE.DISCOVER, { xid: 77, hostname: "VM1" }));
    // Before the offer: the relay asks who has the address it means to offer (not the gateway's announcement).
    const probe = await vm.frames.next((f) => isArp(1)(f) && !isArp(1, GATEWAY)(f));
    const offer = await reply(vm, client, TYPE.OFFER);
    expect(ipText(new DataView(probe.buffer, probe.byteOffset).getUint32(38))).toBe(offer.yiaddr);
    expect(offer.xid).toBe(77);
    expect(ip(offer.yiaddr)).toBeGreaterThanOrEqual(ip("10.9.0.10"));
    expect(ip(offer.yiaddr)).toBeLessThanOrEqual(ip("10.9.0.254"));
    vm.send(dhcpFrame(client, TYPE.REQUEST, { xid: 78, requested: offer.yiaddr, server: GATEWAY, hostname: "VM1" }));
    const ack = await reply(vm, client, TYPE.ACK);
    expect(ack.yiaddr).toBe(offer.yiaddr);
    expect(ack.dstMac).toBe("ff:ff:ff:ff:ff:ff");
    expect(optIp(ack, 1)).toBe("255.255.255.0");
    expect(optIp(ack, 3)).toBe(GATEWAY);
    expect(optIp(ack, 6)).toBe(GATEWAY);
    expect(optIp(ack, 54)).toBe(GATEWAY);
    expect(optIp(ack, 28)).toBe("10.9.0.255");
    expect(optText(ack, 15)).toBe("lab");
    expect([...ack.options.get(119)!]).toEqual([3, 0x6c, 0x61, 0x62, 0]);
    expect(optU32(ack, 51)).toBe(12 * 3600);
    expect(optU32(ack, 58)).toBe(6 * 3600);
    expect(optU32(ack, 59)).toBe(37_800);
    expect(optText(ack, 12)).toBe("vm1");
    const line = await relay.waitForLine(/^lab: 52:54:00:00:00:01 is /);
    expect(line).toBe(`lab: ${client} is ${ack.yiaddr} (vm1) at site-a`);
    const dhcp = await dhcpOf(relay);
    expect(dhcp).toMatchObject({ cidr: "10.9.0.0/24", gateway: GATEWAY, domain: "lab", range: "10.9.0.10-10.9.0.254", pool: 245, free: 244, leaseCount: 1 });
    expect(dhcp.leases).toEqual([{ mac: client, address: ack.yiaddr, name: "vm1", state: "bound", expires: expect.any(String), port: "lab/qemu-listen-1", site: "site-a" }]);
    const hostPort = (await relay.status()).networks[0].ports.find((p: any) => p.kind === "host");
    expect(hostPort).toMatchObject({ id: "lab/host-1", peer: "10.9.0.1 (DHCP, DNS)", state: "up" });
    const metrics = await (await fetch(`${relay.base}/metrics`)).text();
    expect(metrics).toContain('edge_relay_dhcp_leases{network="lab"} 1');
    expect(metrics).toContain('edge_relay_dhcp_pool_addresses{network="lab"} 245');
    // Renewing: unicast from the client's address, answered unicast.
    vm.send(udpFrame(dhcp.mac, client, ip(ack.yiaddr), ip(GATEWAY), 68, 67, dhcpMessage(client, TYPE.REQUEST, { xid: 79, ciaddr: ack.yiaddr })));
    const renewed = await vm.frames.next((f) => readDhcp(f)?.xid === 79);
    expect(readDhcp(renewed)).toMatchObject({ type: TYPE.ACK, dstMac: client, dstIp: ack.yiaddr, yiaddr: ack.yiaddr });
    // Rebinding: the same, broadcast (the client could not reach its server).
    vm.send(dhcpFrame(client, TYPE.REQUEST, { xid: 80, ciaddr: ack.yiaddr }));
    const rebound = await vm.frames.next((f) => readDhcp(f)?.xid === 80);
    expect(readDhcp(rebound)).toMatchObject({ type: TYPE.ACK, dstIp: ack.yiaddr, yiaddr: ack.yiaddr });
    expect(relay.stdout().match(/ is 10\.9\.0\./g)).toHaveLength(1);
  });

  test("a known client gets its address again; RELEASE ends the lease; INFORM gets options without a lease", async () => {
    await using relay = await relayWithDhcp();
    await using vm = await attachVm(relay, "lab");
    const client = "52:54:00:00:00:02";
    const first = await lease(vm, client);
    // Another DISCOVER (a reboot): the same address, offered at once.
    vm.send(dhcpFrame(client, TYPE.DISCOVER, { xid: 5 }));
    expect((await reply(vm, client, TYPE.OFFER)).yiaddr).toBe(first.yiaddr);
    vm.send(dhcpFrame(client, TYPE.RELEASE, { ciaddr: first.yiaddr, server: GATEWAY }));
    await waitUntil(async () => (await dhcpOf(relay)).leaseCount === 0, "the released lease gone from /status");
    vm.send(dhcpFrame(client, TYPE.INFORM, { xid: 9, ciaddr: first.yiaddr }));
    const inform = await reply(vm, client, TYPE.ACK);
    expect(inform.yiaddr).toBe("0.0.0.0");
    expect(inform.options.has(51)).toBe(false);
    expect(optIp(inform, 3)).toBe(GATEWAY);
    const counters = (await dhcpOf(relay)).counters;
    expect(counters).toMatchObject({ releases: 1, informs: 1, acks: 2 });
  });

  test("requests for an address outside the pool or another's are NAKed; choosing another server withdraws the offer; DECLINE rests the address", async () => {
    await using relay = await relayWithDhcp();
    await using vm = await attachVm(relay, "lab");
    const [a, b] = ["52:54:00:00:00:0a", "52:54:00:00:00:0b"];
    vm.send(dhcpFrame(a, TYPE.REQUEST, { requested: "192.168.1.5" }));
    expect((await reply(vm, a, TYPE.NAK)).dstMac).toBe("ff:ff:ff:ff:ff:ff");
    vm.send(dhcpFrame(a, TYPE.REQUEST, { requested: "10.9.0.3" }));
    await reply(vm, a, TYPE.NAK);
    const leased = await lease(vm, a);
    vm.send(dhcpFrame(b, TYPE.REQUEST, { requested: leased.yiaddr }));
    await reply(vm, b, TYPE.NAK);
    // INIT-REBOOT for a free address of the pool: granted (the server may have lost its state).
    vm.send(dhcpFrame(b, TYPE.REQUEST, { requested: "10.9.0.200" }));
    expect((await reply(vm, b, TYPE.ACK)).yiaddr).toBe("10.9.0.200");
    const c = "52:54:00:00:00:0c";
    vm.send(dhcpFrame(c, TYPE.DISCOVER));
    const offer = await reply(vm, c, TYPE.OFFER);
    vm.send(dhcpFrame(c, TYPE.REQUEST, { requested: offer.yiaddr, server: "10.9.0.99" }));
    await waitUntil(async () => !(await dhcpOf(relay)).leases.some((l: any) => l.mac === c), "the withdrawn offer gone");
    await relay.waitForLine(/^another DHCP server on lab: 10\.9\.0\.99 \(a client took its offer\); one relay per network should serve it \(--dhcp\)$/);
    expect((await dhcpOf(relay)).rogueServers).toEqual([{ mac: "?", address: "10.9.0.99" }]);
    vm.send(dhcpFrame(b, TYPE.DECLINE, { requested: "10.9.0.200", server: GATEWAY }));
    await waitUntil(async () => (await dhcpOf(relay)).counters.declines === 1, "the DECLINE counted");
    await relay.waitForLine(/^lab: 52:54:00:00:00:0b declined 10\.9\.0\.200: another host uses it$/);
    vm.send(dhcpFrame(b, TYPE.DISCOVER, { requested: "10.9.0.200" }));
    expect((await reply(vm, b, TYPE.OFFER)).yiaddr).not.toBe("10.9.0.200");
    expect((await dhcpOf(relay)).counters.naks).toBe(3);
  });

  test("an address someone answers ARP for is not offered: the next one is checked instead", async () => {
    await using relay = await relayWithDhcp();
    await using vm = await attachVm(relay, "lab");
    await using squatter = await attachVm(relay, "lab");
    const squatterMac = "52:54:00:00:00:99";
    const client = "52:54:00:00:00:03";
    // The squatter uses 10.9.0.50 without a lease and answers the relay's ARP check for it.
    vm.send(dhcpFrame(client, TYPE.DISCOVER, { requested: "10.9.0.50" }));
    const probe = await squatter.frames.next(isArp(1, "10.9.0.50"));
    squatter.send(arpFrame(2, squatterMac, ip("10.9.0.50"), ip(GATEWAY), [...probe.subarray(6, 12)].map((x) => x.toString(16).padStart(2, "0")).join(":")));
    const offer = await reply(vm, client, TYPE.OFFER);
    expect(offer.yiaddr).not.toBe("10.9.0.50");
    const dhcp = await dhcpOf(relay);
    expect(dhcp.counters.conflicts).toBe(1);
    await relay.waitForLine(/^lab: 10\.9\.0\.50 answers ARP though no lease holds it/);
  });

  test("a reservation gives its MAC its address and name, and DNS knows the name", async () => {
    await using relay = await relayWithDhcp(["--dhcp-host", "52:54:00:00:00:05,10.9.0.5,db"]);
    await using vm = await attachVm(relay, "lab");
    const client = "52:54:00:00:00:05";
    const ack = await lease(vm, client, { hostname: "other" });
    expect(ack.yiaddr).toBe("10.9.0.5");
    expect(optText(ack, 12)).toBe("db");
    const answer = await ask(vm, client, "10.9.0.5", dnsQuery(1, "db.lab", 1));
    expect(answer.answers).toEqual([expect.objectContaining({ type: "A", name: "db.lab", data: "10.9.0.5" })]);
    // Nobody else gets the reserved address.
    const other = "52:54:00:00:00:06";
    vm.send(dhcpFrame(other, TYPE.REQUEST, { requested: "10.9.0.5" }));
    await reply(vm, other, TYPE.NAK);
  });

  test("an exhausted pool leaves further clients unanswered, counted and logged", async () => {
    await using relay = await relayWithDhcp([], "lab=10.9.0.0/24,range=10.9.0.10-10.9.0.11");
    await using vm = await attachVm(relay, "lab");
    const got = [await lease(vm, "52:54:00:00:01:01"), await lease(vm, "52:54:00:00:01:02")].map((a) => a.yiaddr).sort();
    expect(got).toEqual(["10.9.0.10", "10.9.0.11"]);
    vm.send(dhcpFrame("52:54:00:00:01:03", TYPE.DISCOVER));
    await relay.waitForLine(/^lab: no free address for 52:54:00:00:01:03 \(pool 10\.9\.0\.10-10\.9\.0\.11 in use\)$/);
    expect((await dhcpOf(relay)).counters.exhausted).toBe(1);
    expect((await dhcpOf(relay)).free).toBe(0);
    expect(vm.frames.frames.some((f) => readDhcp(f)?.chaddr === "52:54:00:00:01:03")).toBe(false);
  });

  test("a flood of DISCOVERs with random MACs from one port takes at most its share; another port still gets an address", async () => {
    await using relay = await relayWithDhcp();
    await using flooder = await attachVm(relay, "lab");
    await using vm = await attachVm(relay, "lab");
    for (let i = 0; i < 40; i++) flooder.send(dhcpFrame(`52:54:00:aa:00:${i.toString(16).padStart(2, "0")}`, TYPE.DISCOVER));
    await waitUntil(async () => (await dhcpOf(relay)).counters.portCap >= 32, "DISCOVERs over the port's share dropped");
    await waitUntil(async () => (await dhcpOf(relay)).counters.offers === 8, "the share offered");
    const ack = await lease(vm, "52:54:00:00:00:07");
    expect(ack.yiaddr).toStartWith("10.9.0.");
    expect((await dhcpOf(relay)).leases.filter((l: any) => l.port === "lab/qemu-listen-1")).toHaveLength(8);
  });

  test("malformed, truncated, overloaded and oversized messages are dropped and counted, never logged, and the server keeps answering", async () => {
    await using relay = await relayWithDhcp();
    await using vm = await attachVm(relay, "lab");
    const c = "52:54:00:00:00:0e";
    const marker = [0x53, 0x45, 0x43, 0x52, 0x45, 0x54]; // "SECRET": must never reach a log
    const bad = [
      dhcpFrame(c, TYPE.DISCOVER, { extra: [12, 200, ...marker] }), // length past the end
      dhcpFrame(c, TYPE.DISCOVER, { cut: 100 }), // shorter than the fixed part
      dhcpFrame(c, TYPE.DISCOVER, { extra: [52, 1, 3], file: [53, 1, 1, 12, 250, ...marker] }), // overload: the file field runs past its end
      dhcpFrame(c, TYPE.DISCOVER, { extra: [50, 3, 10, 9, 0] }), // a 3-byte address
      udpFrame("ff:ff:ff:ff:ff:ff", c, 0, 0xffffffff, 68, 67, new Uint8Array([1, 2, 3, ...marker])),
      udpFrame("ff:ff:ff:ff:ff:ff", c, 0, 0xffffffff, 68, 67, dhcpMessage(c, 9)), // no such message type
    ];
    // A lying UDP length, and a lying IP total length.
    const lyingUdp = dhcpFrame(c, TYPE.DISCOVER);
    new DataView(lyingUdp.buffer).setUint16(38, 9000);
    bad.push(lyingUdp);
    for (const f of bad) vm.send(f);
    await waitUntil(async () => (await dhcpOf(relay)).counters.malformed === bad.length, `${bad.length} malformed messages counted`);
    // A huge host name across concatenated option 12s (RFC 3396) and option overload with a good sname: a lease, without that name.
    const huge = Array.from({ length: 3 }, () => [12, 200, ...new Array(200).fill(0x61)]).flat();
    const ack = await lease(vm, c, { extra: [...huge, 52, 1, 2], sname: [61, 7, 1, ...mac(c), 255] });
    expect(optText(ack, 15)).toBe("lab");
    expect((await dhcpOf(relay)).leases[0].name).toBeNull();
    const output = relay.stdout() + relay.stderr();
    expect(output).not.toContain("SECRET");
    expect(output).not.toContain("aaaaaaaa");
    expect((await relay.status()).networks[0].ports.every((p: any) => p.state === "up")).toBe(true);
  });

  test("leases survive a restart: kept in the state directory, written atomically", async () => {
    await using dir = await tempDir();
    const client = "52:54:00:00:00:0f";
    let address: string;
    {
      await using relay = await relayWithDhcp(["--state-dir", dir.path]);
      await using vm = await attachVm(relay, "lab");
      address = (await lease(vm, client, { hostname: "keep" })).yiaddr;
      await waitUntil(() => JSON.parse(readFileSync(`${dir.path}/dhcp-lab.json`, "utf8")).leases.length === 1, "the lease written");
    }
    const saved = JSON.parse(readFileSync(`${dir.path}/dhcp-lab.json`, "utf8"));
    expect(saved.leases).toEqual([expect.objectContaining({ mac: client, address, name: "keep", state: "bound" })]);
    await using relay = await relayWithDhcp(["--state-dir", dir.path]);
    expect((await dhcpOf(relay)).leases).toEqual([expect.objectContaining({ mac: client, address, name: "keep" })]);
    await using vm = await attachVm(relay, "lab");
    // INIT-REBOOT: the client asks for the address it had.
    vm.send(dhcpFrame(client, TYPE.REQUEST, { requested: address }));
    expect((await reply(vm, client, TYPE.ACK)).yiaddr).toBe(address);
    const answer = await ask(vm, client, address, dnsQuery(3, "keep.lab", 1));
    expect(answer.answers?.[0]).toMatchObject({ data: address });
  });

  test("the state directory defaults to $STATE_DIRECTORY", async () => {
    await using dir = await tempDir();
    await using relay = await relayWithDhcp([], "lab=10.9.0.0/24", { env: { STATE_DIRECTORY: dir.path } });
    expect((await dhcpOf(relay)).stateFile).toBe(`${dir.path}/dhcp-lab.json`);
  });

  test("without --state-dir or $STATE_DIRECTORY, leases are kept beside the --config file, not in the working directory", async () => {
    await using dir = await tempDir();
    mkdirSync(`${dir.path}/etc`);
    await Bun.write(`${dir.path}/etc/relay.json`, JSON.stringify({ http: "127.0.0.1:0", qemuListen: ["lab=127.0.0.1:0"], dhcp: [{ network: "lab", cidr: "10.9.0.0/24" }] }));
    // A relative path, resolved against the working directory the user ran it in.
    await using relay = await spawnRelay(["--config", "etc/relay.json"], { cwd: dir.path, env: { STATE_DIRECTORY: undefined } });
    expect((await dhcpOf(relay)).stateFile).toBe(`${dir.path}/etc/dhcp-lab.json`);
    await using vm = await attachVm(relay, "lab");
    const client = "52:54:00:00:00:1c";
    const address = (await lease(vm, client, { hostname: "beside" })).yiaddr;
    const saved = () => JSON.parse(readFileSync(`${dir.path}/etc/dhcp-lab.json`, "utf8"));
    await waitUntil(() => saved().leases.length === 1, "the lease written beside the config file");
    expect(saved().leases).toEqual([expect.objectContaining({ mac: client, address, name: "beside", state: "bound" })]);
    expect(readdirSync(dir.path)).toEqual(["etc"]);
  });

  test("the client FQDN (option 81, wire or ASCII form) names a lease without option 12; option 12 wins over it; DNS answers the name", async () => {
    await using relay = await relayWithDhcp();
    await using vm = await attachVm(relay, "lab");
    const fqdn = (flags: number, name: number[]) => [81, 3 + name.length, flags, 0, 0, ...name];
    const text = (t: string) => [...new TextEncoder().encode(t)];
    // E (0x04) set: DNS wire format, `\x03Fq1\x03lab\x00`; S (0x01): the client asks the server to update DNS.
    const wire = await lease(vm, "52:54:00:00:00:81", { extra: fqdn(0x05, [3, ...text("Fq1"), 3, ...text("lab"), 0]) });
    const ascii = await lease(vm, "52:54:00:00:00:82", { extra: fqdn(0x01, text("fq2.example.test")) });
    const both = await lease(vm, "52:54:00:00:00:83", { hostname: "short", extra: fqdn(0x05, [4, ...text("long"), 3, ...text("lab"), 0]) });
    expect([wire, ascii, both].map((ack) => optText(ack, 12))).toEqual(["fq1", "fq2", "short"]);
    const names = Object.fromEntries((await dhcpOf(relay)).leases.map((l: any) => [l.mac, l.name]));
    expect(names).toEqual({ "52:54:00:00:00:81": "fq1", "52:54:00:00:00:82": "fq2", "52:54:00:00:00:83": "short" });
    const client = "52:54:00:00:00:81";
    expect((await ask(vm, client, wire.yiaddr, dnsQuery(81, "fq1.lab", 1))).answers).toEqual([expect.objectContaining({ type: "A", data: wire.yiaddr })]);
    expect((await ask(vm, client, wire.yiaddr, dnsQuery(82, "fq2.lab", 1))).answers).toEqual([expect.objectContaining({ type: "A", data: ascii.yiaddr })]);
    expect((await ask(vm, client, wire.yiaddr, dnsQuery(83, "short.lab", 1))).answers).toEqual([expect.objectContaining({ type: "A", data: both.yiaddr })]);
    expect(await ask(vm, client, wire.yiaddr, dnsQuery(84, "long.lab", 1))).toMatchObject({ rcode: "NXDOMAIN", answers: [] });
  });
});

describe("DNS, ARP and ping on the gateway address", () => {
  test("A and PTR for leases and the gateway; NXDOMAIN in the domain; REFUSED elsewhere; no recursion", async () => {
    await using relay = await relayWithDhcp();
    await using vm = await attachVm(relay, "lab");
    const client = "52:54:00:00:00:21";
    const address = (await lease(vm, client, { hostname: "vm2" })).yiaddr;
    const a = await ask(vm, client, address, dnsQuery(11, "VM2.lab", 1));
    expect(a).toMatchObject({ id: 11, type: "response", rcode: "NOERROR", flag_aa: true, flag_ra: false });
    expect(a.answers).toEqual([expect.objectContaining({ type: "A", data: address })]);
    const gw = await ask(vm, client, address, dnsQuery(12, "gateway.lab", 1));
    expect(gw.answers?.[0]).toMatchObject({ data: GATEWAY });
    const ptr = await ask(vm, client, address, dnsQuery(13, `${address.split(".").reverse().join(".")}.in-addr.arpa`, 12));
    expect(ptr.answers).toEqual([expect.objectContaining({ type: "PTR", data: "vm2.lab" })]);
    const ptrGw = await ask(vm, client, address, dnsQuery(14, "1.0.9.10.in-addr.arpa", 12));
    expect(ptrGw.answers?.[0]).toMatchObject({ data: "gateway.lab" });
    expect(await ask(vm, client, address, dnsQuery(15, "nobody.lab", 1))).toMatchObject({ rcode: "NXDOMAIN", answers: [] });
    expect(await ask(vm, client, address, dnsQuery(16, "example.com", 1))).toMatchObject({ rcode: "REFUSED", answers: [] });
    expect(await ask(vm, client, address, dnsQuery(17, "8.8.8.8.in-addr.arpa", 12))).toMatchObject({ rcode: "REFUSED" });
    // AAAA for a known name: no such record, no error.
    expect(await ask(vm, client, address, dnsQuery(18, "vm2.lab", 28))).toMatchObject({ rcode: "NOERROR", answers: [] });
    // A malformed query (a pointer forward into nothing) is dropped and counted.
    const gatewayMac = (await dhcpOf(relay)).mac;
    vm.send(udpFrame(gatewayMac, client, ip(address), ip(GATEWAY), 4000, 53, Uint8Array.of(0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0, 1, 0, 1)));
    await waitUntil(async () => (await dhcpOf(relay)).counters.malformed === 1, "the malformed query counted");
    expect((await dhcpOf(relay)).counters).toMatchObject({ dnsQueries: 8, dnsAnswers: 5, dnsNxdomain: 1, dnsRefused: 2 });
  });

  test("the gateway answers ARP and ping before any other VM exists", async () => {
    await using relay = await relayWithDhcp();
    await using vm = await attachVm(relay, "lab");
    const client = "52:54:00:00:00:31";
    const gatewayMac = await gatewayMacOf(vm, client, "10.9.0.77");
    expect(gatewayMac).toBe((await dhcpOf(relay)).mac);
    expect(parseInt(gatewayMac.slice(0, 2), 16) & 3).toBe(2);
    const echo = new Uint8Array(8 + 32);
    echo[0] = 8;
    echo.set([0x12, 0x34, 0, 1], 4);
    echo.fill(0x5a, 8);
    const sum = sum16(echo);
    echo[2] = sum >> 8;
    echo[3] = sum & 255;
    vm.send(ipFrame(gatewayMac, client, ip("10.9.0.77"), ip(GATEWAY), 1, echo));
    const f = await vm.frames.next((f) => f.length > 34 && f[23] === 1);
    const icmp = f.subarray(34);
    expect(icmp[0]).toBe(0);
    expect([...icmp.subarray(4)]).toEqual([...echo.subarray(4)]);
    expect(sum16(icmp)).toBe(0);
    expect(sum16(f.subarray(14, 34))).toBe(0);
    expect(ipText(new DataView(f.buffer, f.byteOffset).getUint32(30))).toBe("10.9.0.77");
  });

  test("the gateway's MAC survives a restart (kept in the lease file, else from the relay's name) and is announced to each VM that joins", async () => {
    await using dir = await tempDir();
    const client = "52:54:00:00:00:32";
    const macOf = async (args: string[]) => {
      await using relay = await scenario().listen("lab").with("--dhcp", "lab=10.9.0.0/24", ...args).spawn();
      const gatewayMac = (await dhcpOf(relay)).mac;
      await using vm = await attachVm(relay, "lab");
      // The announcement (RFC 5227) comes unasked: a guest that cached another MAC replaces it.
      expect(senderMac(await vm.frames.next(isAnnouncement))).toBe(gatewayMac);
      expect(await gatewayMacOf(vm, client, "10.9.0.77")).toBe(gatewayMac);
      return gatewayMac;
    };
    const first = await macOf(["--name", "site-a", "--state-dir", dir.path]);
    expect(JSON.parse(readFileSync(`${dir.path}/dhcp-lab.json`, "utf8")).mac).toBe(first);
    // The lease file's MAC wins over the name (a container's host name changes when it is made anew).
    expect(await macOf(["--name", "renamed", "--state-dir", dir.path])).toBe(first);
    // Without a state directory: from the relay's name and the network, the same at every start.
    expect(await macOf(["--name", "site-a"])).toBe(first);
    const other = await macOf(["--name", "site-z"]);
    expect(other).not.toBe(first);
    expect(parseInt(other.slice(0, 2), 16) & 3).toBe(2);
  });

  test("VMs at a site hear the hub's gateway announce itself each time the hub (re)starts, with the same MAC", async () => {
    const port = await freePort();
    await using site = await scenario().with("--uplink", `ws://127.0.0.1:${port}`).listen("lab").with("--name", "site-b").spawn({
      env: { RELAY_UPLINK_TOKEN: TOKEN },
    });
    await using vm = await attachVm(site, "lab");
    const macs: string[] = [];
    for (const start of [1, 2]) {
      await using hub = await spawnRelay(["--http", `127.0.0.1:${port}`, "--token", TOKEN, "--dhcp", "lab=10.9.0.0/24", "--name", "hub"]);
      const announcement = await vm.frames.next(isAnnouncement, 15_000);
      macs.push(senderMac(announcement));
      expect(macs[start - 1]).toBe((await dhcpOf(hub)).mac);
    }
    expect(macs[1]).toBe(macs[0]!);
  }, 40_000);
});

describe("--dhcp in the compiled binary", () => {
  test("dns-packet is bundled: the binary leases an address and answers DNS for it", async () => {
    await using dir = await tempDir();
    const binary = `${dir.path}/edge-relay`;
    await Bun.$`${process.execPath} build --compile --minify ${RELAY} --outfile ${binary}`.quiet();
    await using relay = await scenario().listen("lab").with("--dhcp", "lab=10.9.0.0/24").spawn({ command: [binary], cwd: dir.path });
    await using vm = await attachVm(relay, "lab");
    const address = (await lease(vm, "52:54:00:00:00:91", { hostname: "bin" })).yiaddr;
    const answer = await ask(vm, "52:54:00:00:00:91", address, dnsQuery(21, "bin.lab", 1));
    expect(answer.answers?.[0]).toMatchObject({ type: "A", data: address });
  }, 60_000);
});

describe("one DHCP server per network", () => {
  test("a second relay serving the same network is seen and warned about, on both", async () => {
    await using hub = await scenario().hub(TOKEN).listen("lab").with("--dhcp", "lab=10.9.0.0/24", "--name", "hub").spawn();
    await using site = await scenario().with("--uplink", hub.base.replace("http", "ws")).listen("lab").with("--dhcp", "lab=10.9.0.0/24", "--name", "site-b").spawn({ env: { RELAY_UPLINK_TOKEN: TOKEN } });
    await uplinkUp(site);
    await using vm = await attachVm(site, "lab");
    vm.send(dhcpFrame("52:54:00:00:00:41", TYPE.DISCOVER));
    const [hubMac, siteMac] = [(await dhcpOf(hub)).mac, (await dhcpOf(site)).mac];
    await site.waitForLine(new RegExp(`^another DHCP server on lab: ${hubMac} 10\\.9\\.0\\.1; one relay per network should serve it \\(--dhcp\\)$`));
    await hub.waitForLine(new RegExp(`^another DHCP server on lab: ${siteMac} 10\\.9\\.0\\.1`));
    expect((await dhcpOf(site)).rogueServers).toEqual([{ mac: hubMac, address: GATEWAY }]);
    expect((await dhcpOf(site)).counters.rogueReplies).toBeGreaterThanOrEqual(1);
    // Once per server, however many replies.
    vm.send(dhcpFrame("52:54:00:00:00:42", TYPE.DISCOVER));
    await waitUntil(async () => (await dhcpOf(site)).counters.rogueReplies >= 2, "the second OFFER counted");
    expect(site.stderr().match(/another DHCP server/g)).toHaveLength(1);
  });

  test("a VM at a site gets its lease from the hub, logged with the site's name", async () => {
    await using hub = await scenario().hub(TOKEN).with("--dhcp", "lab=10.9.0.0/24", "--name", "hub").spawn();
    await using site = await scenario().with("--uplink", hub.base.replace("http", "ws")).listen("lab").with("--name", "site-b").spawn({
      env: { RELAY_UPLINK_TOKEN: TOKEN },
    });
    await uplinkUp(site);
    await using vm = await attachVm(site, "lab");
    const ack = await lease(vm, "52:54:00:00:00:51", { hostname: "vm2" });
    expect(await hub.waitForLine(/^lab: 52:54:00:00:00:51 is/)).toBe(`lab: 52:54:00:00:00:51 is ${ack.yiaddr} (vm2) at site-b`);
    expect((await dhcpOf(hub)).leases[0]).toMatchObject({ site: "site-b", port: expect.stringMatching(/^lab\/tunnel-\d+$/) });
  });
});

describe("--dhcp options", () => {
  test("defaults and limits of a network spec", () => {
    expect(resolveDhcpNetwork({ network: "lab", cidr: "10.9.0.0/24" })).toMatchObject({ gateway: ip("10.9.0.1"), first: ip("10.9.0.10"), last: ip("10.9.0.254"), leaseSeconds: 43_200, domain: "lab" });
    expect(resolveDhcpNetwork({ network: "tiny", cidr: "10.9.0.0/29" })).toMatchObject({ first: ip("10.9.0.1"), last: ip("10.9.0.6") });
    expect(resolveDhcpNetwork({ network: "lab", cidr: "10.9.0.0/24", gateway: "10.9.0.254", range: "10.9.0.100-10.9.0.199", lease: "30m", domain: "Example.Test." }))
      .toMatchObject({ gateway: ip("10.9.0.254"), first: ip("10.9.0.100"), last: ip("10.9.0.199"), leaseSeconds: 1800, domain: "example.test" });
    expect(resolveDhcpNetwork({ network: "lab", cidr: "10.9.0.0/24", range: "10.9.1.1-10.9.1.5" })).toBe('range start "10.9.1.1" is not a host address of 10.9.0.0/24');
    expect(resolveDhcpNetwork({ network: "lab", cidr: "10.9.0.0/31" })).toStartWith("expected an IPv4 CIDR from /8 to /30");
    for (const edge of ["10.9.0.0", "10.9.0.255"]) expect(resolveDhcpNetwork({ network: "lab", cidr: "10.9.0.0/24", gateway: edge })).toBe(`gateway "${edge}" is not a host address of 10.9.0.0/24`);
  });

  test("a reservation must be a host address of a --dhcp network other than its gateway", () => {
    const problem = (address: string) => {
      try {
        parseConfig({ dhcp: ["lab=10.9.0.0/24", "big=10.10.0.0/16"], dhcpHosts: [`52:54:00:00:00:01,${address}`] });
        return "";
      } catch (error) {
        return (error as Error).message;
      }
    };
    expect(problem("10.9.0.5")).toBe("");
    expect(problem("10.10.200.1")).toBe("");
    expect(problem("10.11.0.5")).toBe("--dhcp-host (dhcpHosts[0]): 10.11.0.5 is in no --dhcp network");
    for (const address of ["10.9.0.0", "10.9.0.255", "10.9.0.1", "10.10.255.255"]) expect(problem(address)).toEndWith(`: ${address} is not an address ${address.startsWith("10.9.") ? "lab" : "big"} can lease`);
  });

  test("the README's recipe \"boot any image into a network\" passes the option checks, with --dhcp on the hub only", async () => {
    const block = (await recipe("boot-any-image"))!;
    const lines = block.replace(/\\\n\s*/g, " ").split("\n").filter((l) => l.includes("relay.ts"));
    expect(lines).toHaveLength(2);
    const configs = lines.map((line) => {
      const words = line.trim().split(/\s+/);
      const env = Object.fromEntries(words.filter((w) => /^[A-Z_]+=/.test(w)).map((w) => w.split("=") as [string, string]));
      return loadConfig(words.slice(words.indexOf("relay.ts") + 1), env) as Config;
    });
    expect(configs.map((c) => c.dhcp.map((d) => d.cidr))).toEqual([["10.9.0.0/24"], []]);
    expect(configs[0]!.stateDir).toBe("/var/lib/edge-relay");
  });

  test("bad --dhcp and --dhcp-host values exit 2 naming the option; a config file takes objects", async () => {
    const { runCli } = await import("./helpers.ts");
    const bad = await runCli(["--dhcp", "lab=10.9.0.0/24,range=10.9.0.9-10.9.0.2"]);
    expect(bad).toEqual({ stdout: "", stderr: "edge-relay: --dhcp (dhcp[0]): range 10.9.0.9-10.9.0.2 ends before it starts\n", code: 2 });
    const host = await runCli(["--dhcp", "lab=10.9.0.0/24", "--dhcp-host", "01:00:5e:00:00:01,10.9.0.5"]);
    expect(host.stderr).toStartWith("edge-relay: --dhcp-host (dhcpHosts[0]): expected MAC,IP[,NAME] with a unicast MAC");
    expect(host.code).toBe(2);
    await using dir = await tempDir();
    await Bun.write(`${dir.path}/relay.json`, JSON.stringify({
      http: "127.0.0.1:0",
      qemuListen: ["lab=127.0.0.1:0"],
      dhcp: [{ network: "lab", cidr: "10.9.0.0/24", lease: 600, domain: "corp.test" }],
      dhcpHosts: [{ mac: "52:54:00:00:00:61", address: "10.9.0.6", name: "printer" }],
    }));
    await using relay = await spawnRelay(["--config", `${dir.path}/relay.json`]);
    const dhcp = await dhcpOf(relay);
    expect(dhcp).toMatchObject({ domain: "corp.test", leaseSeconds: 600, stateFile: `${dir.path}/dhcp-lab.json` });
    await using vm = await attachVm(relay, "lab");
    const ack = await lease(vm, "52:54:00:00:00:61");
    expect([ack.yiaddr, optText(ack, 12), optText(ack, 15)]).toEqual(["10.9.0.6", "printer", "corp.test"]);
  });
});

describe("GatewayHost with a fake clock", () => {
  test("a lease expires at its time, and its address then goes to another client", async () => {
    let now = Date.parse("2026-01-01T00:00:00Z");
    const timers = new Set<{ at: number; fn: () => void }>();
    const clock = {
      now: () => now,
      setTimer: (fn: () => void, ms: number) => {
        const t = { at: now + ms, fn };
        timers.add(t);
        return t;
      },
      clearTimer: (t: unknown) => void timers.delete(t as { at: number; fn: () => void }),
    };
    const advance = (ms: number) => {
      now += ms;
      for (const t of [...timers].filter((t) => t.at <= now)) {
        timers.delete(t);
        t.fn();
      }
    };
    const lines: string[] = [];
    const spec = resolveDhcpNetwork({ network: "lab", cidr: "10.9.0.0/24", range: "10.9.0.10-10.9.0.10", lease: "1h" }) as DhcpNetworkSpec;
    const network = new Network("lab", { ageingMs: 300_000 });
    const host = new GatewayHost({ spec, reservations: [], relayName: "here", log: { info: (l) => lines.push(l), warn: (l) => lines.push(l) }, clock });
    const vm = new CapturePort();
    network.attach(host);
    network.attach(vm);
    const settle = () => new Promise<void>((r) => setImmediate(r));
    const exchange = async (client: string) => {
      vm.receive(dhcpFrame(client, TYPE.DISCOVER));
      await settle();
      advance(1_000); // the ARP check's wait
      const offer = vm.sent.map(readDhcp).find((m) => m?.chaddr === client && m.type === TYPE.OFFER);
      if (!offer) return undefined;
      vm.receive(dhcpFrame(client, TYPE.REQUEST, { requested: offer.yiaddr, server: GATEWAY }));
      await settle();
      return vm.sent.map(readDhcp).find((m) => m?.chaddr === client && m.type === TYPE.ACK);
    };
    expect((await exchange("52:54:00:00:00:71"))?.yiaddr).toBe("10.9.0.10");
    expect(host.dhcpSnapshot()).toMatchObject({ leaseCount: 1, free: 0 });
    expect(await exchange("52:54:00:00:00:72")).toBeUndefined();
    expect(host.counters.exhausted).toBe(1);
    advance(3_600_000 - 2_000);
    expect(host.dhcpSnapshot().leaseCount).toBe(1);
    advance(2_000);
    expect(host.dhcpSnapshot()).toMatchObject({ leaseCount: 0, free: 1 });
    expect((await exchange("52:54:00:00:00:72"))?.yiaddr).toBe("10.9.0.10");
    expect(lines.filter((l) => l.includes(" is 10.9.0.10 "))).toEqual(["lab: 52:54:00:00:00:71 is 10.9.0.10 at here", "lab: 52:54:00:00:00:72 is 10.9.0.10 at here"]);
    host.close();
  });
});

describe("GatewayHost's lease file", () => {
  const spec = resolveDhcpNetwork({ network: "lab", cidr: "10.9.0.0/24" }) as DhcpNetworkSpec;
  const expires = Date.now() + 3_600_000;
  const record = (mac: string, address: string, extra: Record<string, unknown> = {}) => ({ mac, address, name: null, state: "bound", expires, port: "lab/1", site: "here", ...extra });
  /** Starts a host on `file` (text, or JSON of an object): its warnings, its leases' MACs, and whether it left the file as it was. */
  const startOn = async (file: unknown) => {
    await using dir = await tempDir();
    const path = `${dir.path}/dhcp-lab.json`;
    const text = typeof file === "string" ? file : JSON.stringify(file);
    await Bun.write(path, text);
    const warnings: string[] = [];
    const host = new GatewayHost({ spec, reservations: [], relayName: "here", stateDir: dir.path, log: { info: () => {}, warn: (l) => warnings.push(l.replaceAll(dir.path, "DIR")) } });
    const macs = host.dhcpSnapshot().leases.map((l) => l.mac);
    const kept = readFileSync(path, "utf8") === text;
    host.close();
    return { warnings, macs, kept };
  };

  test("entries that are damaged or do not fit are left out, counted in one line; the rest are kept", async () => {
    const good = { version: 1, network: "lab", cidr: "10.9.0.0/24", mac: "02:00:00:00:00:01", leases: [record("52:54:00:00:00:01", "10.9.0.11", { name: "ok" })] };
    expect(await startOn(good)).toEqual({ warnings: [], macs: ["52:54:00:00:00:01"], kept: true });
    const damaged = [
      record("52:54:00:00:00:02", "10.9.0.12", { expires: "soon" }),
      record("not a mac", "10.9.0.13"),
      record("52:54:00:00:00:04", "10.9.0"),
      record("52:54:00:00:00:05", "10.9.0.15", { state: "offered" }),
      record("52:54:00:00:00:06", "10.9.1.16"),
      record("52:54:00:00:00:07", "10.9.0.17", { extra: true }),
      "52:54:00:00:00:08",
      record("52:54:00:00:00:09", "10.9.0.19", { name: "Not A Label!" }),
    ];
    const { warnings, macs } = await startOn({ ...good, leases: [...good.leases, ...damaged] });
    expect(macs).toEqual(["52:54:00:00:00:01", "52:54:00:00:00:09"]);
    expect(warnings).toEqual(["lab: 7 entries of DIR/dhcp-lab.json are damaged or do not fit the network as configured and were left out"]);
  });

  test("a file that is not JSON, or not a lease file, is one line and left as it is; the host starts without its leases", async () => {
    expect(await startOn("{ not json")).toEqual({ warnings: ["lab: the lease file DIR/dhcp-lab.json is unreadable or not JSON; starting without its leases"], macs: [], kept: true });
    const lease = record("52:54:00:00:00:01", "10.9.0.11");
    for (const [file, at] of [
      [42, "the top"],
      [[lease], "version"],
      [{ version: 2, network: "lab", cidr: "10.9.0.0/24", leases: [lease] }, "version"],
      [{ version: 1, network: "lab", cidr: "10.9.0.0/24", leases: { 0: lease } }, "leases"],
      [{ version: 1, network: "lab", cidr: "10.9.0.0/24", leases: [lease], more: 1 }, "more"],
    ] as const) {
      expect(await startOn(file)).toEqual({ warnings: [`lab: DIR/dhcp-lab.json is not a lease file (at ${at}); starting without its leases`], macs: [], kept: true });
    }
  });

  test("a file without the gateway's MAC, or with one that is not a unicast MAC (or not text), keeps its leases and gets a MAC written", async () => {
    for (const mac of [undefined, "01:00:5e:00:00:01", "nonsense", 7, null]) {
      const { warnings, macs, kept } = await startOn({ version: 1, network: "lab", cidr: "10.9.0.0/24", mac, leases: [record("52:54:00:00:00:01", "10.9.0.11")] });
      expect({ warnings, macs, kept }).toEqual({ warnings: [], macs: ["52:54:00:00:00:01"], kept: false });
    }
  });
});

describe("GatewayHost's intake", () => {
  test("of the IPv4 frames to everyone, the host takes only those for the DHCP server: broadcast mDNS is never decoded", async () => {
    const spec = resolveDhcpNetwork({ network: "lab", cidr: "10.9.0.0/24" }) as DhcpNetworkSpec;
    const network = new Network("lab", { ageingMs: 300_000 });
    const host = new GatewayHost({ spec, reservations: [], relayName: "here", log: { info: () => {}, warn: () => {} } });
    const vm = new CapturePort();
    network.attach(host);
    network.attach(vm);
    const settle = () => new Promise<void>((r) => setImmediate(r));
    // A bad header checksum: the host counts a frame as malformed exactly when it decodes it.
    const badChecksum = (frame: Uint8Array) => ((frame[24] ^= 0xff), frame);
    const c = "52:54:00:00:00:73";
    vm.receive(badChecksum(udpFrame("ff:ff:ff:ff:ff:ff", c, ip("10.9.0.73"), 0xffffffff, 5353, 5353, new Uint8Array(12))));
    vm.receive(badChecksum(udpFrame("01:00:5e:00:00:fb", c, ip("10.9.0.73"), ip("224.0.0.251"), 5353, 5353, new Uint8Array(12))));
    await settle();
    expect(host.counters.malformed).toBe(0);
    vm.receive(badChecksum(udpFrame("ff:ff:ff:ff:ff:ff", c, 0, 0xffffffff, 68, 67, dhcpMessage(c, TYPE.DISCOVER))));
    await settle();
    expect(host.counters.malformed).toBe(1);
    host.close();
  });
});
