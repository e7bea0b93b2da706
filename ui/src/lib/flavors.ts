import type { FlavorView } from "../api";

/** "2 vCPU · 4 GiB · 1× A100 · 50 GiB disk" */
export function flavorSummary(flavor: FlavorView): string {
  const memory =
    flavor.memoryMib % 1024 === 0 ? `${flavor.memoryMib / 1024} GiB` : `${flavor.memoryMib} MiB`;
  const parts = [`${flavor.vcpus} vCPU`, memory];
  if (flavor.gpuCount > 0) {
    parts.push(`${flavor.gpuCount}× ${flavor.gpuModel ?? "GPU"}`);
  }
  parts.push(`${flavor.diskGib} GiB disk`);
  return parts.join(" · ");
}
