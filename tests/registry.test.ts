import { describe, expect, test } from "bun:test";
import { Network, NetworkRegistry, Port, type SwitchPolicy } from "../relay.ts";

/** A port with nowhere to send: the registry only counts who is attached. */
class IdlePort extends Port {
  constructor(kind: string) {
    super(kind, "test");
  }
  protected enqueue(): boolean {
    return true;
  }
}

/** One event-loop turn: the registry releases vacated networks once per turn. */
const turn = () => new Promise<void>((resolve) => setImmediate(resolve));

function setup(maxNetworks = 4) {
  const policy: SwitchPolicy = { ageingMs: 300_000 };
  const made: string[] = [];
  const released: string[] = [];
  const registry = new NetworkRegistry(policy, maxNetworks, { made: (n) => made.push(n.name), released: (n) => released.push(n.name) });
  return { policy, registry, made, released };
}

describe("NetworkRegistry", () => {
  test("getOrCreate makes a network once, with the registry's policy, and tells of it once", () => {
    const { registry, made } = setup();
    const lab = registry.getOrCreate("lab");
    expect(lab).toBeInstanceOf(Network);
    expect(registry.getOrCreate("lab")).toBe(lab);
    expect(registry.get("lab")).toBe(lab);
    expect(registry.get("dev")).toBeUndefined();
    expect([registry.size, made]).toEqual([1, ["lab"]]);
  });

  test("a network a peer brought goes when its last port other than the uplink and the backplane leaves", async () => {
    const { registry, released } = setup();
    const lab = registry.forPeer("lab") as Network;
    const tunnel = new IdlePort("tunnel");
    const uplink = new IdlePort("uplink");
    lab.attach(tunnel);
    lab.attach(uplink);
    await turn();
    expect(registry.get("lab")).toBe(lab);
    lab.detach(tunnel);
    await turn();
    expect(registry.get("lab")).toBeUndefined();
    expect(released).toEqual(["lab"]);
  });

  test("a network made for a peer that then attaches nothing goes after one turn", async () => {
    const { registry, released } = setup();
    expect(registry.forPeer("lab")).toBeInstanceOf(Network);
    expect(registry.size).toBe(1);
    await turn();
    expect([registry.size, released]).toEqual([0, ["lab"]]);
  });

  test("the local ports' networks stay when their ports go; a peer's existing network is shared", async () => {
    const { registry, released } = setup();
    const lab = registry.getOrCreate("lab");
    registry.keepAll();
    expect(registry.forPeer("lab")).toBe(lab);
    const port = new IdlePort("qemu-listen");
    lab.attach(port);
    lab.detach(port);
    await turn();
    expect([registry.get("lab"), released]).toEqual([lab, []]);
  });

  test("a peer gets no new network past --max-networks, and the refusal says why; local ports still do", () => {
    const { registry } = setup(2);
    registry.getOrCreate("a");
    registry.getOrCreate("b");
    expect(registry.forPeer("c")).toEqual({ refused: "this relay has the maximum of 2 networks" });
    expect(registry.forPeer("a")).toBe(registry.get("a")!);
    expect(registry.getOrCreate("d").name).toBe("d");
    expect([...registry.values()].map((n) => n.name)).toEqual(["a", "b", "d"]);
  });

  test("nothing is released while the relay stops", async () => {
    const { policy, registry, released } = setup();
    const lab = registry.forPeer("lab") as Network;
    policy.stopping = true;
    await turn();
    expect([registry.get("lab"), released]).toEqual([lab, []]);
  });

  test("ports() walks every port of every network", () => {
    const { registry } = setup();
    const [p, q] = [new IdlePort("tunnel"), new IdlePort("v86")];
    registry.getOrCreate("a").attach(p);
    registry.getOrCreate("b").attach(q);
    expect([...registry.ports()]).toEqual([p, q]);
  });
});
