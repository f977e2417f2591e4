/**
 * QEMU ports facing hostile peers: who may become a port, how many, and what a flood costs.
 */
import { describe, expect, test } from "bun:test";
import { BROADCAST, type RelayProcess, attachVm, fromMac, makeFrame, runCli, spawnRelay, udpPeer } from "./helpers.ts";

/** The status of the relay's --qemu-udp socket bound to `port`. */
async function datagramStatus(relay: RelayProcess, port = relay.port("qemu-udp")) {
  return (await relay.status()).datagrams.find((d: any) => d.address.endsWith(`:${port}`));
}

describe("QEMU ports on non-loopback addresses", () => {
  const refused: [string[], string][] = [
    [["--qemu-listen", "0.0.0.0:0"], "--qemu-listen (qemuListen[0]): 0.0.0.0 is not a loopback address: anyone who can reach it gets a port on the segment"],
    [["--qemu-listen", "127.0.0.1:0", "--qemu-listen", "lab=[::]:0"], "--qemu-listen (qemuListen[1]): :: is not a loopback address: anyone who can reach it gets a port on the segment"],
    [["--qemu-udp", "0.0.0.0:0,127.0.0.1:9"], "--qemu-udp (qemuUdp[0]): 0.0.0.0 is not a loopback address: anyone who can reach it gets a port on the segment"],
    [["--qemu-mcast", "239.1.2.3:5000"], "--qemu-mcast (qemuMcast[0]): without a loopback LOCALADDR the group is joined on every interface: anyone on the network is on the segment"],
    [["--qemu-mcast", "239.1.2.3:5000,192.0.2.1"], "--qemu-mcast (qemuMcast[0]): 192.0.2.1 is not a loopback address: anyone on that network is on the segment"],
  ];
  for (const [args, message] of refused) {
    test(`${args.join(" ")} exits 2 without --allow-remote-qemu`, async () => {
      expect(await runCli(["--http", "127.0.0.1:0", ...args])).toEqual({ stdout: "", stderr: `edge-relay: ${message}; add --allow-remote-qemu\n`, code: 2 });
    });
  }

  test("--allow-remote-qemu opens them; --qemu-connect to another host needs no flag", async () => {
    await using relay = await spawnRelay(["--http", "127.0.0.1:0", "--qemu-listen", "0.0.0.0:0", "--allow-remote-qemu"]);
    expect(relay.bound.find((b) => b.what === "qemu-listen")!.address).toMatch(/^0\.0\.0\.0:\d+$/);
    await using dialer = await spawnRelay(["--http", "127.0.0.1:0", "--qemu-connect", "192.0.2.1:9"]);
    expect(dialer.stdout()).toContain("ready\n");
  });
});

describe("--qemu-udp with a fixed REMOTE", () => {
  test("datagrams from any other source are dropped and counted, never a port", async () => {
    using vm = await udpPeer();
    using stranger = await udpPeer();
    await using relay = await spawnRelay(["--http", "127.0.0.1:0", "--qemu-udp", `127.0.0.1:0,127.0.0.1:${vm.port}`, "--qemu-listen", "127.0.0.1:0"]);
    await using tcp = await attachVm(relay);
    const udpPort = relay.port("qemu-udp");
    const [V, S] = ["02:00:00:00:40:01", "02:00:00:00:40:02"];
    for (let i = 0; i < 3; i++) stranger.send(makeFrame(BROADCAST, S, `injected ${i}`), udpPort);
    // One socket serves both senders in arrival order: once the VM's frame is through, so are the stranger's.
    const fromVm = makeFrame(BROADCAST, V, "the fixed remote");
    vm.send(fromVm, udpPort);
    expect(await tcp.frames.next()).toEqual(fromVm);
    const status = await datagramStatus(relay);
    expect(status).toMatchObject({ remote: `127.0.0.1:${vm.port}`, peers: 1, foreign: 3 });
    const ports = (await relay.status()).networks[0].ports.map((p: any) => p.peer);
    expect(ports.toSorted()).toEqual([`127.0.0.1:${vm.port}`, tcp.local].toSorted());
    expect(tcp.frames.frames.some(fromMac(S))).toBe(false);
    const logged = relay.stderr().match(/qemu-udp default 127\.0\.0\.1:(\d+): dropped a datagram from 127\.0\.0\.1:(\d+), not the fixed remote/g);
    expect(logged).toEqual([`qemu-udp default 127.0.0.1:${udpPort}: dropped a datagram from 127.0.0.1:${stranger.port}, not the fixed remote`]);
    const metrics = await fetch(`${relay.base}/metrics`).then((r) => r.text());
    expect(metrics).toContain(`edge_relay_datagram_foreign_total{network="default",socket="127.0.0.1:${udpPort}"} 3`);
  });
});
