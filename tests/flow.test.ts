/**
 * Flow control (--flow-control): an unpaced VM sending to a VM that reads slowly is paused, like an
 * 802.3x PAUSE, instead of having its frames dropped at the slow VM's queue; through a tunnel chain
 * the pause travels back hop by hop. The sending and the slow receiving VM each run in a process of
 * their own (tests/fixtures), so nothing in this test process paces the transfer.
 */
import { describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { attachVm, makeFrame, tempDir, uplinkUp, waitUntil, type RelayProcess, scenario } from "./helpers.ts";

const TOKEN = "flow-test-token-0123456789";
const [SENDER, SINK, MARKER] = ["02:00:00:00:71:01", "02:00:00:00:71:02", "02:00:00:00:71:03"];
const QUEUE_BYTES = 262_144;
/** 40 MB at 40,000 frames/s: far more than the kernel's socket buffers hold, read in about a second. */
const N = 40_000;
const SIZE = 1000;
const SINK_RATE = 40_000;

const fixture = (name: string) => new URL(`./fixtures/${name}`, import.meta.url).pathname;
/** Every port a relay has had: the slow VM's closes when it has all it wanted. */
const ports = async (relay: RelayProcess) => (await relay.status()).networks.flatMap((n: any) => [...n.ports, ...n.closedPorts]);

/**
 * Starts the slow VM on `to` (at `sinkAt`, else its TCP --qemu-listen port; a frame from `end` ends
 * its count), waits until `from` has learned its MAC (so the transfer is unicast, not a flood), then
 * the unpaced sending VM on `from`.
 */
async function transfer(from: RelayProcess, to: RelayProcess, sinkRate = SINK_RATE, { sinkAt, end }: { sinkAt?: string; end?: string } = {}) {
  const at = sinkAt ?? String(to.port("qemu-listen"));
  const sink = Bun.spawn([process.execPath, fixture("frame-sink.ts"), at, String(N), SENDER, SINK, String(sinkRate), ...(end ? [end] : [])], {
    stdout: "pipe",
    stderr: "inherit",
  });
  const output = new Response(sink.stdout).text();
  await waitUntil(async () => (await from.status()).networks[0]?.macs.some((m: any) => m.mac === SINK), "the slow VM's MAC learned");
  const sender = Bun.spawn([process.execPath, fixture("frame-sender.ts"), String(from.port("qemu-listen")), String(N), String(SIZE), SENDER, SINK], {
    stdout: "ignore",
    stderr: "inherit",
  });
  return {
    sink,
    output,
    [Symbol.dispose]() {
      sender.kill();
      sink.kill();
    },
  };
}

describe("--flow-control", () => {
  test("on (the default): an unpaced VM behind a slow reader loses nothing; its socket is paused, counted", async () => {
    await using relay = await scenario().listen().noProbe().with("--queue-bytes", "262144").spawn();
    using t = await transfer(relay, relay);
    expect(await t.sink.exited).toBe(0);
    expect((await t.output).trim().split("\n").at(-1)).toBe(`got ${N} in order`);
    const status = await relay.status();
    expect(status.limits.flowControl).toBe(true);
    const all = await ports(relay);
    const sender = all.find((p: any) => p.rx.frames >= N);
    expect(sender.flow.pauses).toBeGreaterThan(0);
    expect(all.map((p: any) => p.tx.drops)).toEqual([0, 0]);
    expect(await (await fetch(`${relay.base}/metrics`)).text()).toMatch(/^edge_relay_port_pauses_total\{[^}]*\} [1-9]\d*$/m);
  });

  test("off: the same transfer loses frames at the slow reader's queue, each one counted, and nothing is paused", async () => {
    await using relay = await scenario().listen().noProbe().with("--queue-bytes", String(QUEUE_BYTES), "--flow-control", "off").spawn();
    using t = await transfer(relay, relay, SINK_RATE, { end: MARKER });
    const slow = await waitUntil(async () => {
      const all = await ports(relay);
      const sender = all.find((p: any) => p.rx.frames === N);
      const sink = all.find((p: any) => p !== sender && p.tx.frames + p.tx.drops === N);
      return sender && sink && { sender, sink };
    }, `all ${N} frames read, then sent or dropped toward the slow VM`, 15_000);
    expect((await relay.status()).limits.flowControl).toBe(false);
    expect(slow.sender.flow.pauses).toBe(0);
    // A marker behind the transfer: when the slow VM reads it, it has read every frame queued before
    // it. One the full queue refuses is counted too, and sent again.
    await using marker = await attachVm(relay);
    const sinkTx = async () => (await ports(relay)).find((p: any) => p.id === slow.sink.id).tx;
    let refused = 0;
    for (let sent = false; !sent; ) {
      const before = await sinkTx();
      marker.send(makeFrame(SINK, MARKER));
      const after = await waitUntil(async () => {
        const tx = await sinkTx();
        return tx.frames + tx.drops > before.frames + before.drops && tx;
      }, "the marker sent or dropped toward the slow VM");
      sent = after.drops === before.drops;
      if (!sent) refused++;
    }
    expect(await t.sink.exited).toBe(0);
    const received = Number(/^received (\d+)$/m.exec(await t.output)?.[1]);
    const drops = (await sinkTx()).drops - refused;
    expect(received).toBeLessThan(N);
    expect(drops).toBe(N - received);
  });

  test("a VM that stops reading is given up on after a second: what its queue and socket cannot hold drops, counted, and the sender goes on", async () => {
    // The stopped VM on a unix socket: what the kernel holds for it is bounded by the relay's send
    // buffer (the default, net.core.wmem_default), so the frames that cannot fit are known.
    await using dir = await tempDir();
    const path = `${dir.path}/sink.sock`;
    await using relay = await scenario().listen().noProbe().with("--qemu-listen", `unix:${path}`, "--queue-bytes", String(QUEUE_BYTES)).spawn();
    // One frame a second: after its first read the VM reads nothing for minutes.
    using t = await transfer(relay, relay, 1, { sinkAt: `unix:${path}` });
    const done = await waitUntil(async () => {
      const all = await ports(relay);
      const sender = all.find((p: any) => p.rx.frames === N);
      const sink = all.find((p: any) => p !== sender && p.tx.frames + p.tx.drops === N);
      return sender && sink && { sender, sink };
    }, `all ${N} frames read, then sent or dropped toward the stopped VM`, 15_000);
    // Given up on once: it never drains, so it stays given up on and pauses no one again; the rest
    // of the transfer drops at its queue. (The pauses before that depend on the kernel's buffers.)
    expect(done.sender.flow).toMatchObject({ waitingFor: null, stalls: 0 });
    expect(done.sender.flow.pauses).toBeGreaterThan(0);
    expect(done.sink.flow.stalls).toBe(1);
    t.sink.kill();
    const read = Number(/^read (\d+)$/m.exec(await t.output)?.[1]);
    // Held between the relay and the stopped VM: its queue; the socket's send buffer, and at most half
    // a buffer more that the kernel takes in its last write (an skb is under half of it); a frame
    // the VM has read in part.
    const sendBuffer = Number(readFileSync("/proc/sys/net/core/wmem_default", "utf8"));
    const held = Math.ceil((QUEUE_BYTES + 1.5 * sendBuffer) / (4 + 14 + SIZE)) + 1;
    expect(done.sink.tx.drops).toBeGreaterThanOrEqual(N - read - held);
    expect(done.sink.tx.drops).toBeLessThanOrEqual(N - read);
  });

  test("through site A → hub → site B the pause travels back hop by hop: nothing is lost", async () => {
    await using hub = await scenario().hub(TOKEN).noProbe().with("--queue-bytes", "262144").spawn();
    const site = () =>
      scenario().listen().noProbe().with("--queue-bytes", "262144").uplink(hub.base, TOKEN).spawn();
    await using a = await site();
    await using b = await site();
    await Promise.all([uplinkUp(a), uplinkUp(b)]);
    using t = await transfer(a, b);
    expect(await t.sink.exited).toBe(0);
    expect((await t.output).trim().split("\n").at(-1)).toBe(`got ${N} in order`);
    for (const relay of [a, hub, b]) expect((await ports(relay)).map((p: any) => p.tx.drops)).toEqual([0, 0]);
    // B stops reading the tunnel, the hub stops reading A's tunnel, A stops reading the sending VM.
    const paused = async (relay: RelayProcess, kind: string) => (await ports(relay)).some((p: any) => p.kind === kind && p.flow.pauses > 0);
    expect([await paused(b, "uplink"), await paused(hub, "tunnel"), await paused(a, "qemu-listen")]).toEqual([true, true, true]);
  });
});
