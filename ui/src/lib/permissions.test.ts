import { describe, expect, it } from "vitest";
import { assignableRoles, canAdminister, canManageOwners } from "./permissions";

describe("permissions", () => {
  it("lets owners and admins administer, nobody else", () => {
    expect(canAdminister("owner")).toBe(true);
    expect(canAdminister("admin")).toBe(true);
    expect(canAdminister("member")).toBe(false);
    expect(canAdminister("viewer")).toBe(false);
    expect(canAdminister(undefined)).toBe(false);
  });

  it("keeps the owner role to owners", () => {
    expect(canManageOwners("owner")).toBe(true);
    expect(canManageOwners("admin")).toBe(false);
    expect(assignableRoles("admin")).not.toContain("owner");
    expect(assignableRoles("owner")).toContain("owner");
    expect(assignableRoles("member")).toEqual([]);
  });
});
