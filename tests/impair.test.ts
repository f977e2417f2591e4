import { describe, expect, test } from "bun:test";
import { Impairment, type ImpairmentClock, MIN_FRAME, formatImpairment, parseImpairment } from "../relay.ts";
import { makeFrame, waitUntil } from "./helpers.ts";

const A = "02:00:00:00:00:0a";
const B = "02:00:00:00:00:0b";

/** A frame numbered `n` (a 32-bit counter just past the Ethernet header). */
function numbered(n: number, size = 46): Uint8Array {
  const frame = makeFrame(A, B, size);
  new DataView(frame.buffer).setUint32(MIN_FRAME, n);
  return frame;
}

function numberOf(frame: Uint8Array): number {
  return new DataView(frame.buffer, frame.byteOffset).getUint32(MIN_FRAME);
}

/** Time that moves only when told, and its timers, counted, so a test can see how many are pending. */
class FakeClock implements ImpairmentClock {
  t = 0;
  readonly timers = new Map<number, { at: number; fn: () => void }>();
  #serial = 0;
  maxPending = 0;
  set = 0;

  now(): number {
    return this.t;
  }
  setTimer(fn: () => void, ms: number): unknown {
    const id = ++this.#serial;
    this.timers.set(id, { at: this.t + ms, fn });
    this.set++;
    this.maxPending = Math.max(this.maxPending, this.timers.size);
    return id;
  }
  clearTimer(timer: unknown): void {
    this.timers.delete(timer as number);
  }
  /** Fires every timer due by `until`, in time order, with the clock at each one's time. */
  advance(until: number): void {
    for (;;) {
      let next: [number, { at: number; fn: () => void }] | undefined;
      for (const entry of this.timers) if (entry[1].at <= until && (!next || entry[1].at < next[1].at)) next = entry;
      if (!next) break;
      this.timers.delete(next[0]);
      this.t = Math.max(this.t, next[1].at);
      next[1].fn();
    }
    this.t = Math.max(this.t, until);
  }
}

/** An impairment on a fake clock that records what it delivers, and when. */
function harness(spec: string) {
  const clock = new FakeClock();
  const out: { frame: Uint8Array; at: number }[] = [];
  const impairment = new Impairment(parseImpairment(spec), (frame) => out.push({ frame, at: clock.t }), clock);
  return { clock, out, impairment };
}

function mean(xs: number[]): number {
  return xs.reduce((a, b) => a + b, 0) / xs.length;
}

function deviation(xs: number[]): number {
  const m = mean(xs);
  return Math.sqrt(xs.reduce((a, x) => a + (x - m) ** 2, 0) / (xs.length - 1));
}

/** Delays (ms) of `n` frames pushed 1 ms apart, by frame number. */
function delays(spec: string, n: number): number[] {
  const { clock, out, impairment } = harness(spec);
  for (let i = 0; i < n; i++) {
    clock.advance(i);
    impairment.push(numbered(i));
  }
  clock.advance(n + 70_000);
  expect(out.length).toBe(n);
  const got = new Array<number>(n);
  for (const { frame, at } of out) got[numberOf(frame)] = at - numberOf(frame);
  return got;
}

/** Which of `n` frames (pushed at once, no delay) came out: a loss pattern. */
function pattern(spec: string, n: number): boolean[] {
  const got = new Array<boolean>(n).fill(false);
  // Delivered inside push, uncopied: one buffer, read as it comes out.
  const impairment = new Impairment(parseImpairment(spec), (frame) => (got[numberOf(frame)] = true));
  const frame = numbered(0);
  for (let i = 0; i < n; i++) {
    new DataView(frame.buffer).setUint32(MIN_FRAME, i);
    impairment.push(frame);
  }
  return got;
}

