// What the rest of the console may use of the API. Only src/api/ imports
// the generated client or talks to the network (src/api/access-path.test.ts
// fails otherwise).

export { api, logIn, logOut, newIdempotencyKey, onSignedOut, signUp } from "./client";
export { ApiError, toApiError, type FieldProblem } from "./errors";
export { getSession, setSession, subscribe, type Session } from "./session";
export { openTerminal, type TerminalConnection } from "./terminal";
export type {
  AllocationState,
  AllocationView,
  Availability,
  FlavorView,
  ProjectView,
  RegionView,
} from "./generated/src";
