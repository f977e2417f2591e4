import { describe, expect, test } from "bun:test";

const fixture = new URL("./fixtures/multicast-scenario.ts", import.meta.url).pathname;
// Multicast runs only inside a network namespace the test makes; that needs root and iproute2.
// Without them the test is skipped with a line saying why, except in CI (root), where it must run.
const missing = process.getuid?.() !== 0 ? "root (to make a network namespace)" : Bun.which("ip") === null ? "iproute2's ip" : undefined;
if (missing !== undefined && !process.env.CI) console.warn(`skipped: the --qemu-mcast test needs ${missing}`);
const needNetns = missing === undefined || process.env.CI ? test : test.skip;

describe("--qemu-mcast", () => {
  needNetns("bridges a QEMU multicast segment through a hub, dropping its own looped-back copies", async () => {
    const ns = `edge-relay-test-${process.pid}`;
    await Bun.$`ip netns add ${ns}`;
    try {
      await Bun.$`ip -n ${ns} link set lo up`;
      await Bun.$`ip -n ${ns} route add 224.0.0.0/4 dev lo`;
      const proc = Bun.spawn(["ip", "netns", "exec", ns, process.execPath, fixture], { stdout: "pipe", stderr: "pipe" });
      const [stdout, stderr, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
      expect({ stdout, stderr, code }).toEqual({ stdout: "multicast scenario ok\n", stderr: "", code: 0 });
    } finally {
      await Bun.$`ip netns del ${ns}`.nothrow();
    }
  });
});
