import { NavLink, Outlet, useLocation, useNavigate } from "react-router";
import { logOut } from "../../api";
import { ErrorBoundary } from "../../components/ErrorBoundary";

/** The frame of the operator console. */
export function OperatorLayout() {
  const navigate = useNavigate();
  const location = useLocation();
  return (
    <div className="shell">
      <a href="#main" className="skip-link">
        Skip to content
      </a>
      <header className="topbar operator">
        <NavLink to="/operator/hosts" className="brand">
          Keel operations
        </NavLink>
        <nav aria-label="Operations">
          <NavLink to="/operator/hosts">Hosts</NavLink>
          <NavLink to="/operator/tenants">Tenants</NavLink>
        </nav>
        <div className="account">
          <button
            type="button"
            className="button secondary"
            onClick={async () => {
              await logOut();
              navigate("/operator/login");
            }}
          >
            Sign out
          </button>
        </div>
      </header>
      <main id="main">
        <ErrorBoundary key={location.pathname}>
          <Outlet />
        </ErrorBoundary>
      </main>
    </div>
  );
}
