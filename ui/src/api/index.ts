// What the rest of the console may use of the API. Only src/api/ imports
// the generated client or talks to the network (src/api/access-path.test.ts
// fails otherwise).

export {
  api,
  logIn,
  logOut,
  newIdempotencyKey,
  operatorLogIn,
  signUp,
  switchTenant,
} from "./client";
export { ApiError, toApiError, type FieldProblem } from "./errors";
export { getSession, sessionEndReason, setSession, subscribe, type Session } from "./session";
export { openTerminal, type TerminalConnection } from "./terminal";
export type {
  AllocationState,
  HostView,
  AllocationView,
  Availability,
  FlavorView,
  ProjectView,
  InvitationView,
  MemberView,
  RegionView,
  Role,
  SessionView,
  AccountView,
  CreditView,
  InvoiceDetail,
  InvoiceView,
  RateCardView,
  UsageSoFar,
} from "./generated/src";
