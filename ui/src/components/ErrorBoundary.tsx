import { Component, type ReactNode } from "react";

/** Catches a page that failed to render or load (e.g. its code changed on
 * the server since this tab opened) and offers a reload instead of a
 * blank page. */
export class ErrorBoundary extends Component<{ children: ReactNode }, { failed: boolean }> {
  state = { failed: false };

  static getDerivedStateFromError() {
    return { failed: true };
  }

  render() {
    if (this.state.failed) {
      return (
        <div className="notice notice-error" role="alert">
          <p>
            <strong>This page could not be shown.</strong> Keel may have been updated since you opened it.
          </p>
          <button type="button" className="button" onClick={() => window.location.reload()}>
            Reload the page
          </button>
        </div>
      );
    }
    return this.props.children;
  }
}
