// The one way to the API: the generated client, configured once with the
// session's token, a single refresh on an expired token, and every error
// turned into an ApiError (errors.ts).

import {
  AdminApi,
  AllocationsApi,
  AuditApi,
  BillingApi,
  AuthApi,
  Configuration,
  InventoryApi,
  MembersApi,
  ProjectsApi,
  ResponseError,
  ServiceAccountsApi,
  type Middleware,
  type TokenResponse,
} from "./generated/src";
import { ApiError } from "./errors";
import { getSession, reloadSession, setSession, type Session } from "./session";

/** Paths whose 401 means "wrong credentials", not "session expired": never
 * refreshed and repeated. (A switch carries the refresh token in its body:
 * repeated after a refresh, it would present a used token, which the API
 * takes for theft.) */
const CREDENTIAL_PATHS = [
  "/v1/auth/login",
  "/v1/auth/register",
  "/v1/auth/refresh",
  "/v1/auth/switch",
  "/v1/admin/auth/login",
];
const RETRIED = "x-keel-retried";

function withHeader(init: RequestInit, name: string, value: string | null): RequestInit {
  const headers = new Headers(init.headers);
  if (value === null) {
    headers.delete(name);
  } else {
    headers.set(name, value);
  }
  return { ...init, headers };
}

const plain = new Configuration({ basePath: "" });
const authForRefresh = new AuthApi(plain);

type RefreshOutcome = "refreshed" | "refused" | "unavailable";
let refreshing: Promise<RefreshOutcome> | null = null;

/** Runs `task` while holding the browser-wide refresh lock (Web Locks), so
 * two tabs never present the same single-use refresh token. */
function underRefreshLock<T>(task: () => Promise<T>): Promise<T> {
  const locks = globalThis.navigator?.locks;
  return locks ? (locks.request("keel.refresh", task) as Promise<T>) : task();
}

/**
 * Renews the session after a request made with `usedToken` was refused as
 * expired. Concurrent callers share one attempt. If the session already
 * moved on (this tab or another refreshed it meanwhile), nothing is asked:
 * the caller just repeats its request with the current token.
 */
function refreshOnce(usedToken: string | null): Promise<RefreshOutcome> {
  refreshing ??= underRefreshLock(async (): Promise<RefreshOutcome> => {
    const session = reloadSession();
    if (!session?.refreshToken) {
      return "refused";
    }
    if (session.accessToken !== usedToken) {
      return "refreshed";
    }
    try {
      const tokens = await authForRefresh.authRefresh({
        refreshRequest: { refreshToken: session.refreshToken },
      });
      setSession(sessionFrom(tokens));
      return "refreshed";
    } catch (error) {
      // Only the API's refusal ends the session; a network failure, a
      // server error or a rate limit leave it for the next attempt.
      const status = error instanceof ResponseError ? error.response.status : 0;
      return status === 400 || status === 401 || status === 422 ? "refused" : "unavailable";
    }
  }).finally(() => {
    refreshing = null;
  });
  return refreshing;
}

function bearerOf(init: RequestInit): string | null {
  const header = new Headers(init.headers).get("Authorization");
  return header?.startsWith("Bearer ") ? header.slice("Bearer ".length) : null;
}

const middleware: Middleware = {
  async pre({ url, init }) {
    const token = getSession()?.accessToken ?? null;
    return { url, init: withHeader(init, "Authorization", token && `Bearer ${token}`) };
  },
  async post({ url, init, response, fetch }) {
    if (response.ok || response.status === 101) {
      return response;
    }
    const path = new URL(url, "http://console").pathname;
    const expired = response.status === 401 && !CREDENTIAL_PATHS.includes(path);
    if (expired && !new Headers(init.headers).has(RETRIED)) {
      const outcome = await refreshOnce(bearerOf(init));
      if (outcome === "refreshed") {
        return fetch(url, withHeader(init, RETRIED, "1"));
      }
      if (outcome === "unavailable") {
        throw new ApiError(
          0,
          "session_not_renewed",
          "Your session could not be renewed just now. Check your connection; this page tries again by itself.",
          null,
        );
      }
    }
    if (expired && getSession()) {
      // The pages behind sign-in see it gone and send the user to log in,
      // saying why.
      setSession(null, "expired");
    }
    throw await ApiError.fromResponse(response);
  },
  async onError() {
    throw ApiError.network();
  },
};

const configuration = new Configuration({ basePath: "", middleware: [middleware] });

export const api = {
  admin: new AdminApi(configuration),
  auth: new AuthApi(configuration),
  allocations: new AllocationsApi(configuration),
  audit: new AuditApi(configuration),
  billing: new BillingApi(configuration),
  inventory: new InventoryApi(configuration),
  members: new MembersApi(configuration),
  projects: new ProjectsApi(configuration),
  serviceAccounts: new ServiceAccountsApi(configuration),
};

export function sessionFrom(tokens: TokenResponse): Session {
  return {
    accessToken: tokens.accessToken,
    refreshToken: tokens.refreshToken,
    tenantId: tokens.tenantId,
    audience: "tenant",
  };
}

/** Signs in and keeps the session. */
export async function logIn(email: string, password: string): Promise<Session> {
  const tokens = await api.auth.authLogin({ loginRequest: { email, password } });
  const session = sessionFrom(tokens);
  setSession(session);
  return session;
}

/** Creates an account and its tenant, then signs in. */
export async function signUp(email: string, password: string, tenantName: string): Promise<Session> {
  await api.auth.authRegister({ registerRequest: { email, password, tenantName } });
  return logIn(email, password);
}

/** Moves to another of the user's tenants: the session's refresh token is
 * exchanged for a session there (no password needed), which becomes this
 * console's; then the old session, which can no longer be renewed, is
 * logged out with its own access token. */
export async function switchTenant(tenantId: string): Promise<Session> {
  // Renews an expired access token first: the switch itself is never
  // repeated after a refresh (see CREDENTIAL_PATHS).
  await api.auth.authSessionGet();
  const old = getSession();
  if (!old?.refreshToken) {
    throw new ApiError(401, "unauthenticated", "Log in again to switch organisations.", null);
  }
  const tokens = await api.auth.authSwitch({ switchRequest: { tenantId, refreshToken: old.refreshToken } });
  const session = sessionFrom(tokens);
  setSession(session);
  try {
    await new AuthApi(new Configuration({ basePath: "", accessToken: old.accessToken })).authLogout();
  } catch {
    // It ends by itself within minutes: its refresh token is used up.
  }
  return session;
}

/** Signs an operator in to the operator console (no refresh token: an
 * operator session lasts one access token, then they log in again). */
export async function operatorLogIn(email: string, password: string): Promise<Session> {
  const tokens = await api.admin.adminLogin({ operatorLoginRequest: { email, password } });
  const session: Session = {
    accessToken: tokens.accessToken,
    refreshToken: null,
    tenantId: null,
    audience: "operator",
    operatorRole: tokens.role,
  };
  setSession(session);
  return session;
}

/** Ends the session on the server (best effort) and here. */
export async function logOut(): Promise<void> {
  try {
    if (getSession()?.audience === "operator") {
      await api.admin.adminLogout();
    } else {
      await api.auth.authLogout();
    }
  } catch {
    // Already expired or unreachable: forgetting it here is what matters.
  }
  setSession(null);
}

/** A fresh key for one submission of a create form (Idempotency-Key):
 * 128 random bits (getRandomValues works outside secure contexts too). */
export function newIdempotencyKey(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}
