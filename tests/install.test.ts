import { describe, expect, test } from "bun:test";
import { ROOT, readme } from "./helpers.ts";

describe("npm install", () => {
  test("every locked package runs on the oldest Node the set-up names, so npm install there warns of no engine", async () => {
    const pkg = await Bun.file(`${ROOT}package.json`).json();
    expect(pkg.engines.node).toBe(">=20");
    expect(await readme()).toContain("On a machine with Node.js 20 or newer and npm");
    const lock = await Bun.file(`${ROOT}package-lock.json`).json();
    const unmet = Object.entries(lock.packages as Record<string, { engines?: { node?: string } }>)
      .filter(([, p]) => p.engines?.node !== undefined && !Bun.semver.satisfies("20.0.0", p.engines.node))
      .map(([path, p]) => `${path} wants node ${p.engines!.node}`);
    expect(unmet).toEqual([]);
  });
});
