import { describe, expect, test } from "bun:test";
import { MIN_FRAME, Network, Port } from "../relay.ts";
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