describe("parseImpairment", () => {
  const forms: [string, string][] = [
    ["", ""],
    ["delay 50ms", "delay 50ms"],
    ["delay 1s", "delay 1s"],
    ["delay 250us", "delay 250us"],
    ["delay 0.5ms", "delay 500us"],
    ["delay 1.5s", "delay 1500ms"],
    ["delay 2sec 3msecs", "delay 2s 3ms"],
    ["delay 20USEC", "delay 20us"],
    ["delay 50", "delay 50ns"],
    ["delay 50ms 10ms", "delay 50ms 10ms"],
    ["delay 50ms 10ms 25%", "delay 50ms 10ms 25%"],
    ["delay 50ms 10ms 25", "delay 50ms 10ms 25%"],
    ["delay 50ms 0ms 25%", "delay 50ms 0ms 25%"],
    ["delay 50ms 10ms distribution normal", "delay 50ms 10ms distribution normal"],
    ["delay 50ms 10ms distribution uniform", "delay 50ms 10ms"],
    ["distribution pareto delay 50ms 10ms", "delay 50ms 10ms distribution pareto"],
    ["delay 50ms 10ms 5% distribution paretonormal", "delay 50ms 10ms 5% distribution paretonormal"],
    ["latency 5ms", "delay 5ms"],
    ["loss 30%", "loss 30%"],
    ["loss 0.1%", "loss 0.1%"],
    ["loss 30", "loss 30%"],
    ["loss 30% 25%", "loss 30% 25%"],
    ["loss random 5%", "loss 5%"],
    ["drop 5%", "loss 5%"],
    ["loss 0.0000001%", "loss 1e-7%"],
    ["loss gemodel 1%", "loss gemodel 1% 99% 100% 0%"],
    ["loss gemodel 1% 10%", "loss gemodel 1% 10% 100% 0%"],
    ["loss gemodel 1% 10% 50%", "loss gemodel 1% 10% 50% 0%"],
    ["loss gemodel 1% 10% 50% 2%", "loss gemodel 1% 10% 50% 2%"],
    ["duplicate 50%", "duplicate 50%"],
    ["duplicate 1 5", "duplicate 1% 5%"],
    ["delay 10ms reorder 25%", "delay 10ms reorder 25%"],
    ["delay 10ms reorder 25% 50% gap 5", "delay 10ms reorder 25% 50% gap 5"],
    ["gap 5 reorder 25% delay 10ms", "delay 10ms reorder 25% gap 5"],
    ["delay 10ms reorder 25% gap 1", "delay 10ms reorder 25%"],
    ["corrupt 0.1%", "corrupt 0.1%"],
    ["corrupt 5% 20%", "corrupt 5% 20%"],
    ["rate 10mbit", "rate 10mbit"],
    ["rate 512kbit", "rate 512kbit"],
    ["rate 1gbit", "rate 1gbit"],
    ["rate 1500bit", "rate 1500bit"],
    ["rate 1500", "rate 1500bit"],
    ["rate 1.5Mbit", "rate 1500kbit"],
    ["rate 100kbps", "rate 800kbit"],
    ["rate 1mbps", "rate 8mbit"],
    ["rate 1kibit", "rate 1024bit"],
    ["rate 10mbit limit 50", "rate 10mbit limit 50"],
    ["limit 50 rate 10mbit", "rate 10mbit limit 50"],
    ["limit 7", "limit 7"],
    ["seed 7", "seed 7"],
    ["seed 4294967295", "seed 4294967295"],
    [
      "  seed 1\tcorrupt 0.1  rate 10mbit duplicate 1% reorder 25% gap 5 loss 1% delay 50ms 10ms 25% distribution normal limit 500 ",
      "delay 50ms 10ms 25% distribution normal loss 1% duplicate 1% reorder 25% gap 5 corrupt 0.1% rate 10mbit limit 500 seed 1",
    ],
  ];
  test.each(forms)("reads %j, written back as %j", (input, canonical) => {
    const spec = parseImpairment(input);
    expect(formatImpairment(spec)).toBe(canonical);
    expect(parseImpairment(canonical)).toEqual(spec);
  });

  test("keeps the values, in netem's units", () => {
    expect(parseImpairment("delay 50ms 10ms 25% distribution normal")).toEqual({ delay: { timeNs: 50e6, jitterNs: 10e6, correlation: 25, distribution: "normal" } });
    expect(parseImpairment("delay 0.5ms").delay?.timeNs).toBe(500_000);
    expect(parseImpairment("loss gemodel 1%").loss).toEqual({ model: "gemodel", p: 1, r: 99, oneMinusH: 100, oneMinusK: 0 });
    expect(parseImpairment("delay 1ms reorder 25%").reorder).toEqual({ percent: 25, correlation: 0, gap: 1 });
    expect(parseImpairment("rate 100kbps").rate).toEqual({ bitsPerSecond: 800_000 });
    expect(parseImpairment("rate 2gibit").rate).toEqual({ bitsPerSecond: 2 * 1024 ** 3 });
    expect(parseImpairment("")).toEqual({});
  });

  const bad: [string, RegExp][] = [
    ["delya 50ms", /^Cannot parse impairment: "delya" is not a netem keyword \(delay, loss, duplicate, reorder, corrupt, rate, limit, seed\)$/],
    ["loss 130%", /^Cannot parse impairment: loss "130%" is not a percentage from 0 to 100$/],
    ["loss -1%", /loss "-1%" is not a percentage from 0 to 100/],
    ["loss 5%%", /loss "5%%" is not a percentage/],
    ["loss 1% 101%", /loss correlation "101%" is not a percentage/],
    ["loss", /loss needs a value, e.g. loss 1%/],
    ["loss gemodel x", /loss gemodel P "x" is not a percentage/],
    ["loss gemodel 1% 200%", /loss gemodel R "200%" is not a percentage/],
    ["loss gemodel 1% 10% 1000", /loss gemodel 1-H "1000" is not a percentage/],
    ["loss gemodel 1% 10% 100% 1.5.5", /loss gemodel 1-K "1.5.5" is not a percentage/],
    ["delay 50mz", /delay "50mz" is not a time/],
    ["delay fast", /delay "fast" is not a time/],
    ["delay 50ms 10xs", /delay jitter "10xs" is not a time/],
    ["delay 50ms 25%", /delay jitter "25%" is not a time/],
    ["delay 50ms 10ms 125%", /delay correlation "125%" is not a percentage/],
    ["delay 61s", /delay "61s" is longer than 60s/],
    ["delay 50ms delay 60ms", /"delay" is given twice/],
    ["delay 50ms latency 60ms", /"latency" is given twice/],
    ["delay 1ms 1ms distribution gaussian", /distribution "gaussian" is not one of uniform, normal, pareto, paretonormal/],
    ["delay 50ms distribution normal", /distribution needs a delay with jitter/],
    ["distribution normal", /distribution needs a delay with jitter/],
    ["reorder 25%", /reorder needs a delay/],
    ["delay 0ms 5ms reorder 25%", /reorder needs a delay/],
    ["delay 10ms gap 5", /gap needs reorder/],
    ["delay 10ms reorder 5% gap 0", /gap "0" is not a whole number from 1 to/],
    ["duplicate 50ms", /duplicate "50ms" is not a percentage/],
    ["corrupt", /corrupt needs a value/],
    ["rate 10mbt", /rate "10mbt" is not a rate/],
    ["rate 0", /rate "0" is not a rate above 0/],
    ["rate fast", /rate "fast" is not a rate/],
    ["rate 10mbit limit 0", /limit "0" is not a whole number from 1 to 100000/],
    ["limit 1.5", /limit "1.5" is not a whole number/],
    ["limit 100001", /limit "100001" is not a whole number from 1 to 100000/],
    ["seed -1", /seed "-1" is not a whole number from 0 to 4294967295/],
    ["seed 4294967296", /seed "4294967296" is not a whole number/],
    ["delay 10ms 10ms loss 1% bogus", /"bogus" is not a netem keyword/],
    ["loss 1% \u001b[31m", /"\\u001b\[31m" is not a netem keyword/],
  ];
  test.each(bad)("refuses %j in one line naming the word", (input, message) => {
    let error: unknown;
    try {
      parseImpairment(input);
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(RangeError);
    expect((error as Error).message).toMatch(message);
    expect((error as Error).message).not.toContain("\n");
  });
});

describe("Impairment", () => {
  test("without delay or rate, frames go through inside push, uncopied, with no timer", () => {
    const { clock, out, impairment } = harness("loss 0% duplicate 0% corrupt 0%");
    const frame = numbered(1);
    impairment.push(frame);
    expect(out.length).toBe(1);
    expect(out[0]!.frame).toBe(frame);
    expect(clock.set).toBe(0);
    expect(impairment.counters).toEqual({ delayed: 0, lost: 0, duplicated: 0, reordered: 0, corrupted: 0, rateDropped: 0, queued: 0 });
  });

  test("delay 50ms: every frame leaves exactly 50 ms after its push, in order, copied out of a reused buffer", () => {
    const { clock, out, impairment } = harness("delay 50ms");
    // One buffer, reused as a socket's would be: the impairment must have copied what it holds.
    const buffer = numbered(0);
    const pushed: number[] = [];
    for (let n = 0; n < 200; n++) {
      // Four bursts of 50, 3 ms apart.
      clock.advance(Math.floor(n / 50) * 3);
      new DataView(buffer.buffer).setUint32(MIN_FRAME, n);
      pushed.push(clock.t);
      impairment.push(buffer);
    }
    expect(impairment.counters.queued).toBe(200);
    clock.advance(52.999);
    expect([out.length, impairment.counters.queued]).toEqual([50, 150]);
    clock.advance(53);
    expect([out.length, impairment.counters.queued]).toEqual([100, 100]);
    clock.advance(60);
    expect(out.map((o) => numberOf(o.frame))).toEqual(pushed.map((_, n) => n));
    expect(out.map((o, n) => o.at - pushed[n]!)).toEqual(pushed.map(() => 50));
    expect(impairment.counters).toMatchObject({ delayed: 200, queued: 0 });
    expect(clock.maxPending).toBe(1);
  });

  test("delay 50ms on the real clock: no frame leaves early", async () => {
    const out: number[] = [];
    const impairment = new Impairment(parseImpairment("delay 50ms"), () => out.push(performance.now()));
    const pushed = performance.now();
    for (let n = 0; n < 3; n++) impairment.push(numbered(n));
    await waitUntil(() => out.length === 3, "3 frames", 2_000);
    for (const at of out) expect(at - pushed).toBeGreaterThanOrEqual(50);
  });

  test("delay 50ms 10ms distribution normal: mean 50 ms, standard deviation 10 ms", () => {
    const got = delays("delay 50ms 10ms distribution normal seed 1", 2_000);
    expect(Math.abs(mean(got) - 50)).toBeLessThan(1.5);
    expect(Math.abs(deviation(got) - 10)).toBeLessThan(1.5);
  });

  test("jitter follows the distribution asked for, within netem's bounds", () => {
    const uniform = delays("delay 50ms 10ms seed 2", 2_000);
    expect(Math.min(...uniform)).toBeGreaterThanOrEqual(40);
    expect(Math.max(...uniform)).toBeLessThanOrEqual(60);
    expect(Math.abs(mean(uniform) - 50)).toBeLessThan(1);
    // Uniform on ±10: standard deviation 10/√3.
    expect(Math.abs(deviation(uniform) - 10 / Math.sqrt(3))).toBeLessThan(0.6);
    // netem's pareto table: delay − 2/3·jitter to delay + 4·jitter, mean about the delay, a long right tail.
    const pareto = delays("delay 50ms 10ms distribution pareto seed 3", 2_000);
    expect(Math.min(...pareto)).toBeGreaterThanOrEqual(50 - 20 / 3 - 1e-9);
    expect(Math.max(...pareto)).toBeLessThanOrEqual(90 + 1e-9);
    expect(Math.abs(mean(pareto) - 50)).toBeLessThan(1.5);
    expect(pareto.filter((d) => d > 70).length).toBeGreaterThan(0);
    const paretonormal = delays("delay 50ms 10ms distribution paretonormal seed 4", 2_000);
    expect(Math.min(...paretonormal)).toBeGreaterThanOrEqual(50 - 15 - 1e-9);
    expect(Math.max(...paretonormal)).toBeLessThanOrEqual(90 + 1e-9);
    expect(Math.abs(mean(paretonormal) - 50)).toBeLessThan(1.5);
  });

  test("a delay drawn below 0 is 0: the frame goes at once", () => {
    const got = delays("delay 1ms 10ms distribution normal seed 5", 1_000);
    expect(Math.min(...got)).toBe(0);
    expect(got.filter((d) => d === 0).length).toBeGreaterThan(300);
  });

  test("delay correlation makes successive delays alike, as netem's does", () => {
    const lag1 = (xs: number[]) => {
      const m = mean(xs);
      let num = 0;
      let den = 0;
      for (let i = 0; i < xs.length; i++) {
        den += (xs[i]! - m) ** 2;
        if (i > 0) num += (xs[i]! - m) * (xs[i - 1]! - m);
      }
      return num / den;
    };
    expect(Math.abs(lag1(delays("delay 50ms 10ms seed 6", 2_000)))).toBeLessThan(0.1);
    expect(lag1(delays("delay 50ms 10ms 90% seed 6", 2_000))).toBeGreaterThan(0.8);
  });

  test("loss 30% seed 7: 30% ± 3 points of 10,000 frames, the same pattern for the same seed", () => {
    const first = pattern("loss 30% seed 7", 10_000);
    const lost = first.filter((delivered) => !delivered).length;
    expect(Math.abs(lost / 10_000 - 0.3)).toBeLessThan(0.03);
    expect(pattern("loss 30% seed 7", 10_000)).toEqual(first);
    expect(pattern("loss 30% seed 8", 10_000)).not.toEqual(first);
    const { impairment } = harness("loss 30% seed 7");
    for (let i = 0; i < 10_000; i++) impairment.push(numbered(i));
    expect(impairment.counters.lost).toBe(lost);
    expect(impairment.seed).toBe(7);
  });

  test("without a seed, each impairment draws its own", () => {
    const a = new Impairment(parseImpairment("loss 50%"), () => {});
    const b = new Impairment(parseImpairment("loss 50%"), () => {});
    expect(a.seed).not.toBe(b.seed);
  });

  /** Lengths of the runs of lost frames. */
  function bursts(delivered: boolean[]): number[] {
    const runs: number[] = [];
    let run = 0;
    for (const d of delivered) {
      if (!d) run++;
      else if (run > 0) runs.push(run), (run = 0);
    }
    if (run > 0) runs.push(run);
    return runs;
  }

  test("loss gemodel 1% 10%: bursts averaging 1/R = 10 frames", () => {
    const runs = bursts(pattern("loss gemodel 1% 10% seed 9", 100_000));
    expect(runs.length).toBeGreaterThan(500);
    expect(Math.abs(mean(runs) - 10) / 10).toBeLessThan(0.2);
    // Time in the bad state is 1% / (1% + 10%) of all.
    const lost = runs.reduce((a, b) => a + b, 0);
    expect(Math.abs(lost / 100_000 - 1 / 11)).toBeLessThan(0.015);
  });

  test("loss gemodel 1% 10% 50% 1%: loss in both states, still in bursts", () => {
    const delivered = pattern("loss gemodel 1% 10% 50% 1% seed 10", 100_000);
    const lost = delivered.filter((d) => !d).length;
    // Bad state 1/11 of the time losing half, good state 10/11 losing 1%.
    const expected = (1 / 11) * 0.5 + (10 / 11) * 0.01;
    expect(Math.abs(lost / 100_000 - expected) / expected).toBeLessThan(0.15);
    // Independent loss at that rate would almost never lose 4 in a row (p⁴ ≈ 1e-5 per frame).
    expect(bursts(delivered).filter((run) => run >= 4).length).toBeGreaterThan(20);
  });

  test("rate 10mbit: 20 Mbit/s offered for 2 s leaves at 10 Mbit/s, the excess past limit dropped and counted", () => {
    const { clock, out, impairment } = harness("rate 10mbit limit 100");
    // 1250-byte frames (10,000 bits) every 0.5 ms: 20 Mbit/s.
    let pushed = 0;
    let maxQueued = 0;
    for (let t = 0; t < 2_000; t += 0.5) {
      clock.advance(t);
      impairment.push(numbered(pushed++, 1250 - MIN_FRAME));
      maxQueued = Math.max(maxQueued, impairment.counters.queued);
    }
    clock.advance(2_000);
    const bits = out.length * 10_000;
    expect(Math.abs(bits / 2 / 10e6 - 1)).toBeLessThan(0.1);
    for (let i = 1; i < out.length; i++) expect(out[i]!.at - out[i - 1]!.at).toBeGreaterThanOrEqual(1 - 1e-9);
    const { rateDropped, queued, delayed } = impairment.counters;
    expect(maxQueued).toBe(100);
    expect(rateDropped).toBeGreaterThan(1_500);
    expect(out.length + rateDropped + queued).toBe(pushed);
    expect(delayed).toBe(pushed - rateDropped);
    // What was admitted all leaves, in order.
    clock.advance(3_000);
    expect(out.length).toBe(pushed - rateDropped);
    const numbers = out.map((o) => numberOf(o.frame));
    expect(numbers).toEqual(numbers.toSorted((a, b) => a - b));
  });

  test("rate without limit holds netem's 1000 frames; delay alone holds 100,000", () => {
    const rated = harness("rate 1mbit");
    for (let i = 0; i < 1_200; i++) rated.impairment.push(numbered(i));
    expect(rated.impairment.counters).toMatchObject({ queued: 1_000, rateDropped: 200 });
    const delayed = harness("delay 1s");
    const frame = numbered(0);
    for (let i = 0; i < 100_010; i++) delayed.impairment.push(frame);
    expect(delayed.impairment.counters).toMatchObject({ queued: 100_000, rateDropped: 10 });
    const limited = harness("delay 1s limit 10");
    for (let i = 0; i < 15; i++) limited.impairment.push(frame);
    expect(limited.impairment.counters).toMatchObject({ queued: 10, rateDropped: 5 });
  });

  test("the queue never holds more than 64 MiB", () => {
    const { impairment } = harness("delay 1s");
    const big = numbered(0, 65_536 - MIN_FRAME);
    for (let i = 0; i < 1_100; i++) impairment.push(big);
    expect(impairment.counters).toMatchObject({ queued: 1_024, rateDropped: 76 });
  });

  test("duplicate 50%: half the frames come twice, side by side", () => {
    const { out, impairment } = harness("duplicate 50% seed 11");
    for (let i = 0; i < 10_000; i++) impairment.push(numbered(i));
    expect(Math.abs(out.length / 10_000 - 1.5)).toBeLessThan(0.03);
    expect(impairment.counters.duplicated).toBe(out.length - 10_000);
    const numbers = out.map((o) => numberOf(o.frame));
    expect(new Set(numbers).size).toBe(10_000);
    expect(numbers).toEqual(numbers.toSorted((a, b) => a - b));
  });

  test("reorder 25% gap 5 with delay 10ms: some frames overtake, never two within 5", () => {
    const { clock, out, impairment } = harness("delay 10ms reorder 25% gap 5 seed 12");
    for (let i = 0; i < 2_000; i++) {
      clock.advance(i);
      impairment.push(numbered(i));
    }
    clock.advance(2_100);
    expect(out.length).toBe(2_000);
    const early = out.filter((o) => o.at === numberOf(o.frame)).map((o) => numberOf(o.frame));
    const late = out.filter((o) => o.at === numberOf(o.frame) + 10);
    expect(early.length + late.length).toBe(2_000);
    expect(impairment.counters.reordered).toBe(early.length);
    // 4 frames delayed after each reordered one, then each a 25% candidate: one in 8 on average.
    expect(Math.abs(early.length / 2_000 - 1 / 8)).toBeLessThan(0.03);
    for (let i = 1; i < early.length; i++) expect(early[i]! - early[i - 1]!).toBeGreaterThanOrEqual(5);
    const numbers = out.map((o) => numberOf(o.frame));
    expect(numbers).not.toEqual(numbers.toSorted((a, b) => a - b));
  });

  test("reorder 100% gap 5: every 5th frame is sent at once (netem's example)", () => {
    const { clock, out, impairment } = harness("delay 10ms reorder 100% gap 5");
    for (let i = 1; i <= 20; i++) impairment.push(numbered(i));
    expect(out.map((o) => numberOf(o.frame))).toEqual([5, 10, 15, 20]);
    clock.advance(10);
    expect(out.map((o) => numberOf(o.frame))).toEqual([5, 10, 15, 20, 1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13, 14, 16, 17, 18, 19]);
  });

  test("corrupt 100%: exactly one bit differs, never in the Ethernet header; the caller's frame is untouched", () => {
    const { out, impairment } = harness("corrupt 100% seed 13");
    const sent: Uint8Array[] = [];
    for (let i = 0; i < 1_000; i++) {
      const frame = numbered(i, 4 + ((i * 37) % 1_500));
      sent.push(frame.slice());
      impairment.push(frame);
      expect(frame).toEqual(sent[i]!);
    }
    const flippedAt = new Set<number>();
    for (const [i, { frame }] of out.entries()) {
      const original = sent[i]!;
      expect(frame.length).toBe(original.length);
      let bits = 0;
      for (let j = 0; j < frame.length; j++) {
        const diff = frame[j]! ^ original[j]!;
        if (diff === 0) continue;
        expect(j).toBeGreaterThanOrEqual(MIN_FRAME);
        flippedAt.add(j);
        bits += diff.toString(2).replaceAll("0", "").length;
      }
      expect(bits).toBe(1);
    }
    expect(flippedAt.size).toBeGreaterThan(100);
    expect(impairment.counters.corrupted).toBe(1_000);
    // Nothing past the header to flip: left alone, not counted.
    const header = makeFrame(A, B, 0);
    impairment.push(header);
    expect(out.at(-1)!.frame).toEqual(makeFrame(A, B, 0));
    expect(impairment.counters.corrupted).toBe(1_000);
  });

  test("one timer: 1,000 frames queued with jitter never have more than one timer pending", () => {
    const { clock, out, impairment } = harness("delay 100ms 50ms seed 14");
    for (let i = 0; i < 1_000; i++) {
      clock.advance(i * 0.01);
      impairment.push(numbered(i));
    }
    expect(impairment.counters.queued).toBe(1_000);
    expect(clock.timers.size).toBe(1);
    clock.advance(200);
    expect(out.length).toBe(1_000);
    expect(clock.maxPending).toBe(1);
    expect(clock.timers.size).toBe(0);
    // Released by release time, not arrival: jitter lets frames overtake, as in netem.
    const at = out.map((o) => o.at);
    expect(at).toEqual(at.toSorted((a, b) => a - b));
    const numbers = out.map((o) => numberOf(o.frame));
    expect(numbers).not.toEqual(numbers.toSorted((a, b) => a - b));
  });

  test("everything due goes in one pass of the timer", () => {
    const { clock, out, impairment } = harness("delay 10ms");
    for (let i = 0; i < 100; i++) {
      clock.advance(i * 0.001);
      impairment.push(numbered(i));
    }
    expect(clock.set).toBe(1);
    clock.t = 20;
    clock.advance(20);
    expect(out.length).toBe(100);
    expect(clock.set).toBe(1);
  });

  test("close() drops what is queued, cancels the timer, and takes nothing more", () => {
    const { clock, out, impairment } = harness("delay 10ms");
    for (let i = 0; i < 10; i++) impairment.push(numbered(i));
    impairment.close();
    expect(clock.timers.size).toBe(0);
    expect(impairment.counters.queued).toBe(0);
    impairment.push(numbered(11));
    clock.advance(100);
    expect(out.length).toBe(0);
    expect(impairment.counters).toEqual({ delayed: 10, lost: 0, duplicated: 0, reordered: 0, corrupted: 0, rateDropped: 0, queued: 0 });
  });

  test("a deliver that throws does not strand the frames behind it", () => {
    const clock = new FakeClock();
    const got: number[] = [];
    const impairment = new Impairment(parseImpairment("delay 10ms"), (frame) => {
      if (numberOf(frame) === 0) throw new Error("port gone");
      got.push(numberOf(frame));
    }, clock);
    for (let i = 0; i < 3; i++) impairment.push(numbered(i));
    expect(() => clock.advance(10)).toThrow("port gone");
    expect(clock.timers.size).toBe(1);
    clock.advance(10);
    expect(got).toEqual([1, 2]);
  });
});
