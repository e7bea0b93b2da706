import { describe, expect, it } from "vitest";
import { hostActions, usage } from "./hosts";

describe("hostActions", () => {
  it("offers what changes the host's state", () => {
    expect([...hostActions("ready")].sort()).toEqual(["cordon", "drain"]);
    expect([...hostActions("cordoned")].sort()).toEqual(["drain", "uncordon"]);
    expect([...hostActions("draining")].sort()).toEqual(["cordon", "uncordon"]);
    expect(hostActions("offline").size).toBe(3);
    expect(hostActions("revoked").size).toBe(0);
  });

  it("prints used of total", () => {
    expect(usage(3, 8)).toBe("3 / 8");
    expect(usage(1, 4, " GiB")).toBe("1 / 4 GiB");
  });
});
