import { describe, expect, test } from "bun:test";
import { BatchedPort, Capture, FrameBatch, MAX_FRAME, MIN_FRAME, Network, Port, PortTotals, RoundRobin, encodeFrames, parseImpairment, renderMetrics, statusNetworks, type Snapshot, type SwitchPolicy } from "../relay.ts";
import { BROADCAST, makeFrame } from "./helpers.ts";

/** A port that records what the switch sends it: the switch is pure, so no socket is needed here. */
class RecordingPort extends Port {
  readonly sent: Uint8Array[] = [];
  constructor(name: string) {
    super("test", name);
  }
  protected enqueue(frame: Uint8Array): boolean {
    this.sent.push(frame);
    return true;
  }
}

const A = "02:00:00:00:00:0a";
const B = "02:00:00:00:00:0b";
const C = "02:00:00:00:00:0c";

function setup(ageingMs = 300_000) {
  let now = 1_000;
  const net = new Network("default", { ageingMs, now: () => now });
  const ports = [new RecordingPort("p1"), new RecordingPort("p2"), new RecordingPort("p3")] as const;
  for (const p of ports) net.attach(p);
  return { net, ports, advance: (ms: number) => (now += ms) };
}

describe("Network", () => {
  test("floods broadcast and unknown unicast to every other port, never back", () => {
    const { net, ports: [p1, p2, p3] } = setup();
    net.forward(makeFrame(BROADCAST, A), p1);
    net.forward(makeFrame(C, A), p1);
    expect(p1.sent.length).toBe(0);
    expect(p2.sent.length).toBe(2);
    expect(p3.sent.length).toBe(2);
  });

  test("never learns a multicast source, and floods multicast destinations", () => {
    const { net, ports: [p1, p2, p3] } = setup();
    net.forward(makeFrame(BROADCAST, "01:00:5e:00:00:01"), p2);
    expect(net.macs.size).toBe(0);
    net.forward(makeFrame("01:00:5e:00:00:01", A), p1);
    expect([p1.sent.length, p2.sent.length, p3.sent.length]).toEqual([1, 1, 2]);
  });

  test("learns source MACs and sends known unicast to that port only", () => {
    const { net, ports: [p1, p2, p3] } = setup();
    net.forward(makeFrame(BROADCAST, B), p2);
    net.forward(makeFrame(B, A), p1);
    expect(p2.sent.length).toBe(1);
    expect(p3.sent.length).toBe(1); // only the broadcast
    net.forward(makeFrame(A, B), p2);
    expect(p1.sent.length).toBe(2);
    expect(p3.sent.length).toBe(1);
    expect(net.snapshot().macs.map((m) => [m.mac, m.port])).toEqual([[B, p2.id], [A, p1.id]]);
  });

  test("filters a frame whose destination sits on the port it came from", () => {
    const { net, ports: [p1, p2, p3] } = setup();
    net.forward(makeFrame(BROADCAST, B), p1);
    net.forward(makeFrame(B, A), p1);
    expect([p1.sent.length, p2.sent.length, p3.sent.length]).toEqual([0, 1, 1]);
  });

  test("ages MAC entries out and floods again", () => {
    const { net, ports: [p1, p2, p3], advance } = setup(300_000);
    net.forward(makeFrame(BROADCAST, B), p2);
    advance(299_999);
    net.forward(makeFrame(B, A), p1);
    expect(p3.sent.length).toBe(1);
    advance(1); // exactly the ageing time: B is forgotten
    net.forward(makeFrame(B, A), p1);
    expect(p3.sent.length).toBe(2);
    advance(300_000);
    net.forward(makeFrame(B, C), p1);
    expect(p3.sent.length).toBe(3);
    net.sweep();
    expect(net.snapshot().macs.map((m) => m.mac)).toEqual([C]);
  });

  test("moves a MAC that shows up on another port", () => {
    const { net, ports: [p1, p2, p3] } = setup();
    net.forward(makeFrame(BROADCAST, B), p2);
    net.forward(makeFrame(BROADCAST, B), p3);
    net.forward(makeFrame(B, A), p1);
    expect(p2.sent.length).toBe(1);
    expect(p3.sent.length).toBe(2);
  });

  test("drops runts and 0-length frames, counted, without learning", () => {
    const { net, ports: [p1, p2] } = setup();
    net.forward(new Uint8Array(0), p1);
    net.forward(makeFrame(BROADCAST, A).subarray(0, MIN_FRAME - 1), p1);
    expect(p2.sent.length).toBe(0);
    expect(p1.stats.rxRunts).toBe(2);
    expect(p1.stats.rxFrames).toBe(0);
    expect(net.macs.size).toBe(0);
  });

  test("never carries frames across networks", () => {
    const lab = new Network("lab", 300_000);
    const other = new Network("other", 300_000);
    const [l1, l2, o1] = [new RecordingPort("l1"), new RecordingPort("l2"), new RecordingPort("o1")];
    lab.attach(l1);
    lab.attach(l2);
    other.attach(o1);
    lab.forward(makeFrame(BROADCAST, A), l1);
    expect(l2.sent.length).toBe(1);
    expect(o1.sent.length).toBe(0);
  });

  test("detach() forgets the port's MACs and keeps its closing snapshot", () => {
    const { net, ports: [p1, p2, p3] } = setup();
    net.forward(makeFrame(BROADCAST, B), p2);
    net.detach(p2);
    net.forward(makeFrame(B, A), p1);
    expect(p3.sent.length).toBe(2);
    expect(net.snapshot().closedPorts.map((p) => [p.id, p.state, p.rx.frames])).toEqual([[p2.id, "closed", 1]]);
  });

  test("counts tx frames and bytes per port", () => {
    const { net, ports: [p1, p2] } = setup();
    const f = makeFrame(BROADCAST, A, 100);
    net.forward(f, p1);
    expect(p2.stats.txFrames).toBe(1);
    expect(p2.stats.txBytes).toBe(f.length);
    expect(p1.stats.rxBytes).toBe(f.length);
  });
});

