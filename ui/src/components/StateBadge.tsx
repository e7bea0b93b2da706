import type { AllocationState } from "../api";
import { isTransitional, stateLabel } from "../lib/allocations";

export function StateBadge({ state }: { state: AllocationState }) {
  return (
    <span className={`badge badge-${state}`} data-state={state}>
      {isTransitional(state) && <span className="spinner" aria-hidden="true" />}
      {stateLabel(state)}
    </span>
  );
}
