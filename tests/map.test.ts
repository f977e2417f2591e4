import { describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { RELAY } from "./helpers.ts";

const lines = readFileSync(RELAY, "utf8").split("\n");
const header = lines.slice(0, lines.findIndex((l) => l === " * @module"));

/** The section index of the @module comment: ` * - NAME  purpose`, in order. */
function sectionIndex(): string[] {
  const start = header.indexOf(" * ## Map");
  const out: string[] = [];
  for (const line of header.slice(start + 1)) {
    if (line.startsWith(" * ## ")) break;
    const m = /^ \* - (.+?) {2,}\S/.exec(line);
    if (m) out.push(m[1]!);
  }
  return out;
}

/** The banners, `// ───── NAME ─────`, in order, with the lines under each. */
function sections(): { name: string; body: string[] }[] {
  const out: { name: string; body: string[] }[] = [];
  for (const line of lines) {
    const m = /^\/\/ ─+ (.+?) ─+$/.exec(line);
    if (m) out.push({ name: m[1]!, body: [] });
    else out.at(-1)?.body.push(line);
  }
  return out;
}

describe("relay.ts's map", () => {
  test("the section index in the @module comment names every section banner, in order", () => {
    expect(sectionIndex().length).toBeGreaterThan(10);
    expect(sectionIndex()).toEqual(sections().map((s) => s.name));
  });

  test("every section opens with design notes: at least three lines of comment under its banner", () => {
    for (const { name, body } of sections()) {
      const notes = body.slice(0, body.findIndex((l) => !l.startsWith("//"))).filter((l) => l.length > 3);
      expect({ name, notes: notes.length >= 3 }).toEqual({ name, notes: true });
    }
  });

  test("every class the table of port kinds names is a Port, defined in the section the table says", () => {
    const rows = header.filter((l) => /^ \* \| [a-z]/.test(l) && !l.includes("| class ")).map((l) => l.split("|").map((c) => c.trim()));
    expect(rows.length).toBeGreaterThanOrEqual(7);
    const all = sections();
    for (const [, kind, cls, section] of rows) {
      const body = all.find((s) => s.name === section)?.body ?? [];
      expect({ kind, cls, defined: body.some((l) => new RegExp(`^(export )?class ${cls} extends (Port|BatchedPort)\\b`).test(l)) }).toEqual({ kind, cls, defined: true });
    }
  });
});
