import { describe, expect, it } from "vitest";
import { flavorSummary } from "./flavors";

describe("flavorSummary", () => {
  it("names CPU, memory, GPUs and disk", () => {
    expect(
      flavorSummary({ name: "gpu.a100", vcpus: 8, memoryMib: 65536, gpuCount: 1, gpuModel: "A100", diskGib: 100, resourceName: "" }),
    ).toBe("8 vCPU · 64 GiB · 1× A100 · 100 GiB disk");
    expect(
      flavorSummary({ name: "cpu.tiny", vcpus: 1, memoryMib: 512, gpuCount: 0, gpuModel: null, diskGib: 10, resourceName: "" }),
    ).toBe("1 vCPU · 512 MiB · 10 GiB disk");
  });
});
