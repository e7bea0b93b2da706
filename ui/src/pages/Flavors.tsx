import { useQuery } from "@tanstack/react-query";
import { Link, useParams } from "react-router";
import { api } from "../api";
import { ErrorNotice } from "../components/ErrorNotice";
import { TableWrap } from "../components/TableWrap";
import { Loading } from "../components/Loading";
import { PageHeading } from "../components/PageHeading";
import { UpdatedAt } from "../components/UpdatedAt";
import { flavorSummary } from "../lib/flavors";

export function FlavorsPage() {
  const { projectId = "" } = useParams();
  const flavors = useQuery({ queryKey: ["flavors"], queryFn: () => api.inventory.flavorList() });
  const availability = useQuery({
    queryKey: ["availability"],
    queryFn: () => api.inventory.availabilityList(),
    refetchInterval: 15_000,
  });
  const regions = [...new Set((availability.data?.items ?? []).map((item) => item.region))].sort();
  const count = (flavor: string, region: string) =>
    availability.data?.items.find((item) => item.flavor === flavor && item.region === region)?.available ?? 0;
  return (
    <>
      <div className="page-head">
        <PageHeading>Flavors and availability</PageHeading>
        <Link className="button" to={`/projects/${projectId}/allocations/new`}>
          Launch allocation
        </Link>
      </div>
      <UpdatedAt at={availability.dataUpdatedAt} fetching={availability.isFetching} />
      {(flavors.isPending || availability.isPending) && <Loading what="flavors" />}
      {flavors.error && <ErrorNotice error={flavors.error} title="Flavors could not be loaded" />}
      {availability.error && <ErrorNotice error={availability.error} title="Availability could not be loaded" />}
      {flavors.data && flavors.data.items.length === 0 && <p className="empty">No flavors are offered yet.</p>}
      {flavors.data && flavors.data.items.length > 0 && (
        <TableWrap label="Flavors table">
          <table>
            <caption className="visually-hidden">Flavors, and how many of each can launch now per region</caption>
            <thead>
              <tr>
                <th scope="col">Flavor</th>
                <th scope="col">Size</th>
                {regions.map((region) => (
                  <th scope="col" key={region}>
                    Can launch in {region}
                  </th>
                ))}
              </tr>
            </thead>
            <tbody>
              {flavors.data.items.map((flavor) => (
                <tr key={flavor.name}>
                  <th scope="row">{flavor.name}</th>
                  <td>{flavorSummary(flavor)}</td>
                  {regions.map((region) => (
                    <td key={region}>{count(flavor.name, region)}</td>
                  ))}
                </tr>
              ))}
            </tbody>
          </table>
        </TableWrap>
      )}
    </>
  );
}