describe("Network hardening", () => {
  const macN = (i: number) => `02:00:${[i >>> 24, (i >>> 16) & 0xff, (i >>> 8) & 0xff, i & 0xff].map((b) => b.toString(16).padStart(2, "0")).join(":")}`;

  test("a VM port learns at most --port-macs source MACs; frames from further ones are dropped and counted", () => {
    const net = new Network("lab", { ageingMs: 300_000, portMacs: 4 });
    const [attacker, victim] = [new RecordingPort("a"), new RecordingPort("v")];
    net.attach(attacker);
    net.attach(victim);
    for (let i = 0; i < 10; i++) net.forward(makeFrame(BROADCAST, macN(i)), attacker);
    expect(attacker.macCount).toBe(4);
    expect(attacker.stats.rxMacLimit).toBe(6);
    expect(victim.sent.length).toBe(4);
    net.forward(makeFrame(BROADCAST, C), victim);
    net.forward(makeFrame(C, macN(0)), attacker);
    expect(victim.sent.at(-1)).toEqual(makeFrame(C, macN(0)));
    expect(net.snapshot().macCount).toBe(5);
  });

  test("a full table evicts the least recently seen entry rather than refusing new MACs", () => {
    let now = 0;
    const net = new Network("lab", { ageingMs: 3_600_000, now: () => now });
    const trunk = new (class extends RecordingPort {
      override readonly trunk = true;
    })("trunk");
    const vm = new RecordingPort("vm");
    net.attach(trunk);
    net.attach(vm);
    for (let i = 0; i < 16_384; i++) net.forward(makeFrame(BROADCAST, macN(i)), trunk);
    now += 2_000;
    net.forward(makeFrame(BROADCAST, macN(0)), trunk); // seen again: no longer the oldest
    const V = "06:00:00:00:00:01";
    net.forward(makeFrame(BROADCAST, V), vm);
    expect(net.macs.size).toBe(16_384);
    expect(trunk.macCount + vm.macCount).toBe(16_384);
    const learned = net.snapshot(Infinity).macs.map((m) => m.mac);
    expect(learned).toContain(V);
    expect(learned).toContain(macN(0));
    expect(learned).not.toContain(macN(1));
    vm.sent.length = 0;
    net.forward(makeFrame(V, macN(2)), trunk);
    expect(vm.sent.length).toBe(1);
  });

  test("storm control drops broadcast and multicast beyond the per-port limit per second, counted", () => {
    let now = 10_000;
    const net = new Network("lab", { ageingMs: 300_000, now: () => now, stormLimit: 10 });
    const [p1, p2] = [new RecordingPort("p1"), new RecordingPort("p2")];
    net.attach(p1);
    net.attach(p2);
    for (let i = 0; i < 25; i++) net.forward(makeFrame(BROADCAST, A), p1);
    for (let i = 0; i < 5; i++) net.forward(makeFrame(B, A), p1);
    expect(p2.sent.length).toBe(15);
    expect(p1.stats.rxStorm).toBe(15);
    now += 1_000;
    net.forward(makeFrame("01:00:5e:00:00:01", A), p1);
    expect(p2.sent.length).toBe(16);
  });

  test("a loop probe that comes back blocks one port of the loop, logged once, until the block runs out", () => {
    let now = 0;
    const lines: string[] = [];
    let loops = 0;
    const net = new Network("lab", {
      ageingMs: 300_000,
      now: () => now,
      relayId: "0123456789abcdef",
      loopBlockMs: 60_000,
      log: { info: (l) => lines.push(l), warn: (l) => lines.push(l) },
      onLoop: () => loops++,
    });
    // p1 and p2 are bridged outside the switch: whatever leaves one enters through the other.
    const bridge: [Port, Port][] = [];
    class BridgedPort extends Port {
      readonly sent: Uint8Array[] = [];
      protected enqueue(frame: Uint8Array): boolean {
        this.sent.push(frame);
        const other = bridge.find(([a]) => a === this)?.[1];
        if (other && this.sent.length < 1000) queueMicrotask(() => net.forward(frame, other));
        return true;
      }
    }
    const [p1, p2, p3] = [new BridgedPort("test", "p1"), new BridgedPort("test", "p2"), new RecordingPort("p3")];
    bridge.push([p1, p2], [p2, p1]);
    for (const p of [p1, p2, p3]) net.attach(p);
    net.probe();
    return Promise.resolve().then(async () => {
      await Bun.sleep(0);
      const states = [p1.state, p2.state].sort();
      expect(states).toEqual(["blocked-loop", "up"]);
      expect(p3.state).toBe("up");
      expect(loops).toBe(1);
      expect(lines).toHaveLength(1);
      expect(lines[0]).toMatch(/^network lab: loop detected \(a probe sent out of lab\/test-\d+ came back on lab\/test-\d+\); blocking lab\/test-\d+ p\d for 60 s$/);
      const blocked = p1.state === "blocked-loop" ? p1 : p2;
      expect(blocked.snapshot().state).toBe("blocked-loop");
      net.forward(makeFrame(BROADCAST, A), blocked);
      expect(blocked.stats.rxLoop).toBe(1);
      expect(p3.sent.filter((f) => f[12] !== 0x90).length).toBe(0);
      now += 60_000;
      bridge.length = 0;
      net.probe();
      expect(blocked.state).toBe("up");
    });
  });

  test("another relay's probe is flooded, never learned; a probe back on the port it left is ignored", () => {
    const net = new Network("lab", { ageingMs: 300_000, relayId: "0123456789abcdef" });
    const [p1, p2] = [new RecordingPort("p1"), new RecordingPort("p2")];
    net.attach(p1);
    net.attach(p2);
    net.probe();
    const own = p1.sent[0]!;
    expect([own[12], own[13]]).toEqual([0x90, 0x00]);
    net.forward(own, p1);
    expect([p1.state, p2.state]).toEqual(["up", "up"]);
    const foreign = own.slice();
    foreign[7] ^= 0xff;
    net.forward(foreign, p1);
    expect(p2.sent.at(-1)).toEqual(foreign);
    expect(net.macs.size).toBe(0);
  });

  test("snapshot(0), which /metrics uses, never walks the MAC table", () => {
    const net = new Network("lab", 300_000);
    const [p1, p2] = [new RecordingPort("p1"), new RecordingPort("p2")];
    net.attach(p1);
    net.attach(p2);
    net.forward(makeFrame(BROADCAST, A), p1);
    net.forward(makeFrame(BROADCAST, B), p2);
    Object.defineProperty(net.macs, Symbol.iterator, { value: () => { throw new Error("walked the MAC table"); } });
    Object.defineProperty(net.macs, "entries", { value: () => { throw new Error("walked the MAC table"); } });
    const s = net.snapshot(0);
    expect(s.macCount).toBe(2);
    expect(s.macs).toEqual([]);
    expect(() => net.snapshot(10)).toThrow("walked the MAC table");
  });
});

