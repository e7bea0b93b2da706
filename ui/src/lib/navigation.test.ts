import { describe, expect, it } from "vitest";
import { safeNext } from "./navigation";

describe("safeNext", () => {
  it("keeps a path of the console", () => {
    expect(safeNext("/projects/p/flavors?x=1")).toBe("/projects/p/flavors?x=1");
  });

  it("refuses anything that could leave the console", () => {
    for (const next of [null, "", "https://evil.example", "//evil.example", "/\\evil.example", "javascript:alert(1)"]) {
      expect(safeNext(next)).toBe("/");
    }
  });
});
