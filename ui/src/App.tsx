import { QueryClientProvider } from "@tanstack/react-query";
import { Suspense, lazy, useEffect, useSyncExternalStore, type ReactNode } from "react";
import { BrowserRouter, Navigate, Route, Routes, useLocation, useNavigate } from "react-router";
import { getSession, onSignedOut, subscribe } from "./api";
import { queryClient } from "./queryClient";
import { Layout } from "./components/Layout";
import { AllocationDetailPage } from "./pages/AllocationDetail";
import { AllocationsPage } from "./pages/Allocations";
import { FlavorsPage } from "./pages/Flavors";
import { HomePage } from "./pages/Home";
import { LaunchPage } from "./pages/Launch";
import { LoginPage } from "./pages/Login";
import { NotFoundPage } from "./pages/NotFound";
import { SignupPage } from "./pages/Signup";
import { Loading } from "./components/Loading";

// The terminal emulator is most of the console's code: loaded when needed.
const TerminalPage = lazy(() => import("./pages/Terminal").then((module) => ({ default: module.TerminalPage })));

export function useSession() {
  return useSyncExternalStore(subscribe, getSession);
}

/** Pages behind sign-in: without a session, to the login page and back. */
function RequireSession({ children }: { children: ReactNode }) {
  const session = useSession();
  const location = useLocation();
  if (!session) {
    const next = encodeURIComponent(location.pathname + location.search);
    return <Navigate to={`/login?next=${next}`} replace />;
  }
  return children;
}

/** A session that ended by itself sends the user to log in, keeping the page. */
function SignedOutRedirect() {
  const navigate = useNavigate();
  const location = useLocation();
  useEffect(
    () =>
      onSignedOut(() => {
        queryClient.clear();
        const next = encodeURIComponent(location.pathname + location.search);
        navigate(`/login?next=${next}&expired=1`, { replace: true });
      }),
    [navigate, location],
  );
  return null;
}

export function App() {
  return (
    <QueryClientProvider client={queryClient}>
      <BrowserRouter>
        <SignedOutRedirect />
        <Routes>
          <Route path="/login" element={<LoginPage />} />
          <Route path="/signup" element={<SignupPage />} />
          <Route
            element={
              <RequireSession>
                <Layout />
              </RequireSession>
            }
          >
            <Route index element={<HomePage />} />
            <Route path="projects/:projectId/allocations" element={<AllocationsPage />} />
            <Route path="projects/:projectId/allocations/new" element={<LaunchPage />} />
            <Route path="projects/:projectId/allocations/:allocationId" element={<AllocationDetailPage />} />
            <Route path="projects/:projectId/allocations/:allocationId/terminal" element={
                <Suspense fallback={<Loading what="the terminal" />}>
                  <TerminalPage />
                </Suspense>
              }
            />
            <Route path="projects/:projectId/flavors" element={<FlavorsPage />} />
            <Route path="*" element={<NotFoundPage />} />
          </Route>
        </Routes>
      </BrowserRouter>
    </QueryClientProvider>
  );
}
