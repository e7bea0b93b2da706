/** Where to go after login: only a path of this console, never an address
 * elsewhere (`//host`, `/\host` and the like are refused). */
export function safeNext(next: string | null): string {
  return next && next.startsWith("/") && !next.startsWith("//") && !next.includes("\\") ? next : "/";
}
