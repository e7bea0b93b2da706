/** When the data on screen was last fetched. */
export function UpdatedAt({ at, fetching }: { at: number; fetching: boolean }) {
  if (!at) {
    return null;
  }
  return (
    <p className="updated-at" aria-live="off">
      Updated at {new Date(at).toLocaleTimeString()}
      {fetching ? " · refreshing" : ""}
    </p>
  );
}
