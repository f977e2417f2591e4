/**
 * A small TCP proxy for the chaos test: it listens on a port of its own (stable for the whole test)
 * and forwards each connection to wherever `target()` says the upstream is *now*, so a hub that was
 * killed can come back on any port. It can misbehave on demand:
 *
 * - `cut()`: reset every current connection, both ends at once;
 * - `refuseFor(ms)`: new connections are reset as soon as they are accepted;
 * - `blackholeFor(ms)`: new connections are accepted and then never answered nor forwarded, like a
 *   load balancer with a dead backend. They stay open after the window ends (a dead backend does
 *   not tell anyone either); only `cut()` or `close()` ends them;
 * - `stall()`: every current connection stops forwarding in both directions, silently and for
 *   good, without closing (a path that died: NAT rebinding, a pulled cable); new ones pass;
 * - `delayFor(ms, delayMs)`: every byte forwarded in either direction waits `delayMs` first, order
 *   preserved (bytes queued behind a delayed chunk never overtake it).
 *
 * Backpressure is passed on: a direction that has more than HIGH_WATER bytes waiting pauses its
 * source until it is below LOW_WATER again, so a stopped peer cannot make the proxy buffer without
 * bound.
 */
import type { Socket, TCPSocketListener } from "bun";

const HIGH_WATER = 1 << 20;
const LOW_WATER = 256 << 10;

export interface ProxyStats {
  accepted: number;
  forwarded: number;
  refused: number;
  blackholed: number;
  cut: number;
  /** Upstream dials that failed (no upstream right now, or it refused). */
  upstreamFailed: number;
}

type End = { conn: Conn; side: "down" | "up" } | { held: true };

/** One direction of a connection: chunks released in order, none before its due time. */
class Lane {
  target: Socket<End> | undefined;
  /** The source ended: end the target once everything queued is written. */
  ending = false;
  #chunks: { due: number; bytes: Uint8Array }[] = [];
  #bytes = 0;
  #lastDue = 0;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #blocked = false;
  #pausedSource = false;

  constructor(private readonly source: () => Socket<End> | undefined) {}

