import { useQuery } from "@tanstack/react-query";
import { api } from "../api";

/** The signed-in user, their organisation and role (`GET /v1/auth/session`). */
export function useSessionInfo() {
  return useQuery({
    queryKey: ["session"],
    queryFn: () => api.auth.authSessionGet(),
    staleTime: 60_000,
  });
}
