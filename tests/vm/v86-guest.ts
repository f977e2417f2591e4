/**
 * Runs one v86 guest (npm `v86`, an x86 emulator in WebAssembly) in this Bun process, the way a
 * browser page would: v86's ne2k NIC opens `new WebSocket(relay_url)` (Bun's global WebSocket plays
 * the browser's) and sends and receives one raw Ethernet frame per binary message.
 *
 * Started by the real-VM suite as a child process, so the emulator's CPU use never stalls the test
 * runner. Like QEMU's `-serial stdio`: the guest's serial console (ttyS0) goes to stdout byte for
 * byte and stdin goes to the guest's serial input. The guest powering off ends the process, and so
 * does stdin closing (the test runner went away). Anything about the emulator itself goes to stderr.
 *
 * Configuration, one JSON object in the V86_GUEST environment variable:
 * `{ relayUrl, kernel, initrd, bios, vgaBios, cmdline, memoryMb }` (paths are files).
 */
import { readFileSync } from "node:fs";
import { V86 } from "v86/build/libv86.mjs";

interface Config {
  relayUrl: string;
  kernel: string;
  initrd: string;
  bios: string;
  vgaBios: string;
  cmdline: string;
  memoryMb?: number;
}

const config = JSON.parse(process.env.V86_GUEST ?? "null") as Config | null;
if (!config) {
  console.error("v86-guest: set V86_GUEST to {relayUrl, kernel, initrd, bios, vgaBios, cmdline}");
  process.exit(2);
}

/** A file as the `{ buffer }` v86 takes for its images. */
const image = (path: string) => {
  const bytes = readFileSync(path);
  return { buffer: bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) as ArrayBuffer };
};

const wasmPath = new URL("../../node_modules/v86/build/v86.wasm", import.meta.url).pathname;
const emulator = new V86({
  wasm_path: wasmPath,
  bios: image(config.bios),
  vga_bios: image(config.vgaBios),
  bzimage: image(config.kernel),
  initrd: image(config.initrd),
  cmdline: config.cmdline,
  memory_size: (config.memoryMb ?? 128) * 1024 * 1024,
  net_device: { type: "ne2k", relay_url: config.relayUrl },
  autostart: true,
  disable_keyboard: true,
  disable_mouse: true,
  disable_speaker: true,
});

// Serial output arrives a byte per event: gather a turn's worth into one write.
let pending: number[] = [];
let line = "";
let stopping = false;
const flush = () => {
  const bytes = Uint8Array.from(pending);
  pending = [];
  process.stdout.write(bytes);
};
emulator.add_listener("serial0-output-byte", (byte: number) => {
  if (pending.length === 0) setImmediate(flush);
  pending.push(byte);
  // The kernel's last words after `poweroff -f`: v86 has no power switch to pull, so we do.
  if (byte === 10) {
    if (/reboot: (Power down|System halted)/.test(line)) void stop(0);
    line = "";
  } else if (line.length < 200) line += String.fromCharCode(byte);
});
emulator.add_listener("emulator-ready", () => console.error("v86-guest: emulator ready"));

async function stop(code: number) {
  if (stopping) return;
  stopping = true;
  if (pending.length) flush();
  await emulator.destroy().catch(() => {});
  process.exit(code);
}

process.stdin.setEncoding("utf8");
process.stdin.on("data", (text: string) => emulator.serial0_send(text));
process.stdin.on("end", () => void stop(0));
process.on("SIGTERM", () => void stop(0));
process.on("SIGINT", () => void stop(0));
