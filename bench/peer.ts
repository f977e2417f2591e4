/**
 * Bench peer: a QEMU-like endpoint speaking QEMU's stream framing (u32 BE length + frame) over TCP,
 * or one frame per UDP datagram. Run as a separate process so its CPU is not charged to the relays.
 *
 *   npx bun bench/peer.ts gen  (--tcp-connect H:P | --tcp-listen H:P | --udp-bind H:P --udp-to H:P)
 *                          [--size 1500] [--seconds 5] [--count N] [--rate FPS] [--batch-bytes 262144]
 *   npx bun bench/peer.ts sink (same transports) [--rate FPS]   (reads no faster than FPS frames/s)
 *   npx bun bench/peer.ts ping (same transports) [--samples 3000] [--warmup 300] [--size 64]
 *   npx bun bench/peer.ts vms  --tcp-connect H:P [--count 100]  (N idle VMs, one broadcast each)
 *   npx bun bench/peer.ts capture --url http://H:P/capture?network=NET  (reads the pcapng stream as fast
 *                          as it can; "report": bytes and packet blocks so far)
 *
 * Protocol with the driver (bench/run.ts): JSON events, one per stdout line
 * ({"event":"listening"|"ready"|"done"|"report",...}); commands, one per stdin line
 * ("start", "report", "reset", "quit").
 *
 * gen/ping print "ready" once they received the sink's announce frame (so every switch on the path
 * has learnt the sink's MAC), then wait for "start". The sink announces itself (src = its MAC,
 * dst = broadcast) every 200 ms until the first data frame arrives.
 */
import type { Socket, udp } from "bun";
import {
  BROADCAST,
  ETHERTYPE,
  GEN_MAC,
  HEADER,
  KIND_ANNOUNCE,
  KIND_DATA,
  KIND_PING,
  KIND_PONG,
  SINK_MAC,
  StreamDeframer,
  buildFrame,
  fillRandom,
  hashBytes,
  mac,
  mixSeq,
  stamp,
} from "./frames.ts";

// ---------------------------------------------------------------------------------------- options
const mode = process.argv[2];
const opts: Record<string, string> = {};
for (let i = 3; i < process.argv.length; i++) {
  const a = process.argv[i]!;
  if (!a.startsWith("--")) throw new Error(`unexpected argument ${a}`);
  opts[a.slice(2)] = process.argv[++i] ?? "";
}
const num = (k: string, d: number) => (opts[k] !== undefined ? Number(opts[k]) : d);
const hostPort = (s: string) => {
  const i = s.lastIndexOf(":");
  return { host: s.slice(0, i).replace(/^\[|\]$/g, ""), port: Number(s.slice(i + 1)) };
};
const now = () => performance.timeOrigin + performance.now(); // ms, comparable across processes
const emit = (event: string, data: object = {}) => console.log(JSON.stringify({ event, ...data }));
const fail = (msg: string) => {
  console.error(`peer ${mode}: ${msg}`);
  process.exit(1);
};

const myMac = opts.mac ? mac(opts.mac) : mode === "sink" ? SINK_MAC : GEN_MAC;
const peerMac = opts["peer-mac"] ? mac(opts["peer-mac"]) : mode === "sink" ? GEN_MAC : SINK_MAC;
const isUdp = opts["udp-bind"] !== undefined;

// ------------------------------------------------------------------------------------- transport
/** Minimal transport: deliver frames to `onFrame`, send single frames, expose the raw socket. */
interface Transport {
  sendFrame(f: Uint8Array): void;
  tcp?: Socket<any>;
  udp?: udp.Socket<"buffer">;
  udpTo?: { host: string; port: number };
}
let transport: Transport | undefined;
let onFrame: (buf: Uint8Array, start: number, len: number) => void = () => {};
let onDrain: () => void = () => {};
let onOpen: () => void = () => {};
/** Sink rate limiting hook, called after each TCP chunk. */
let afterChunk: (s: Socket<any>) => void = () => {};

const pendingSingles: Uint8Array[] = []; // small control frames that hit backpressure

