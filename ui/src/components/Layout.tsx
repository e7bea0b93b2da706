import { useMutation, useQuery } from "@tanstack/react-query";
import { NavLink, Outlet, useLocation, useNavigate, useParams } from "react-router";
import { api, logOut, switchTenant } from "../api";
import { useSessionInfo } from "../hooks/useSessionInfo";
import { canAdminister } from "../lib/permissions";
import { queryClient } from "../queryClient";
import { ErrorBoundary } from "./ErrorBoundary";
import { ErrorNotice } from "./ErrorNotice";

/** The frame of every signed-in page: organisation and project switchers,
 * navigation, who is signed in, sign out. */
/** The project last opened: organisation-wide pages (members) keep the
 * project navigation pointing at it. */
let lastProject: string | undefined;

export function Layout() {
  const { projectId: routeProject } = useParams();
  const navigate = useNavigate();
  const location = useLocation();
  const projects = useQuery({
    queryKey: ["projects"],
    queryFn: () => api.projects.projectList({ limit: 200 }),
  });
  const known = (id: string | undefined) => projects.data?.items.some((project) => project.id === id);
  if (routeProject) {
    lastProject = routeProject;
  }
  const projectId = routeProject ?? (known(lastProject) ? lastProject : projects.data?.items[0]?.id);

  const session = useSessionInfo();
  const switchOrganisation = useMutation({
    mutationFn: (tenantId: string) => switchTenant(tenantId),
    onSuccess: () => {
      // Everything on screen belonged to the other organisation.
      queryClient.clear();
      navigate("/");
    },
  });

  const switchProject = (next: string) => {
    // The same page in the other project (its list, not one of this
    // project's allocations).
    const section = routeProject ? (location.pathname.split("/")[3] ?? "allocations") : "allocations";
    navigate(`/projects/${next}/${section}`);
  };

  return (
    <div className="shell">
      <a href="#main" className="skip-link">
        Skip to content
      </a>
      <header className="topbar">
        <NavLink to="/" className="brand">
          Keel
        </NavLink>
        {session.data && session.data.tenants.length > 1 && (
          <div className="switcher">
            <label htmlFor="organisation-switcher">Organisation</label>
            <select
              id="organisation-switcher"
              value={session.data.tenantId}
              disabled={switchOrganisation.isPending}
              onChange={(event) => switchOrganisation.mutate(event.target.value)}
            >
              {session.data.tenants.map((tenant) => (
                <option key={tenant.tenantId} value={tenant.tenantId}>
                  {tenant.name}
                </option>
              ))}
            </select>
          </div>
        )}
        {session.data && session.data.tenants.length <= 1 && (
          <span className="organisation">{session.data.tenantName}</span>
        )}
        {projects.data && projectId && (
          <div className="switcher">
            <label htmlFor="project-switcher">Project</label>
            <select id="project-switcher" value={projectId} onChange={(event) => switchProject(event.target.value)}>
              {projects.data.items.map((project) => (
                <option key={project.id} value={project.id}>
                  {project.name}
                </option>
              ))}
            </select>
          </div>
        )}
        {projectId && (
          <nav aria-label="Main">
            <NavLink to={`/projects/${projectId}/allocations`}>Allocations</NavLink>
            <NavLink to={`/projects/${projectId}/flavors`}>Flavors</NavLink>
            <NavLink to={`/projects/${projectId}/service-accounts`}>Service accounts</NavLink>
            <NavLink to="/members">Members</NavLink>
            {canAdminister(session.data?.role) && <NavLink to="/audit">Audit log</NavLink>}
            {canAdminister(session.data?.role) && <NavLink to="/billing">Billing</NavLink>}
          </nav>
        )}
        <div className="account">
          {session.data && (
            <span className="whoami">
              {session.data.email} · {session.data.role}
            </span>
          )}
          <button
            type="button"
            className="button secondary"
            onClick={async () => {
              await logOut();
              navigate("/login");
            }}
          >
            Sign out
          </button>
        </div>
      </header>
      {projects.error && <ErrorNotice error={projects.error} title="Projects could not be loaded" />}
      {switchOrganisation.error && (
        <ErrorNotice error={switchOrganisation.error} title="Could not switch organisation" />
      )}
      <main id="main">
        <ErrorBoundary key={location.pathname}>
          <Outlet />
        </ErrorBoundary>
      </main>
    </div>
  );
}