  push(bytes: Uint8Array, delayMs: number): void {
    const due = Math.max(performance.now() + delayMs, this.#lastDue);
    this.#lastDue = due;
    this.#chunks.push({ due, bytes });
    this.#bytes += bytes.length;
    if (this.#bytes > HIGH_WATER && !this.#pausedSource) {
      this.#pausedSource = true;
      this.source()?.pause();
    }
    if (this.#timer === undefined) this.pump();
  }

  /** Writes whatever is due; sets a timer for the next chunk that is not. */
  pump(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    const target = this.target;
    if (target === undefined || this.#blocked) return;
    while (this.#chunks.length > 0) {
      const head = this.#chunks[0]!;
      const wait = head.due - performance.now();
      if (wait > 0) {
        this.#timer = setTimeout(() => this.pump(), wait);
        return;
      }
      const n = target.write(head.bytes);
      if (n < 0) return; // the target is closed; its close handler tidies up
      this.#bytes -= n;
      if (n < head.bytes.length) {
        head.bytes = head.bytes.subarray(n);
        this.#blocked = true;
        return;
      }
      this.#chunks.shift();
      if (this.#pausedSource && this.#bytes < LOW_WATER) {
        this.#pausedSource = false;
        this.source()?.resume();
      }
    }
    if (this.ending) target.end();
  }

  drain(): void {
    this.#blocked = false;
    this.pump();
  }

  discard(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#chunks = [];
    this.#bytes = 0;
  }
}

/** A forwarded connection: `down` is the client that dialled us, `up` our dial to the target. */
class Conn {
  up: Socket<End> | undefined;
  readonly toUp: Lane;
  readonly toDown: Lane;
  /** Reset, or both ends closed: nothing more to do. */
  done = false;
  /** The path died: bytes from either end are dropped. */
  stalled = false;
  readonly #gone = { down: false, up: false };

  constructor(readonly down: Socket<End>) {
    this.toUp = new Lane(() => this.down);
    this.toDown = new Lane(() => this.up);
    this.toDown.target = down;
  }

  /** Resets both ends now, dropping whatever is queued. */
  terminate(): void {
    if (this.done) return;
    this.done = true;
    this.toUp.discard();
    this.toDown.discard();
    this.down.terminate();
    this.up?.terminate();
  }

  /**
   * One end closed: pass the rest of its bytes on, then end the other end (a FIN, as TCP would).
   * Returns true once the connection is finished with.
   */
  ended(side: "down" | "up"): boolean {
    this.#gone[side] = true;
    if (this.done) return true;
    if (this.#gone.down && this.#gone.up) {
      this.done = true;
      return true;
    }
    // A dead path tells the other end nothing: it stays open until cut or closed.
    if (this.stalled) return false;
    const lane = side === "down" ? this.toUp : this.toDown;
    if (lane.target === undefined) {
      // the upstream dial is still under way: nothing can be delivered
      this.terminate();
      return true;
    }
    lane.ending = true;
    lane.pump();
    return false;
  }
}

export class ChaosProxy implements AsyncDisposable {
  readonly stats: ProxyStats = { accepted: 0, forwarded: 0, refused: 0, blackholed: 0, cut: 0, upstreamFailed: 0 };
  readonly #conns = new Set<Conn>();
  readonly #held = new Set<Socket<End>>();
  readonly #listener: TCPSocketListener<End>;
  #refuseUntil = 0;
  #blackholeUntil = 0;
  #delayUntil = 0;
  #delayMs = 0;

  /** `target()`: the upstream port now, or undefined when there is none (connections are then reset). */
  constructor(private readonly target: () => number | undefined) {
    const proxy = this;
    this.#listener = Bun.listen<End>({
      hostname: "127.0.0.1",
      port: 0,
      socket: {
        open(socket) {
          proxy.#accept(socket);
        },
        data(socket, chunk) {
          const end = socket.data;
          if (end && "conn" in end && !end.conn.stalled) end.conn.toUp.push(chunk, proxy.#delay());
        },
        drain(socket) {
          const end = socket.data;
          if (end && "conn" in end) end.conn.toDown.drain();
        },
        close(socket) {
          proxy.#closed(socket);
        },
        error(socket) {
          proxy.#closed(socket);
        },
      },
    });
  }

  get port(): number {
    return this.#listener.port;
  }

  /** Connections held by a blackhole right now. */
  get held(): number {
    return this.#held.size;
  }

  /** Connections forwarded right now. */
  get open(): number {
    return this.#conns.size;
  }

  /** A one-line description of the modes in force, for failure messages. */
  describe(): string {
    const now = performance.now();
    const modes = [
      now < this.#refuseUntil && "refusing",
      now < this.#blackholeUntil && "blackholing",
      now < this.#delayUntil && `delaying ${this.#delayMs} ms`,
    ].filter(Boolean);
    return `proxy :${this.port} ${modes.join(", ") || "passing"}; ${this.open} open, ${this.held} held in a blackhole; ${JSON.stringify(this.stats)}`;
  }

  cut(): number {
    let n = 0;
    for (const conn of this.#conns) {
      conn.terminate();
      n++;
    }
    for (const socket of this.#held) {
      socket.terminate();
      n++;
    }
    this.#conns.clear();
    this.#held.clear();
    this.stats.cut += n;
    return n;
  }

  /** Stalls every connection open now (see the top); returns how many. */
  stall(): number {
    for (const conn of this.#conns) conn.stalled = true;
    return this.#conns.size;
  }

  refuseFor(ms: number): void {
    this.#refuseUntil = Math.max(this.#refuseUntil, performance.now() + ms);
  }

  blackholeFor(ms: number): void {
    this.#blackholeUntil = Math.max(this.#blackholeUntil, performance.now() + ms);
  }

  delayFor(ms: number, delayMs: number): void {
    this.#delayUntil = Math.max(this.#delayUntil, performance.now() + ms);
    this.#delayMs = delayMs;
  }

  /** Ends every misbehaviour window (connections already held by a blackhole stay held). */
  behave(): void {
    this.#refuseUntil = this.#blackholeUntil = this.#delayUntil = 0;
  }

  #delay(): number {
    return performance.now() < this.#delayUntil ? this.#delayMs : 0;
  }

  #accept(down: Socket<End>): void {
    this.stats.accepted++;
    const now = performance.now();
    if (now < this.#refuseUntil) {
      this.stats.refused++;
      down.data = { held: true };
      down.terminate();
      return;
    }
    if (now < this.#blackholeUntil) {
      this.stats.blackholed++;
      down.data = { held: true };
      this.#held.add(down);
      return;
    }
    const port = this.target();
    if (port === undefined) {
      this.stats.upstreamFailed++;
      down.data = { held: true };
      down.terminate();
      return;
    }
    const conn = new Conn(down);
    down.data = { conn, side: "down" };
    this.#conns.add(conn);
    this.stats.forwarded++;
    const proxy = this;
    Bun.connect<End>({
      hostname: "127.0.0.1",
      port,
      data: { conn, side: "up" },
      socket: {
        open(up) {
          if (conn.done) {
            up.terminate();
            return;
          }
          conn.up = up;
          conn.toUp.target = up;
          conn.toUp.pump();
        },
        data(_up, chunk) {
          if (!conn.done && !conn.stalled) conn.toDown.push(chunk, proxy.#delay());
        },
        drain() {
          conn.toUp.drain();
        },
        close(up) {
          proxy.#closed(up);
        },
        error(up) {
          proxy.#closed(up);
        },
      },
    }).catch(() => {
      this.stats.upstreamFailed++;
      conn.terminate();
      this.#conns.delete(conn);
    });
  }

  #closed(socket: Socket<End>): void {
    const end = socket.data;
    if (!end) return;
    if ("held" in end) this.#held.delete(socket);
    else if (end.conn.ended(end.side)) this.#conns.delete(end.conn);
  }

  close(): void {
    this.cut();
    this.#listener.stop(true);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.close();
  }
}