function tcpHandlers() {
  const deframer = new StreamDeframer(
    (b, s, l) => onFrame(b, s, l),
    (m) => fail(m),
  );
  return {
    open(s: Socket<any>) {
      s.setNoDelay?.(true);
      if (transport?.tcp) {
        s.end(); // one peer at a time, like QEMU
        return;
      }
      transport = {
        tcp: s,
        sendFrame(f) {
          const rec = new Uint8Array(4 + f.length);
          new DataView(rec.buffer).setUint32(0, f.length);
          rec.set(f, 4);
          if (pendingSingles.length) return void pendingSingles.push(rec);
          const w = s.write(rec);
          if (w < rec.length) pendingSingles.push(rec.subarray(Math.max(w, 0)));
        },
      };
      onOpen();
    },
    data(s: Socket<any>, chunk: Uint8Array) {
      if (s !== transport?.tcp) return;
      deframer.push(chunk);
      afterChunk(s);
    },
    drain(s: Socket<any>) {
      while (pendingSingles.length) {
        const r = pendingSingles[0]!;
        const w = s.write(r);
        if (w < r.length) {
          pendingSingles[0] = r.subarray(Math.max(w, 0));
          return;
        }
        pendingSingles.shift();
      }
      onDrain();
    },
    close(s: Socket<any>) {
      if (s === transport?.tcp) {
        emit("closed");
        if (mode !== "vms") process.exit(0);
      }
    },
    error(_s: Socket<any>, e: Error) {
      fail(`socket error ${e}`);
    },
  };
}

async function openTransport() {
  if (opts["tcp-connect"]) {
    const { host, port } = hostPort(opts["tcp-connect"]);
    await Bun.connect({ hostname: host, port, socket: tcpHandlers() });
  } else if (opts["tcp-listen"]) {
    const { host, port } = hostPort(opts["tcp-listen"]);
    const server = Bun.listen({ hostname: host, port, socket: tcpHandlers() });
    emit("listening", { port: server.port });
  } else if (isUdp) {
    const { host, port } = hostPort(opts["udp-bind"]!);
    const to = hostPort(opts["udp-to"] ?? fail("--udp-to required"));
    const sock = await Bun.udpSocket({
      hostname: host,
      port,
      socket: {
        data(_s: unknown, buf: Uint8Array) {
          onFrame(buf, 0, buf.length);
        },
        drain() {
          onDrain();
        },
        error(this: unknown, e: unknown) {
          // ECONNREFUSED when nobody listens yet: keep going.
          void e;
        },
      } as any,
    });
    transport = {
      udp: sock,
      udpTo: to,
      sendFrame(f) {
        sock.send(f, to.port, to.host);
      },
    };
    emit("listening", { port: sock.port });
    onOpen();
  } else {
    fail("need --tcp-connect, --tcp-listen or --udp-bind");
  }
}

// ------------------------------------------------------------------------------------- commands
const commands: Record<string, () => void> = { quit: () => process.exit(0) };
async function readCommands() {
  for await (const line of console) {
    const cmd = line.trim();
    if (!cmd) continue;
    const f = commands[cmd];
    if (f) f();
    else console.error(`peer ${mode}: unknown command ${cmd}`);
  }
  process.exit(0); // driver went away
}

/** Frame classification shared by gen/ping: waits for the sink's announce. */
function sameMac(b: Uint8Array, off: number, m: Uint8Array) {
  for (let i = 0; i < 6; i++) if (b[off + i] !== m[i]) return false;
  return true;
}
function kindOf(b: Uint8Array, s: number, len: number) {
  if (len < HEADER || b[s + 12] !== ETHERTYPE >> 8 || b[s + 13] !== (ETHERTYPE & 255)) return 0;
  return (b[s + 14]! << 8) | b[s + 15]!;
}

