import { useInfiniteQuery } from "@tanstack/react-query";
import { api } from "../../api";
import { ErrorNotice } from "../../components/ErrorNotice";
import { TableWrap } from "../../components/TableWrap";
import { Loading } from "../../components/Loading";
import { PageHeading } from "../../components/PageHeading";

export function TenantsPage() {
  const tenants = useInfiniteQuery({
    queryKey: ["operator", "tenants"],
    queryFn: ({ pageParam }) => api.admin.adminTenantList({ limit: 100, cursor: pageParam }),
    initialPageParam: undefined as string | undefined,
    getNextPageParam: (page) => page.nextCursor ?? undefined,
  });
  const items = tenants.data?.pages.flatMap((page) => page.items) ?? [];
  return (
    <>
      <PageHeading>Tenants</PageHeading>
      {tenants.isPending && <Loading what="tenants" />}
      {tenants.error && <ErrorNotice error={tenants.error} title="Tenants could not be loaded" />}
      {tenants.data && items.length === 0 && <p className="empty">No tenants yet.</p>}
      {items.length > 0 && (
        <TableWrap label="Tenants table">
          <table>
            <caption className="visually-hidden">Tenants of this platform</caption>
            <thead>
              <tr>
                <th scope="col">Name</th>
                <th scope="col">Members</th>
                <th scope="col">Projects</th>
                <th scope="col">Created</th>
                <th scope="col">Id</th>
              </tr>
            </thead>
            <tbody>
              {items.map((tenant) => (
                <tr key={tenant.id}>
                  <th scope="row">{tenant.name}</th>
                  <td>{tenant.members}</td>
                  <td>{tenant.projects}</td>
                  <td>{tenant.createdAt.toLocaleDateString()}</td>
                  <td>
                    <code>{tenant.id}</code>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </TableWrap>
      )}
      {tenants.hasNextPage && (
        <div className="actions">
          <button type="button" className="button secondary" disabled={tenants.isFetchingNextPage} onClick={() => void tenants.fetchNextPage()}>
            {tenants.isFetchingNextPage ? "Loading…" : "Load more"}
          </button>
        </div>
      )}
    </>
  );
}