describe("Network at scale", () => {
  test("the MAC table stays in last-seen order for a MAC heard more often than once a second", () => {
    const { net, ports: [p1, p2], advance } = setup();
    net.forward(makeFrame(BROADCAST, A), p1);
    advance(100);
    net.forward(makeFrame(BROADCAST, B), p2);
    // A keeps talking, never a full second after its last frame: it must still move past B.
    for (let i = 0; i < 4; i++) {
      advance(500);
      net.forward(makeFrame(BROADCAST, A), p1);
    }
    expect(net.snapshot().macs.map((m) => m.mac)).toEqual([B, A]);
  });

  test("sweep() forgets expired entries and stops within a second of the first one still fresh", () => {
    const { net, ports: [p1, p2], advance } = setup(10_000);
    net.forward(makeFrame(BROADCAST, A), p1);
    advance(20_000);
    for (let i = 0; i < 200; i++) net.forward(makeFrame(BROADCAST, `02:00:00:01:${(i >> 8).toString(16).padStart(2, "0")}:${(i & 255).toString(16).padStart(2, "0")}`), p2);
    expect(net.macs.size).toBe(201);
    expect(net.sweep()).toBe(1);
    expect(net.macs.size).toBe(200);
    expect(p1.macCount).toBe(0);
    expect(net.sweep()).toBe(0);
  });

  test("a network of one port sends no loop probe; with a second port both get one", () => {
    const net = new Network("lab", { ageingMs: 300_000, relayId: "0123456789abcdef" });
    const [p1, p2] = [new RecordingPort("p1"), new RecordingPort("p2")];
    net.attach(p1);
    expect(net.probe()).toBe(0);
    expect(p1.sent).toHaveLength(0);
    net.attach(p2);
    expect(net.probe()).toBe(2);
    expect([p1.sent.length, p2.sent.length]).toEqual([1, 1]);
    // Each probe names its port (big-endian serial after the magic and the relay id).
    const serial = (f: Uint8Array) => new DataView(f.buffer, f.byteOffset).getUint32(14 + 16 + 8);
    expect([serial(p1.sent[0]!), serial(p2.sent[0]!)]).toEqual([p1.serial, p2.serial]);
  });

  test("RoundRobin visits a bounded share per step, resumes where it stopped, and sees entries added meanwhile", () => {
    const names = new Map<string, string>([["a", "a"], ["b", "b"], ["c", "c"], ["d", "d"], ["e", "e"]]);
    const rounds = new RoundRobin(names);
    const seen: string[] = [];
    const visit = (x: string) => (seen.push(x), 0);
    rounds.step(2, visit);
    expect(seen).toEqual(["a", "b"]);
    rounds.step(2, visit);
    expect(seen).toEqual(["a", "b", "c", "d"]);
    names.set("f", "f");
    rounds.step(3, visit);
    expect(seen.slice(4)).toEqual(["e", "f", "a"]);
    // A visit's own work counts against the budget; no entry twice in one step.
    seen.length = 0;
    rounds.step(100, (x) => (seen.push(x), x === "c" ? 50 : 0));
    expect(seen).toEqual(["b", "c", "d", "e", "f", "a"]);
    seen.length = 0;
    rounds.step(3, (x) => (seen.push(x), 10));
    expect(seen).toEqual(["b"]);
  });

  test("status lists a page of networks and up to a number of ports each, with exact totals", () => {
    const nets = Array.from({ length: 300 }, (_, i) => new Network(`n${i}`, 300_000));
    for (let i = 0; i < 300; i++) nets[0]!.attach(new RecordingPort(`p${i}`));
    const byDefault = statusNetworks(nets, nets.length, {});
    expect(byDefault.networksPage).toEqual({ offset: 0, limit: 256, total: 300 });
    expect(byDefault.networks.map((n) => n.name)).toEqual(nets.slice(0, 256).map((n) => n.name));
    expect(byDefault.networks[0]!.ports).toHaveLength(256);
    expect(byDefault.networks[0]!.portCount).toBe(300);
    const page = statusNetworks(nets, nets.length, { offset: 298, networks: 5, ports: 0 });
    expect(page.networks.map((n) => n.name)).toEqual(["n298", "n299"]);
    expect(page.networksPage).toEqual({ offset: 298, limit: 5, total: 300 });
    expect(statusNetworks(nets, nets.length, { networks: Infinity, ports: Infinity }).networks[0]!.ports).toHaveLength(300);
  });

  test("renderMetrics reads each port's counters without building status snapshots or walking MAC tables", () => {
    const net = new Network("lab", 300_000);
    const [p1, p2] = [new RecordingPort("p1"), new RecordingPort("p2")];
    net.attach(p1);
    net.attach(p2);
    net.forward(makeFrame(BROADCAST, A, 100), p1);
    for (const p of [p1, p2]) p.snapshot = () => { throw new Error("built a port snapshot"); };
    net.snapshot = () => { throw new Error("built a network snapshot"); };
    Object.defineProperty(net.macs, Symbol.iterator, { value: () => { throw new Error("walked the MAC table"); } });
    const s = { networks: [], limits: { tunnels: 0, memoryUsed: 0, memoryDrops: 0 }, datagrams: [], impairments: [], uplink: null, uptime: 1 } as unknown as Snapshot;
    const text = renderMetrics(s, [net], new PortTotals().collect([net]));
    expect(text).toContain(`edge_relay_port_rx_frames_total{network="lab",port="${p1.id}",kind="test"} 1`);
    expect(text).toContain(`edge_relay_port_tx_bytes_total{network="lab",port="${p2.id}",kind="test"} 114`);
    expect(text).toContain(`edge_relay_port_blocked{network="lab",port="${p1.id}",kind="test"} 0`);
    expect(text).toContain("# TYPE edge_relay_port_blocked gauge");
    expect(text).toContain('edge_relay_network_macs{network="lab"} 1');
  });

  test("renderMetrics gives the first ports and networks series of their own; per-kind totals cover every port, closed ones too", () => {
    const totals = new PortTotals();
    const nets = ["a", "b", "c"].map((name) => new Network(name, { ageingMs: 300_000, totals }));
    const ports = nets.flatMap((net) => [new RecordingPort("x"), new RecordingPort("y")].map((p) => (net.attach(p), p)));
    ports.forEach((p, i) => p.network!.forward(makeFrame(BROADCAST, `02:00:00:00:01:${String(i).padStart(2, "0")}`, 100), p));
    const s = { networks: [], limits: { tunnels: 0, memoryUsed: 0, memoryDrops: 0 }, datagrams: [], impairments: [], uplink: null, uptime: 1 } as unknown as Snapshot;
    const render = () => renderMetrics(s, nets, totals.collect(nets), { ports: 3, networks: 2 });
    const before = render();
    expect(before.match(/^edge_relay_port_rx_frames_total\{/gm)).toHaveLength(3);
    expect(before.match(/^edge_relay_network_ports\{/gm)).toHaveLength(2);
    expect(before).toContain("\nedge_relay_metrics_ports_omitted 3\n");
    expect(before).toContain('\nedge_relay_kind_ports{kind="test"} 6\n');
    expect(before).toContain('\nedge_relay_kind_rx_frames_total{kind="test"} 6\n');
    expect(before).toContain('\nedge_relay_kind_tx_frames_total{kind="test"} 6\n');
    // A port that goes takes its series with it; the totals keep what it counted.
    nets[2]!.detach(ports[5]!);
    const after = render();
    expect(after).toContain('\nedge_relay_kind_ports{kind="test"} 5\n');
    expect(after).toContain('\nedge_relay_kind_rx_frames_total{kind="test"} 6\n');
    expect(after).toContain("\nedge_relay_metrics_ports_omitted 2\n");
    expect(renderMetrics(s, nets, totals.collect(nets), { ports: Infinity, networks: Infinity }).match(/^edge_relay_port_rx_frames_total\{/gm)).toHaveLength(5);
  });
});

/** A port that takes cut-through runs whole, recording each one (and single frames as RecordingPort does). */
class RunPort extends RecordingPort {
  readonly runs: Uint8Array[] = [];
  /** For each run: could it go on as the message it came in? */
  readonly asMessage: boolean[] = [];
  override readonly takesRuns = true;
  limit = Infinity;
  override get maxRun(): number {
    return this.limit;
  }
  override enqueueRun(block: Uint8Array, start: number, end: number, frames: number, message: boolean): boolean {
    this.runs.push(block.slice(start, end));
    this.asMessage.push(message);
    this.countRun(frames, end - start - 4 * frames, true);
    return true;
  }
}

const HEADER = Uint8Array.of(9, 9, 9);
const concat = (a: Uint8Array, b: Uint8Array) => {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
};

/** A port of batched messages (as a tunnel's) that records each message it sends. */
class MessagePort extends BatchedPort {
  readonly messages: Uint8Array[] = [];
  constructor() {
    super("msg", "peer", HEADER, 1 << 18);
  }
  protected reserve(): boolean {
    return true;
  }
  protected sendBatch(batch: FrameBatch): boolean {
    this.messages.push(batch.view().slice());
    batch.reset();
    return true;
  }
  protected override sendMessage(message: Uint8Array): boolean {
    this.messages.push(message.slice());
    return true;
  }
}

describe("Network cut-through (forwardRun)", () => {
  function runSetup() {
    let now = 1_000;
    const net = new Network("default", { ageingMs: 300_000, now: () => now });
    const ports = [new RunPort("p1"), new RunPort("p2"), new RunPort("p3")] as const;
    for (const p of ports) net.attach(p);
    // A behind p1, B behind p2, C behind p3.
    net.forward(makeFrame(BROADCAST, A), ports[0]);
    net.forward(makeFrame(BROADCAST, B), ports[1]);
    net.forward(makeFrame(BROADCAST, C), ports[2]);
    for (const p of ports) p.sent.length = 0;
    return { net, ports, advance: (ms: number) => (now += ms) };
  }
  /** A network of two ports, A learned behind the first (which takes runs) and B behind `second`. */
  function pair<P extends Port>(second: P, policy: Partial<SwitchPolicy> = {}) {
    const net = new Network("default", { ageingMs: 300_000, now: () => 1_000, ...policy });
    const p1 = new RunPort("p1");
    net.attach(p1);
    net.attach(second);
    net.forward(makeFrame(BROADCAST, A), p1);
    net.forward(makeFrame(BROADCAST, B), second);
    return { net, p1, p2: second };
  }
  const counts = (ports: readonly RunPort[]) => ports.map((p) => [p.stats.rxFrames, p.stats.rxBytes, p.stats.txFrames, p.stats.txBytes]);

  test("forwards a run of unicast frames to one learned port whole: sources refreshed, every frame counted in and out", () => {
    const { net, ports: [p1, p2, p3], advance } = runSetup();
    advance(5_000);
    const frames = [makeFrame(B, A, 46), makeFrame(B, A, 1500), makeFrame(B, A, 100)];
    const run = encodeFrames(frames);
    const before = counts([p1, p2, p3]);
    expect(net.forwardRun(run, 0, run.length, p1, false)).toBe(run.length);
    expect(p2.runs).toEqual([run]);
    expect([p1.runs.length, p3.runs.length, p1.sent.length, p2.sent.length, p3.sent.length]).toEqual([0, 0, 0, 0, 0]);
    const bytes = frames.reduce((n, f) => n + f.length, 0);
    expect(counts([p1, p2, p3])).toEqual([
      [before[0]![0]! + 3, before[0]![1]! + bytes, before[0]![2]!, before[0]![3]!],
      [before[1]![0]!, before[1]![1]!, before[1]![2]! + 3, before[1]![3]! + bytes],
      before[2]!,
    ]);
    // A was seen just now (refreshed by the run), B 5 s ago.
    const ages = Object.fromEntries(net.snapshot().macs.map((m) => [m.mac, m.age]));
    expect(ages[A]).toBe(0);
    expect(ages[B]).toBe(5);
  });

  test("stops before a frame cut off at the end of the block (a chunk's next frame, or a malformed message's tail for the decoder to refuse); only a message's run to its end may go on as that message", () => {
    const { net, ports: [p1, p2] } = runSetup();
    const whole = encodeFrames([makeFrame(B, A), makeFrame(B, A)]);
    const cut = new Uint8Array(3 + whole.length + 30);
    cut.set(whole, 3);
    cut.set(encodeFrames([makeFrame(B, A, 100)]).subarray(0, 30), 3 + whole.length);
    expect(net.forwardRun(cut, 3, cut.length, p1, true)).toBe(3 + whole.length);
    expect(net.forwardRun(cut, 3, 3 + whole.length, p1, true)).toBe(3 + whole.length);
    expect(net.forwardRun(cut, 3, 3 + whole.length, p1, false)).toBe(3 + whole.length);
    expect(p2.runs).toEqual([whole, whole, whole]);
    expect(p2.asMessage).toEqual([false, true, false]);
  });

  test("ends a run before the frame that would make it longer than the destination takes", () => {
    const { net, ports: [p1, p2] } = runSetup();
    const frames = [makeFrame(B, A, 100), makeFrame(B, A, 100), makeFrame(B, A, 100)];
    const run = encodeFrames(frames);
    p2.limit = 2 * (4 + 114) + 10;
    expect(net.forwardRun(run, 0, run.length, p1, false)).toBe(2 * (4 + 114));
    expect(net.forwardRun(run, 2 * (4 + 114), run.length, p1, false)).toBe(run.length);
    expect(p2.runs).toEqual([run.subarray(0, 2 * (4 + 114)), run.subarray(2 * (4 + 114))]);
    // Cut short, a message's run cannot go on as that message; a frame longer than the limit never goes as a run.
    expect(net.forwardRun(run, 0, run.length, p1, true)).toBe(2 * (4 + 114));
    expect(p2.asMessage).toEqual([false, false, false]);
    p2.limit = 100;
    expect(net.forwardRun(run, 0, run.length, p1, false)).toBe(0);
    expect(p2.runs.length).toBe(3);
  });

  test("a message-run leaves as the message it is with the port's header written over its own (behind a batch only when big); any other run is copied into the batch", () => {
    const { net, p1, p2 } = pair(new MessagePort());
    p2.flush(); // the broadcast's batch goes out
    p2.messages.length = 0;
    const asMessage = (run: Uint8Array) => {
      const message = concat(Uint8Array.of(1, 0, 7), run);
      expect(net.forwardRun(message, 3, message.length, p1, true)).toBe(message.length);
      return message;
    };
    const small = encodeFrames([makeFrame(B, A, 60), makeFrame(B, A, 70)]);
    const sent = asMessage(small); // nothing batched: sent as it is
    expect(p2.messages).toEqual([concat(HEADER, small)]);
    expect(sent.subarray(0, 3)).toEqual(HEADER);
    const first = makeFrame(B, A, 50);
    net.forward(first, p1); // batched
    asMessage(small); // small, behind a batch: copied into it
    expect(p2.messages.length).toBe(1);
    const big = encodeFrames(Array.from({ length: 12 }, () => makeFrame(B, A, 1486)));
    asMessage(big); // big: the batch goes first, then the message as it is
    expect(p2.messages.slice(1)).toEqual([concat(HEADER, concat(encodeFrames([first]), small)), concat(HEADER, big)]);
    expect(p2.stats.txFrames).toBe(1 + 2 + 1 + 2 + 12);
    expect(net.forwardRun(big, 0, big.length, p1, false)).toBe(big.length); // a chunk's run: batched
    expect(p2.messages.length).toBe(3);
    p2.flush();
    expect(p2.messages[3]).toEqual(concat(HEADER, big));
  });

  /** Frames that forwardRun leaves to forward(), each with what it is. */
  const offenders: [string, () => Uint8Array][] = [
    ["broadcast", () => makeFrame(BROADCAST, A)],
    ["unknown destination", () => makeFrame("02:00:00:00:00:0d", A)],
    ["destination behind the source's port", () => makeFrame(A, B)],
    ["unlearned source", () => makeFrame(B, "02:00:00:00:00:0e")],
    ["source learned on another port", () => makeFrame(B, C)],
    ["runt", () => new Uint8Array(MIN_FRAME - 1)],
    ["frame over MAX_FRAME", () => makeFrame(B, A, MAX_FRAME + 1 - 14)],
  ];

  test("leaves a run to forward() (forwarding and counting nothing) when its first frame is broadcast, to an unknown or same-port destination, from an unlearned source, a runt or oversize, or for a capture, an impairment or a port that takes no runs", () => {
    const cases: [string, (s: ReturnType<typeof runSetup>) => { run: Uint8Array; from?: Port }][] = [
      ...offenders.map(([what, frame]): (typeof cases)[number] => [what, () => ({ run: encodeFrames([frame(), makeFrame(B, A)]) })]),
      [
        "capture",
        ({ net }) => {
          net.addCapture(new Capture(net, { snaplen: 100 }, () => true, { count: 0, done() {} }));
          return { run: encodeFrames([makeFrame(B, A)]) };
        },
      ],
      [
        "impairment in",
        ({ ports: [p1] }) => {
          p1.impair("in", parseImpairment("delay 1ms"));
          return { run: encodeFrames([makeFrame(B, A)]) };
        },
      ],
      [
        "impairment out",
        ({ ports: [, p2] }) => {
          p2.impair("out", parseImpairment("loss 1%"));
          return { run: encodeFrames([makeFrame(B, A)]) };
        },
      ],
    ];
    for (const [what, make] of cases) {
      const s = runSetup();
      const { run } = make(s);
      const before = counts(s.ports);
      expect([what, s.net.forwardRun(run, 0, run.length, s.ports[0], false)]).toEqual([what, 0]);
      expect([what, counts(s.ports), s.ports.map((p) => p.runs.length + p.sent.length)]).toEqual([what, before, [0, 0, 0]]);
      for (const p of s.ports) p.impair("in", undefined), p.impair("out", undefined);
    }
    // A destination port that takes no runs.
    const { net, p1 } = pair(new RecordingPort("p2"));
    const run = encodeFrames([makeFrame(B, A)]);
    expect(net.forwardRun(run, 0, run.length, p1, false)).toBe(0);
  });

  test("hands on the frames before one it cannot take as a run and returns where it stopped, whatever that frame is", () => {
    for (const [what, frame] of offenders) {
      const { net, ports: [p1, p2, p3] } = runSetup();
      const prefix = encodeFrames([makeFrame(B, A, 100), makeFrame(B, A, 200), makeFrame(B, A, 300)]);
      const run = concat(prefix, encodeFrames([frame(), makeFrame(B, A)]));
      const before = counts([p1, p2, p3]);
      expect([what, net.forwardRun(run, 0, run.length, p1, true)]).toEqual([what, prefix.length]);
      expect([what, p2.runs, p2.asMessage]).toEqual([what, [prefix], [false]]);
      expect([what, p2.sent.length, p3.runs.length + p3.sent.length]).toEqual([what, 0, 0]);
      expect([what, counts([p1, p2])]).toEqual([
        what,
        [
          [before[0]![0]! + 3, before[0]![1]! + 600 + 3 * 14, before[0]![2]!, before[0]![3]!],
          [before[1]![0]!, before[1]![1]!, before[1]![2]! + 3, before[1]![3]! + 600 + 3 * 14],
        ],
      ]);
      // The callers ask again from there: the frame it cannot take comes back at once.
      expect([what, net.forwardRun(run, prefix.length, run.length, p1, false)]).toEqual([what, prefix.length]);
    }
  });

  test("a run to a second destination starts where the first ends: each goes to its port whole", () => {
    const { net, ports: [p1, p2, p3] } = runSetup();
    const toB = encodeFrames([makeFrame(B, A, 100), makeFrame(B, A, 100)]);
    const toC = encodeFrames([makeFrame(C, A, 100)]);
    const run = concat(toB, toC);
    expect(net.forwardRun(run, 0, run.length, p1, false)).toBe(toB.length);
    expect(net.forwardRun(run, toB.length, run.length, p1, false)).toBe(run.length);
    expect([p2.runs, p3.runs]).toEqual([[toB], [toC]]);
  });

  test("N unicast frames then a broadcast, as a caller forwards them (runs while they go, then frame by frame): the N go to their port as one run, the broadcast floods, and the port's message keeps their order", () => {
    class CountingMessagePort extends MessagePort {
      readonly runFrames: number[] = [];
      override enqueueRun(block: Uint8Array, start: number, end: number, frames: number, message: boolean): boolean {
        this.runFrames.push(frames);
        return super.enqueueRun(block, start, end, frames, message);
      }
    }
    const { net, p1, p2 } = pair(new CountingMessagePort());
    const p3 = new RunPort("p3");
    net.attach(p3);
    p2.flush();
    p2.messages.length = 0;
    const unicast = Array.from({ length: 5 }, (_, i) => makeFrame(B, A, 100 + i));
    const frames = [...unicast, makeFrame(BROADCAST, A, 80), makeFrame(B, A, 90)];
    const block = encodeFrames(frames);
    let at = 0;
    for (let next = net.forwardRun(block, at, block.length, p1, false); next !== at; next = net.forwardRun(block, at, block.length, p1, false)) at = next;
    expect(at).toBe(encodeFrames(unicast).length);
    for (const frame of frames.slice(unicast.length)) net.forward(frame, p1);
    p2.flush();
    expect(p2.runFrames).toEqual([5]);
    expect(p2.messages).toEqual([concat(HEADER, block)]);
    expect(p3.sent).toEqual([frames[5]!]);
    expect([p1.stats.rxFrames, p2.stats.txFrames, p3.stats.txFrames]).toEqual([1 + 7, 1 + 7, 1]);
  });

  test("port security still holds: a run from a source beyond --port-macs goes to forward(), which drops and counts it", () => {
    const { net, p1, p2 } = pair(new RunPort("p2"), { portMacs: 1 });
    const run = encodeFrames([makeFrame(B, C)]);
    expect(net.forwardRun(run, 0, run.length, p1, false)).toBe(0);
    net.forward(makeFrame(B, C), p1);
    expect(p1.stats.rxMacLimit).toBe(1);
    expect(p2.runs.length + p2.sent.length).toBe(1); // A's broadcast only
  });
});
