import { useEffect, useRef, type ReactNode } from "react";

/** The page's h1; takes the focus when the page opens, so keyboard and
 * screen-reader users start at the top of the new page. */
export function PageHeading({ children }: { children: ReactNode }) {
  const heading = useRef<HTMLHeadingElement>(null);
  useEffect(() => {
    heading.current?.focus();
  }, []);
  return (
    <h1 ref={heading} tabIndex={-1}>
      {children}
    </h1>
  );
}
