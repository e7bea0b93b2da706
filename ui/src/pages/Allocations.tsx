import { useQuery } from "@tanstack/react-query";
import { Link, useParams } from "react-router";
import { api } from "../api";
import { ErrorNotice } from "../components/ErrorNotice";
import { TableWrap } from "../components/TableWrap";
import { Loading } from "../components/Loading";
import { PageHeading } from "../components/PageHeading";
import { StateBadge } from "../components/StateBadge";
import { UpdatedAt } from "../components/UpdatedAt";
import { refreshInterval } from "../lib/allocations";

export function AllocationsPage() {
  const { projectId = "" } = useParams();
  const allocations = useQuery({
    queryKey: ["allocations", projectId],
    queryFn: () => api.allocations.allocationList({ projectId, limit: 200 }),
    refetchInterval: (query) => refreshInterval((query.state.data?.items ?? []).map((item) => item.state)),
  });
  const items = allocations.data?.items ?? [];
  return (
    <>
      <div className="page-head">
        <PageHeading>Allocations</PageHeading>
        <Link className="button" to={`/projects/${projectId}/allocations/new`}>
          Launch allocation
        </Link>
      </div>
      <UpdatedAt at={allocations.dataUpdatedAt} fetching={allocations.isFetching} />
      {allocations.error && <ErrorNotice error={allocations.error} title="Allocations could not be loaded" />}
      {allocations.isPending && <Loading what="allocations" />}
      {allocations.data && items.length === 0 && (
        <div className="empty">
          <p>No allocations in this project yet.</p>
          <Link to={`/projects/${projectId}/allocations/new`}>Launch your first allocation</Link>
        </div>
      )}
      {items.length > 0 && (
        <TableWrap label="Allocations table">
          <table>
            <caption className="visually-hidden">Allocations of this project</caption>
            <thead>
              <tr>
                <th scope="col">Name</th>
                <th scope="col">State</th>
                <th scope="col">Flavor</th>
                <th scope="col">Region</th>
                <th scope="col">Created</th>
              </tr>
            </thead>
            <tbody>
              {items.map((allocation) => (
                <tr key={allocation.id}>
                  <td>
                    <Link to={`/projects/${projectId}/allocations/${allocation.id}`}>{allocation.name}</Link>
                  </td>
                  <td>
                    <StateBadge state={allocation.state} />
                  </td>
                  <td>{allocation.flavor}</td>
                  <td>{allocation.region}</td>
                  <td>
                    <time dateTime={allocation.createdAt.toISOString()}>{allocation.createdAt.toLocaleString()}</time>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </TableWrap>
      )}
      {allocations.data?.nextCursor && (
        <p className="hint">Showing the first {items.length} allocations.</p>
      )}
    </>
  );
}
