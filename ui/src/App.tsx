import { QueryClientProvider } from "@tanstack/react-query";
import { Suspense, lazy, useSyncExternalStore, type ReactNode } from "react";
import { BrowserRouter, Navigate, Route, Routes, useLocation } from "react-router";
import { getSession, sessionEndReason, subscribe, type Session } from "./api";
import { queryClient } from "./queryClient";
import { Layout } from "./components/Layout";
import { AllocationDetailPage } from "./pages/AllocationDetail";
import { AllocationsPage } from "./pages/Allocations";
import { AuditPage } from "./pages/Audit";
import { BillingPage } from "./pages/Billing";
import { InvoiceDetailPage } from "./pages/InvoiceDetail";
import { FlavorsPage } from "./pages/Flavors";
import { HomePage } from "./pages/Home";
import { LaunchPage } from "./pages/Launch";
import { LoginPage } from "./pages/Login";
import { MembersPage } from "./pages/Members";
import { NotFoundPage } from "./pages/NotFound";
import { HostsPage } from "./pages/operator/Hosts";
import { OperatorLayout } from "./pages/operator/OperatorLayout";
import { OperatorLoginPage } from "./pages/operator/OperatorLogin";
import { TenantsPage } from "./pages/operator/Tenants";
import { ServiceAccountsPage } from "./pages/ServiceAccounts";
import { SignupPage } from "./pages/Signup";
import { Loading } from "./components/Loading";

// The terminal emulator is most of the console's code: loaded when needed.
const TerminalPage = lazy(() => import("./pages/Terminal").then((module) => ({ default: module.TerminalPage })));

export function useSession() {
  return useSyncExternalStore(subscribe, getSession);
}

/** Pages behind sign-in: without a session of the right kind (a tenant
 * user's or an operator's), to that login page and back, told when the
 * session ended by itself. */
function RequireSession({ audience, children }: { audience: Session["audience"]; children: ReactNode }) {
  const session = useSession();
  const location = useLocation();
  if (session?.audience !== audience) {
    const next = encodeURIComponent(location.pathname + location.search);
    const login = audience === "operator" ? "/operator/login" : "/login";
    const expired = !session && sessionEndReason() === "expired" ? "&expired=1" : "";
    return <Navigate to={`${login}?next=${next}${expired}`} replace />;
  }
  return children;
}

export function App() {
  return (
    <QueryClientProvider client={queryClient}>
      <BrowserRouter>
        <Routes>
          <Route path="/login" element={<LoginPage />} />
          <Route path="/signup" element={<SignupPage />} />
          <Route path="/operator/login" element={<OperatorLoginPage />} />
          <Route
            path="/operator"
            element={
              <RequireSession audience="operator">
                <OperatorLayout />
              </RequireSession>
            }
          >
            <Route index element={<Navigate to="/operator/hosts" replace />} />
            <Route path="hosts" element={<HostsPage />} />
            <Route path="tenants" element={<TenantsPage />} />
            <Route path="*" element={<NotFoundPage />} />
          </Route>
          <Route
            element={
              <RequireSession audience="tenant">
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
            <Route path="projects/:projectId/service-accounts" element={<ServiceAccountsPage />} />
            <Route path="members" element={<MembersPage />} />
            <Route path="audit" element={<AuditPage />} />
            <Route path="billing" element={<BillingPage />} />
            <Route path="billing/invoices/:invoiceId" element={<InvoiceDetailPage />} />
            <Route path="*" element={<NotFoundPage />} />
          </Route>
        </Routes>
      </BrowserRouter>
    </QueryClientProvider>
  );
}
