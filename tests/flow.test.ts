/**
 * Flow control (--flow-control): an unpaced VM sending to a VM that reads slowly is paused, like an
 * 802.3x PAUSE, instead of having its frames dropped at the slow VM's queue; through a tunnel chain
 * the pause travels back hop by hop. The sending and the slow receiving VM each run in a process of
 * their own (tests/fixtures), so nothing in this test process paces the transfer.
 */
import { describe, expect, test } from "bun:test";
import { uplinkUp, waitUntil, type RelayProcess, scenario } from "./helpers.ts";

const TOKEN = "flow-test-token-0123456789";
const [SENDER, SINK] = ["02:00:00:00:71:01", "02:00:00:00:71:02"];
/** 40 MB at 40,000 frames/s: far more than the kernel's socket buffers hold, read in about a second. */
const N = 40_000;
const SIZE = 1000;
const SINK_RATE = 40_000;

const fixture = (name: string) => new URL(`./fixtures/${name}`, import.meta.url).pathname;
/** Every port a relay has had: the slow VM's closes when it has all it wanted. */
const ports = async (relay: RelayProcess) => (await relay.status()).networks.flatMap((n: any) => [...n.ports, ...n.closedPorts]);

/**
 * Starts the slow VM on `to`, waits until `from` has learned its MAC (so the transfer is unicast, not
 * a flood), then the unpaced sending VM on `from`.
 */
async function transfer(from: RelayProcess, to: RelayProcess, sinkRate = SINK_RATE) {
  const sink = Bun.spawn([process.execPath, fixture("frame-sink.ts"), String(to.port("qemu-listen")), String(N), SENDER, SINK, String(sinkRate)], {
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

  test("off: the same transfer loses frames at the slow reader's queue, counted, and nothing is paused", async () => {
    await using relay = await scenario().listen().noProbe().with("--queue-bytes", "262144", "--flow-control", "off").spawn();
    using _ = await transfer(relay, relay);
    const slow = await waitUntil(async () => {
      const all = await ports(relay);
      const sender = all.find((p: any) => p.rx.frames === N);
      const sink = all.find((p: any) => p !== sender && p.tx.frames + p.tx.drops === N);
      return sender && sink && { sender, sink };
    }, `all ${N} frames read, then sent or dropped toward the slow VM`, 15_000);
    expect((await relay.status()).limits.flowControl).toBe(false);
    expect(slow.sink.tx.drops).toBeGreaterThan(0);
    expect(slow.sender.flow.pauses).toBe(0);
  });

  test("a VM that stops reading is given up on after a second: its excess drops, counted, and the sender goes on", async () => {
    await using relay = await scenario().listen().noProbe().with("--queue-bytes", "262144").spawn();
    // One frame a second: after its first read the VM reads nothing for minutes.
    using _ = await transfer(relay, relay, 1);
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
    expect(done.sink.tx.drops).toBeGreaterThan(0);
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
