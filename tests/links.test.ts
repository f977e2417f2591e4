/**
 * Link impairment through real relays: netem's words on a network, a port or the uplink, at start
 * (--impair) and at run time (PUT/DELETE /impair/TARGET), with fake VMs on real sockets.
 */
import { describe, expect, test } from "bun:test";
import { BROADCAST, attachVm, fromMac, makeFrame, spawnRelay, uplinkUp, waitUntil, type RelayProcess } from "./helpers.ts";

const TOKEN = "links-secret-2c9d4e1f";
const wallMs = () => performance.timeOrigin + performance.now();

/** A frame carrying the time it was sent, in ms. */
function stamped(dst: string, src: string, seq: number): Uint8Array {
  const f = makeFrame(dst, src, 46);
  const view = new DataView(f.buffer);
  view.setUint32(14, seq);
  view.setFloat64(18, wallMs());
  return f;
}
const sentAt = (f: Uint8Array) => new DataView(f.buffer, f.byteOffset).getFloat64(18);
const seqOf = (f: Uint8Array) => new DataView(f.buffer, f.byteOffset).getUint32(14);

const impair = (relay: RelayProcess, target: string, spec?: string) =>
  fetch(`${relay.base}/impair/${encodeURIComponent(target)}`, spec === undefined ? { method: "DELETE" } : { method: "PUT", body: spec });

describe("link impairment", () => {
  test("--impair NET=\"delay 50ms\": every frame arrives at least 50 ms later, in order, counted", async () => {
    await using relay = await spawnRelay(["--http", "127.0.0.1:0", "--qemu-listen", "lab=127.0.0.1:0", "--loop-probe", "0", "--impair", "lab=delay 50ms"]);
    await using vm1 = await attachVm(relay);
    await using vm2 = await attachVm(relay);
    const A = "02:00:00:00:71:01";
    for (let i = 0; i < 100; i++) vm1.send(stamped(BROADCAST, A, i));
    const got = (await vm2.frames.count(100)).filter(fromMac(A));
    const now = wallMs();
    expect(got.map(seqOf)).toEqual(Array.from({ length: 100 }, (_, i) => i));
    for (const f of got) expect(now - sentAt(f)).toBeGreaterThanOrEqual(50);
    const [profile] = (await relay.status()).impairments;
    expect(profile).toMatchObject({ target: "lab", spec: "delay 50ms", delayed: 100, lost: 0 });
    expect(profile.ports).toHaveLength(2);
    expect(await (await fetch(`${relay.base}/metrics`)).text()).toContain('edge_relay_impairment_delayed_total{target="lab"} 100');
  });

  test("a runtime PUT takes effect on live ports without reconnecting; DELETE restores the clean path", async () => {
    await using relay = await spawnRelay(["--http", "127.0.0.1:0", "--qemu-listen", "lab=127.0.0.1:0", "--loop-probe", "0"]);
    await using vm1 = await attachVm(relay);
    await using vm2 = await attachVm(relay);
    const ids = (await relay.status()).networks[0].ports.map((p: any) => p.id);
    const port2 = ids.find((id: string) => id.endsWith("-2"))!;
    const A = "02:00:00:00:72:01";
    const put = await impair(relay, `${port2}:out`, "loss 100%");
    expect([put.status, await put.text()]).toEqual([200, "loss 100%\n"]);
    for (let i = 0; i < 20; i++) vm1.send(stamped(BROADCAST, A, i));
    await waitUntil(async () => (await relay.status()).impairments[0]?.lost === 20, "20 frames lost to the impairment");
    expect(vm2.frames.frames).toHaveLength(0);
    expect(await (await fetch(`${relay.base}/impair`)).json()).toMatchObject([{ target: `${port2}:out`, spec: "loss 100%", ports: [`${port2}:out`], lost: 20 }]);
    expect((await impair(relay, `${port2}:out`)).status).toBe(204);
    vm1.send(stamped(BROADCAST, A, 99));
    expect(seqOf(await vm2.frames.next(fromMac(A)))).toBe(99);
    expect((await relay.status()).networks[0].ports.map((p: any) => p.id)).toEqual(ids);
    expect((await impair(relay, `${port2}:out`)).status).toBe(404);
    const bad = await impair(relay, "lab", "delya 5ms");
    expect([bad.status, (await bad.text()).split("\n").length]).toEqual([400, 2]);
    const badTarget = await impair(relay, "no such/target", "delay 5ms");
    expect(badTarget.status).toBe(400);
  });

  test("delay 100ms on a site's uplink adds about 200 ms to a round trip across the hub", async () => {
    await using hub = await spawnRelay(["--http", "127.0.0.1:0", "--token", TOKEN, "--loop-probe", "0"]);
    const site = (...extra: string[]) =>
      spawnRelay(["--http", "127.0.0.1:0", "--qemu-listen", "127.0.0.1:0", "--loop-probe", "0", "--uplink", hub.base.replace(/^http/, "ws"), "--uplink-token", TOKEN, ...extra]);
    await using siteA = await site("--impair", "uplink=delay 100ms");
    await using siteB = await site();
    await Promise.all([uplinkUp(siteA), uplinkUp(siteB)]);
    await using vmA = await attachVm(siteA);
    await using vmB = await attachVm(siteB);
    const [A, B] = ["02:00:00:00:73:01", "02:00:00:00:73:02"];
    const rtts: number[] = [];
    for (let i = 0; i < 5; i++) {
      vmA.send(stamped(BROADCAST, A, i));
      const ping = await vmB.frames.next(fromMac(A), 5_000);
      const pong = makeFrame(A, B, 46);
      pong.set(ping.subarray(14, 26), 14);
      vmB.send(pong);
      const back = await vmA.frames.next(fromMac(B), 5_000);
      rtts.push(wallMs() - sentAt(back));
    }
    for (const rtt of rtts) {
      expect(rtt).toBeGreaterThanOrEqual(200);
      expect(rtt).toBeLessThan(400);
    }
    expect((await siteA.status()).impairments[0]).toMatchObject({ target: "uplink", spec: "delay 100ms" });
  });

  test("a bad --impair exits 2 with one line naming the word", async () => {
    const { runCli } = await import("./helpers.ts");
    const out = await runCli(["--impair", "uplink=delay 50ms loss 130%"]);
    expect(out).toEqual({ stdout: "", stderr: expect.stringMatching(/^edge-relay: --impair \(impair\[0\]\): Cannot parse impairment: .*130%.*\n$/), code: 2 });
  });
});
