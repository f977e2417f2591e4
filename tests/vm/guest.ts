/**
 * Real QEMU guests for the end-to-end suite: runs setup.sh (qemu, busybox, a Debian cloud kernel in
 * the cache), builds a busybox initramfs at test time, boots guests under TCG and drives them through
 * their serial console.
 *
 * The guest's /init reads its name and address from the kernel command line (`er.name=`, `er.ip=`),
 * loads the virtio-net modules, configures eth0, announces itself (gratuitous ARP), prints `@@ready`
 * and then runs commands the host writes to ttyS0, one per line: `<id> <shell text>`. Each command's
 * output is framed by `@@begin <id>` and `@@end <id> <rc>`. Background jobs print onto the console
 * as well. `poweroff` ends the guest (QEMU runs with -no-reboot).
 *
 * A v86 guest (`v86Guest`) is the same initramfs built for 32 bits: Debian's i386 686 kernel with
 * the ne2k modules and busybox-static:i386, booted by the npm `v86` emulator in a Bun child process
 * (tests/vm/v86-guest.ts) whose stdin and stdout are the serial console, so the same Guest class
 * drives it.
 */
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Subprocess } from "bun";

const HERE = new URL(".", import.meta.url).pathname;
const ROOT = join(HERE, "../..");
export const VM_CACHE = process.env.VM_CACHE ?? join(ROOT, ".cache/vm");

/** Modules needed for virtio-net on Debian's 6.1 cloud kernel, in load order. */
const MODULES = [
  "virtio_ring",
  "virtio",
  "virtio_pci_legacy_dev",
  "virtio_pci_modern_dev",
  "virtio_pci",
  "failover",
  "net_failover",
  "virtio_net",
];

/** v86's ne2k NIC on Debian's i386 686 kernel, in load order. */
const V86_MODULES = ["8390", "ne2k-pci"];

export interface VmAssets {
  kernel: string;
  modules: string;
  /** For the v86 guest: the i386 kernel, its modules, busybox, and seabios's folder. */
  v86: { kernel: string; modules: string; busybox: string; seabios: string };
}

/** Runs tests/vm/setup.sh (idempotent) and returns the kernel and its module folder. */
export function setupVm(): VmAssets {
  const res = Bun.spawnSync(["sh", join(HERE, "setup.sh")], {
    env: { ...process.env, VM_CACHE },
    stdout: "pipe",
    stderr: "pipe",
  });
  const out = res.stdout.toString();
  if (res.exitCode !== 0) {
    throw new Error(`tests/vm/setup.sh failed (${res.exitCode}):\n${out}\n${res.stderr.toString()}`);
  }
  const field = (name: string) => {
    const value = new RegExp(`^${name}: (.+)$`, "m").exec(out)?.[1];
    if (!value) throw new Error(`tests/vm/setup.sh printed no ${name}:\n${out}`);
    return value;
  };
  return {
    kernel: field("kernel"),
    modules: field("modules"),
    v86: { kernel: field("v86-kernel"), modules: field("v86-modules"), busybox: field("v86-busybox"), seabios: field("seabios") },
  };
}

// ---------------------------------------------------------------- initramfs (cpio newc + gzip)

interface CpioEntry {
  name: string;
  mode: number; // including the file type bits
  data?: Uint8Array;
  rdevMajor?: number;
  rdevMinor?: number;
}

