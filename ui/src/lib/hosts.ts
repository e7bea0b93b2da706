// What an operator may do with a host in each state, mirroring the API
// (keel-inventory `hosts`): cordon stops new placements, drain also waits
// for the host to empty (then it becomes cordoned), uncordon takes work
// again. On an offline host an action sets the state it returns in.

export type HostAction = "cordon" | "uncordon" | "drain";

export function hostActions(state: string): ReadonlySet<HostAction> {
  switch (state) {
    case "ready":
      return new Set<HostAction>(["cordon", "drain"]);
    case "cordoned":
      return new Set<HostAction>(["uncordon", "drain"]);
    case "draining":
      return new Set<HostAction>(["uncordon", "cordon"]);
    case "offline":
      return new Set<HostAction>(["cordon", "uncordon", "drain"]);
    default:
      return new Set<HostAction>();
  }
}

/** "3 / 8" with the unit, for a used-of-total column. */
export function usage(used: number, total: number, unit = ""): string {
  return `${used} / ${total}${unit}`;
}
