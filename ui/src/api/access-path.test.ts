// One access path: only src/api/ may talk to the network. Any `fetch`,
// `XMLHttpRequest` or `WebSocket` elsewhere in the console fails this test.

import { readFileSync, readdirSync, statSync } from "node:fs";
import { join, relative } from "node:path";
import { describe, expect, it } from "vitest";

const SRC = join(import.meta.dirname, "..");
const FORBIDDEN = /\b(fetch|XMLHttpRequest|WebSocket|EventSource)\b|generated\/src/;

function sources(dir: string): string[] {
  return readdirSync(dir).flatMap((entry) => {
    const path = join(dir, entry);
    if (statSync(path).isDirectory()) {
      return sources(path);
    }
    return /\.(ts|tsx)$/.test(entry) && !entry.endsWith(".test.ts") ? [path] : [];
  });
}

describe("the access path", () => {
  it("keeps network access and the generated client inside src/api", () => {
    const outside = sources(SRC).filter((path) => !relative(SRC, path).startsWith("api"));
    expect(outside.length).toBeGreaterThan(0);
    const offenders = outside
      .map((path) => ({ path: relative(SRC, path), text: readFileSync(path, "utf8") }))
      .filter(({ text }) => FORBIDDEN.test(text))
      .map(({ path }) => path);
    expect(offenders).toEqual([]);
  });
});
