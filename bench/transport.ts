/**
 * One end of the `transport` bench case: tunnel-sized messages carried one way, flat out, over
 * one transport, to see what the transport itself costs a relay hop (run.ts measures the CPU).
 *
 *   bun bench/transport.ts recv <ws|wss|tls|tcp> [cert.pem]          → {"event":"listening","port":N}
 *   bun bench/transport.ts send <ws|wss|tls|tcp> <port> <bytes> [ca.pem] → {"event":"connected"}
 *
 * Commands on stdin, one a line: `go` (the sender starts), `count` (the receiver answers
 * {"event":"count","bytes":B,"messages":M}), `quit`.
 * ws/wss: one WebSocket message per tunnel message (Bun.serve ← Bun's WebSocket client, as the
 * hub and its sites). tls/tcp: a byte stream (Bun.listen ← Bun.connect), each message behind a
 * 4-byte length, the receiver walking the lengths as a stream tunnel's reader would.
 */
const [role, kind, ...rest] = process.argv.slice(2);
const HOST = "127.0.0.1";
const say = (event: object) => console.log(JSON.stringify(event));
if (!["ws", "wss", "tls", "tcp"].includes(kind ?? "")) throw new Error(`transport: unknown kind ${kind}; kinds: ws wss tls tcp`);

async function commands(on: Record<string, () => void>): Promise<void> {
  for await (const line of console) {
    const command = line.trim();
    if (command === "quit") process.exit(0);
    on[command]?.();
  }
  process.exit(0);
}

if (role === "recv") {
  const pem = rest[0] ? await Bun.file(rest[0]).text() : undefined;
  const tls = kind === "wss" || kind === "tls" ? { cert: pem!, key: pem! } : undefined;
  let bytes = 0;
  let messages = 0;
  let port: number;
  if (kind === "ws" || kind === "wss") {
    const server = Bun.serve({
      hostname: HOST,
      port: 0,
      tls,
      fetch: (req, srv) => (srv.upgrade(req, { data: undefined }) ? undefined : new Response("no", { status: 400 })),
      websocket: {
        perMessageDeflate: false,
        maxPayloadLength: 1 << 20,
        message(_ws, message) {
          bytes += message.length;
          messages++;
        },
      },
    });
    port = server.port!;
  } else {
    // The length of the message in progress still to come, and the bytes of a length prefix cut by a chunk.
    let left = 0;
    let prefix = 0;
    let prefixBytes = 0;
    const listener = Bun.listen({
      hostname: HOST,
      port: 0,
      tls,
      socket: {
        data(_s, chunk) {
          bytes += chunk.length;
          let i = 0;
          while (i < chunk.length) {
            if (left > 0) {
              const take = Math.min(left, chunk.length - i);
              left -= take;
              i += take;
              continue;
            }
            prefix = (prefix << 8) | chunk[i++]!;
            if (++prefixBytes === 4) {
              left = prefix >>> 0;
              prefix = prefixBytes = 0;
              messages++;
            }
          }
        },
      },
    });
    port = listener.port;
  }
  say({ event: "listening", port });
  await commands({ count: () => say({ event: "count", bytes, messages }) });
} else if (role === "send") {
  const [port, size, caFile] = rest;
  const ca = caFile ? await Bun.file(caFile).text() : undefined;
  const body = new Uint8Array(Number(size)).fill(0x5a);
  let go = false;
  if (kind === "ws" || kind === "wss") {
    const ws = new WebSocket(`${kind}://${HOST}:${port}/`, { perMessageDeflate: false, ...(ca && { tls: { ca } }) } as any);
    // The client has no drain event: send while little is buffered, look again a millisecond later.
    const pump = () => {
      while (ws.bufferedAmount < 4 << 20) ws.send(body);
      setTimeout(pump, 1);
    };
    ws.onopen = () => say({ event: "connected" });
    ws.onclose = () => process.exit(0);
    await commands({ go: () => !go && ((go = true), pump()) });
  } else {
    const message = new Uint8Array(4 + body.length);
    new DataView(message.buffer).setUint32(0, body.length);
    message.set(body, 4);
    let offset = 0;
    const pump = (socket: import("bun").Socket) => {
      for (;;) {
        const n = socket.write(message, offset, message.length - offset);
        if (n <= 0) return;
        offset += n;
        if (offset < message.length) return; // the rest on drain
        offset = 0;
      }
    };
    const socket = await Bun.connect({
      hostname: HOST,
      port: Number(port),
      ...(ca && { tls: { ca, serverName: "localhost" } }),
      socket: {
        open: () => say({ event: "connected" }),
        drain: (s) => go && pump(s),
        close: () => process.exit(0),
        data() {},
      },
    });
    await commands({ go: () => !go && ((go = true), pump(socket)) });
  }
} else throw new Error(`transport: unknown role ${role}; roles: recv send`);
