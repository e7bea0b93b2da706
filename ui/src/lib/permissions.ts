// What a tenant role may do, for the console's choice of what to offer.
// It mirrors the API's decision matrix (keel-auth `authz`, committed as
// crates/keel-auth/authz-matrix.txt); the API decides in the end, and a
// refusal still shows its message.

import type { Role } from "../api";

const RANK: Record<Role, number> = { viewer: 0, member: 1, admin: 2, owner: 3 };

/** Members, invitations, service accounts, the audit log, billing. */
export function canAdminister(role: Role | undefined): boolean {
  return role !== undefined && RANK[role] >= RANK.admin;
}

/** Giving or taking the owner role. */
export function canManageOwners(role: Role | undefined): boolean {
  return role === "owner";
}

/** The roles `role` may hand out. */
export function assignableRoles(role: Role | undefined): Role[] {
  if (role === "owner") {
    return ["owner", "admin", "member", "viewer"];
  }
  if (role === "admin") {
    return ["admin", "member", "viewer"];
  }
  return [];
}
