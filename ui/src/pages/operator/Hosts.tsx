import { useMutation, useQuery, useQueryClient } from "@tanstack/react-query";
import { api, getSession, type HostView } from "../../api";
import { ConfirmButton } from "../../components/ConfirmButton";
import { ErrorNotice } from "../../components/ErrorNotice";
import { TableWrap } from "../../components/TableWrap";
import { Loading } from "../../components/Loading";
import { PageHeading } from "../../components/PageHeading";
import { UpdatedAt } from "../../components/UpdatedAt";
import { hostActions, usage, type HostAction } from "../../lib/hosts";

const TRANSITIONAL = new Set(["draining"]);

export function HostsPage() {
  const queryClient = useQueryClient();
  const hosts = useQuery({
    queryKey: ["operator", "hosts"],
    queryFn: () => api.admin.adminHostList({ limit: 200 }),
    refetchInterval: (query) =>
      (query.state.data?.items ?? []).some((host) => TRANSITIONAL.has(host.state)) ? 2_000 : 15_000,
  });
  const act = useMutation({
    mutationFn: ({ host, action }: { host: HostView; action: HostAction }) => {
      const request = { hostId: host.id, ifMatch: `"${host.version}"` };
      switch (action) {
        case "cordon":
          return api.admin.adminHostCordon(request);
        case "uncordon":
          return api.admin.adminHostUncordon(request);
        case "drain":
          return api.admin.adminHostDrain(request);
      }
    },
    onSettled: () => queryClient.invalidateQueries({ queryKey: ["operator", "hosts"] }),
  });
  const items = hosts.data?.items ?? [];
  // A read-only operator looks, and changes nothing.
  const mayChange = getSession()?.operatorRole === "operator";
  return (
    <>
      <PageHeading>Hosts</PageHeading>
      <UpdatedAt at={hosts.dataUpdatedAt} fetching={hosts.isFetching} />
      {hosts.isPending && <Loading what="hosts" />}
      {hosts.error && <ErrorNotice error={hosts.error} title="Hosts could not be loaded" />}
      {act.error && <ErrorNotice error={act.error} title="The host was not changed" />}
      {hosts.data && items.length === 0 && (
        <p className="empty">No hosts yet. Enrol one with a join token (`api join-token`, then `keel-agent join`).</p>
      )}
      {items.length > 0 && (
        <TableWrap label="Hosts table">
          <table>
            <caption className="visually-hidden">Enrolled hosts</caption>
            <thead>
              <tr>
                <th scope="col">Host</th>
                <th scope="col">Region</th>
                <th scope="col">State</th>
                <th scope="col">vCPUs</th>
                <th scope="col">Memory</th>
                <th scope="col">GPUs</th>
                <th scope="col">Last seen</th>
                <th scope="col">Actions</th>
              </tr>
            </thead>
            <tbody>
              {items.map((host) => {
                const actions = mayChange ? hostActions(host.state) : new Set<HostAction>();
                return (
                  <tr key={host.id}>
                    <th scope="row">{host.name}</th>
                    <td>{host.region}</td>
                    <td>
                      <span className={`badge host-${host.state}`}>{host.state}</span>
                    </td>
                    <td>{usage(host.reservedVcpus, host.vcpus)}</td>
                    <td>{usage(Math.round(host.reservedMemoryMib / 1024), Math.round(host.memoryMib / 1024), " GiB")}</td>
                    <td>{host.gpuCount > 0 ? `${usage(host.reservedGpus, host.gpuCount)} ${host.gpuModel ?? ""}` : "—"}</td>
                    <td>{host.lastSeenAt ? host.lastSeenAt.toLocaleString() : "never"}</td>
                    <td className="row-actions">
                      {actions.has("cordon") && (
                        <ConfirmButton
                          label={`Cordon ${host.name}`}
                          text="Cordon"
                          question={`Cordon ${host.name}? Nothing new is placed on it; what runs keeps running.`}
                          confirmLabel="Cordon"
                          disabled={act.isPending}
                          onConfirm={() => act.mutate({ host, action: "cordon" })}
                        />
                      )}
                      {actions.has("drain") && (
                        <ConfirmButton
                          label={`Drain ${host.name}`}
                          text="Drain"
                          question={`Drain ${host.name}? Nothing new is placed on it, and it becomes cordoned once its allocations are gone.`}
                          confirmLabel="Drain"
                          danger
                          disabled={act.isPending}
                          onConfirm={() => act.mutate({ host, action: "drain" })}
                        />
                      )}
                      {actions.has("uncordon") && (
                        <ConfirmButton
                          label={`Uncordon ${host.name}`}
                          text="Uncordon"
                          question={`Uncordon ${host.name}? It takes new allocations again.`}
                          confirmLabel="Uncordon"
                          disabled={act.isPending}
                          onConfirm={() => act.mutate({ host, action: "uncordon" })}
                        />
                      )}
                    </td>
                  </tr>
                );
              })}
            </tbody>
          </table>
        </TableWrap>
      )}
    </>
  );
}