function cpioNewc(entries: CpioEntry[]): Uint8Array {
  const enc = new TextEncoder();
  const parts: Uint8Array[] = [];
  let size = 0;
  const push = (b: Uint8Array) => {
    parts.push(b);
    size += b.length;
  };
  const pad4 = () => {
    const n = (4 - (size % 4)) % 4;
    if (n) push(new Uint8Array(n));
  };
  const hex = (n: number) => n.toString(16).padStart(8, "0");
  let ino = 1;
  for (const e of [...entries, { name: "TRAILER!!!", mode: 0 }] as CpioEntry[]) {
    const data = e.data ?? new Uint8Array(0);
    const name = enc.encode(`${e.name}\0`);
    const header =
      "070701" +
      hex(e.name === "TRAILER!!!" ? 0 : ino++) +
      hex(e.mode) +
      hex(0) + // uid
      hex(0) + // gid
      hex(1) + // nlink
      hex(0) + // mtime
      hex(data.length) +
      hex(0) + // dev major
      hex(0) + // dev minor
      hex(e.rdevMajor ?? 0) +
      hex(e.rdevMinor ?? 0) +
      hex(name.length) +
      hex(0); // check
    push(enc.encode(header));
    push(name);
    pad4();
    push(data);
    pad4();
  }
  const out = new Uint8Array(size);
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

const init = (modules: string[]) => `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1
stty -echo -onlcr 2>/dev/null
arg() { tr ' ' '\\n' </proc/cmdline | sed -n "s/^$1=//p" | tail -n 1; }
NAME=$(arg er.name)
IP=$(arg er.ip)
MAC=$(arg er.mac)
IP2=$(arg er.ip2)
hostname "\${NAME:-guest}"
for m in ${modules.join(" ")}; do insmod /lib/modules/$m.ko || echo "@@error insmod $m"; done
ip link set lo up
n=0
while ! ip link show eth0 >/dev/null 2>&1; do
  n=$((n + 1)); [ $n -gt 200 ] && { echo "@@error no eth0"; poweroff -f; }
  usleep 10000
done
[ -n "$MAC" ] && ip link set eth0 address "$MAC"
ip link set eth0 up
# er.ip=dhcp: no address given, udhcpc asks for one (its script prints @@lease).
if [ "$IP" = dhcp ]; then
  udhcpc -i eth0 -s /etc/udhcpc.script -q -n -t 20 -T 2 -x "hostname:$NAME" >/dev/null 2>&1 || echo "@@error udhcpc got no lease"
else
  ip addr add "$IP" dev eth0
fi
# A second NIC (a direct link beside the relayed one), when asked for.
if [ -n "$IP2" ]; then
  n=0
  while ! ip link show eth1 >/dev/null 2>&1; do
    n=$((n + 1)); [ $n -gt 200 ] && { echo "@@error no eth1"; poweroff -f; }
    usleep 10000
  done
  ip addr add "$IP2" dev eth1
  ip link set eth1 up
fi
# Tell the switches where we are (a UDP port the relay has to learn needs one frame from us).
[ "$IP" = dhcp ] || arping -q -U -c 1 -I eth0 "\${IP%/*}" >/dev/null 2>&1
echo "@@ready $NAME $(cut -d' ' -f1 /proc/uptime)"
while IFS= read -r line; do
  id=\${line%% *}
  cmd=\${line#* }
  [ -n "$id" ] || continue
  echo "@@begin $id"
  sh -c "$cmd" </dev/null
  echo "@@end $id $?"
done
poweroff -f
`;

/** A receiver for the transfer: nc -l -e runs this with the socket as stdin/stdout. */
const RX = `#!/bin/sh
md5sum | cut -d' ' -f1 > /tmp/rx.md5
cat /tmp/rx.md5
`;

/**
 * udhcpc's script (busybox gives it ip, mask as a prefix length, router, dns, domain and lease in
 * the environment): configures eth0, the default route and resolv.conf, and tells the host.
 */
const UDHCPC_SCRIPT = `#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface" ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && ip route replace default via "\${router%% *}" dev "$interface"
    : > /etc/resolv.conf
    [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    echo "@@lease $ip/$mask router=$router dns=$dns domain=$domain lease=$lease" > /dev/console
    ;;
esac
`;

/** What goes into an initramfs: busybox, and the kernel modules /init loads (names, in order). */
interface InitramfsParts {
  busybox: string;
  /** The kernel's lib/modules/VERSION folder. */
  modules: string;
  load: string[];
}

/** Builds the gzip'd initramfs into `dir` (as `file`) and returns its path. */
export function buildInitramfs(parts: InitramfsParts, dir: string, file = "initramfs.cpio.gz"): string {
  const enc = new TextEncoder();
  const busybox = new Uint8Array(readFileSync(parts.busybox));
  const moduleFiles = new Map<string, string>();
  const walk = (d: string) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith(".ko")) moduleFiles.set(e.name.slice(0, -3), p);
    }
  };
  walk(join(parts.modules, "kernel"));
  const entries: CpioEntry[] = [
    { name: "bin", mode: 0o40755 },
    { name: "dev", mode: 0o40755 },
    { name: "dev/console", mode: 0o20600, rdevMajor: 5, rdevMinor: 1 },
    { name: "lib", mode: 0o40755 },
    { name: "lib/modules", mode: 0o40755 },
    { name: "bin/busybox", mode: 0o100755, data: busybox },
    { name: "bin/rx", mode: 0o100755, data: enc.encode(RX) },
    { name: "etc", mode: 0o40755 },
    { name: "etc/udhcpc.script", mode: 0o100755, data: enc.encode(UDHCPC_SCRIPT) },
    { name: "init", mode: 0o100755, data: enc.encode(init(parts.load)) },
  ];
  for (const m of parts.load) {
    const p = moduleFiles.get(m);
    if (!p) throw new Error(`kernel module ${m}.ko not found under ${parts.modules}`);
    entries.push({ name: `lib/modules/${m}.ko`, mode: 0o100644, data: new Uint8Array(readFileSync(p)) });
  }
  const path = join(dir, file);
  writeFileSync(path, Bun.gzipSync(cpioNewc(entries) as Uint8Array<ArrayBuffer>));
  return path;
}

