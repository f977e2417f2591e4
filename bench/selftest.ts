/**
 * `npx bun bench/selftest.ts`: checks that the sink really counts what it claims. Feeds a sink (a real
 * `peer.ts sink` process) frames in split chunks with one reordered, one duplicated and three
 * damaged ones (filler, seq, checksum), and expects exactly those counts back.
 */
import { GEN_MAC, HEADER, KIND_DATA, SINK_MAC, buildFrame } from "./frames.ts";

const proc = Bun.spawn([process.execPath, new URL("./peer.ts", import.meta.url).pathname, "sink", "--tcp-listen", "127.0.0.1:0"], {
  stdin: "pipe",
  stdout: "pipe",
  stderr: "inherit",
});
const reader = (proc.stdout as ReadableStream<Uint8Array>).getReader();
let buf = "";
async function event(name: string): Promise<any> {
  for (;;) {
    const i = buf.indexOf("\n");
    if (i >= 0) {
      const e = JSON.parse(buf.slice(0, i));
      buf = buf.slice(i + 1);
      if (e.event === name) return e;
      continue;
    }
    const { value, done } = await reader.read();
    if (done) throw new Error("sink exited");
    buf += new TextDecoder().decode(value);
  }
}
const { port } = await event("listening");

const seqs = [0, 1, 2, 3, 5, 4, 6, 6, 7, 8, 9, 10, 11];
const frames = seqs.map((s, i) => buildFrame(i % 2 ? 1500 : 66, SINK_MAC, GEN_MAC, KIND_DATA, s));
frames[9]![HEADER + 7]! ^= 0x10; // seq 8: filler bit flip
frames[10]![21]! ^= 0x01; // seq 9: seq bit flip
frames[11]![26]! ^= 0x80; // seq 10: checksum bit flip
const stream = new Uint8Array(frames.reduce((n, f) => n + 4 + f.length, 0));
let at = 0;
for (const f of frames) {
  new DataView(stream.buffer).setUint32(at, f.length);
  stream.set(f, at + 4);
  at += 4 + f.length;
}
const sock = await Bun.connect({ hostname: "127.0.0.1", port, socket: { data() {} } });
// Odd chunk sizes so frames and length prefixes are cut everywhere.
for (let i = 0; i < stream.length; ) {
  const n = [1, 3, 7, 500, 2, 1600][i % 6]!;
  sock.write(stream.subarray(i, i + n));
  i += n;
  await Bun.sleep(1);
}
await Bun.sleep(200);
(proc.stdin as import("bun").FileSink).write("report\n");
(proc.stdin as import("bun").FileSink).flush();
const r = await event("report");
proc.kill();
const want = { received: 13, reordered: 1, dup: 1, corrupt: 3 };
const got = { received: r.received, reordered: r.reordered, dup: r.dup, corrupt: r.corrupt };
const ok = JSON.stringify(want) === JSON.stringify(got);
console.log(ok ? "selftest ok" : "selftest FAILED", JSON.stringify(got));
process.exit(ok ? 0 : 1);
