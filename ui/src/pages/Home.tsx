import { useQuery } from "@tanstack/react-query";
import { Navigate } from "react-router";
import { api } from "../api";
import { ErrorNotice } from "../components/ErrorNotice";
import { Loading } from "../components/Loading";
import { PageHeading } from "../components/PageHeading";

/** Opens the first project's allocations. */
export function HomePage() {
  const projects = useQuery({
    queryKey: ["projects"],
    queryFn: () => api.projects.projectList({ limit: 200 }),
  });
  if (projects.data?.items[0]) {
    return <Navigate to={`/projects/${projects.data.items[0].id}/allocations`} replace />;
  }
  return (
    <>
      <PageHeading>Welcome to Keel</PageHeading>
      {projects.isPending && <Loading what="your projects" />}
      {projects.error && <ErrorNotice error={projects.error} />}
      {projects.data && <p className="empty">You have no project you may see yet. Ask an owner of your organisation.</p>}
    </>
  );
}