/** Kernel, initramfs and a scratch folder; dispose removes the scratch folder. */
export interface VmImage extends Disposable {
  kernel: string;
  initrd: string;
  dir: string;
  /** The 32-bit image for v86, and the BIOS images it boots with. */
  v86: { kernel: string; initrd: string; bios: string; vgaBios: string };
}

export function prepareImage(): VmImage {
  const assets = setupVm();
  const dir = mkdtempSync(join(tmpdir(), "edge-relay-vm-"));
  try {
    const initrd = buildInitramfs({ busybox: "/bin/busybox", modules: assets.modules, load: MODULES }, dir);
    const v = assets.v86;
    return {
      kernel: assets.kernel,
      initrd,
      dir,
      v86: {
        kernel: v.kernel,
        initrd: buildInitramfs({ busybox: v.busybox, modules: v.modules, load: V86_MODULES }, dir, "initramfs-i386.cpio.gz"),
        bios: join(v.seabios, "bios.bin"),
        vgaBios: join(v.seabios, "vgabios-stdvga.bin"),
      },
      [Symbol.dispose]() {
        rmSync(dir, { recursive: true, force: true });
      },
    };
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
}

// ---------------------------------------------------------------- free ports for QEMU's own sockets

// ---------------------------------------------------------------- guests

export interface GuestOptions {
  name: string;
  /** `192.0.2.1/24` */
  ip: string;
  mac: string;
  /** Everything after `-netdev `, without `id=` (added as `id=n0`). */
  netdev: string;
  /** eth0's QEMU arguments exactly as a recipe gives them, instead of `netdev` and `mac`. */
  nic?: string[];
  /** A second NIC (eth1): its `-netdev` (id=n1 is added), address and MAC. */
  nic2?: { netdev: string; ip: string; mac: string };
  memoryMb?: number;
  /** A command that execs QEMU, e.g. `["ip", "netns", "exec", NAME]` (must keep the pid). */
  prefix?: string[];
}

export interface PingResult {
  transmitted: number;
  received: number;
  lossPct: number;
  avgMs: number;
  output: string;
}

let nextCommandId = 1;
const SETPRIV = Bun.which("setpriv");

export class Guest implements AsyncDisposable {
  readonly proc: Subprocess<"pipe", "pipe", "pipe">;
  readonly startedAt = performance.now();
  readyAt = 0;
  /** Serial console text so far (\r stripped). */
  console = "";
  /** Lines with the host time they arrived. */
  readonly lines: { t: number; line: string }[] = [];
  private partial = "";
  private waiters = new Set<() => void>();
  private stderrText = "";

  /** What runs the guest, for messages: `qemu` or `v86`. */
  readonly engine: string;

  constructor(
    image: VmImage,
    readonly opts: GuestOptions,
    /** Runs the guest instead of QEMU, its serial console on stdin and stdout (see v86Guest). */
    runner?: { engine: string; command: string[]; env?: Record<string, string> },
  ) {
    this.engine = runner?.engine ?? "qemu";
    const args = runner ? [...(opts.prefix ?? []), ...runner.command] : [
      ...(opts.prefix ?? []),
      "qemu-system-x86_64",
      "-accel", "tcg",
      "-m", String(opts.memoryMb ?? 256),
      "-smp", "1",
      "-nodefaults",
      "-no-user-config",
      "-display", "none",
      "-monitor", "none",
      "-serial", "stdio",
      "-no-reboot",
      "-kernel", image.kernel,
      "-initrd", image.initrd,
      "-append", `console=ttyS0 quiet loglevel=3 panic=-1 er.name=${opts.name} er.ip=${opts.ip}${opts.nic2 ? ` er.ip2=${opts.nic2.ip}` : ""}`,
      ...(opts.nic ?? ["-netdev", `${opts.netdev},id=n0`, "-device", `virtio-net-pci,netdev=n0,mac=${opts.mac}`]),
      ...(opts.nic2 ? ["-netdev", `${opts.nic2.netdev},id=n1`, "-device", `virtio-net-pci,netdev=n1,mac=${opts.nic2.mac}`] : []),
    ];
    // If the test runner dies (Ctrl-C, crash), take QEMU with it.
    if (SETPRIV) args.unshift(SETPRIV, "--pdeathsig", "KILL", "--");
    const env = runner?.env ? { ...process.env, ...runner.env } : undefined;
    const proc = Bun.spawn(args, { stdin: "pipe", stdout: "pipe", stderr: "pipe", env });
    this.proc = proc;
    const decoder = new TextDecoder();
    (async () => {
      for await (const chunk of proc.stdout) {
        const text = decoder.decode(chunk, { stream: true }).replaceAll("\r", "");
        this.console += text;
        const t = performance.now();
        const parts = (this.partial + text).split("\n");
        this.partial = parts.pop()!;
        for (const line of parts) this.lines.push({ t, line });
        this.notify();
      }
    })();
    (async () => {
      const d = new TextDecoder();
      for await (const chunk of proc.stderr) {
        this.stderrText += d.decode(chunk, { stream: true });
        this.notify();
      }
    })();
    this.proc.exited.then(() => this.notify());
  }

  get name() {
    return this.opts.name;
  }

  get address() {
    return this.opts.ip.split("/")[0]!;
  }

  get exited() {
    return this.proc.exitCode !== null || this.proc.signalCode !== null;
  }

  private notify() {
    for (const w of this.waiters) w();
  }

  private describe() {
    return `guest ${this.name} (${this.engine} ${this.exited ? `exited ${this.proc.exitCode ?? this.proc.signalCode}` : "running"})\n` +
      `--- serial ---\n${this.console.slice(-4000)}\n--- ${this.engine} stderr ---\n${this.stderrText}`;
  }

  /** Resolves with the first console line (from line index `from`) for which `match` is truthy. */
  waitForLine<T>(match: (line: string) => T | undefined | null | false, what: string, timeoutMs = 60_000, from = 0): Promise<{ value: T; index: number; t: number }> {
    return new Promise((resolve, reject) => {
      let i = from;
      const timer = setTimeout(() => {
        this.waiters.delete(check);
        reject(new Error(`Timed out after ${timeoutMs} ms waiting for ${what} on ${this.describe()}`));
      }, timeoutMs);
      const check = () => {
        for (; i < this.lines.length; i++) {
          const v = match(this.lines[i]!.line);
          if (v) {
            clearTimeout(timer);
            this.waiters.delete(check);
            resolve({ value: v, index: i, t: this.lines[i]!.t });
            return;
          }
        }
        if (this.exited) {
          clearTimeout(timer);
          this.waiters.delete(check);
          reject(new Error(`${this.engine} exited while waiting for ${what}: ${this.describe()}`));
        }
      };
      this.waiters.add(check);
      check();
    });
  }

  /** Waits for `@@ready` (modules loaded, eth0 configured). */
  async ready(timeoutMs = 60_000) {
    const { t } = await this.waitForLine((l) => l.startsWith(`@@ready ${this.name}`), "@@ready", timeoutMs);
    this.readyAt = t;
    const err = this.lines.find((l) => l.line.startsWith("@@error"));
    if (err) throw new Error(`${err.line} on ${this.describe()}`);
    return this;
  }

  /** Boot time in ms (QEMU start to `@@ready`). */
  get bootMs() {
    return this.readyAt - this.startedAt;
  }

  /** Runs one shell command line in the guest and returns its console output and exit code. */
  async run(cmd: string, timeoutMs = 60_000): Promise<{ rc: number; output: string }> {
    if (cmd.includes("\n")) throw new Error("one line only");
    const id = `c${nextCommandId++}`;
    const from = this.lines.length;
    this.proc.stdin.write(`${id} ${cmd}\n`);
    this.proc.stdin.flush();
    const begin = await this.waitForLine((l) => l === `@@begin ${id}`, `start of ${cmd}`, timeoutMs, from);
    const end = await this.waitForLine(
      (l) => (l.startsWith(`@@end ${id} `) ? l : undefined),
      `end of ${cmd}`,
      timeoutMs,
      begin.index + 1,
    );
    const output = this.lines
      .slice(begin.index + 1, end.index)
      .map((l) => l.line)
      .join("\n");
    return { rc: Number(end.value.split(" ")[2]), output };
  }

  /** Like run, but throws unless the command exits 0. */
  async sh(cmd: string, timeoutMs = 60_000): Promise<string> {
    const r = await this.run(cmd, timeoutMs);
    if (r.rc !== 0) throw new Error(`guest ${this.name}: \`${cmd}\` exited ${r.rc}:\n${r.output}`);
    return r.output;
  }

  /** Guest uptime in seconds (10 ms resolution). */
  async uptime(): Promise<number> {
    return Number((await this.sh("cut -d' ' -f1 /proc/uptime")).trim().split("\n").pop());
  }

  /** `ping -c count -i intervalS -W waitS target` (-W: how long to wait for replies after the last). */
  async ping(target: string, count = 5, intervalS = 0.2, waitS = 5, timeoutMs = 60_000): Promise<PingResult> {
    const { output } = await this.run(`ping -c ${count} -i ${intervalS} -W ${waitS} ${target}`, timeoutMs);
    const m = /(\d+) packets transmitted, (\d+) packets received/.exec(output);
    const avg = /round-trip min\/avg\/max = [\d.]+\/([\d.]+)\//.exec(output);
    if (!m) throw new Error(`guest ${this.name}: unexpected ping output:\n${output}`);
    const transmitted = Number(m[1]);
    const received = Number(m[2]);
    return {
      transmitted,
      received,
      lossPct: transmitted ? (100 * (transmitted - received)) / transmitted : 100,
      avgMs: avg ? Number(avg[1]) : NaN,
      output,
    };
  }

  /** Asks the guest to power off and waits for QEMU to exit. */
  async poweroff(timeoutMs = 20_000) {
    if (this.exited) return;
    this.proc.stdin.write(`p poweroff -f\n`);
    this.proc.stdin.flush();
    const timer = setTimeout(() => this.proc.kill("SIGKILL"), timeoutMs);
    await this.proc.exited;
    clearTimeout(timer);
  }

  async [Symbol.asyncDispose]() {
    if (!this.exited) this.proc.kill("SIGKILL");
    await this.proc.exited;
  }
}

const V86_RUNNER = join(HERE, "v86-guest.ts");

/**
 * A v86 guest (32-bit, ne2k NIC) whose NIC dials `relayUrl` as v86 in a browser page would, run by
 * tests/vm/v86-guest.ts in a Bun child process. `env` goes to that process (e.g.
 * NODE_EXTRA_CA_CERTS for a wss:// relay with a certificate of the test's own). The MAC is set by
 * the guest's /init.
 */
export function v86Guest(
  image: VmImage,
  opts: { name: string; ip: string; mac: string; relayUrl: string; memoryMb?: number; env?: Record<string, string> },
): Guest {
  // irqpoll: the kernel also runs the NIC's interrupt handler on every timer tick. In 2 of the
  // first 3 runs of the v86 scenario (on a loaded machine) a transfer stalled for good with the
  // guest's ne2k reset by NETDEV WATCHDOG again and again, as if the card's level-triggered
  // interrupt had been lost in the emulated PIC; polling makes a lost interrupt cost one tick.
  // Not reproduced since, with or without it (20+ runs, some with two extra CPU hogs).
  const config = {
    relayUrl: opts.relayUrl,
    ...image.v86,
    cmdline: `console=ttyS0 quiet loglevel=3 panic=-1 tsc=reliable irqpoll er.name=${opts.name} er.ip=${opts.ip} er.mac=${opts.mac}`,
    memoryMb: opts.memoryMb ?? 128,
  };
  return new Guest(image, { ...opts, netdev: "" }, {
    engine: "v86",
    command: [process.execPath, V86_RUNNER],
    env: { ...opts.env, V86_GUEST: JSON.stringify(config) },
  });
}

export interface TransferResult {
  bytes: number;
  seconds: number;
  mbPerS: number;
  sentMd5: string;
  receivedMd5: string;
  ok: boolean;
}

/**
 * Sends `mib` MiB of random data from `from` to `to` over TCP (busybox nc) and compares the md5 the
 * sender computed with the one the receiver computed. Times it with the sender's /proc/uptime.
 */
export async function transfer(from: Guest, to: Guest, mib = 32, port = 5001, timeoutMs = 300_000, address = to.address): Promise<TransferResult> {
  const sentMd5 = (
    await from.sh(`dd if=/dev/urandom of=/tmp/data bs=1048576 count=${mib} 2>/dev/null && md5sum /tmp/data`, 120_000)
  )
    .trim()
    .split("\n")
    .pop()!
    .split(" ")[0]!;
  await to.sh(`rm -f /tmp/rx.md5; nc -l -p ${port} -e /bin/rx >/dev/null 2>&1 &`);
  await to.sh(`while ! netstat -ltn | grep -q ':${port} '; do usleep 20000; done`);
  const out = await from.sh(
    `a=$(cut -d' ' -f1 /proc/uptime); h=$(nc ${address} ${port} </tmp/data); b=$(cut -d' ' -f1 /proc/uptime); echo "@@xfer $a $b $h"`,
    timeoutMs,
  );
  const m = /@@xfer ([\d.]+) ([\d.]+) ?(\S*)/.exec(out);
  if (!m) throw new Error(`guest ${from.name}: no transfer result:\n${out}`);
  const seconds = Math.max(Number(m[2]) - Number(m[1]), 0.01);
  // The receiver's own record of what it got.
  const receivedMd5 = (
    await to.sh(`n=0; while [ ! -s /tmp/rx.md5 ] && [ $n -lt 500 ]; do n=$((n+1)); usleep 20000; done; cat /tmp/rx.md5`)
  )
    .trim()
    .split("\n")
    .pop()!;
  const bytes = mib * 1048576;
  return {
    bytes,
    seconds,
    mbPerS: bytes / 1e6 / seconds,
    sentMd5,
    receivedMd5,
    ok: sentMd5.length === 32 && sentMd5 === receivedMd5 && m[3] === receivedMd5,
  };
}
