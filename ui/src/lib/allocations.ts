// The central rules for what a tenant may do with an allocation in each
// state, and how often the console looks again. They follow the API's
// lifecycle (AllocationState::can_become in keel-provisioning): a button
// is offered only when the API would accept it.

import type { AllocationState } from "../api";

export type AllocationAction = "stop" | "start" | "terminate" | "terminal";

const TRANSITIONAL: ReadonlySet<AllocationState> = new Set<AllocationState>([
  "requested",
  "scheduled",
  "provisioning",
  "stopping",
  "starting",
  "terminating",
]);

export function isTransitional(state: AllocationState): boolean {
  return TRANSITIONAL.has(state);
}

export function allowedActions(state: AllocationState): ReadonlySet<AllocationAction> {
  const actions = new Set<AllocationAction>();
  if (state === "running") {
    actions.add("stop");
    actions.add("terminal");
  }
  if (state === "stopped") {
    actions.add("start");
  }
  if (state !== "terminating" && state !== "terminated") {
    actions.add("terminate");
  }
  return actions;
}

/** Poll every second while something is changing, else every 15 s. */
export const FAST_REFRESH_MS = 1_000;
export const SLOW_REFRESH_MS = 15_000;

export function refreshInterval(states: readonly AllocationState[]): number {
  return states.some(isTransitional) ? FAST_REFRESH_MS : SLOW_REFRESH_MS;
}

/** Names the API accepts: DNS-label style, 1–63 characters. */
export function allocationNameProblem(name: string): string | null {
  if (name.length === 0) {
    return "Enter a name.";
  }
  if (name.length > 63) {
    return "Use at most 63 characters.";
  }
  if (!/^[a-z0-9]([a-z0-9-]*[a-z0-9])?$/.test(name)) {
    return "Use lowercase letters, digits and hyphens, starting and ending with a letter or digit.";
  }
  return null;
}

const LABELS: Record<AllocationState, string> = {
  requested: "Requested",
  scheduled: "Scheduled",
  provisioning: "Provisioning",
  running: "Running",
  stopping: "Stopping",
  stopped: "Stopped",
  starting: "Starting",
  terminating: "Terminating",
  terminated: "Terminated",
  failed: "Failed",
  lost: "Lost",
};

export function stateLabel(state: AllocationState): string {
  return LABELS[state];
}
