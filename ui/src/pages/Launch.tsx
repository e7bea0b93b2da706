import { useMutation, useQuery, useQueryClient } from "@tanstack/react-query";
import { useState, type FormEvent } from "react";
import { Link, useNavigate, useParams } from "react-router";
import { api, newIdempotencyKey, toApiError } from "../api";
import { ErrorNotice } from "../components/ErrorNotice";
import { Loading } from "../components/Loading";
import { PageHeading } from "../components/PageHeading";
import { allocationNameProblem } from "../lib/allocations";
import { flavorSummary } from "../lib/flavors";

export function LaunchPage() {
  const { projectId = "" } = useParams();
  const navigate = useNavigate();
  const queryClient = useQueryClient();
  const flavors = useQuery({ queryKey: ["flavors"], queryFn: () => api.inventory.flavorList() });
  const regions = useQuery({ queryKey: ["regions"], queryFn: () => api.inventory.regionList() });
  const availability = useQuery({
    queryKey: ["availability"],
    queryFn: () => api.inventory.availabilityList(),
    refetchInterval: 15_000,
  });

  const [name, setName] = useState("");
  const [flavor, setFlavor] = useState("");
  const [region, setRegion] = useState("");
  const [touched, setTouched] = useState(false);
  // One key per submission: a double click or a retry of the same form
  // makes one allocation; a new key once it was created.
  const [idempotencyKey, setIdempotencyKey] = useState(newIdempotencyKey);

  const chosenFlavor = flavor || flavors.data?.items[0]?.name || "";
  const chosenRegion = region || regions.data?.items[0]?.name || "";
  const available = availability.data?.items.find(
    (item) => item.flavor === chosenFlavor && item.region === chosenRegion,
  )?.available;

  const launch = useMutation({
    mutationFn: () =>
      api.allocations.allocationCreate({
        projectId,
        idempotencyKey,
        newAllocation: { name, flavor: chosenFlavor, region: chosenRegion },
      }),
    onSuccess: (allocation) => {
      setIdempotencyKey(newIdempotencyKey());
      void queryClient.invalidateQueries({ queryKey: ["allocations", projectId] });
      navigate(`/projects/${projectId}/allocations/${allocation.id}`);
    },
  });
  const nameProblem = allocationNameProblem(name);
  const serverProblem = launch.error ? toApiError(launch.error) : null;
  const nameMessage = (touched && nameProblem) || serverProblem?.fieldMessage("name");

  const submit = (event: FormEvent) => {
    event.preventDefault();
    setTouched(true);
    if (!nameProblem && !launch.isPending) {
      launch.mutate();
    }
  };

  return (
    <>
      <PageHeading>Launch an allocation</PageHeading>
      {(flavors.isPending || regions.isPending) && <Loading what="flavors and regions" />}
      {flavors.error && <ErrorNotice error={flavors.error} title="Flavors could not be loaded" />}
      {regions.error && <ErrorNotice error={regions.error} title="Regions could not be loaded" />}
      {flavors.data && regions.data && (
        <form className="form" onSubmit={submit} noValidate>
          <label>
            Name
            <input
              name="name"
              value={name}
              maxLength={100}
              required
              aria-invalid={Boolean(nameMessage)}
              aria-describedby="name-help"
              onChange={(event) => setName(event.target.value)}
              onBlur={() => setTouched(true)}
            />
          </label>
          <p id="name-help" className={nameMessage ? "field-error" : "hint"}>
            {nameMessage || "Lowercase letters, digits and hyphens; up to 63 characters."}
          </p>
          <label>
            Flavor
            <select name="flavor" value={chosenFlavor} onChange={(event) => setFlavor(event.target.value)}>
              {flavors.data.items.map((item) => (
                <option key={item.name} value={item.name}>
                  {item.name} — {flavorSummary(item)}
                </option>
              ))}
            </select>
          </label>
          {serverProblem?.fieldMessage("flavor") && <p className="field-error">{serverProblem.fieldMessage("flavor")}</p>}
          <label>
            Region
            <select name="region" value={chosenRegion} onChange={(event) => setRegion(event.target.value)}>
              {regions.data.items.map((item) => (
                <option key={item.name} value={item.name}>
                  {item.name}
                </option>
              ))}
            </select>
          </label>
          <p className="hint" aria-live="polite">
            {available === undefined
              ? "Availability unknown."
              : available === 0
                ? "None of this flavor can launch in this region right now."
                : `${available} can launch in this region now.`}
          </p>
          {launch.error && <ErrorNotice error={launch.error} title="The allocation was not launched" />}
          <div className="actions">
            <Link className="button secondary" to={`/projects/${projectId}/allocations`}>
              Cancel
            </Link>
            <button type="submit" className="button" disabled={launch.isPending}>
              {launch.isPending ? "Launching…" : "Launch"}
            </button>
          </div>
        </form>
      )}
    </>
  );
}