// ------------------------------------------------------------------------------------------ gen
function runGen() {
  const size = num("size", 1500);
  if (size < HEADER || size > 69_632) fail(`bad --size ${size}`);
  const seconds = num("seconds", 5);
  const count = num("count", Infinity);
  const rate = num("rate", 0);
  const rec = isUdp ? size : 4 + size; // bytes per frame on the wire
  const batchBytes = num("batch-bytes", isUdp ? 64 * size : 256 * 1024);
  const K = Math.max(1, Math.floor(batchBytes / rec));
  const batch = new Uint8Array(K * rec);
  const view = new DataView(batch.buffer);
  const slotHash = new Float64Array(K);
  for (let i = 0; i < K; i++) {
    const f = i * rec + (isUdp ? 0 : 4);
    if (!isUdp) view.setUint32(i * rec, size);
    fillRandom(batch, f + HEADER, f + size);
    slotHash[i] = hashBytes(batch, f + HEADER, f + size);
    stamp(view, batch, f, size, peerMac, myMac, KIND_DATA, 0, slotHash[i]!);
  }
  let seq = 0; // next sequence number
  let sent = 0; // frames fully handed to the kernel
  let bytes = 0;
  let off = 0; // bytes of the current batch already written (TCP)
  let udpDone = 0; // frames of the current batch already sent (UDP)
  let inBatch = false;
  let t0 = 0;
  let paceT0 = 0;
  let t1 = 0;
  let deadline = Infinity;
  let running = false;
  let waiting = false; // for drain or a pacing timer
  let rx = 0;
  let announced = false;

  onFrame = (b, s, len) => {
    rx++;
    if (!announced && kindOf(b, s, len) === KIND_ANNOUNCE && sameMac(b, s + 6, peerMac)) {
      announced = true;
      emit("ready", { batchFrames: K });
    }
  };

  const fill = () => {
    const hdr = isUdp ? 0 : 4;
    for (let i = 0; i < K; i++) {
      const f = i * rec + hdr + 16;
      const hi = Math.floor(seq / 0x1_0000_0000) >>> 0;
      const lo = seq >>> 0;
      view.setUint32(f, hi);
      view.setUint32(f + 4, lo);
      view.setUint32(f + 8, mixSeq(slotHash[i]!, hi, lo, size));
      seq++;
    }
  };
  const udpArgs: any[] = [];

  const finish = () => {
    running = false;
    t1 = now();
    emit("done", { sent, bytes, t0, t1, seconds: (t1 - t0) / 1000, rx, fps: sent / ((t1 - t0) / 1000) });
  };

  const pump = () => {
    waiting = false;
    if (!running) return;
    let loops = 0;
    for (;;) {
      if (!inBatch) {
        if (sent >= count || now() >= deadline) return finish();
        if (rate > 0) {
          let allowed = (rate * (now() - paceT0)) / 1000;
          // Timers run late: catch up by at most ~4 ms of traffic (2 batches at least), never in
          // one long burst (UDP would lose it in the receiver's socket buffer).
          const maxLag = Math.max(2 * K, rate * 0.004);
          if (allowed - sent > maxLag) {
            paceT0 += ((allowed - sent - maxLag) / rate) * 1000;
            allowed = sent + maxLag;
          }
          if (sent >= allowed) {
            waiting = true;
            setTimeout(pump, 1);
            return;
          }
        }
        fill();
        inBatch = true;
        off = 0;
        udpDone = 0;
      }
      if (isUdp) {
        const u = transport!.udp!;
        const args = udpDone === 0 ? udpArgs : udpArgs.slice(udpDone * 3);
        const n = u.sendMany(args);
        udpDone += n;
        if (udpDone < K) {
          waiting = true;
          setTimeout(pump, 0);
          return;
        }
      } else {
        const w = transport!.tcp!.write(off === 0 ? batch : batch.subarray(off));
        if (w < 0) return fail("write after close");
        off += w;
        if (off < batch.length) {
          waiting = true; // resumed by drain
          return;
        }
      }
      inBatch = false;
      sent += K;
      bytes += K * size;
      if (++loops >= 32) {
        waiting = true;
        setImmediate(pump);
        return;
      }
    }
  };
  onDrain = () => {
    if (running && waiting && !isUdp) pump();
  };

  commands.start = () => {
    if (running) return;
    if (isUdp) {
      const { host, port } = transport!.udpTo!;
      udpArgs.length = 0;
      for (let i = 0; i < K; i++) udpArgs.push(batch.subarray(i * rec, i * rec + size), port, host);
    }
    running = true;
    t0 = paceT0 = now();
    deadline = t0 + seconds * 1000;
    pump();
  };
  commands.stop = () => {
    deadline = 0;
  };
}

