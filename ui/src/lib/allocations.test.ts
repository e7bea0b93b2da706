import { describe, expect, it } from "vitest";
import {
  FAST_REFRESH_MS,
  SLOW_REFRESH_MS,
  allocationNameProblem,
  allowedActions,
  refreshInterval,
} from "./allocations";

describe("allowedActions", () => {
  it("offers stop and the terminal only while running", () => {
    expect([...allowedActions("running")].sort()).toEqual(["stop", "terminal", "terminate"]);
    expect(allowedActions("stopped").has("stop")).toBe(false);
    expect(allowedActions("provisioning").has("terminal")).toBe(false);
  });

  it("offers start only when stopped", () => {
    expect([...allowedActions("stopped")].sort()).toEqual(["start", "terminate"]);
  });

  it("lets every state but the last two be terminated", () => {
    for (const state of ["requested", "scheduled", "provisioning", "failed", "lost", "starting"] as const) {
      expect(allowedActions(state).has("terminate")).toBe(true);
    }
    expect(allowedActions("terminating").size).toBe(0);
    expect(allowedActions("terminated").size).toBe(0);
  });
});

describe("refreshInterval", () => {
  it("is fast while anything is in transition and slow otherwise", () => {
    expect(refreshInterval(["running", "provisioning"])).toBe(FAST_REFRESH_MS);
    expect(refreshInterval(["running", "stopped", "failed"])).toBe(SLOW_REFRESH_MS);
    expect(refreshInterval([])).toBe(SLOW_REFRESH_MS);
  });
});

describe("allocationNameProblem", () => {
  it("accepts what the API accepts", () => {
    expect(allocationNameProblem("trainer-1")).toBeNull();
    expect(allocationNameProblem("a")).toBeNull();
    expect(allocationNameProblem("a".repeat(63))).toBeNull();
  });

  it("refuses empty, overlong and malformed names", () => {
    expect(allocationNameProblem("")).toMatch(/Enter a name/);
    expect(allocationNameProblem("a".repeat(64))).toMatch(/63/);
    for (const bad of ["-a", "a-", "Trainer", "a_b", "a b"]) {
      expect(allocationNameProblem(bad)).not.toBeNull();
    }
  });
});
