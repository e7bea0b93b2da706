import { QueryClient } from "@tanstack/react-query";
import { getSession, subscribe, toApiError } from "./api";

/** How often a query that found the API unreachable asks again. */
export const UNREACHABLE_RETRY_MS = 5_000;

export const queryClient = new QueryClient({
  defaultOptions: {
    queries: {
      // A 4xx will not change by asking again; the network might.
      retry: (failures, error) => toApiError(error).status === 0 && failures < 3,
      refetchOnWindowFocus: true,
      // While the API is unreachable, keep asking: the page recovers by
      // itself when it is back. (Pages that poll set their own interval.)
      refetchInterval: (query) =>
        query.state.status === "error" && toApiError(query.state.error).status === 0 ? UNREACHABLE_RETRY_MS : false,
    },
    mutations: { retry: false },
  },
});

// Nothing one signed-in user saw may show for the next: the cache goes
// with the session (here or in another tab), and is cleared again at every
// login.
subscribe(() => {
  if (!getSession()) {
    queryClient.clear();
  }
});