// ----------------------------------------------------------------------------------------- sink
function runSink() {
  const rate = num("rate", 0);
  let received = 0; // data frames, corrupt ones included
  let bytes = 0;
  let reordered = 0;
  let dup = 0;
  let corrupt = 0;
  let other = 0;
  let pings = 0;
  let maxSeq = -1;
  let first = 0;
  let last = 0;
  let budgetStart = 0;
  let announcing: ReturnType<typeof setInterval> | undefined;

  const announce = () => transport?.sendFrame(buildFrame(64, BROADCAST, myMac, KIND_ANNOUNCE, 0));
  onOpen = () => {
    announce();
    announcing = setInterval(announce, 200);
    emit("ready");
  };

  onFrame = (b, s, len) => {
    const kind = kindOf(b, s, len);
    if (kind === KIND_PING && sameMac(b, s, myMac)) {
      // Echo: same payload, MACs swapped.
      const f = b.slice(s, s + len);
      f.set(b.subarray(s + 6, s + 12), 0);
      f.set(myMac, 6);
      f[15] = KIND_PONG;
      pings++;
      transport!.sendFrame(f);
      return;
    }
    if (kind !== KIND_DATA || !sameMac(b, s, myMac) || !sameMac(b, s + 6, peerMac)) {
      if (kind === KIND_DATA) {
        received++; // a data frame with damaged addresses
        corrupt++;
      } else other++;
      return;
    }
    const t = now();
    if (received === 0) {
      first = t;
      budgetStart = t;
      if (announcing) clearInterval(announcing);
      announcing = undefined;
    }
    last = t;
    received++;
    bytes += len;
    const hi = ((b[s + 16]! << 24) | (b[s + 17]! << 16) | (b[s + 18]! << 8) | b[s + 19]!) >>> 0;
    const lo = ((b[s + 20]! << 24) | (b[s + 21]! << 16) | (b[s + 22]! << 8) | b[s + 23]!) >>> 0;
    const ck = ((b[s + 24]! << 24) | (b[s + 25]! << 16) | (b[s + 26]! << 8) | b[s + 27]!) >>> 0;
    if (mixSeq(hashBytes(b, s + HEADER, s + len), hi, lo, len) !== ck) {
      corrupt++;
      return;
    }
    const seq = hi * 0x1_0000_0000 + lo;
    if (seq < maxSeq) reordered++;
    else if (seq === maxSeq) dup++;
    else maxSeq = seq;
  };

  if (rate > 0) {
    // Read no faster than `rate` frames/s: pause the socket (the kernel buffer then fills and the
    // sender sees backpressure) and resume when the budget allows. UDP: frames are dropped by the
    // kernel instead, which is what a slow QEMU does too.
    let paused = false;
    afterChunk = (s) => {
      if (paused || received === 0) return;
      const ahead = received - (rate * (now() - budgetStart)) / 1000;
      if (ahead > 0) {
        paused = true;
        s.pause();
        setTimeout(
          () => {
            paused = false;
            s.resume();
          },
          Math.max(1, (ahead / rate) * 1000),
        );
      }
    };
  }

  commands.report = () =>
    emit("report", {
      received,
      bytes,
      reordered,
      dup,
      corrupt,
      other,
      pings,
      maxSeq,
      first,
      last,
      seconds: (last - first) / 1000,
      fps: received > 1 ? (received - 1) / ((last - first) / 1000) : 0,
    });
  commands.reset = () => {
    received = bytes = reordered = dup = corrupt = other = pings = 0;
    maxSeq = -1;
    first = last = 0;
  };
}

// ----------------------------------------------------------------------------------------- ping
function runPing() {
  const size = num("size", 64);
  const samples = num("samples", 3000);
  const warmup = num("warmup", 300);
  const timeoutMs = num("timeout-ms", 1000);
  const frame = buildFrame(size, peerMac, myMac, KIND_PING, 0);
  const view = new DataView(frame.buffer);
  const fillerHash = hashBytes(frame, HEADER, size);
  const rtts: number[] = [];
  let seq = 0;
  let sentAt = 0;
  let lost = 0;
  let running = false;
  let announced = false;
  let timer: ReturnType<typeof setTimeout> | undefined;

  const send = () => {
    seq++;
    stamp(view, frame, 0, size, peerMac, myMac, KIND_PING, seq, fillerHash);
    sentAt = performance.now();
    if (timer) clearTimeout(timer);
    timer = setTimeout(() => {
      lost++;
      send();
    }, timeoutMs);
    transport!.sendFrame(frame);
  };
  const done = () => {
    running = false;
    if (timer) clearTimeout(timer);
    const us = rtts.map((r) => (r * 1000) / 2).sort((a, b) => a - b);
    const q = (p: number) => us[Math.min(us.length - 1, Math.floor(p * us.length))]!;
    emit("done", { samples: us.length, lost, p50: q(0.5), p90: q(0.9), p99: q(0.99), max: us[us.length - 1], oneWayUs: true });
  };
  onFrame = (b, s, len) => {
    const kind = kindOf(b, s, len);
    if (!announced && kind === KIND_ANNOUNCE && sameMac(b, s + 6, peerMac)) {
      announced = true;
      emit("ready");
      return;
    }
    if (!running || kind !== KIND_PONG || !sameMac(b, s, myMac)) return;
    const lo = ((b[s + 20]! << 24) | (b[s + 21]! << 16) | (b[s + 22]! << 8) | b[s + 23]!) >>> 0;
    if (lo !== seq >>> 0) return; // a late reply to a timed-out ping
    const rtt = performance.now() - sentAt;
    if (seq > warmup + lost) rtts.push(rtt);
    if (rtts.length >= samples) return done();
    send();
  };
  commands.start = () => {
    running = true;
    send();
  };
}

