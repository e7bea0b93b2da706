import { Link } from "react-router";
import { PageHeading } from "../components/PageHeading";

export function NotFoundPage({ what }: { what?: string }) {
  return (
    <>
      <PageHeading>Not found</PageHeading>
      <p>{what ?? "This page"} does not exist, or you may not see it.</p>
      <p>
        <Link to="/">Back to your projects</Link>
      </p>
    </>
  );
}
