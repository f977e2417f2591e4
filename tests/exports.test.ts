import { describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { RELAY } from "./helpers.ts";

/**
 * What relay.ts exports is a decision: the supported API, or an `@internal` name a test needs.
 * A new export fails here until it is added to one of the two lists.
 */
const SUPPORTED = [
  "ADMIN_COOKIE", "BACKPLANE_HUB_HEADER", "BoundAddress", "Config", "ConfigError", "Logger", "MAX_DATAGRAM", "MAX_FRAME",
  "MIN_FRAME", "MSG_CONTROL", "MSG_DATA", "HubState", "RelayHandle", "Snapshot", "TUNNEL_PATH", "TUNNEL_PROTOCOL", "TUNNEL_VERSION",
  "V86_PATH", "VERSION", "loadConfig", "main", "parseConfig", "startRelay",
];

const INTERNAL = [
  "AdminSessions", "AuthThrottle", "Backoff", "BatchedPort", "BUDGET_ALPHA", "Capture", "DhcpNetworkSpec", "FrameBatch",
  "GatewayHost", "Impairment", "ImpairmentClock", "MemoryBudget", "NatsDecoder", "Network", "NetworkRegistry",
  "OPTIONS", "PAGE_HTML", "PAGE_HTML_WITH_LOGOUT", "Port", "PortTotals", "RateLimit", "RoundRobin", "StreamDecoder",
  "StreamWriter", "SwitchPolicy", "TunnelLink", "UNIX_DGRAM_BACKLOG", "UNIX_DGRAM_MESSAGE_COST", "addInvite",
  "backplaneSubject", "clientAddress", "dataHeader", "decodeArp", "decodeDhcp", "decodeIpv4", "decodeTunnelMessage",
  "decodeUdp", "encodeControl", "encodeFrames", "environmentFileValue", "flagOf", "formatClient", "formatImpairment",
  "formatMac", "helpText", "hpubRoom", "hubStartLines", "listInvites", "macBytes", "macKey", "natsHeaderBlock", "noProxyMatches",
  "openHubState", "openUnixDgram", "parseCidr", "parseControl", "parseHostPort", "parseImpairment", "parseMac", "rateLimitedLog",
  "renderMetrics", "resolveDhcpNetwork", "selfSignedCertificate", "statusNetworks", "trustedProxyList", "uplinkProxy", "withHubLock",
  "withoutUserinfo", "writeHpub",
];

/** Every top-level `export` declaration, with whether its doc comment says `@internal`. */
function declaredExports(): { name: string; internal: boolean }[] {
  const lines = readFileSync(RELAY, "utf8").split("\n");
  const out: { name: string; internal: boolean }[] = [];
  lines.forEach((line, i) => {
    const m = /^export (?:declare |async |abstract )*(?:function\*?|class|const|let|type|interface|enum) ([A-Za-z_$][\w$]*)/.exec(line);
    if (!m) return;
    let doc = "";
    if (lines[i - 1]?.trimEnd().endsWith("*/")) {
      let k = i - 1;
      while (k > 0 && !lines[k]!.trimStart().startsWith("/**")) k--;
      doc = lines.slice(k, i).join("\n");
    }
    out.push({ name: m[1]!, internal: doc.includes("@internal") });
  });
  return out;
}

const sorted = (names: string[]) => [...names].sort((a, b) => a.localeCompare(b));

describe("relay.ts's exports", () => {
  test("the supported API is exactly the listed names, none marked @internal", () => {
    expect(sorted(declaredExports().filter((e) => !e.internal).map((e) => e.name))).toEqual(sorted(SUPPORTED));
  });

  test("every other export is marked @internal and listed as a test's need", () => {
    expect(sorted(declaredExports().filter((e) => e.internal).map((e) => e.name))).toEqual(sorted(INTERNAL));
  });

  test("the module's runtime exports are all declared ones (no re-exports or export lists)", async () => {
    const declared = new Set(declaredExports().map((e) => e.name));
    expect(Object.keys(await import("../relay.ts")).filter((name) => !declared.has(name))).toEqual([]);
  });
});