// ------------------------------------------------------------------------------------------ vms
/** N idle "VMs": each connects, sends one broadcast frame from its own MAC, then reads and discards. */
async function runVms() {
  const n = num("count", 100);
  const { host, port } = hostPort(opts["tcp-connect"] ?? fail("--tcp-connect required"));
  const socks: Socket<any>[] = [];
  let rx = 0;
  for (let i = 0; i < n; i++) {
    const m = Uint8Array.of(0x02, 0, 0, 1, (i >> 8) & 255, i & 255);
    const f = buildFrame(64, BROADCAST, m, KIND_ANNOUNCE, i);
    const rec = new Uint8Array(4 + f.length);
    new DataView(rec.buffer).setUint32(0, f.length);
    rec.set(f, 4);
    socks.push(
      await Bun.connect({
        hostname: host,
        port,
        socket: {
          open(s) {
            s.write(rec);
          },
          data(_s, c) {
            rx += c.length;
          },
          close() {},
          error(_s, e) {
            fail(`vm ${i}: ${e}`);
          },
        },
      }),
    );
  }
  emit("ready", { count: n });
  commands.report = () => emit("report", { rxBytes: rx, open: socks.filter((s) => s.readyState === WebSocket.OPEN).length });
}

// -------------------------------------------------------------------------------------- capture
/**
 * A live-capture client: GET the pcapng stream and read it as fast as it can, counting bytes and
 * Enhanced Packet Blocks (type 6) by walking the block lengths, which costs nothing per byte.
 */
async function runCapture() {
  const url = opts.url ?? fail("--url required");
  const res = await fetch(url);
  if (!res.ok || !res.body) fail(`GET ${url}: ${res.status}`);
  let bytes = 0;
  let packets = 0;
  let blocks = 0;
  let chunks = 0;
  let ended = false;
  // Block walk: `skip` bytes left of the current block; `head` collects a block's first 8 bytes.
  let skip = 0;
  const head = new Uint8Array(8);
  const dv = new DataView(head.buffer);
  let headLen = 0;
  commands.report = () => emit("report", { bytes, packets, blocks, chunks, ended });
  emit("ready");
  const reader = res.body!.getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    chunks++;
    bytes += value.length;
    let i = 0;
    while (i < value.length) {
      if (skip > 0) {
        const n = Math.min(skip, value.length - i);
        skip -= n;
        i += n;
        continue;
      }
      const n = Math.min(8 - headLen, value.length - i);
      head.set(value.subarray(i, i + n), headLen);
      headLen += n;
      i += n;
      if (headLen < 8) break;
      headLen = 0;
      // The relay writes little-endian sections.
      const type = dv.getUint32(0, true);
      const len = dv.getUint32(4, true);
      if (len < 12 || len % 4) fail(`bad pcapng block length ${len} at byte ${bytes - value.length + i - 8}`);
      blocks++;
      if (type === 6) packets++;
      skip = len - 8;
    }
  }
  ended = true;
}

// ----------------------------------------------------------------------------------------- main
switch (mode) {
  case "gen":
    runGen();
    break;
  case "sink":
    runSink();
    break;
  case "ping":
    runPing();
    break;
  case "vms":
    await runVms();
    break;
  case "capture":
    void runCapture().catch((e) => fail(String(e)));
    break;
  default:
    fail(`usage: npx bun bench/peer.ts gen|sink|ping|vms|capture [options] (got ${mode})`);
}
if (mode !== "vms" && mode !== "capture") await openTransport();
void readCommands();
