import { useQuery } from "@tanstack/react-query";
import { NavLink, Outlet, useLocation, useNavigate, useParams } from "react-router";
import { api, logOut } from "../api";
import { ErrorBoundary } from "./ErrorBoundary";
import { ErrorNotice } from "./ErrorNotice";

/** The frame of every signed-in page: project switcher, navigation, sign out. */
export function Layout() {
  const { projectId } = useParams();
  const navigate = useNavigate();
  const location = useLocation();
  const projects = useQuery({
    queryKey: ["projects"],
    queryFn: () => api.projects.projectList({ limit: 200 }),
  });

  const switchProject = (next: string) => {
    // The same page in the other project (its list, not one of this
    // project's allocations).
    const section = location.pathname.split("/")[3] ?? "allocations";
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
        {projects.data && projectId && (
          <label className="switcher">
            <span>Project</span>
            <select value={projectId} onChange={(event) => switchProject(event.target.value)}>
              {projects.data.items.map((project) => (
                <option key={project.id} value={project.id}>
                  {project.name}
                </option>
              ))}
            </select>
          </label>
        )}
        {projectId && (
          <nav aria-label="Main">
            <NavLink to={`/projects/${projectId}/allocations`}>Allocations</NavLink>
            <NavLink to={`/projects/${projectId}/flavors`}>Flavors</NavLink>
          </nav>
        )}
        <button
          type="button"
          className="button secondary signout"
          onClick={async () => {
            await logOut();
            navigate("/login");
          }}
        >
          Sign out
        </button>
      </header>
      {projects.error && <ErrorNotice error={projects.error} title="Projects could not be loaded" />}
      <main id="main">
        <ErrorBoundary key={location.pathname}>
          <Outlet />
        </ErrorBoundary>
      </main>
    </div>
  );
}
