// Who is signed in. The tokens live in memory and in localStorage, shared
// by every tab of this browser: signing in or out in one tab does so in
// all (the `storage` event), and a refresh in one tab is seen by the
// others, so no tab ever presents a refresh token another has already
// used (which the API treats as theft and answers by revoking the
// session). See doc/console.md for why not a cookie.

export interface Session {
  accessToken: string;
  refreshToken: string | null;
  tenantId: string | null;
  /** "tenant" for tenant users, "operator" for the operator console. */
  audience: "tenant" | "operator";
  /** An operator's platform role (`operator` or `read_only_operator`). */
  operatorRole?: string;
}

const STORAGE_KEY = "keel.session";
const listeners = new Set<() => void>();
let current: Session | null = load();
/** Why the last session ended: the login page says so after an expiry. */
let endReason: "logout" | "expired" | null = null;

function load(): Session | null {
  try {
    const stored = globalThis.localStorage?.getItem(STORAGE_KEY);
    return stored ? (JSON.parse(stored) as Session) : null;
  } catch {
    return null;
  }
}

function notify(): void {
  listeners.forEach((listener) => listener());
}

// Another tab signed in, refreshed or signed out.
globalThis.addEventListener?.("storage", (event: StorageEvent) => {
  if (event.key === STORAGE_KEY || event.key === null) {
    current = load();
    notify();
  }
});

export function getSession(): Session | null {
  return current;
}

/** Reads the session again from storage (another tab may have refreshed
 * it before this tab heard of it); returns it. */
export function reloadSession(): Session | null {
  const stored = load();
  if (JSON.stringify(stored) !== JSON.stringify(current)) {
    current = stored;
    notify();
  }
  return current;
}

/** Keeps `session`, or forgets it (`reason`: why it ended). */
export function setSession(session: Session | null, reason: "logout" | "expired" = "logout"): void {
  current = session;
  endReason = session ? null : reason;
  try {
    if (session) {
      globalThis.localStorage?.setItem(STORAGE_KEY, JSON.stringify(session));
    } else {
      globalThis.localStorage?.removeItem(STORAGE_KEY);
    }
  } catch {
    // Storage refused (private mode): the session lives in this tab only.
  }
  notify();
}

export function sessionEndReason(): "logout" | "expired" | null {
  return endReason;
}

export function subscribe(listener: () => void): () => void {
  listeners.add(listener);
  return () => listeners.delete(listener);
}
